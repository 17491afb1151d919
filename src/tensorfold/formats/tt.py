"""Tensor-train over all modes: ``T[i_1..i_N] = G_1[i_1] G_2[i_2] ... G_N[i_N]``."""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

from torch import Tensor

from ..errors import RankError
from .base import (
    FactorizedTensor,
    Modes,
    bond_caps,
    center_out,
    fill_to_count,
    largest_fitting,
    register,
)


def tt_parameter_count(bonds: tuple[int, ...], dims: Modes) -> int:
    full = (1, *bonds, 1)
    return sum(full[k] * d * full[k + 1] for k, d in enumerate(dims))


def resolve_bonds_from_int(rank: int, dims: Modes) -> tuple[int, ...]:
    return tuple(min(rank, c) for c in bond_caps(dims))


def resolve_bonds_from_sequence(rank: tuple[int, ...], dims: Modes, fmt: str) -> tuple[int, ...]:
    n_bonds = len(dims) - 1
    if len(rank) == n_bonds + 2:
        if rank[0] != 1 or rank[-1] != 1:
            raise RankError(f"rank={rank!r}: the boundary ranks of {fmt} must be 1")
        rank = rank[1:-1]
    if len(rank) != n_bonds:
        raise RankError(
            f"rank={rank!r}: {fmt} over {len(dims)} cores needs {n_bonds} bond ranks "
            f"(or {n_bonds + 2} with the boundary 1s)"
        )
    for k, (r, cap) in enumerate(zip(rank, bond_caps(dims), strict=False)):
        if r > cap:
            raise RankError(
                f"rank={rank!r}: bond rank[{k}]={r} exceeds its largest useful value {cap}"
            )
    return tuple(rank)


def bonds_for_count(n_params: int, dims: Modes) -> tuple[int, ...]:
    caps = bond_caps(dims)
    if not caps:
        return ()

    def count(bonds: list[int]) -> int:
        return tt_parameter_count(tuple(bonds), dims)

    uniform = largest_fitting(1, max(caps), lambda r: count([min(r, c) for c in caps]) <= n_params)
    bonds = [min(uniform, c) for c in caps]
    return tuple(fill_to_count(bonds, caps, count, n_params, center_out(len(caps))))


def tt_init_std(target_std: float, bonds: tuple[int, ...], n_cores: int) -> float:
    # Var(T) = prod(bonds) * prod_k var(G_k): every path through the bonds adds one term.
    return (target_std**2 / math.prod(bonds)) ** (1.0 / (2 * n_cores))


@register
class TTTensor(FactorizedTensor):
    """Tensor-train over all modes (layer modes, then out modes, then in modes).

    Parameters: cores ``(r_{k-1}, d_k, r_k)`` with ``r_0 = r_N = 1``. ``rank`` is the
    tuple of the ``N - 1`` inner bond ranks; the bond between the last out mode and
    the first in mode is the matrix rank of the weight.
    """

    name = "tt"
    aliases = ("tensor-train", "tensor_train")
    decomposition_options = ()

    @classmethod
    def parameter_shapes(
        cls, rank: tuple[int, ...], out_modes: Modes, in_modes: Modes, layer_shape: Modes
    ):
        full = (1, *rank, 1)
        dims = layer_shape + out_modes + in_modes
        return [(full[k], d, full[k + 1]) for k, d in enumerate(dims)]

    @classmethod
    def subscripts(cls, layer: str, out: str, inp: str, fresh: Iterator[str]) -> tuple[str, ...]:
        modes = layer + out + inp
        bonds = [next(fresh) for _ in range(len(modes) + 1)]
        return tuple(bonds[k] + m + bonds[k + 1] for k, m in enumerate(modes))

    @classmethod
    def rank_from_int(cls, rank: int, out_modes: Modes, in_modes: Modes, layer_shape: Modes):
        return resolve_bonds_from_int(rank, layer_shape + out_modes + in_modes)

    @classmethod
    def rank_from_sequence(
        cls, rank: tuple[int, ...], out_modes: Modes, in_modes: Modes, layer_shape: Modes
    ):
        return resolve_bonds_from_sequence(rank, layer_shape + out_modes + in_modes, "tt")

    @classmethod
    def rank_for_count(cls, n_params: int, out_modes: Modes, in_modes: Modes, layer_shape: Modes):
        return bonds_for_count(n_params, layer_shape + out_modes + in_modes)

    def init_stds(self, target_std: float) -> list[float | None]:
        n = len(self.factors)
        return [tt_init_std(target_std, self.rank, n)] * n

    def fit_(self, tensor: Tensor, **options: Any) -> float:
        from ..decompose import tt_svd

        self._check_options(options)
        cores, error = tt_svd(self._check_dense(tensor), [1, *self.rank, 1])
        self.copy_factors_(cores)
        return error

    def low_rank_capacity(self) -> int | None:
        """The bond ``r`` where the weight is a matrix (one out and one in mode, no layer
        modes): ``W = G_1 G_2``; ``None`` otherwise."""
        if self.layer_shape or len(self.out_modes) != 1 or len(self.in_modes) != 1:
            return None
        return int(self.rank[0])

    def _assign_low_rank(self, left: Tensor, right: Tensor, capacity: int) -> None:
        m = left.shape[1]
        first = left.new_zeros(left.shape[0], capacity)
        first[:, :m] = left
        second = right.new_zeros(capacity, right.shape[1])
        second[:m] = right
        self.copy_factors_([first, second])
