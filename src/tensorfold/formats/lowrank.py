"""A low-rank matrix in a gauge-fixed form: ``W = U [I C] P``.

A pair ``W = U V`` of rank ``k`` holds ``k (m + n)`` numbers but has only ``k (m + n - k)``
degrees of freedom: ``U V = (U S) (S^-1 V)`` for every invertible ``S``. Fixing ``k`` columns
of ``V`` to the identity removes that freedom, so the same parameter count holds a larger
rank. The fixed columns are chosen by LU with partial pivoting of ``V``'s orthonormal row
basis (the DEIM choice), which keeps ``C`` well conditioned.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import RankError
from .base import FactorizedTensor, Modes, largest_fitting, register

# GEMM kernels run up to twice as fast when a product's width (here the rank) is a multiple
# of 16, and faster at multiples of 8 than at other widths (RESULTS, "Low-rank forward and
# rank steps"): ranks that fill a count take such steps where a step costs at most an
# eighth of the rank.
_RANK_STEPS = ((128, 16), (64, 8))  # (from this rank on, steps of)
# In the time of one GEMM multiply-add (on the CPU measured), gathering one input number
# costs about 128 (the gather and the copy of x_1 into the sum) and building one number of
# V about 256 (a transposed copy and an indexed one): fitted to where one form overtakes
# the other on MiniLM's shapes (RESULTS, "Low-rank forward and rank steps").
_GATHER_COST = 128
_BUILD_COST = 256


def rank_on_grid(rank: int) -> int:
    """The largest rank ``<= rank`` in the steps ranks that fill a count take."""
    for start, step in _RANK_STEPS:
        if rank >= start:
            return rank - rank % step
    return rank


def next_rank_on_grid(rank: int) -> int:
    """The smallest rank ``> rank`` in those steps."""
    for start, step in _RANK_STEPS:
        if rank + 1 >= start:
            return rank + step - rank % step
    return rank + 1


def builds_v(rows: int, rank: int, in_f: int) -> bool:
    """Whether :meth:`LowRankTensor.linear` builds ``V`` for ``rows`` inputs instead of
    gathering them: ``x V^T`` costs ``rank^2`` more multiply-adds per row than
    ``x_1 + x_2 C^T`` but builds ``rank * in_f`` numbers once instead of gathering
    ``rows * in_f``."""
    return rows * (_GATHER_COST * in_f - rank * rank) > _BUILD_COST * rank * in_f


def gauge_count(rank: int, out_f: int, in_f: int) -> int:
    """Numbers held by one layer's ``U (out_f, rank)`` and ``C (rank, in_f - rank)``."""
    return rank * (out_f + in_f - rank)


def gauge_fixed(left: Tensor, right: Tensor, rank: int) -> tuple[Tensor, Tensor, Tensor]:
    """``(U, C, perm)`` with ``U @ V == left @ right``, where column ``perm[j]`` of ``V`` is
    column ``j`` of ``cat([I, C], 1)`` (the ``rank`` pivot columns first).

    ``left (out, m)``, ``right (m, in)`` with ``m <= rank <= min(out, in)``; computed in
    float64.
    """
    left, right = left.double(), right.double()
    m, n = right.shape
    # An orthonormal basis of rank rows whose first m span right's rows (padded with
    # random directions where right has fewer rows): right = T^T Q^T.
    pad = torch.randn(n, rank - m, dtype=right.dtype, generator=torch.Generator().manual_seed(0))
    q, r = torch.linalg.qr(torch.cat([right.T, pad.to(right.device)], dim=1))
    basis = q.T  # (rank, n), orthonormal rows
    lift = left.new_zeros(left.shape[0], rank)
    lift[:, :m] = left @ r[:m, :m].T
    # Partial pivoting of basis^T picks rank well-conditioned columns.
    _, pivots = torch.linalg.lu_factor(basis.T)
    perm = list(range(n))
    for i, p in enumerate(pivots.tolist()):
        perm[i], perm[p - 1] = perm[p - 1], perm[i]
    perm_t = torch.tensor(perm, device=right.device)
    block = basis[:, perm_t[:rank]]  # (rank, rank), invertible
    coef = torch.linalg.solve(block, basis[:, perm_t[rank:]])
    return lift @ block, coef, perm_t


@register
class LowRankTensor(FactorizedTensor):
    """Low rank in a gauge-fixed form, per layer ``W = U [I C] P`` (``P`` a permutation of
    the input features). Parameters: ``U (*layer_shape, *out_modes, k)`` and
    ``C (*layer_shape, k, in_features - k)``, ``U`` stored ``k``-major (its strides those of
    ``U^T``); buffer ``perm`` (the permutation, per layer).
    ``rank`` is the int ``k <= min(out_features, in_features)``; a layer holds
    ``k (out_features + in_features - k)`` numbers, so at full rank exactly the dense count.
    The factors the network contracts are ``U`` and ``V = [I C] P``, built from ``C``; a
    layer's own forward (:meth:`linear`) builds nothing: ``x P^T = [x_1 x_2]`` is one
    gather of the input, and ``x V^T = x_1 + x_2 C^T``."""

    name = "lowrank"
    aliases = ("low-rank", "gauge-fixed")
    decomposition_options = ()
    builds_values = True

    @classmethod
    def parameter_shapes(
        cls, rank: int, out_modes: Modes, in_modes: Modes, layer_shape: Modes
    ) -> list[tuple[int, ...]]:
        return [(*layer_shape, *out_modes, rank), (*layer_shape, rank, math.prod(in_modes) - rank)]

    @classmethod
    def empty_factor(
        cls,
        index: int,
        shape: tuple[int, ...],
        n_layer_modes: int,
        device: torch.device | str | None,
        dtype: torch.dtype | None,
    ) -> Tensor:
        # U (out, k) is stored k-major, as U^T: one input row's product with it then
        # streams rows of out_features numbers instead of rows of k, which the CPU's GEMV
        # reads from memory much faster (RESULTS, "Decode at realistic width"); many rows
        # run as fast either way.
        if index != 0:
            return super().empty_factor(index, shape, n_layer_modes, device, dtype)
        n = n_layer_modes
        k_first = (*shape[:n], shape[-1], *shape[n:-1])
        return torch.empty(k_first, device=device, dtype=dtype).movedim(n, -1)

    @classmethod
    def subscripts(cls, layer: str, out: str, inp: str, fresh: Iterator[str]) -> tuple[str, ...]:
        r = next(fresh)
        return (layer + out + r, layer + r + inp)

    @classmethod
    def rank_from_int(cls, rank: int, out_modes: Modes, in_modes: Modes, layer_shape: Modes) -> int:
        return min(rank, math.prod(out_modes), math.prod(in_modes))

    @classmethod
    def rank_from_sequence(
        cls, rank: tuple[int, ...], out_modes: Modes, in_modes: Modes, layer_shape: Modes
    ) -> int:
        if len(rank) != 1:
            raise RankError(
                f"rank={rank!r}: lowrank takes a single int rank, got {len(rank)} values"
            )
        return cls.rank_from_int(rank[0], out_modes, in_modes, layer_shape)

    @classmethod
    def rank_for_count(
        cls, n_params: int, out_modes: Modes, in_modes: Modes, layer_shape: Modes
    ) -> int:
        out_f, in_f, n = math.prod(out_modes), math.prod(in_modes), math.prod(layer_shape)
        full = min(out_f, in_f)
        k = largest_fitting(1, full, lambda k: n * gauge_count(k, out_f, in_f) <= n_params)
        return k if k == full else rank_on_grid(k)

    def _init_buffers(self) -> None:
        in_f = math.prod(self.in_modes)
        perm = torch.arange(in_f, device=self.factors[0].device)
        self.register_buffer("perm", perm.expand(*self.layer_shape, in_f).clone())

    def init_stds(self, target_std: float) -> list[float | None]:
        # W's entries are a column of U (fixed columns) or k products u c (the others):
        # var(U) = target^2 and var(C) = 1 / k give both the target.
        return [target_std, 1.0 / math.sqrt(self.rank)]

    def reset_parameters(
        self, std: float | None = None, generator: torch.Generator | None = None
    ) -> None:
        super().reset_parameters(std, generator)
        perm = self._perm()
        perm.copy_(torch.arange(perm.shape[-1], device=perm.device).expand_as(perm))

    def _perm(self) -> Tensor:
        perm = self._buffers["perm"]
        assert perm is not None  # registered in __init__
        return perm

    def values_of(self, stored: Sequence[Tensor]) -> list[Tensor]:
        """``U`` and ``V = [I C] P`` from the stored ``U`` and ``C``."""
        u, coef = stored
        perm = self._perm()
        k = int(self.rank)
        eye = torch.eye(k, dtype=coef.dtype, device=coef.device).expand(*coef.shape[:-1], k)
        full = torch.cat([eye, coef], dim=-1)
        if self.layer_shape:
            v = full.new_zeros(full.shape).scatter(-1, perm.unsqueeze(-2).expand_as(full), full)
        else:
            v = full.new_zeros(full.shape).index_copy(-1, perm, full)
        return [u, v.reshape(*v.shape[:-1], *self.in_modes)]

    def linear(self, x: Tensor, indices: tuple[int, ...], bias: Tensor | None) -> Tensor | None:
        """``x W^T + bias`` for one layer, two GEMMs: on few rows the input is gathered
        (``x P^T = [x_1 x_2]``, then ``x_1 + x_2 C^T``); on many, ``V^T`` is built by one
        indexed copy of ``[I C]^T`` and multiplied (see :func:`builds_v`)."""
        u, coef = self._stored(indices)
        perm = self._perm()[indices] if indices else self._perm()
        k = int(self.rank)
        flat = x.reshape(-1, x.shape[-1])
        if builds_v(flat.shape[0], k, flat.shape[1]):
            eye = torch.eye(k, dtype=coef.dtype, device=coef.device)
            stacked = torch.cat([eye, coef.T])  # [I C]^T, the rows of V^T in pivot order
            inner = flat @ stacked.new_empty(stacked.shape).index_copy(0, perm, stacked)
        else:
            gathered = flat.index_select(-1, perm)
            inner = torch.addmm(gathered[:, :k], gathered[:, k:], coef.T)
        out = F.linear(inner, u.reshape(-1, k), bias)
        return out.reshape(*x.shape[:-1], out.shape[-1])

    def _stored(self, indices: tuple[int, ...]) -> tuple[Tensor, Tensor]:
        """One layer's ``U`` and ``C`` in the working dtype (dequantized where int8)."""
        u, coef = self._stored_values()
        return (u[indices], coef[indices]) if indices else (u, coef)

    def fit_(self, tensor: Tensor, **options: Any) -> float:
        from ..decompose._common import prepare

        self._check_options(options)
        dense = self._check_dense(tensor)
        prepare(dense, torch.float64)  # refuses what no decomposition takes (NaN, Inf)
        out_f, in_f, k = math.prod(self.out_modes), math.prod(self.in_modes), int(self.rank)
        matrices = dense.reshape(-1, out_f, in_f).double()
        us, coefs, perms = [], [], []
        for w in matrices:
            u, s, vh = torch.linalg.svd(w, full_matrices=False)
            left, right = u[:, :k] * s[:k], vh[:k]
            uk, ck, pk = gauge_fixed(left, right, k)
            us.append(uk)
            coefs.append(ck)
            perms.append(pk)
        self._write(torch.stack(us), torch.stack(coefs), torch.stack(perms))
        with torch.no_grad():
            rebuilt = self.to_tensor().double().reshape(matrices.shape)
        return float((rebuilt - matrices).norm() / matrices.norm().clamp_min(1e-300))

    def low_rank_capacity(self) -> int | None:
        """The rank ``k`` (one layer: layer modes have a permutation each)."""
        return None if self.layer_shape else int(self.rank)

    def _assign_low_rank(self, left: Tensor, right: Tensor, capacity: int) -> None:
        u, coef, perm = gauge_fixed(left, right, capacity)
        self._write(u, coef, perm)

    def _write(self, u: Tensor, coef: Tensor, perm: Tensor) -> None:
        target = self._perm()
        target.copy_(perm.reshape(target.shape))
        self.copy_factors_([u, coef])
