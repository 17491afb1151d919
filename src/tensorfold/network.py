"""``Network``: the einsum labels of one layer's factorized weight, and its narrowest cut."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

__all__ = ["BATCH_LABEL", "Network"]

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
    _hash: int = field(default=0, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        # Networks key every plan lookup: hash once, not on every call.
        object.__setattr__(self, "_hash", hash((self.subscripts, self.out_labels, self.in_labels)))

    def __hash__(self) -> int:
        return self._hash

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
        for sub, shape in zip(self.subscripts, shapes, strict=False):
            for label, size in zip(sub, shape, strict=False):
                sizes[label] = size
        return sizes

    def narrowest_cut(
        self, shapes: tuple[tuple[int, ...], ...]
    ) -> tuple[tuple[int, ...], tuple[int, ...], str] | None:
        """Split the factors into an input side and an output side, crossing the fewest bonds.

        Returns ``(input-side positions, output-side positions, crossing labels)``, the
        split whose crossing labels have the smallest product of sizes (the rank ``r``
        of ``W = up @ down``), or None where a factor carries both input and output
        modes (TT-matrix) and no such split exists. Factors with neither (a Tucker
        core, CP weights, selected layer cores) may go to either side; all choices
        are tried, since there are only a few.
        """
        sizes = self.sizes(shapes)
        ins: list[int] = []
        outs: list[int] = []
        free: list[int] = []
        for k, sub in enumerate(self.subscripts):
            has_in = any(c in self.in_labels for c in sub)
            has_out = any(c in self.out_labels for c in sub)
            if has_in and has_out:
                return None
            (ins if has_in else outs if has_out else free).append(k)
        if len(free) > _CUT_MAX_FREE:
            return None
        best: tuple[int, tuple[int, ...], tuple[int, ...], str] | None = None
        for mask in range(1 << len(free)):
            down = sorted(ins + [f for j, f in enumerate(free) if mask >> j & 1])
            up = sorted(outs + [f for j, f in enumerate(free) if not mask >> j & 1])
            if not down or not up:
                continue
            up_labels = set("".join(self.subscripts[k] for k in up))
            seen = "".join(self.subscripts[k] for k in down)
            cut = "".join(c for k, c in enumerate(seen) if c in up_labels and seen.index(c) == k)
            rank = math.prod(sizes[c] for c in cut)
            if best is None or rank < best[0]:
                best = (rank, tuple(down), tuple(up), cut)
        return None if best is None else best[1:]


_CUT_MAX_FREE = 8  # factors free to sit on either side of a cut (2**8 splits tried)
