"""The ``'auto'`` choice, in one place: which path runs a layer, priced by the cost model.

A layer ``y = x W^T + b`` with ``W`` held as factors can run three ways:

* ``'factorized'``: contract ``x`` with the factors (``W`` is never built);
* ``'split'``: two thin GEMMs with ``W = up @ down`` split where the fewest bonds cross
  (CP, Tucker, TT; none for TT-matrix);
* ``'reconstructed'``: one GEMM with the dense ``W``.

The split pair and ``W`` are *operands*: either kept from an earlier call (cached, free
per call) or built in this one (their build is priced in). :func:`choose` is the one rule:

1. every path is priced as one cold call (a layer among layers, :meth:`CostModel.cold`),
   with each operand it needs either cached or built per call;
2. the dense side, ``'reconstructed'``, is the default; a thin path is taken where its
   price times its margin is at most the dense side's, and of those the cheapest;
3. where factors get gradients (training), a split built per call is not offered: the
   model prices forwards, and the split's backward through two rebuilds lost (RESULTS.md).

``functional.factorized_linear(..., 'auto')`` asks with nothing cached;
``FactorizedLinear`` in inference asks with the operands its ``cache`` policy may keep,
and settles a contested answer (:attr:`Choice.contested`) by timing once per batch bucket.
Everything here depends only on shapes and is computed once per
``(network, factor shapes, batch bucket, device type, itemsize)``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Literal

import torch
from torch import Tensor

from .contraction import ContractionPlan, Network, contraction_plan, cost_model

__all__ = [
    "Path",
    "PATHS",
    "Candidate",
    "Choice",
    "LayerProgram",
    "SplitProgram",
    "choose",
    "layer_program",
    "rebuild_plan",
    "split_program",
]

Path = Literal["factorized", "split", "reconstructed"]
PATHS: tuple[Path, ...] = ("factorized", "split", "reconstructed")
Operand = Literal["split", "weight"]  # what a cache can keep between calls

# With a cached weight the dense side is exactly nn.Linear's speed: a chain must be
# predicted clearly faster to be taken.
_CACHED_MARGIN = 1.25
# Without one, near ties still go to rebuild + GEMM: one large GEMM runs nearer the
# machine's peak than the model credits (every near tie measured went that way).
_REBUILD_MARGIN = 1.1
# Two plain GEMMs, which the model prices well.
_SPLIT_MARGIN = 1.1
# Where the runner-up is predicted within this factor of the pick, the prediction is
# inside the model's error on kernel chains against single GEMMs (which varies between
# machines), so a layer that can time both paths does, once per batch bucket.
_MEASURE_WITHIN = 3.0


@dataclass(frozen=True)
class Candidate:
    """One path as priced for one call.

    Attributes:
        path: ``'factorized'``, ``'split'`` or ``'reconstructed'``.
        seconds: the cost model's price of one cold call, building what is not cached.
        cached: whether the path's operand (split pair or ``W``) is kept between calls;
            False for ``'factorized'``, which has none.
        margin: the factor its price must beat the dense side by (1.0 for the dense side).
    """

    path: Path
    seconds: float
    cached: bool
    margin: float


@dataclass(frozen=True)
class Choice:
    """The answer of :func:`choose`, with what decided it; ``str()`` prints it.

    Attributes:
        path: the pick.
        candidates: every path offered, in :data:`PATHS` order.
        contested: the runner-up where it is predicted within the model's error of the
            pick (a layer may then time both), else None.
    """

    path: Path
    candidates: tuple[Candidate, ...]
    contested: Path | None

    def price(self, path: str) -> float:
        """The predicted seconds of ``path`` (inf where it is not offered)."""
        return next((c.seconds for c in self.candidates if c.path == path), math.inf)

    def __str__(self) -> str:
        dense = self.price("reconstructed")
        lines = ["path           predicted us  vs dense  operand        margin"]
        for c in self.candidates:
            operand = "-" if c.path == "factorized" else "cached" if c.cached else "built per call"
            margin = "default" if c.path == "reconstructed" else f"x{c.margin:g}"
            mark = "  <- pick" if c.path == self.path else ""
            lines.append(
                f"{c.path:14s} {c.seconds * 1e6:12.1f}  {c.seconds / dense:8.3f}  "
                f"{operand:14s} {margin}{mark}"
            )
        lines.append(
            "rule: 'reconstructed' unless a thin path's price x its margin <= its price; "
            "then the cheapest such path"
        )
        if self.contested is not None:
            lines.append(
                f"contested: '{self.contested}' is predicted within x{_MEASURE_WITHIN:g} of "
                f"'{self.path}'"
            )
        return "\n".join(lines)


def choose(
    program: LayerProgram, cached: frozenset[str] = frozenset(), grad: bool = False
) -> Choice:
    """The path ``'auto'`` runs for ``program``'s layer and batch bucket.

    Args:
        program: the layer's :class:`LayerProgram` (shapes, plans, prices).
        cached: the operands kept between calls: a subset of ``{'split', 'weight'}``.
        grad: whether the factors get gradients from this call (then nothing is cached
            and a split built per call is not offered).
    """
    return program.decisions[(frozenset(cached) if not grad else frozenset(), grad)]


def _decide(program: LayerProgram, cached: frozenset[str], grad: bool) -> Choice:
    model = cost_model(program.device_type)
    fwd = program.forward
    weight_cached = "weight" in cached
    candidates = [
        Candidate(
            "factorized",
            model.cold(program.t_factorized, fwd.n_kernels + 1),
            False,
            _CACHED_MARGIN if weight_cached else _REBUILD_MARGIN,
        )
    ]
    split = program.split
    if split is not None and ("split" in cached or not grad):
        seconds = model.cold(program.t_split, 2)
        if "split" not in cached:
            build = split.down.cost_s + split.up.cost_s
            seconds += model.cold(build, split.down.n_kernels + split.up.n_kernels)
        candidates.append(Candidate("split", seconds, "split" in cached, _SPLIT_MARGIN))
    if weight_cached:
        dense = Candidate("reconstructed", model.cold(program.t_gemm, 1), True, 1.0)
    else:
        dense = Candidate(
            "reconstructed",
            model.cold(program.t_rebuild + program.t_gemm, program.rebuild.n_kernels + 1),
            False,
            1.0,
        )
    candidates.append(dense)
    passing = [c for c in candidates[:-1] if c.seconds * c.margin <= dense.seconds]
    pick = min(passing, key=lambda c: c.seconds) if passing else dense
    others = [c for c in candidates if c is not pick]
    runner = min(others, key=lambda c: c.seconds) if others else None
    contested = None
    if runner is not None and runner.seconds <= pick.seconds * _MEASURE_WITHIN:
        contested = runner.path
    return Choice(pick.path, tuple(candidates), contested)


def _mode_sizes(
    network: Network, shapes: tuple[tuple[int, ...], ...]
) -> tuple[list[int], list[int]]:
    sizes = network.sizes(shapes)
    return [sizes[c] for c in network.out_labels], [sizes[c] for c in network.in_labels]


@lru_cache(maxsize=4096)
def rebuild_plan(
    network: Network, shapes: tuple[tuple[int, ...], ...], device_type: str, itemsize: int
) -> ContractionPlan:
    """The plan rebuilding ``W`` from single-layer factors; no intermediate exceeds ``W``."""
    out_modes, in_modes = _mode_sizes(network, shapes)
    numel = math.prod(out_modes) * math.prod(in_modes)
    return contraction_plan(network.weight_equation(), shapes, numel, device_type, itemsize)


@dataclass(frozen=True)
class _Unary:
    """A split side that is one factor: dropped size-1 labels, a permute and a reshape.

    Unlike an einsum, this returns a view of the factor wherever strides allow, so a
    cache holding it costs no memory.
    """

    kept_shape: tuple[int, ...]
    perm: tuple[int, ...]

    def __call__(self, factor: Tensor) -> Tensor:
        return factor.reshape(self.kept_shape).permute(self.perm)


@dataclass(frozen=True)
class SplitProgram:
    """``W = up @ down`` at the narrowest cut between input and output modes.

    With parameters that do not change (inference), ``down (rank, in)`` and
    ``up (out, rank)`` are built once and every call is two thin GEMMs,
    ``2 rows rank (in + out)`` FLOPs: a TT layer's middle bond, a Tucker core's
    smaller side, a CP rank. A side that is a single factor (TT with one mode per side,
    a Tucker side without the core) is a view of that factor where its strides allow.

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
    down_unary: _Unary | None = field(default=None, repr=False)
    up_unary: _Unary | None = field(default=None, repr=False)

    def __call__(self, factors: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
        down = self._side(self.down, self.down_unary, [factors[k] for k in self.down_factors])
        up = self._side(self.up, self.up_unary, [factors[k] for k in self.up_factors])
        return down.reshape(self.rank, -1), up.reshape(-1, self.rank)

    @staticmethod
    def _side(plan: ContractionPlan, unary: _Unary | None, factors: list[Tensor]) -> Tensor:
        return unary(factors[0]) if unary is not None else plan(*factors)

    def built_bytes(self, factors: Sequence[Tensor], copies: bool = False) -> int:
        """Bytes a built pair takes beyond the factors (a side that is a view costs 0,
        unless ``copies``: the factors given are themselves built, e.g. dequantized).

        Found without computing anything: the pair is built from meta tensors with the
        factors' shapes and strides.
        """
        meta = [
            torch.empty_strided(f.shape, f.stride(), dtype=f.dtype, device="meta") for f in factors
        ]
        total = 0
        for side in self(meta):
            if copies or not any(side._base is m for m in meta):
                total += side.numel() * side.element_size()
        return total


def _unary_side(sub: str, output: str, shape: tuple[int, ...]) -> _Unary | None:
    sizes = dict(zip(sub, shape, strict=True))
    dropped = [c for c in sub if c not in output]
    if any(sizes[c] != 1 for c in dropped) or sorted(output) != sorted(
        c for c in sub if c in output
    ):
        return None
    kept = "".join(c for c in sub if c in output)
    return _Unary(tuple(sizes[c] for c in kept), tuple(kept.index(c) for c in output))


@lru_cache(maxsize=4096)
def split_program(
    network: Network, shapes: tuple[tuple[int, ...], ...], device_type: str, itemsize: int
) -> SplitProgram | None:
    """The :class:`SplitProgram` of a network at its narrowest cut, or None (TT-matrix)."""
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

    def unary(positions: tuple[int, ...], output: str) -> _Unary | None:
        if len(positions) != 1:
            return None
        return _unary_side(network.subscripts[positions[0]], output, shapes[positions[0]])

    down_out, up_out = labels + network.in_labels, network.out_labels + labels
    down = side(down_factors, down_out, rank * math.prod(in_modes))
    up = side(up_factors, up_out, rank * math.prod(out_modes))
    return SplitProgram(
        rank,
        down_factors,
        up_factors,
        down,
        up,
        unary(down_factors, down_out),
        unary(up_factors, up_out),
    )


@dataclass(frozen=True)
class LayerProgram:
    """Everything shape-dependent about one layer at one batch bucket, computed once.

    Attributes:
        in_features, out_features: the layer's widths.
        rows: the batch bucket (row count) everything was planned and priced for.
        in_modes: the input's tensorized shape (for the reshape into the network).
        device_type: the device type the plans were priced for.
        forward: the plan contracting ``x[Z, in_modes]`` with the factors.
        rebuild: the plan rebuilding ``W`` (no intermediate larger than ``W``).
        split: ``W = up @ down`` at the network's narrowest cut, or None (TT-matrix).
        t_factorized, t_rebuild, t_gemm, t_split: cost-model seconds (hot caches) of the
            factorized forward, of rebuilding ``W``, of the dense GEMM and of the two thin
            GEMMs of a built split (inf without one), at the bucket's row count.
        decisions: :func:`choose`'s answer per ``(cached operands, grad)``.
    """

    in_features: int
    out_features: int
    rows: int
    in_modes: tuple[int, ...]
    device_type: str
    forward: ContractionPlan
    rebuild: ContractionPlan
    split: SplitProgram | None
    t_factorized: float
    t_rebuild: float
    t_gemm: float
    t_split: float
    decisions: dict[tuple[frozenset[str], bool], Choice] = field(
        default_factory=dict, repr=False, compare=False, hash=False
    )

    @property
    def choice(self) -> Path:
        """What runs in training: nothing cached, factors get gradients."""
        return choose(self, frozenset(), grad=True).path

    @property
    def choice_cached(self) -> Path:
        """What runs in inference when both the split pair and ``W`` may be cached."""
        return choose(self, frozenset({"split", "weight"})).path

    def flops(self, path: str) -> int:
        """FLOPs of one call of ``path`` on ``rows`` rows; a cached operand is free."""
        if path == "factorized":
            return self.forward.flops
        if path == "split" and self.split is not None:
            return 2 * self.rows * self.split.rank * (self.in_features + self.out_features)
        return 2 * self.rows * self.in_features * self.out_features

    def __str__(self) -> str:
        head = (
            f"{self.out_features}x{self.in_features} layer at {self.rows} row(s) "
            f"({self.device_type}); forward plan:\n{self.forward}"
        )
        return head + f"\nrebuild plan:\n{self.rebuild}"


_CACHE_SETS: tuple[frozenset[str], ...] = (
    frozenset(),
    frozenset({"split"}),
    frozenset({"weight"}),
    frozenset({"split", "weight"}),
)


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
    rebuild = rebuild_plan(network, shapes, device_type, itemsize)
    model = cost_model(device_type)
    split = split_program(network, shapes, device_type, itemsize)
    t_split = math.inf
    if split is not None:
        t_split = model.gemm(bucket, n_in, split.rank, itemsize) + model.gemm(
            bucket, split.rank, n_out, itemsize
        )
    program = LayerProgram(
        n_in,
        n_out,
        bucket,
        tuple(in_modes),
        device_type,
        forward,
        rebuild,
        split,
        forward.cost_s + model.launch_s,  # the factorized path also reshapes x (and y)
        rebuild.cost_s,
        model.gemm(bucket, n_in, n_out, itemsize),
        t_split,
    )
    program.decisions[(frozenset(), True)] = _decide(program, frozenset(), True)
    for cached in _CACHE_SETS:
        program.decisions[(cached, False)] = _decide(program, cached, False)
    return program
