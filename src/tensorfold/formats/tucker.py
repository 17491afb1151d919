"""Tucker: ``T = G x_1 U_1 x_2 U_2 ... x_N U_N`` with a small core ``G``."""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

from torch import Tensor

from ..errors import RankError
from .base import FactorizedTensor, Modes, fill_to_count, register


@register
class TuckerTensor(FactorizedTensor):
    """Tucker format. Parameters: the core ``(R_1, ..., R_N)`` then one factor
    ``(d_k, R_k)`` per mode (layer modes first). ``rank`` is the tuple of all ``R_k``;
    a tuple of one rank per out/in mode leaves the layer modes at full rank."""

    name = "tucker"
    decomposition_options = ("n_iter_max", "tol", "init")

    @classmethod
    def parameter_shapes(
        cls, rank: tuple[int, ...], out_modes: Modes, in_modes: Modes, layer_shape: Modes
    ):
        dims = layer_shape + out_modes + in_modes
        return [tuple(rank)] + [(d, r) for d, r in zip(dims, rank, strict=False)]

    @classmethod
    def subscripts(cls, layer: str, out: str, inp: str, fresh: Iterator[str]) -> tuple[str, ...]:
        modes = layer + out + inp
        ranks = "".join(next(fresh) for _ in modes)
        return (ranks, *(m + r for m, r in zip(modes, ranks, strict=False)))

    @classmethod
    def rank_from_int(cls, rank: int, out_modes: Modes, in_modes: Modes, layer_shape: Modes):
        # A rank above a mode's size adds nothing: cap it there.
        return layer_shape + tuple(min(rank, d) for d in out_modes + in_modes)

    @classmethod
    def rank_from_sequence(
        cls, rank: tuple[int, ...], out_modes: Modes, in_modes: Modes, layer_shape: Modes
    ):
        weight_dims = out_modes + in_modes
        if len(rank) == len(weight_dims):
            rank = layer_shape + rank
        dims = layer_shape + weight_dims
        if len(rank) != len(dims):
            raise RankError(
                f"rank={rank!r}: Tucker needs one rank per mode, {len(weight_dims)} "
                f"(out and in modes) or {len(dims)} (with the layer modes)"
            )
        for k, (r, d) in enumerate(zip(rank, dims, strict=False)):
            if r > d:
                raise RankError(f"rank={rank!r}: rank[{k}]={r} exceeds its mode size {d}")
        return tuple(rank)

    @classmethod
    def rank_for_count(cls, n_params: int, out_modes: Modes, in_modes: Modes, layer_shape: Modes):
        dims = out_modes + in_modes

        def count(ranks: list[int]) -> int:
            return cls.count_parameters(
                layer_shape + tuple(ranks), out_modes, in_modes, layer_shape
            )

        def proportional(s: float) -> list[int]:
            return [max(1, min(d, math.floor(s * d))) for d in dims]

        lo, hi = 0.0, 1.0
        for _ in range(60):  # bisection on the shared fraction of each mode kept
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if count(proportional(mid)) <= n_params else (lo, mid)
        ranks = proportional(lo)
        order = sorted(range(len(dims)), key=lambda k: -dims[k])
        ranks = fill_to_count(ranks, dims, count, n_params, order)
        return layer_shape + tuple(ranks)

    def init_stds(self, target_std: float) -> list[float | None]:
        # Var(T) = var(G) * prod_k R_k var(U_k): unit-variance projections, core carries the scale.
        stds: list[float | None] = [target_std]
        return stds + [1.0 / math.sqrt(r) for r in self.rank]

    def fit_(self, tensor: Tensor, **options: Any) -> float:
        from ..decompose import tucker_hooi

        self._check_options(options)
        # HOOI sweeps are cheap (~15 ms on a 1024x1024 weight): run up to 100, as tensorly does,
        # so the fit is never worse than its `tucker` at the same ranks (seen: 20 sweeps were).
        options.setdefault("n_iter_max", 100)
        options.setdefault("tol", 1e-8)
        core, factors, error = tucker_hooi(self._check_dense(tensor), list(self.rank), **options)
        self.copy_factors_([core, *factors])
        return error
