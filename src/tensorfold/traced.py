"""The forward under ``torch.compile`` / ``torch.export``: constant plans run as einsums.

Dynamo cannot trace the planner (opt_einsum, lru_cache) nor call the compiled plan
objects. So while tracing, the same cached plan and the same ``'auto'`` choice
(:func:`tensorfold.choice.choose`, nothing cached) are looked up in a function Dynamo runs
once and bakes in as a constant (its arguments are shapes and names, which Dynamo guards),
and they come back as plain ``(positions, einsum equation)`` pairs run with
``torch.einsum``; the compiler then fuses and lowers them itself.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import opt_einsum
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.fx.experimental.symbolic_shapes import has_static_value

from .choice import _mode_sizes, choose, layer_program
from .contraction import ContractionPlan, Network, batch_bucket
from .errors import ShapeError

__all__ = ["traced_linear", "traced_weight"]

_SYMBOLIC_BUCKET = 64  # the batch bucket planned for when the row count is symbolic

_Steps = tuple[tuple[tuple[int, ...], str], ...]  # (operand positions, einsum) per pairwise step


def _pairwise_steps(plan: ContractionPlan) -> _Steps:
    if not plan.path:  # a single operand
        return (((0,), plan.equation),)
    lhs = plan.equation.partition("->")[0].split(",")
    shapes = [tuple(1 for _ in sub) for sub in lhs]  # the order only; sizes do not matter here
    _, info = opt_einsum.contract_path(
        plan.equation, *shapes, shapes=True, optimize=list(plan.path)
    )
    return tuple((tuple(step[0]), step[2]) for step in info.contraction_list)


@torch.compiler.assume_constant_result
def _traced_route(
    labels: tuple[tuple[str, ...], str, str],
    shapes: tuple[tuple[int, ...], ...],
    bucket: int,
    device_type: str,
    itemsize: int,
    implementation: str,
    grad: bool,
) -> tuple[str, _Steps, _Steps, tuple[tuple[int, ...], tuple[int, ...]], int]:
    # The network arrives as plain tuples: Dynamo in torch 2.11 cannot rebuild a frozen
    # dataclass to pass it to an eagerly run function (seen on the GPU image).
    program = layer_program(Network(*labels), shapes, bucket, device_type, itemsize)
    if implementation == "auto":
        implementation = choose(program, frozenset(), grad).path
    split = program.split
    if implementation == "split" and split is not None:
        sides = (split.down_factors, split.up_factors)
        return "split", _pairwise_steps(split.down), _pairwise_steps(split.up), sides, split.rank
    plan = program.forward if implementation == "factorized" else program.rebuild
    return implementation, _pairwise_steps(plan), (), ((), ()), 0


def _labels(network: Network) -> tuple[tuple[str, ...], str, str]:
    return (network.subscripts, network.out_labels, network.in_labels)


def _run_steps(steps: _Steps, operands: Sequence[Tensor]) -> Tensor:
    ops = list(operands)
    for positions, equation in steps:
        picked = [ops[p] for p in positions]
        ops = [op for k, op in enumerate(ops) if k not in positions]
        ops.append(torch.einsum(equation, *picked))
    return ops[0]


def traced_weight(factors: Sequence[Tensor], network: Network) -> Tensor:
    """:func:`tensorfold.functional.reconstruct_weight` while tracing."""
    f0 = factors[0]
    shapes = tuple(tuple(f.shape) for f in factors)
    _, steps, _, _, _ = _traced_route(
        _labels(network), shapes, 1, f0.device.type, f0.dtype.itemsize, "reconstructed", False
    )
    out_modes, in_modes = _mode_sizes(network, shapes)
    return _run_steps(steps, factors).reshape(math.prod(out_modes), math.prod(in_modes))


def traced_linear(
    x: Tensor, factors: Sequence[Tensor], network: Network, bias: Tensor | None, implementation: str
) -> Tensor:
    """:func:`tensorfold.functional.factorized_linear` while tracing (no lean backward)."""
    shapes = tuple(tuple(f.shape) for f in factors)
    out_modes, in_modes = _mode_sizes(network, shapes)
    n_in, n_out = math.prod(in_modes), math.prod(out_modes)
    if x.ndim == 0 or x.shape[-1] != n_in:
        width = x.shape[-1] if x.ndim else "a scalar"
        raise ShapeError(f"input has last dimension {width}, but the layer has in_features={n_in}")
    lead = x.shape[:-1]
    rows = 1
    for d in lead:  # not math.prod: Dynamo would specialise a symbolic batch to a constant
        rows = rows * d
    # A symbolic row count (dynamic batch) plans for a fixed bucket: computing its bucket
    # would specialise it. (Under Dynamo even a symbolic size passes isinstance(_, int).)
    bucket = batch_bucket(rows) if has_static_value(rows) else _SYMBOLIC_BUCKET
    f0 = factors[0]
    grad = torch.is_grad_enabled() and any(f.requires_grad for f in factors)
    implementation, steps, up_steps, sides, rank = _traced_route(
        _labels(network), shapes, bucket, f0.device.type, f0.dtype.itemsize, implementation, grad
    )
    if implementation == "split":
        down = _run_steps(steps, [factors[k] for k in sides[0]]).reshape(rank, n_in)
        up = _run_steps(up_steps, [factors[k] for k in sides[1]]).reshape(n_out, rank)
        return F.linear(F.linear(x, down), up, bias)
    if implementation == "reconstructed":
        return F.linear(x, _run_steps(steps, factors).reshape(n_out, n_in), bias)
    y = _run_steps(steps, (x.reshape(rows, *in_modes), *factors)).reshape(*lead, n_out)
    return y if bias is None else y + bias.to(y.dtype)
