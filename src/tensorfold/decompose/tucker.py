"""Tucker decomposition: HOSVD start, then higher-order orthogonal iteration (HOOI)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from tensorfold.decompose._common import (
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


def _project_all_but(
    x: torch.Tensor, factors: Sequence[torch.Tensor], skip: int | None
) -> torch.Tensor:
    """``x`` with every mode but ``skip`` (all when None) projected onto its factor's columns."""
    # Shrink the modes with the largest reduction first: later contractions get cheaper.
    order = sorted(
        (k for k in range(x.ndim) if k != skip),
        key=lambda k: factors[k].shape[1] / factors[k].shape[0],
    )
    for k in order:
        x = _mode_dot(x, factors[k], k)
    return x


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

        floor = round_off_floor(prep.dtype)
        err_prev = None
        for _ in range(int(n_iter_max) if prep.norm > 0 else 0):
            for k in range(x.ndim):
                y = _project_all_but(x, factors, k)
                factors[k], n_valid[k] = _subspace(y, k, r[k], gen)
            core = _mode_dot(y, factors[-1], x.ndim - 1)
            # ||x - x_hat||^2 = 1 - ||core||^2 for orthonormal factors (cheap; only steers).
            err = max(0.0, 1.0 - float(torch.linalg.vector_norm(core)) ** 2) ** 0.5
            if err_prev is not None and (abs(err_prev - err) <= tol * err_prev or err < floor):
                break
            err_prev = err

        core = _project_all_but(x, factors, None)
        # Padding columns span directions the data does not have: make them contribute 0.
        for k in range(x.ndim):
            if n_valid[k] < r[k]:
                core.narrow(k, n_valid[k], r[k] - n_valid[k]).zero_()
        if prep.norm > 0:
            x_hat = core
            for k in range(x.ndim):
                x_hat = _mode_dot(x_hat, factors[k].mT, k)
            err_out = float(torch.linalg.vector_norm(x - x_hat))
        else:
            err_out = 0.0
        return (core * prep.norm).contiguous(), [f.contiguous() for f in factors], err_out
