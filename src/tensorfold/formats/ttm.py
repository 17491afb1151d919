"""TT-matrix (MPO, block-TT): ``W[(o_1..o_N),(i_1..i_N)] = G_1[o_1,i_1] ... G_N[o_N,i_N]``."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from torch import Tensor

from ..errors import RankError
from .base import FactorizedTensor, Modes, register
from .tt import (
    bonds_for_count,
    resolve_bonds_from_int,
    resolve_bonds_from_sequence,
    tt_init_std,
)


def padded(out_modes: Modes, in_modes: Modes) -> tuple[Modes, Modes]:
    """Pad the shorter side with trailing 1-modes so both have as many modes."""
    n = max(len(out_modes), len(in_modes))
    return out_modes + (1,) * (n - len(out_modes)), in_modes + (1,) * (n - len(in_modes))


def core_dims(out_modes: Modes, in_modes: Modes, layer_shape: Modes) -> Modes:
    """Size of each core's physical index: the layer modes, then ``o_k * i_k`` per pair."""
    outs, ins = padded(out_modes, in_modes)
    return layer_shape + tuple(o * i for o, i in zip(outs, ins, strict=False))


@register
class TTMTensor(FactorizedTensor):
    """TT-matrix: one core ``(r, n_l, r)`` per layer mode, then one core ``(r, o_k, i_k, r)``
    per pair of out and in modes (the shorter side padded with 1-modes). ``rank`` is the
    tuple of inner bond ranks."""

    name = "ttm"
    aliases = ("blocktt", "tt-matrix", "tt_matrix", "mpo")
    decomposition_options = ()

    @classmethod
    def parameter_shapes(
        cls, rank: tuple[int, ...], out_modes: Modes, in_modes: Modes, layer_shape: Modes
    ):
        full = (1, *rank, 1)
        outs, ins = padded(out_modes, in_modes)
        shapes: list[tuple[int, ...]] = [
            (full[k], n, full[k + 1]) for k, n in enumerate(layer_shape)
        ]
        offset = len(layer_shape)
        shapes += [
            (full[offset + k], o, i, full[offset + k + 1])
            for k, (o, i) in enumerate(zip(outs, ins, strict=False))
        ]
        return shapes

    @classmethod
    def subscripts(cls, layer: str, out: str, inp: str, fresh: Iterator[str]) -> tuple[str, ...]:
        n = max(len(out), len(inp))
        # Padded 1-modes get letters of their own that appear nowhere else (summed, size 1).
        outs = out + "".join(next(fresh) for _ in range(n - len(out)))
        ins = inp + "".join(next(fresh) for _ in range(n - len(inp)))
        bonds = [next(fresh) for _ in range(len(layer) + n + 1)]
        subs = [bonds[k] + m + bonds[k + 1] for k, m in enumerate(layer)]
        offset = len(layer)
        subs += [
            bonds[offset + k] + o + i + bonds[offset + k + 1]
            for k, (o, i) in enumerate(zip(outs, ins, strict=False))
        ]
        return tuple(subs)

    @classmethod
    def rank_from_int(cls, rank: int, out_modes: Modes, in_modes: Modes, layer_shape: Modes):
        dims = core_dims(out_modes, in_modes, layer_shape)
        if len(dims) == 1:
            raise RankError(_single_core_message(f"rank={rank}", dims))
        return resolve_bonds_from_int(rank, dims)

    @classmethod
    def rank_from_sequence(
        cls, rank: tuple[int, ...], out_modes: Modes, in_modes: Modes, layer_shape: Modes
    ):
        return resolve_bonds_from_sequence(rank, core_dims(out_modes, in_modes, layer_shape), "ttm")

    @classmethod
    def rank_for_count(cls, n_params: int, out_modes: Modes, in_modes: Modes, layer_shape: Modes):
        dims = core_dims(out_modes, in_modes, layer_shape)
        if len(dims) == 1 and n_params < 0.95 * dims[0]:
            raise RankError(_single_core_message(f"a budget of {n_params} parameters", dims))
        return bonds_for_count(n_params, dims)

    def init_stds(self, target_std: float) -> list[float | None]:
        n = len(self.factors)
        return [tt_init_std(target_std, self.rank, n)] * n

    def fit_(self, tensor: Tensor, **options: Any) -> float:
        from ..decompose import ttm_svd

        self._check_options(options)
        outs, ins = padded(self.out_modes, self.in_modes)
        dense = self._check_dense(tensor).reshape(self.layer_shape + outs + ins)
        cores, error = ttm_svd(dense, len(self.layer_shape), outs, ins, [1, *self.rank, 1])
        self.copy_factors_(cores)
        return error


def _single_core_message(asked: str, dims: Modes) -> str:
    # One out mode, one in mode and no layer modes: a single core is the dense matrix itself.
    return (
        f"{asked} cannot be met by 'ttm' with one out mode and one in mode: its single core is "
        f"the dense weight ({dims[0]} parameters, no bond to truncate); "
        "use two or more modes per side"
    )
