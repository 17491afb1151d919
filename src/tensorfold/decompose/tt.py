"""Tensor-train (TT) and TT-matrix (MPO) decompositions by sequential truncated SVD."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from tensorfold.decompose._common import (
    check_int_ranks,
    complete_columns,
    leading_left_singular,
    make_generator,
    prepare,
    small_work_threads,
    work_estimate,
)
from tensorfold.errors import DecompositionError, RankError

__all__ = ["tt_svd", "ttm_svd"]


def _tt_dense(cores: Sequence[torch.Tensor]) -> torch.Tensor:
    """Rebuild the dense tensor of a TT, left to right (a chain of GEMMs)."""
    full = cores[0].reshape(-1, cores[0].shape[-1])
    for core in cores[1:]:
        r = core.shape[0]
        full = (full @ core.reshape(r, -1)).reshape(-1, core.shape[-1])
    return full.reshape([c.shape[1] for c in cores])


def _tt_svd_unit(
    x: torch.Tensor, ranks: list[int], generator: torch.Generator
) -> list[torch.Tensor]:
    """TT-SVD of a tensor ``x`` (already checked and scaled); cores are left-orthonormal."""
    dims = list(x.shape)
    cores: list[torch.Tensor] = []
    rest = x.reshape(1, -1)
    for k in range(len(dims) - 1):
        r_prev, r_next = ranks[k], ranks[k + 1]
        mat = rest.reshape(r_prev * dims[k], -1)
        u, _ = leading_left_singular(mat, r_next)
        avail = u.shape[1]
        # Padded bond directions get non-zero core columns but zero rows in the remainder,
        # so they add exactly nothing to the reconstruction.
        u_full = complete_columns(u, r_next, generator)
        rest = mat.new_zeros(r_next, mat.shape[1])
        rest[:avail] = u.mT @ mat
        cores.append(u_full.reshape(r_prev, dims[k], r_next))
    cores.append(rest.reshape(ranks[-2], dims[-1], 1))
    return cores


def _rel_error(x: torch.Tensor, x_hat: torch.Tensor) -> float:
    return float(torch.linalg.vector_norm(x - x_hat))


def tt_svd(
    tensor: torch.Tensor,
    ranks: Sequence[int],
    *,
    compute_dtype: torch.dtype | None = None,
    generator: torch.Generator | None = None,
) -> tuple[list[torch.Tensor], float]:
    """Tensor-train decomposition by sequential truncated SVD (left to right).

    Math: ``T[i_1..i_N] ~= G_1[:, i_1, :] G_2[:, i_2, :] ... G_N[:, i_N, :]``.

    The result is exact (up to round-off) when ``tensor`` has TT ranks ``<= ranks``. Where a
    bond cannot hold ``ranks[k]`` independent directions, the core is padded with extra
    (non-zero) columns whose matching slices in the next core are zero.

    Args:
        tensor: Dense real tensor with ``ndim = N >= 1`` and finite entries.
        ranks: ``N + 1`` bond ranks ``(1, r_1, ..., r_{N-1}, 1)``.
        compute_dtype: float32 or float64; default float64 for float64 input, else float32.
        generator: Source of the random padding columns (a fixed seed when omitted).

    Returns:
        ``(cores, rel_error)``: ``cores[k]`` of shape ``(ranks[k], tensor.shape[k],
        ranks[k+1])`` in the compute dtype on ``tensor``'s device, and
        ``||T - T_hat||_F / ||T||_F`` as a float (0.0 when ``T == 0``).

    Raises:
        DecompositionError: ``tensor`` holds NaN or Inf, or is not a real tensor.
        RankError: ``ranks`` has the wrong length, a non-positive entry, or ends other than 1.

    Shape:
        tensor ``(d_1, ..., d_N)`` -> cores ``[(r_0, d_1, r_1), ..., (r_{N-1}, d_N, r_N)]``.

    Example:
        >>> t = torch.randn(4, 5, 6, dtype=torch.float64)
        >>> cores, err = tt_svd(t, (1, 4, 6, 1))
        >>> [tuple(c.shape) for c in cores], err < 1e-10
        ([(1, 4, 4), (4, 5, 6), (6, 6, 1)], True)
    """
    with torch.no_grad(), small_work_threads(work_estimate(tensor, ranks)):
        prep = prepare(tensor, compute_dtype)
        r = check_int_ranks(ranks, prep.x.ndim + 1, f"a TT of a {prep.x.ndim}-way tensor")
        if r[0] != 1 or r[-1] != 1:
            raise RankError(f"ranks={tuple(r)} must start and end with 1 for a TT")
        cores = _tt_svd_unit(prep.x, r, make_generator(generator))
        err = _rel_error(prep.x, _tt_dense(cores)) if prep.norm > 0 else 0.0
        # Put the scale on the last core: the others stay orthonormal.
        cores[-1] = cores[-1] * prep.norm
        return cores, err


def ttm_svd(
    tensor: torch.Tensor,
    n_layer_modes: int,
    out_modes: Sequence[int],
    in_modes: Sequence[int],
    ranks: Sequence[int],
    *,
    compute_dtype: torch.dtype | None = None,
    generator: torch.Generator | None = None,
) -> tuple[list[torch.Tensor], float]:
    """TT-matrix (MPO) decomposition: TT-SVD over merged ``(out_k, in_k)`` pairs.

    Math: ``T[l.., o_1..o_d, i_1..i_d] ~= L_1[:, l_1, :] ... M_1[:, o_1, i_1, :] ...
    M_d[:, o_d, i_d, :]``.

    Exact (up to round-off) when the permuted tensor ``(layer modes, (o_1 i_1), ...,
    (o_d i_d))`` has TT ranks ``<= ranks``.

    Args:
        tensor: Dense real tensor of shape ``layer_shape + out_modes + in_modes``.
        n_layer_modes: How many leading dims are layer modes (0 for a single weight).
        out_modes: Output modes ``(o_1, ..., o_d)``.
        in_modes: Input modes ``(i_1, ..., i_d)``, same length as ``out_modes``.
        ranks: ``n_layer_modes + d + 1`` bond ranks, 1 at both ends.
        compute_dtype: float32 or float64; default float64 for float64 input, else float32.
        generator: Source of the random padding columns (a fixed seed when omitted).

    Returns:
        ``(cores, rel_error)``: one core ``(r_{k-1}, n_k, r_k)`` per layer mode, then one core
        ``(r_{k-1}, o_k, i_k, r_k)`` per mode pair, and ``||T - T_hat||_F / ||T||_F``.

    Raises:
        DecompositionError: ``tensor`` holds NaN or Inf, or its shape does not match.
        RankError: ``ranks`` has the wrong length, a non-positive entry, or ends other than 1.

    Shape:
        tensor ``(*layer, o_1..o_d, i_1..i_d)`` -> cores ``[(r, n, r')..., (r, o_k, i_k, r')...]``.

    Example:
        >>> w = torch.randn(2 * 3, 4 * 5, dtype=torch.float64).reshape(2, 3, 4, 5)
        >>> cores, err = ttm_svd(w, 0, (2, 3), (4, 5), (1, 8, 1))
        >>> [tuple(c.shape) for c in cores], err < 1e-10
        ([(1, 2, 4, 8), (8, 3, 5, 1)], True)
    """
    with torch.no_grad(), small_work_threads(work_estimate(tensor, ranks)):
        prep = prepare(tensor, compute_dtype)
        outs, ins = [int(o) for o in out_modes], [int(i) for i in in_modes]
        n_layer = int(n_layer_modes)
        if len(outs) != len(ins):
            raise DecompositionError(
                f"out_modes={tuple(outs)} and in_modes={tuple(ins)} must have the same length "
                "(pad the shorter one with 1-modes)"
            )
        shape = tuple(prep.x.shape)
        d = len(outs)
        if n_layer < 0 or shape[n_layer:] != tuple(outs + ins) or n_layer + d == 0:
            raise DecompositionError(
                f"tensor shape {shape} does not match n_layer_modes={n_layer_modes}, "
                f"out_modes={tuple(outs)}, in_modes={tuple(ins)}: expected "
                f"layer_shape + {tuple(outs + ins)} with {n_layer_modes} layer dims"
            )
        n_cores = n_layer + d
        r = check_int_ranks(ranks, n_cores + 1, f"a TT-matrix with {n_cores} cores")
        if r[0] != 1 or r[-1] != 1:
            raise RankError(f"ranks={tuple(r)} must start and end with 1 for a TT-matrix")
        perm = list(range(n_layer))
        for k in range(d):
            perm += [n_layer + k, n_layer + d + k]
        merged = list(shape[:n_layer]) + [o * i for o, i in zip(outs, ins, strict=True)]
        xp = prep.x.permute(perm).reshape(merged)
        cores = _tt_svd_unit(xp, r, make_generator(generator))
        err = _rel_error(xp, _tt_dense(cores)) if prep.norm > 0 else 0.0
        cores[-1] = cores[-1] * prep.norm
        for k in range(d):
            c = cores[n_layer + k]
            cores[n_layer + k] = c.reshape(c.shape[0], outs[k], ins[k], c.shape[-1])
        return cores, err
