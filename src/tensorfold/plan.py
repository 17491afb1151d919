"""Contraction planning: find an einsum order once per shape, then reuse it.

A factorized layer is a small tensor network. Its forward pass (input with the
factors) and its reconstruction (factors into the dense weight) are each one
einsum whose best pairwise order depends only on the shapes. opt_einsum finds
that order; we cache it per shape key so the hot path never searches, and run it
as a chain of two-operand ``torch.einsum`` calls (which torch maps to bmm).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import opt_einsum
import torch

__all__ = ["Network", "ContractionPlan", "contraction_plan", "batch_bucket"]

BATCH_LABEL = "Z"  # reserved: formats never use it for a mode or a rank


@dataclass(frozen=True)
class Network:
    """The einsum description of one layer's factorized weight.

    Attributes:
        subscripts: one label string per factor, in factor order.
        out_labels: labels of the output modes, in order.
        in_labels: labels of the input modes, in order.

    Labels in no output or input position are ranks (summed over). Sizes come from
    the factor shapes, so one network serves every mode size and rank.
    """

    subscripts: tuple[str, ...]
    out_labels: str
    in_labels: str

    def weight_equation(self) -> str:
        """``factors -> out_modes + in_modes`` (the dense weight as a tensor)."""
        return ",".join(self.subscripts) + "->" + self.out_labels + self.in_labels

    def forward_equation(self) -> str:
        """``x[Z, in_modes], factors -> y[Z, out_modes]``."""
        lhs = ",".join((BATCH_LABEL + self.in_labels,) + self.subscripts)
        return lhs + "->" + BATCH_LABEL + self.out_labels

    def sizes(self, shapes: tuple[tuple[int, ...], ...]) -> dict[str, int]:
        """Map each label to its size, read off the factor shapes."""
        sizes: dict[str, int] = {}
        for sub, shape in zip(self.subscripts, shapes):
            for label, size in zip(sub, shape):
                sizes[label] = size
        return sizes


@dataclass(frozen=True)
class ContractionPlan:
    """A precomputed pairwise contraction order for one einsum and one set of shapes.

    Attributes:
        steps: ``(positions, equation)`` per pairwise step, opt_einsum's convention:
            pop the operands at ``positions`` (descending), contract, append the result.
        flops: multiply-add count times two of the whole chain.
        largest_intermediate: element count of the biggest intermediate.
    """

    steps: tuple[tuple[tuple[int, ...], str], ...]
    flops: int
    largest_intermediate: int

    def __call__(self, *operands: torch.Tensor) -> torch.Tensor:
        ops = list(operands)
        for positions, equation in self.steps:
            picked = [ops.pop(p) for p in positions]
            ops.append(torch.einsum(equation, *picked))
        return ops[0]


def _step_flops(equation: str, sizes: dict[str, int]) -> int:
    inputs, _, output = equation.partition("->")
    labels = set(inputs.replace(",", ""))
    volume = math.prod(sizes[label] for label in labels)
    summed = labels - set(output)
    return 2 * volume if summed else volume


@lru_cache(maxsize=8192)
def contraction_plan(
    equation: str, shapes: tuple[tuple[int, ...], ...], memory_limit: int | None = None
) -> ContractionPlan:
    """Plan ``equation`` over operands of ``shapes``; cached, so call it freely.

    Args:
        equation: an explicit einsum equation (``"...->..."``) in letters only.
        shapes: the operand shapes, as tuples of Python ints.
        memory_limit: largest intermediate allowed (elements), or None.

    Returns:
        The :class:`ContractionPlan`. Single-operand equations get one step.
    """
    shapes = tuple(tuple(int(d) for d in s) for s in shapes)
    if len(shapes) == 1:
        sizes = dict(zip(equation.partition("->")[0], shapes[0]))
        out_numel = math.prod(sizes[c] for c in equation.partition("->")[2])
        return ContractionPlan((((0,), equation),), math.prod(shapes[0]), out_numel)
    # 'optimal' is exhaustive and fast for the chains a layer makes; 'dp' scales further.
    strategy = "optimal" if len(shapes) <= 6 else "dp"
    try:
        _, info = opt_einsum.contract_path(
            equation, *shapes, shapes=True, optimize=strategy, memory_limit=memory_limit
        )
    except RuntimeError:  # no order keeps every intermediate under the limit: drop it
        _, info = opt_einsum.contract_path(equation, *shapes, shapes=True, optimize=strategy)
    inputs = equation.partition("->")[0].split(",")
    sizes: dict[str, int] = {}
    for sub, shape in zip(inputs, shapes):
        sizes.update(zip(sub, shape))
    steps = []
    flops = 0
    for positions, _removed, step_equation, *_ in info.contraction_list:
        steps.append((tuple(positions), step_equation))
        flops += _step_flops(step_equation, sizes)
    return ContractionPlan(tuple(steps), flops, int(info.largest_intermediate))


def batch_bucket(rows: int) -> int:
    """Round a row count up to a power of two: plans are shared within a bucket."""
    return 1 if rows <= 1 else 1 << (rows - 1).bit_length()
