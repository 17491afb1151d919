"""Path search: which pairwise order contracts a network, found once per shape and cached.

opt_einsum proposes a few orders (fewest FLOPs, smallest intermediates and mixes of the
two); each is compiled (:mod:`tensorfold.steps`) and priced by the cost model
(:mod:`tensorfold.cost`), and the cheapest becomes a :class:`~tensorfold.runtime.ContractionPlan`.
A reconstruction whose every order needs an intermediate larger than the result (CP with a
rank above ``min(in, out)``) is *sliced*: the shared rank label is split into chunks
contracted one after another and summed, so no intermediate exceeds the weight.
"""

from __future__ import annotations

import math
from functools import lru_cache

import opt_einsum

from . import steps as compiler
from .cost import cost_model
from .network import BATCH_LABEL
from .runtime import ContractionPlan

__all__ = ["contraction_plan", "candidate_paths", "batch_bucket"]


_STRATEGIES = ("flops", "size", "combo-8", "combo-64", "combo-512")
_DP_MAX_OPERANDS = 9


def candidate_paths(
    equation: str, shapes: tuple[tuple[int, ...], ...]
) -> list[list[tuple[int, ...]]]:
    """A few opt_einsum orders: fewest FLOPs, smallest intermediates and mixes."""
    found: list[list[tuple[int, ...]]] = []
    strategies: list[object] = []
    if len(shapes) <= 5:
        strategies.append("optimal")
    if len(shapes) <= _DP_MAX_OPERANDS:
        strategies += [
            opt_einsum.DynamicProgramming(minimize=m, search_outer=True) for m in _STRATEGIES
        ]
    else:
        # DP is exponential in the operand count (minutes for a 5+5-mode CP with layer
        # modes); bounded searches stay in milliseconds.
        strategies.append("branch-2")
    strategies.append("greedy")
    for strategy in strategies:
        try:
            path, _ = opt_einsum.contract_path(equation, *shapes, shapes=True, optimize=strategy)
        except (RuntimeError, ValueError):
            continue
        path = [tuple(p) for p in path]
        if path not in found:
            found.append(path)
    return found


def _plan(
    equation: str,
    shapes: tuple[tuple[int, ...], ...],
    memory_limit: int | None,
    device_type: str,
    itemsize: int,
) -> ContractionPlan:
    model = cost_model(device_type)
    dynamic = BATCH_LABEL if BATCH_LABEL in equation.partition("->")[0] else ""
    best = None
    for path in candidate_paths(equation, shapes):
        steps, final_perm, flops, largest, cost = compiler.compile_path(
            equation, shapes, path, model, itemsize, dynamic
        )
        fits = memory_limit is None or largest <= memory_limit
        key = (not fits, cost if fits else largest)
        if best is None or key < best[0]:
            best = (key, path, steps, final_perm, flops, largest, cost)
    assert best is not None
    _, path, steps, final_perm, flops, largest, cost = best
    if not dynamic:
        # A rebuild: lay the chosen order's last step out by the contiguous run of the
        # copy into the weight's order (TT-matrix interleaves out and in modes, and the
        # flat price cannot tell a gather of single elements from whole cache lines). The
        # order itself is still ranked by the flat price: ranked by run, orders with far
        # more FLOPs won and ran slower (A/B in benchmarks/RESULTS.md).
        steps, final_perm, flops, largest, cost = compiler.compile_path(
            equation, shapes, list(path), model, itemsize, dynamic, layout_by_run=True
        )
    return ContractionPlan(equation, tuple(path), flops, largest, cost, steps, final_perm)


def _sliced_plan(
    equation: str,
    shapes: tuple[tuple[int, ...], ...],
    memory_limit: int,
    device_type: str,
    itemsize: int,
) -> ContractionPlan | None:
    """Split the summed label shared by the most operands into chunks that fit the limit."""
    lhs, _, output = equation.partition("->")
    inputs = lhs.split(",")
    sizes: dict[str, int] = {}
    for sub, shape in zip(inputs, shapes, strict=False):
        sizes.update(zip(sub, shape, strict=False))
    summed = [c for c in sizes if c not in output and sizes[c] > 1]
    if not summed:
        return None
    label = max(summed, key=lambda c: (sum(c in s for s in inputs), sizes[c]))
    size = sizes[label]
    axes = tuple(s.index(label) if label in s else -1 for s in inputs)
    out_numel = math.prod(sizes[c] for c in output)
    chunk = size
    while chunk > 1:
        chunk = (chunk + 1) // 2
        sub_shapes = tuple(
            tuple(chunk if k == ax else d for k, d in enumerate(s))
            for s, ax in zip(shapes, axes, strict=False)
        )
        # The chunk's size is dynamic at run time (the last chunk may be smaller).
        model = cost_model(device_type)
        for path in candidate_paths(equation, sub_shapes):
            steps, final_perm, flops, largest, cost = compiler.compile_path(
                equation, sub_shapes, path, model, itemsize, label
            )
            if largest <= memory_limit:
                n_chunks = -(-size // chunk)
                return ContractionPlan(
                    equation,
                    tuple(path),
                    flops * n_chunks,
                    max(largest, out_numel),
                    cost * n_chunks
                    + (n_chunks - 1)
                    * model.kernel(out_numel, 2 * out_numel * itemsize, out_numel * itemsize),
                    steps,
                    final_perm,
                    slices=(label, axes, size, chunk),
                )
    return None


@lru_cache(maxsize=8192)
def contraction_plan(
    equation: str,
    shapes: tuple[tuple[int, ...], ...],
    memory_limit: int | None = None,
    device_type: str = "cpu",
    itemsize: int = 4,
) -> ContractionPlan:
    """Plan ``equation`` over operands of ``shapes``; cached, so call it freely.

    Args:
        equation: an explicit einsum equation (``"...->..."``) in letters only. The
            label ``Z`` (:data:`BATCH_LABEL`), if present, is the batch: its size may
            differ at run time from the planned one.
        shapes: the operand shapes, as tuples of Python ints.
        memory_limit: largest intermediate allowed (elements), or None. If no order
            fits, the plan is sliced over a shared summed label; if even that fails,
            the order with the smallest largest intermediate is used.
        device_type: ``'cpu'`` or ``'cuda'``: which cost model ranks the orders.
        itemsize: bytes per element (4 for float32, 2 for bfloat16).

    Returns:
        The compiled :class:`ContractionPlan`.

    Example:
        >>> import torch
        >>> plan = contraction_plan("ab,bc->ac", ((2, 3), (3, 4)))
        >>> plan(torch.ones(2, 3), torch.ones(3, 4)).shape
        torch.Size([2, 4])
    """
    shapes = tuple(tuple(int(d) for d in s) for s in shapes)
    if len(shapes) == 1:
        lhs, _, out = equation.partition("->")
        sizes = dict(zip(lhs, shapes[0], strict=False))
        out_numel = math.prod(sizes[c] for c in out)
        return ContractionPlan(
            equation, (), math.prod(shapes[0]), out_numel, 0.0, (), None, unary=True
        )
    plan = _plan(equation, shapes, memory_limit, device_type, itemsize)
    if (
        memory_limit is not None
        and plan.largest_intermediate > memory_limit
        and BATCH_LABEL not in equation
    ):
        sliced = _sliced_plan(equation, shapes, memory_limit, device_type, itemsize)
        if sliced is not None:
            return sliced
    return plan


def batch_bucket(rows: int) -> int:
    """Round a row count up to a power of two: plans are shared within a bucket."""
    return 1 if rows <= 1 else 1 << (rows - 1).bit_length()
