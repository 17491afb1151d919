"""Pure-tensor forms of a factorized linear layer: tensors in, tensor out.

No modules, no state beyond the plan caches of :mod:`tensorfold.contraction`, no I/O.
``network`` (a :class:`~tensorfold.contraction.Network`) says how the factors contract;
each format provides one (``tensorfold.formats.get_format(name).network_for(n_out, n_in)``).

Everything that depends only on shapes (the contraction orders of the forward and
of the reconstruction, their costs, the ``'auto'`` choice) is computed once per
``(network, factor shapes, batch bucket, device type, dtype)`` and cached; a call
looks it up and runs a fixed list of ``mm``/``bmm`` kernels.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

import opt_einsum
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.fx.experimental.symbolic_shapes import has_static_value

from .contraction import ContractionPlan, Network, batch_bucket, contraction_plan, cost_model
from .errors import FactorizationError, ImplementationError, ShapeError

__all__ = [
    "IMPLEMENTATIONS",
    "check_implementation",
    "reconstruct_weight",
    "factorized_linear",
    "choose_implementation",
    "layer_program",
    "LayerProgram",
    "SplitProgram",
    "split_weight",
]

IMPLEMENTATIONS = ("factorized", "reconstructed", "auto")

# A training step costs about three forward passes on every path (forward, then
# gradients for the input and for the weights), so the forward costs decide 'auto'
# in training too; the lean backward of the factorized path recomputes its forward.
_LEAN_RECOMPUTE = 4.0 / 3.0
# With a reusable weight the dense GEMM is the safe side (exactly nn.Linear's speed):
# the factorized path must be predicted clearly faster to be taken. A cached split pair
# is two plain GEMMs, which the model prices well (CP 1% at 4096x4096: predicted 0.85x
# dense, measured 0.85-0.88x), so it needs a smaller margin.
_CACHED_MARGIN = 1.25
_SPLIT_MARGIN = 1.1
# Without a reusable weight, a near tie also goes to rebuild + GEMM: one large GEMM runs
# nearer the machine's peak than the model credits, and in every near tie measured
# (CP 10% at >= 1024 rows, model within 1%; TT-matrix) the rebuild won by 2-9%.
_REBUILD_MARGIN = 1.1


def check_implementation(implementation: object) -> str:
    """Return the canonical implementation name or raise a clear error."""
    name = implementation.lower() if isinstance(implementation, str) else implementation
    if name not in IMPLEMENTATIONS:
        raise ImplementationError(
            f"implementation={implementation!r} is not one of {', '.join(map(repr, IMPLEMENTATIONS))}"
        )
    return str(name)


@dataclass(frozen=True)
class LayerProgram:
    """Everything shape-dependent about one layer at one batch bucket, computed once.

    Attributes:
        in_features, out_features: the layer's widths.
        rows: the batch bucket (row count) everything was planned and priced for.
        in_modes: the input's tensorized shape (for the reshape into the network).
        forward: the plan contracting ``x[Z, in_modes]`` with the factors.
        rebuild: the plan rebuilding ``W`` (no intermediate larger than ``W``).
        split: ``W = up @ down`` at the network's narrowest cut, or None (TT-matrix).
        t_factorized, t_rebuild, t_gemm, t_split: cost-model seconds of the factorized
            forward, of rebuilding ``W``, of the dense GEMM and of the two thin GEMMs
            with a cached split (inf without one), at the bucket's row count.
        choice: ``'factorized'`` or ``'reconstructed'`` when ``W`` must be rebuilt.
        choice_cached: what runs when rebuilt operands can be reused (inference):
            ``'factorized'``, ``'reconstructed'`` (a cached ``W``) or ``'split'`` (a
            cached ``(down, up)`` pair).
    """

    in_features: int
    out_features: int
    rows: int
    in_modes: tuple[int, ...]
    forward: ContractionPlan
    rebuild: ContractionPlan
    split: SplitProgram | None
    t_factorized: float
    t_rebuild: float
    t_gemm: float
    t_split: float
    choice: str
    choice_cached: str

    def flops(self, path: str) -> int:
        """FLOPs of one call of ``path`` (a :attr:`choice_cached` value) on ``rows`` rows.

        A cached operand is free; ``'reconstructed'`` counts the GEMM only.
        """
        if path == "factorized":
            return self.forward.flops
        if path == "split" and self.split is not None:
            return 2 * self.rows * self.split.rank * (self.in_features + self.out_features)
        return 2 * self.rows * self.in_features * self.out_features


def _mode_sizes(
    network: Network, shapes: tuple[tuple[int, ...], ...]
) -> tuple[list[int], list[int]]:
    sizes = network.sizes(shapes)
    return [sizes[c] for c in network.out_labels], [sizes[c] for c in network.in_labels]


@lru_cache(maxsize=4096)
def _rebuild_plan(
    network: Network, shapes: tuple[tuple[int, ...], ...], device_type: str, itemsize: int
) -> ContractionPlan:
    out_modes, in_modes = _mode_sizes(network, shapes)
    numel = math.prod(out_modes) * math.prod(in_modes)
    return contraction_plan(network.weight_equation(), shapes, numel, device_type, itemsize)


@dataclass(frozen=True)
class SplitProgram:
    """``W = up @ down`` at the narrowest cut between input and output modes.

    With parameters that do not change (inference), ``down (rank, in)`` and
    ``up (out, rank)`` are rebuilt once and every call is two thin GEMMs,
    ``2 rows rank (in + out)`` FLOPs: a TT layer's middle bond, a Tucker core's
    smaller side, a CP rank.

    Attributes:
        rank: the product of the crossing bonds' sizes.
        down_factors, up_factors: factor positions on the input and output side.
        down, up: plans contracting each side to ``cut + in`` and ``out + cut`` labels.
    """

    rank: int
    down_factors: tuple[int, ...]
    up_factors: tuple[int, ...]
    down: ContractionPlan
    up: ContractionPlan

    def __call__(self, factors: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
        down = self.down(*[factors[k] for k in self.down_factors])
        up = self.up(*[factors[k] for k in self.up_factors])
        return down.reshape(self.rank, -1), up.reshape(-1, self.rank)


@lru_cache(maxsize=4096)
def _split_program(
    network: Network, shapes: tuple[tuple[int, ...], ...], device_type: str, itemsize: int
) -> SplitProgram | None:
    cut = network.narrowest_cut(shapes)
    if cut is None:
        return None
    down_factors, up_factors, labels = cut
    sizes = network.sizes(shapes)
    rank = math.prod(sizes[c] for c in labels)
    out_modes, in_modes = _mode_sizes(network, shapes)

    def side(positions: tuple[int, ...], output: str, numel: int) -> ContractionPlan:
        equation = ",".join(network.subscripts[k] for k in positions) + "->" + output
        return contraction_plan(
            equation, tuple(shapes[k] for k in positions), numel, device_type, itemsize
        )

    down = side(down_factors, labels + network.in_labels, rank * math.prod(in_modes))
    up = side(up_factors, network.out_labels + labels, rank * math.prod(out_modes))
    return SplitProgram(rank, down_factors, up_factors, down, up)


@lru_cache(maxsize=8192)
def layer_program(
    network: Network,
    shapes: tuple[tuple[int, ...], ...],
    bucket: int,
    device_type: str = "cpu",
    itemsize: int = 4,
) -> LayerProgram:
    """The cached :class:`LayerProgram` for a layer's factor shapes and a batch bucket."""
    shapes = tuple(tuple(int(d) for d in s) for s in shapes)
    out_modes, in_modes = _mode_sizes(network, shapes)
    n_in, n_out = math.prod(in_modes), math.prod(out_modes)
    forward = contraction_plan(
        network.forward_equation(), ((bucket, *in_modes), *shapes), None, device_type, itemsize
    )
    rebuild = _rebuild_plan(network, shapes, device_type, itemsize)
    model = cost_model(device_type)
    t_gemm = model.gemm(bucket, n_in, n_out, itemsize)
    # The factorized path also pays the reshape of x and (maybe) of y.
    t_fact = forward.cost_s + model.launch_s
    t_rebuild = rebuild.cost_s
    choice = "factorized" if t_fact * _REBUILD_MARGIN <= t_rebuild + t_gemm else "reconstructed"
    split = _split_program(network, shapes, device_type, itemsize)
    t_split = math.inf
    if split is not None:
        t_split = model.gemm(bucket, n_in, split.rank, itemsize) + model.gemm(
            bucket, split.rank, n_out, itemsize
        )
    # With cached operands (inference): the cheaper thin path, if clearly cheaper than the
    # dense GEMM. Priced with cold caches, as a layer between other layers runs: then every
    # kernel call costs more, and a chain of many kernels pays most (Tucker 1%, 1024x1024,
    # 32 rows: its 8-kernel chain and the split were priced equal hot, and the split ran
    # 2.2x faster; benchmarks/ab_inference_choice.py).
    cold = model.cold_call_s
    cold_fact = t_fact + (forward.n_kernels + 1) * cold
    cold_split = t_split + 2 * cold
    cold_gemm = t_gemm + cold
    if cold_split <= cold_fact:
        choice_cached = "split" if cold_split * _SPLIT_MARGIN <= cold_gemm else "reconstructed"
    else:
        choice_cached = "factorized" if cold_fact * _CACHED_MARGIN <= cold_gemm else "reconstructed"
    return LayerProgram(
        n_in,
        n_out,
        bucket,
        tuple(in_modes),
        forward,
        rebuild,
        split,
        t_fact,
        t_rebuild,
        t_gemm,
        t_split,
        choice,
        choice_cached,
    )


def _program(factors: Sequence[Tensor], network: Network, rows: int) -> LayerProgram:
    f0 = factors[0]
    return layer_program(
        network,
        tuple(tuple(f.shape) for f in factors),
        batch_bucket(rows),
        f0.device.type,
        f0.element_size(),
    )


# ---- under torch.compile / torch.export ------------------------------------------------
# Dynamo cannot trace the planner (opt_einsum, lru_cache) nor call the compiled plan
# objects. So while tracing, the same cached plan is looked up in a function Dynamo runs
# once and bakes in as a constant (its arguments are shapes and names, which Dynamo
# guards), and it comes back as plain ``(positions, einsum equation)`` pairs run with
# ``torch.einsum``; the compiler then fuses and lowers them itself.
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
) -> tuple[str, _Steps]:
    # The network arrives as plain tuples: Dynamo in torch 2.11 cannot rebuild a frozen
    # dataclass to pass it to an eagerly run function (seen on the GPU image).
    program = layer_program(Network(*labels), shapes, bucket, device_type, itemsize)
    if implementation == "auto":
        implementation = program.choice
    plan = program.forward if implementation == "factorized" else program.rebuild
    return implementation, _pairwise_steps(plan)


def _labels(network: Network) -> tuple[tuple[str, ...], str, str]:
    return (network.subscripts, network.out_labels, network.in_labels)


def _run_steps(steps: _Steps, operands: Sequence[Tensor]) -> Tensor:
    ops = list(operands)
    for positions, equation in steps:
        picked = [ops[p] for p in positions]
        ops = [op for k, op in enumerate(ops) if k not in positions]
        ops.append(torch.einsum(equation, *picked))
    return ops[0]


def _traced_linear(
    x: Tensor, factors: Sequence[Tensor], network: Network, bias: Tensor | None, implementation: str
) -> Tensor:
    shapes = tuple(tuple(f.shape) for f in factors)
    out_modes, in_modes = _mode_sizes(network, shapes)
    n_in, n_out = math.prod(in_modes), math.prod(out_modes)
    if x.ndim == 0 or x.shape[-1] != n_in:
        width = x.shape[-1] if x.ndim else "a scalar"
        raise ShapeError(f"input has last dimension {width}, but the layer has in_features={n_in}")
    implementation = check_implementation(implementation)
    lead = x.shape[:-1]
    rows = 1
    for d in lead:  # not math.prod: Dynamo would specialise a symbolic batch to a constant
        rows = rows * d
    # A symbolic row count (dynamic batch) plans for a fixed bucket: computing its bucket
    # would specialise it. (Under Dynamo even a symbolic size passes isinstance(_, int).)
    bucket = batch_bucket(rows) if has_static_value(rows) else _SYMBOLIC_BUCKET
    f0 = factors[0]
    implementation, steps = _traced_route(
        _labels(network), shapes, bucket, f0.device.type, f0.dtype.itemsize, implementation
    )
    if implementation == "reconstructed":
        return F.linear(x, _run_steps(steps, factors).reshape(n_out, n_in), bias)
    y = _run_steps(steps, (x.reshape(rows, *in_modes), *factors)).reshape(*lead, n_out)
    return y if bias is None else y + bias.to(y.dtype)


def reconstruct_weight(factors: Sequence[Tensor], network: Network) -> Tensor:
    """Rebuild the dense ``(out_features, in_features)`` weight from single-layer factors.

    The contraction order is planned once per shape so that no intermediate is
    larger than the weight itself (a CP rank above ``min(in, out)`` is contracted
    in chunks). ``W = contract(factors)``.

    Shape:
        factors: as the format lays them out; returns ``(prod(out_modes), prod(in_modes))``.
    """
    f0 = factors[0]
    shapes = tuple(tuple(f.shape) for f in factors)
    if torch.compiler.is_compiling():
        _, steps = _traced_route(
            _labels(network), shapes, 1, f0.device.type, f0.dtype.itemsize, "reconstructed"
        )
        out_modes, in_modes = _mode_sizes(network, shapes)
        return _run_steps(steps, factors).reshape(math.prod(out_modes), math.prod(in_modes))
    plan = _rebuild_plan(network, shapes, f0.device.type, f0.element_size())
    out_modes, in_modes = _mode_sizes(network, shapes)
    return plan(*factors).reshape(math.prod(out_modes), math.prod(in_modes))


def split_weight(factors: Sequence[Tensor], network: Network) -> tuple[Tensor, Tensor]:
    """The weight as two thin matrices, ``W = up @ down``, split where the fewest bonds cross.

    ``y = x W^T + b`` is then ``F.linear(F.linear(x, down), up, b)``. Exact (no
    truncation): ``rank`` is the product of the bond sizes crossing from the input
    factors to the output factors (TT: the bond between the last output core and the
    first input core; Tucker: the smaller side of the core; CP: the rank).

    Shape:
        factors: single-layer factors; returns ``down (rank, in_features)``,
        ``up (out_features, rank)``.

    Raises:
        FactorizationError: where a factor holds both input and output modes (TT-matrix),
            so no such split exists.
    """
    f0 = factors[0]
    shapes = tuple(tuple(f.shape) for f in factors)
    split = _split_program(network, shapes, f0.device.type, f0.element_size())
    if split is None:
        raise FactorizationError(
            "split_weight: a factor holds both input and output modes (as in TT-matrix), "
            "so the weight has no split into an input side and an output side"
        )
    return split(factors)


def choose_implementation(
    factors: Sequence[Tensor], network: Network, rows: int, reuse_weight: bool = False
) -> str:
    """'factorized' or 'reconstructed', whichever the cost model says is cheaper for ``rows``.

    With ``reuse_weight=True`` rebuilt operands are taken as free (inference reuses them):
    'reconstructed' means one dense GEMM with a cached ``W``, and a third answer,
    'split', means two thin GEMMs with a cached :func:`split_weight` pair.
    """
    program = _program(factors, network, rows)
    return program.choice_cached if reuse_weight else program.choice


class _LeanFactorized(torch.autograd.Function):
    """The factorized contraction, saving only ``x`` and the factors for backward.

    Autograd through the plan would keep every batch-sized intermediate alive until
    backward; here backward recomputes the forward chain (one more forward's FLOPs)
    and differentiates it at once, so a stack of layers holds only its inputs.
    """

    @staticmethod
    def _run(
        plan: ContractionPlan, fused_bias: bool, x: Tensor, factors: Sequence[Tensor]
    ) -> Tensor:
        # With a fused bias it is the last operand: the last GEMM is addmm(bias, ...).
        if fused_bias:
            return plan.with_bias(factors[-1], x, *factors[:-1])
        return plan(x, *factors)

    @staticmethod
    def forward(  # type: ignore[override]
        ctx, plan: ContractionPlan, fused_bias: bool, x: Tensor, *factors: Tensor
    ) -> Tensor:
        ctx.plan = plan
        ctx.fused_bias = fused_bias
        ctx.save_for_backward(x, *factors)
        return _LeanFactorized._run(plan, fused_bias, x, factors)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        x, *factors = ctx.saved_tensors
        needs = ctx.needs_input_grad[2:]
        with torch.enable_grad():
            pairs = zip((x, *factors), needs, strict=True)
            inputs = [t.detach().requires_grad_(n) for t, n in pairs]
            y = _LeanFactorized._run(ctx.plan, ctx.fused_bias, inputs[0], inputs[1:])
            wanted = [t for t, n in zip(inputs, needs, strict=True) if n]
            grads = iter(torch.autograd.grad(y, wanted, grad)) if wanted else iter(())
        return (None, None, *[next(grads) if n else None for n in needs])


def factorized_linear(
    x: Tensor,
    factors: Sequence[Tensor],
    network: Network,
    bias: Tensor | None = None,
    implementation: str = "factorized",
    lean_backward: bool = False,
) -> Tensor:
    """``y = x W^T + b`` with ``W`` held as factors.

    ``'factorized'`` contracts ``x`` with the factors directly (``W`` is never built),
    ``'reconstructed'`` rebuilds ``W`` and runs one GEMM, ``'auto'`` picks the cheaper
    by a cost model (FLOPs, bytes moved, kernels), planned once per shape and batch
    size bucket.

    Args:
        x: input of shape ``(*, in_features)``.
        factors: the single-layer factors of the format, in order.
        network: the format's :class:`~tensorfold.contraction.Network`.
        bias: optional ``(out_features,)``.
        implementation: ``'factorized'``, ``'reconstructed'`` or ``'auto'``.
        lean_backward: on the factorized path, save only ``x`` and the factors for
            backward and recompute the chain there (less memory, one more forward).

    Shape:
        x: ``(*, in_features)`` -> ``(*, out_features)``.

    Example:
        >>> import torch
        >>> from tensorfold.formats import get_format
        >>> cores = [torch.randn(1, 4, 3), torch.randn(3, 2, 1)]  # TT: one out mode, one in mode
        >>> factorized_linear(torch.randn(5, 2), cores, get_format("tt").network_for(1, 1)).shape
        torch.Size([5, 4])
    """
    if torch.compiler.is_compiling():  # traced: constant plans, no lean backward
        return _traced_linear(x, factors, network, bias, implementation)
    lead = x.shape[:-1]
    rows = math.prod(lead) if x.ndim else 0
    program = _program(factors, network, rows)
    if x.ndim == 0 or x.shape[-1] != program.in_features:
        width = x.shape[-1] if x.ndim else "a scalar"
        raise ShapeError(
            f"input has last dimension {width}, but the layer has in_features={program.in_features}"
        )
    if implementation == "auto":
        implementation = program.choice
    elif implementation not in ("factorized", "reconstructed"):
        implementation = check_implementation(implementation)
        if implementation == "auto":
            implementation = program.choice
    if implementation == "reconstructed" or rows == 0:
        weight = program.rebuild(*factors).reshape(program.out_features, program.in_features)
        return F.linear(x, weight, bias)
    xt = x.reshape(rows, *program.in_modes)
    plan = program.forward
    if lean_backward and torch.is_grad_enabled():
        if bias is not None and plan.fuses_bias:
            y = _LeanFactorized.apply(plan, True, xt, *factors, bias)
            return y.reshape(*lead, program.out_features)
        y = _LeanFactorized.apply(plan, False, xt, *factors)
    elif bias is not None and plan.fuses_bias:
        # The last GEMM adds the bias (addmm), as nn.Linear does: no extra pass over y.
        return plan.with_bias(bias, xt, *factors).reshape(*lead, program.out_features)
    else:
        y = plan(xt, *factors)
    y = y.reshape(*lead, program.out_features)
    if bias is None:
        return y
    # Under autocast y is in the low dtype: cast the bias as F.linear does, so every path
    # returns nn.Linear's dtype. Without autograd, add in place: y is a fresh result, and
    # a second freshly allocated output costs more than the add itself.
    bias = bias.to(y.dtype)
    if not torch.is_grad_enabled() or not (y.requires_grad or bias.requires_grad):
        return y.add_(bias)
    return y + bias
