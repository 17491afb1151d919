"""CP (canonical polyadic): ``T = sum_r w_r a1_r o a2_r o ... o aN_r``."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from torch import Tensor

from ..errors import RankError
from .base import FactorizedTensor, Modes, register


@register
class CPTensor(FactorizedTensor):
    """CP format. Parameters: ``weights (R,)`` then one factor ``(d_k, R)`` per mode
    (layer modes first, then out modes, then in modes). ``rank`` is the int ``R``.

    ``fit_`` runs CP-ALS from an SVD start; without ``n_iter_max`` it caps the sweeps by a
    work budget (:func:`default_sweeps`)."""

    name = "cp"
    aliases = ("parafac", "candecomp")
    decomposition_options = ("n_iter_max", "tol", "init", "generator")

    @classmethod
    def parameter_shapes(
        cls, rank: int, out_modes: Modes, in_modes: Modes, layer_shape: Modes
    ) -> list[tuple[int, ...]]:
        return [(rank,)] + [(d, rank) for d in layer_shape + out_modes + in_modes]

    @classmethod
    def subscripts(cls, layer: str, out: str, inp: str, fresh: Iterator[str]) -> tuple[str, ...]:
        r = next(fresh)
        return (r, *(m + r for m in layer + out + inp))

    @classmethod
    def rank_from_int(cls, rank: int, out_modes: Modes, in_modes: Modes, layer_shape: Modes) -> int:
        return rank

    @classmethod
    def rank_from_sequence(
        cls, rank: tuple[int, ...], out_modes: Modes, in_modes: Modes, layer_shape: Modes
    ) -> int:
        if len(rank) != 1:
            raise RankError(f"rank={rank!r}: CP takes a single int rank, got {len(rank)} values")
        return rank[0]

    @classmethod
    def rank_for_count(
        cls, n_params: int, out_modes: Modes, in_modes: Modes, layer_shape: Modes
    ) -> int:
        per_rank = 1 + sum(layer_shape + out_modes + in_modes)
        return max(1, n_params // per_rank)

    def init_stds(self, target_std: float) -> list[float | None]:
        # Var(T) = R * prod_k var(a_k) with unit weights: share the scale equally.
        n = len(self.all_modes)
        std = (target_std**2 / self.rank) ** (1.0 / (2 * n))
        return [None] + [std] * n

    def fit_(self, tensor: Tensor, **options: Any) -> float:
        from ..decompose import cp_als

        self._check_options(options)
        dense = self._check_dense(tensor)
        options.setdefault("n_iter_max", default_sweeps(dense.numel(), self.rank, dense.ndim))
        weights, factors, error = cp_als(dense, self.rank, **options)
        self.copy_factors_(_balance_cp(weights, factors))
        return error

    def low_rank_capacity(self) -> int | None:
        """The CP rank ``R`` where the weight is a matrix (one out and one in mode, no
        layer modes): ``W = sum_r w_r a_r b_r^T``; ``None`` otherwise."""
        if self.layer_shape or len(self.out_modes) != 1 or len(self.in_modes) != 1:
            return None
        return int(self.rank)

    def _assign_low_rank(self, left: Tensor, right: Tensor, capacity: int) -> None:
        # Unit columns, the scale of each term in its weight (as a CP decomposition has it).
        m = left.shape[1]
        left_norms = left.norm(dim=0).clamp_min(1e-30)
        right_norms = right.norm(dim=1).clamp_min(1e-30)
        weights = left.new_zeros(capacity)
        weights[:m] = left_norms * right_norms
        a = left.new_zeros(left.shape[0], capacity)
        a[:, :m] = left / left_norms
        b = right.new_zeros(right.shape[1], capacity)
        b[:, :m] = (right / right_norms.unsqueeze(1)).T
        self.copy_factors_([weights, a, b])


# About 3 s of ALS on two cores: a layer conversion should take seconds, not minutes.
_SWEEP_BUDGET_FLOPS = 2e11


def default_sweeps(numel: int, rank: int, n_modes: int) -> int:
    """ALS sweeps for ``fit_`` when the caller gives none: 100, fewer for big problems (>= 10).

    One sweep costs two GEMMs with the half Khatri-Rao products (``4 numel R``) and one
    ``R x R`` Cholesky per mode (``R^3 / 3``). Past ~10 sweeps the error of a layer-sized
    problem moves in the third digit (0.893 -> 0.874 from 10 to 100 sweeps on a 1024x1024
    Gaussian weight at R=1613), so a work cap trades that for a 10x faster conversion.
    Pass ``decomposition_kwargs={"n_iter_max": ...}`` to override.
    """
    sweep = 4 * numel * rank + n_modes * rank**3 / 3
    return int(min(100, max(10, _SWEEP_BUDGET_FLOPS // sweep)))


def _balance_cp(weights: Tensor, factors: list[Tensor]) -> list[Tensor]:
    """Spread each component's scale evenly over its factors (keeps weights at 1).

    Equal column norms keep gradients of all factors on one scale when training goes on.
    """
    scale = weights.abs() ** (1.0 / len(factors))
    sign = weights.sign()
    sign[sign == 0] = 1
    balanced = [f * scale for f in factors]
    balanced[0] = balanced[0] * sign
    return [weights.new_ones(weights.shape), *balanced]
