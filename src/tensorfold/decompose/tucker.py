"""Tucker decomposition: HOSVD start, then higher-order orthogonal iteration (HOOI)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from tensorfold.decompose._common import (
    balanced_split,
    check_int_ranks,
    complete_columns,
    lapack_thread,
    leading_left_singular,
    make_generator,
    prepare,
    randn,
    round_off_floor,
    small_work_threads,
    work_estimate,
)
from tensorfold.errors import DecompositionError, RankError

__all__ = ["tucker_hooi"]


def _mode_dot(x: torch.Tensor, m: torch.Tensor, mode: int) -> torch.Tensor:
    """Contract ``x``'s ``mode`` with the rows of ``m``: ``y = x x_mode m^T`` for ``m: (d, r)``."""
    return torch.movedim(torch.tensordot(x, m, dims=([mode], [0])), -1, mode)


def _project(
    x: torch.Tensor, factors: Sequence[torch.Tensor], modes: Sequence[int]
) -> torch.Tensor:
    """Project ``x``'s ``modes`` onto the columns of ``factors[i]`` (one per listed mode)."""
    # Shrink the modes with the largest reduction first: later contractions get cheaper.
    order = sorted(range(len(modes)), key=lambda i: factors[i].shape[1] / factors[i].shape[0])
    for i in order:
        x = _mode_dot(x, factors[i], modes[i])
    return x


def _kron(mats: Sequence[torch.Tensor], like: torch.Tensor) -> torch.Tensor:
    """Kronecker product in C order of the modes: ``(prod d_k, prod r_k)``."""
    out = like.new_ones(1, 1)
    for m in mats:
        # torch.kron fails ('view size is not compatible') on some strided inputs, e.g. a
        # (d, 1) factor with strides (1, d): an explicit outer product and reshape instead.
        out = (out[:, None, :, None] * m[None, :, None, :]).reshape(
            out.shape[0] * m.shape[0], out.shape[1] * m.shape[1]
        )
    return out


def _unfold(x: torch.Tensor, mode: int) -> torch.Tensor:
    return torch.movedim(x, mode, 0).reshape(x.shape[mode], -1)


def _subspace(
    y: torch.Tensor, mode: int, r: int, generator: torch.Generator
) -> tuple[torch.Tensor, int]:
    """Leading ``r`` left singular vectors of ``y``'s mode unfolding, completed if short."""
    u, _ = leading_left_singular(_unfold(y, mode), r)
    return complete_columns(u, r, generator), u.shape[1]


def tucker_hooi(
    tensor: torch.Tensor,
    ranks: Sequence[int],
    n_iter_max: int = 50,
    tol: float = 1e-10,
    init: str = "svd",
    *,
    compute_dtype: torch.dtype | None = None,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, list[torch.Tensor], float]:
    """Tucker decomposition with orthonormal factors by HOSVD + HOOI.

    Math: ``T ~= G x_1 U_1 x_2 U_2 ... x_N U_N`` with ``U_k^T U_k = I``.

    Each HOOI step replaces ``U_k`` by the leading ``ranks[k]`` left singular vectors of the
    mode-``k`` unfolding of ``T`` projected on all other factors; iterations stop when the
    relative error changes by less than ``tol`` (relatively) or after ``n_iter_max`` sweeps.
    Exact (up to round-off) when ``tensor`` has multilinear ranks ``<= ranks``. A factor whose
    unfolding has fewer than ``ranks[k]`` directions is completed with orthonormal columns
    whose core slices are zero.

    Args:
        tensor: Dense real tensor with finite entries.
        ranks: One rank per mode, ``1 <= ranks[k] <= tensor.shape[k]``.
        n_iter_max: Maximum number of HOOI sweeps (0 gives the plain HOSVD).
        tol: Stop when ``|e_prev - e| <= tol * e_prev``.
        init: ``"svd"`` (HOSVD) or ``"random"`` (random orthonormal factors).
        compute_dtype: float32 or float64; default float64 for float64 input, else float32.
        generator: Source of random columns (a fixed seed when omitted).

    Returns:
        ``(core, factors, rel_error)``: ``core`` of shape ``ranks``, ``factors[k]`` of shape
        ``(tensor.shape[k], ranks[k])`` with orthonormal columns, and
        ``||T - T_hat||_F / ||T||_F`` as a float (0.0 when ``T == 0``).

    Raises:
        DecompositionError: ``tensor`` holds NaN or Inf, or ``init`` is unknown.
        RankError: ``ranks`` has the wrong length or an entry outside ``[1, tensor.shape[k]]``.

    Shape:
        tensor ``(d_1, ..., d_N)`` -> core ``(r_1, ..., r_N)``, factors ``[(d_k, r_k)]``.

    Example:
        >>> t = torch.randn(4, 5, 6, dtype=torch.float64)
        >>> core, factors, err = tucker_hooi(t, (4, 5, 6))
        >>> tuple(core.shape), err < 1e-10
        ((4, 5, 6), True)
    """
    with torch.no_grad(), small_work_threads(work_estimate(tensor, ranks)):
        prep = prepare(tensor, compute_dtype)
        x = prep.x
        shape = list(x.shape)
        r = check_int_ranks(ranks, x.ndim, f"a Tucker of a {x.ndim}-way tensor")
        bad = [k for k in range(x.ndim) if r[k] > shape[k]]
        if bad:
            raise RankError(
                f"ranks={tuple(r)} exceed the tensor shape {tuple(shape)} at modes {bad}; "
                "a Tucker rank must be <= its mode size"
            )
        if init not in ("svd", "random"):
            raise DecompositionError(f"init={init!r} is not supported; use 'svd' or 'random'")
        gen = make_generator(generator)
        n_valid = list(r)  # leading factor columns that carry data; the rest are padding
        factors: list[torch.Tensor] = []
        for k in range(x.ndim):
            if init == "svd":
                u, n_valid[k] = _subspace(x, k, r[k], gen)
            else:
                with lapack_thread():
                    u = torch.linalg.qr(randn((shape[k], r[k]), gen, x)).Q
            factors.append(u)

        # T as a (left modes, right modes) matrix: projecting one group with a Kronecker
        # product of its factors is one GEMM, shared by every mode of the other group.
        n_left = balanced_split(shape)
        left, right = list(range(n_left)), list(range(n_left, x.ndim))
        x_mat = x.reshape(math.prod(shape[:n_left]), -1)
        floor = round_off_floor(prep.dtype)
        err_prev = None
        for _ in range(int(n_iter_max) if prep.norm > 0 else 0):
            for group, other, mat in ((left, right, x_mat), (right, left, x_mat.mT)):
                if not group:
                    continue
                z = mat @ _kron([factors[j] for j in other], x)
                z = z.reshape([shape[j] for j in group] + [-1])
                for pos, k in enumerate(group):
                    rest = [i for i in range(len(group)) if i != pos]
                    y = _project(z, [factors[group[i]] for i in rest], rest)
                    factors[k], n_valid[k] = _subspace(y, pos, r[k], gen)
            core = _mode_dot(y, factors[k], pos)
            # ||x - x_hat||^2 = 1 - ||core||^2 for orthonormal factors (cheap; only steers).
            err = max(0.0, 1.0 - float(torch.linalg.vector_norm(core)) ** 2) ** 0.5
            if err_prev is not None and (abs(err_prev - err) <= tol * err_prev or err < floor):
                break
            err_prev = err

        k_left = _kron([factors[j] for j in left], x)
        k_right = _kron([factors[j] for j in right], x)
        core = (k_left.mT @ x_mat @ k_right).reshape(r)
        # Padding columns span directions the data does not have: make them contribute 0.
        for k in range(x.ndim):
            if n_valid[k] < r[k]:
                core.narrow(k, n_valid[k], r[k] - n_valid[k]).zero_()
        if prep.norm > 0:
            x_hat = k_left @ core.reshape(k_left.shape[1], -1) @ k_right.mT
            err_out = float(torch.linalg.vector_norm(x_mat - x_hat))
        else:
            err_out = 0.0
        return (core * prep.norm).contiguous(), [f.contiguous() for f in factors], err_out
