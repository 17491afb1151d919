"""CP (CANDECOMP/PARAFAC) decomposition by alternating least squares (ALS).

The MTTKRPs (``X_(k) (kr of the other factors)``) dominate ALS. Here the modes are split into
a left and a right group with products close to ``sqrt(numel)``, so ``T`` is a
``(left, right)`` matrix. One GEMM with the Khatri-Rao product of the right group's factors,
``P = T_mat @ KR_right`` of shape ``(left, R)``, serves every left mode (each one is then a
cheap contraction of ``P`` with the other left factors), and symmetrically for the right
group. No Khatri-Rao product of all-but-one mode is ever built.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from tensorfold.decompose._common import (
    balanced_split,
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

__all__ = ["cp_als"]


def _khatri_rao(mats: Sequence[torch.Tensor], rank: int, like: torch.Tensor) -> torch.Tensor:
    """Column-wise Kronecker product, rows in C order of the modes: ``(prod d_k, R)``."""
    if not mats:
        return like.new_ones(1, rank)
    kr = mats[0]
    for m in mats[1:]:
        kr = (kr[:, None, :] * m[None, :, :]).reshape(-1, rank)
    return kr


def _group_mttkrp(
    p: torch.Tensor, factors: Sequence[torch.Tensor], group: Sequence[int], pos: int
) -> torch.Tensor:
    """MTTKRP of ``group[pos]`` from ``p`` (``(prod group dims, R)``) and the other factors.

    Math: ``M[j, r] = sum_{a, b} P[a, j, b, r] KR_before[a, r] KR_after[b, r]``.
    """
    rank = p.shape[-1]
    before = _khatri_rao([factors[j] for j in group[:pos]], rank, p)
    after = _khatri_rao([factors[j] for j in group[pos + 1 :]], rank, p)
    d = factors[group[pos]].shape[0]
    p4 = p.reshape(before.shape[0], d, after.shape[0], rank)
    # Elementwise products along the contiguous rank axis, then reductions: no transposes.
    if before.shape[0] > 1:
        p3 = (p4 * before[:, None, None, :]).sum(0)
    else:
        p3 = p4[0]
    if after.shape[0] > 1:
        return (p3 * after[None, :, :]).sum(1)
    return p3[:, 0]


def _solve_normal(v: torch.Tensor, rhs: torch.Tensor, ridge: float) -> torch.Tensor:
    """Solve ``a (v + lam I) = rhs`` for ``a``; ``v`` is overwritten (it is a scratch buffer).

    ``lam = ridge * mean(diag v)``, raised if ``v`` is numerically not positive definite.
    """
    diag = v.diagonal()
    lam = ridge * (float(diag.mean()) or 1.0)
    diag.add_(lam)
    for _ in range(3):
        with lapack_thread():
            chol, info = torch.linalg.cholesky_ex(v)
        if int(info) == 0:
            # a L L^T = rhs, solved from the right: no transposed copies of rhs.
            y = torch.linalg.solve_triangular(chol.mT, rhs, upper=True, left=False)
            return torch.linalg.solve_triangular(chol, y, upper=False, left=False)
        diag.add_(lam * 999.0)  # nearly collinear components: regularise harder, not fail
        lam *= 1e3
    with lapack_thread():
        return torch.linalg.lstsq(v, rhs.mT).solution.mT


def _normalise(a: torch.Tensor, old: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Unit-norm columns and their norms; a zero column keeps its old direction."""
    norms = torch.linalg.vector_norm(a, dim=0)
    ok = norms > 0
    a = torch.where(ok, a / torch.where(ok, norms, torch.ones_like(norms)), old)
    return a, norms


def _init_factors(
    x: torch.Tensor, rank: int, init: str, gen: torch.Generator, padding: str = "normal"
) -> list[torch.Tensor]:
    """Unit-norm starting factors; ``padding`` draws the columns beyond the SVD ones."""
    factors = []
    for k, d in enumerate(x.shape):
        if init == "svd":
            unfold = torch.movedim(x, k, 0).reshape(d, -1)
            u, _ = leading_left_singular(unfold, rank)
        else:
            u = x.new_zeros(d, 0)
        if u.shape[1] < rank:
            # More components than the mode has directions: random columns fill the rest.
            extra = randn((d, rank - u.shape[1]), gen, x)
            if padding == "uniform":
                # Non-negative columns start the extra components away from the SVD ones.
                extra = torch.special.ndtr(extra)
            u = torch.cat([u, extra], dim=1)
        norms = torch.linalg.vector_norm(u, dim=0, keepdim=True).clamp_min(1e-30)
        factors.append(u / norms)
    return factors


def _als(
    x: torch.Tensor,
    factors: list[torch.Tensor],
    n_iter_max: int,
    tol: float,
    ridge: float,
    extrapolate: bool = False,
) -> tuple[torch.Tensor, list[torch.Tensor], float]:
    """ALS sweeps on a unit-norm ``x`` from unit-norm ``factors`` (updated in place).

    With ``extrapolate``, each sweep also tries the point ``prev + s (cur - prev)`` with
    ``s = it^(1/3)`` (a Bro-style line search) and keeps it when its error is lower: this
    walks out of the slow "swamps" of ALS. It costs one reconstruction per sweep.
    """
    shape = list(x.shape)
    rank = factors[0].shape[1]
    n_left = balanced_split(shape)
    left, right = list(range(n_left)), list(range(n_left, len(shape)))
    x_mat = x.reshape(math.prod(shape[:n_left]), -1)
    groups = [(left, right, x_mat), (right, left, x_mat.mT)]
    last = (right or left)[-1]
    grams = [f.mT @ f for f in factors]
    weights = x.new_ones(rank)
    v_buf, v_last = x.new_empty(rank, rank), x.new_empty(rank, rank)
    floor = round_off_floor(x.dtype)
    err_prev = None
    prev: tuple[torch.Tensor, list[torch.Tensor]] | None = None
    for it in range(max(1, int(n_iter_max))):
        for group, other, mat in groups:
            if not group:
                continue
            p = mat @ _khatri_rao([factors[j] for j in other], rank, x)
            h_other = x.new_ones(rank, rank)
            for j in other:
                h_other.mul_(grams[j])
            for pos, m in enumerate(group):
                mttkrp = _group_mttkrp(p, factors, group, pos)
                others_in = [grams[j] for j in group if j != m]
                if others_in:
                    torch.mul(h_other, others_in[0], out=v_buf)
                    for g in others_in[1:]:
                        v_buf.mul_(g)
                else:
                    v_buf.copy_(h_other)
                if m == last:
                    v_last.copy_(v_buf)  # kept for the error estimate; the solve overwrites
                a = _solve_normal(v_buf, mttkrp, ridge)
                factors[m], weights = _normalise(a, factors[m])
                grams[m] = factors[m].mT @ factors[m]
        # Residual from the last solve, without a reconstruction:
        # ||x - x_hat||^2 = 1 - 2 <x, x_hat> + w^T (*_k G_k) w.
        inner = float((mttkrp * factors[last]).sum(0) @ weights)
        hat2 = float(weights @ (v_last * grams[last]) @ weights)
        err = max(0.0, 1.0 - 2.0 * inner + hat2) ** 0.5
        if err < floor:
            # Below what the estimate resolves: measure the residual directly.
            err = _dense_error(x_mat, weights, factors, left, right, rank)
        if extrapolate:
            if prev is not None:
                step = (it + 1) ** (1.0 / 3.0)
                w_try = prev[0] + step * (weights - prev[0])
                f_try = []
                for f, f_prev in zip(factors, prev[1], strict=True):
                    f_new, norms = _normalise(f_prev + step * (f - f_prev), f)
                    f_try.append(f_new)
                    w_try = w_try * norms
                err_try = _dense_error(x_mat, w_try, f_try, left, right, rank)
                if err_try < err:
                    weights, factors, err = w_try, f_try, err_try
                    grams = [f.mT @ f for f in factors]
            prev = (weights.clone(), [f.clone() for f in factors])
        if err_prev is not None and abs(err_prev - err) <= tol * err_prev:
            break
        err_prev = err
    return weights, factors, _dense_error(x_mat, weights, factors, left, right, rank)


# Below this many ``numel * rank`` multiply-adds per sweep, extra starts are nearly free and
# guard against ALS swamps (tiny tensors, ranks above the mode sizes).
_SMALL_PROBLEM = 200_000
_TINY_PROBLEM = 20_000
_FINALISTS = 4


def cp_als(
    tensor: torch.Tensor,
    rank: int,
    n_iter_max: int = 100,
    tol: float = 1e-8,
    init: str = "svd",
    generator: torch.Generator | None = None,
    *,
    compute_dtype: torch.dtype | None = None,
    ridge: float | None = None,
    n_starts: int | None = None,
) -> tuple[torch.Tensor, list[torch.Tensor], float]:
    """CP decomposition by alternating least squares with a small ridge.

    Math: ``T ~= sum_r w_r a^(1)_r o a^(2)_r o ... o a^(N)_r`` with ``||a^(k)_r|| = 1``.

    Each factor in turn solves ``A_k (V_k + lam I) = X_(k) KR_{j != k}(A_j)`` with
    ``V_k = *_{j != k} A_j^T A_j`` (Hadamard product) by Cholesky; columns are then
    normalised and their norms become ``w``. Iterations stop when the relative error changes
    by less than ``tol * e_prev`` or after ``n_iter_max`` sweeps. With several starts, each
    runs ``n_iter_max // 4`` sweeps, the first (``init``) start and the 3 best others run
    the remaining sweeps and the lowest final
    error wins. Components are returned by decreasing weight.

    Args:
        tensor: Dense real tensor with finite entries.
        rank: Number of components ``R >= 1``.
        n_iter_max: Maximum number of ALS sweeps per start (at least one is always run).
        tol: Stop when ``|e_prev - e| <= tol * e_prev``.
        init: ``"svd"`` (leading left singular vectors of each unfolding, random columns
            beyond the mode size) or ``"random"``. Extra starts are random variants.
        generator: Source of random columns (a fixed seed when omitted).
        compute_dtype: float32 or float64; default float64 for float64 input, else float32.
        ridge: Relative Tikhonov term ``lam / mean(diag V_k)``; default 1e-6 in float32 and
            1e-12 in float64.
        n_starts: Number of starts; default 64 when ``numel * rank <= 2e4``, 16 up to
            ``2e5`` (small problems: ALS swamps are common there and starts are cheap; these
            also use the extrapolation step), else 1.

    Returns:
        ``(weights, factors, rel_error)``: ``weights`` of shape ``(R,)``, ``factors[k]`` of
        shape ``(tensor.shape[k], R)`` with unit-norm columns, and
        ``||T - T_hat||_F / ||T||_F`` as a float (0.0 when ``T == 0``).

    Raises:
        DecompositionError: ``tensor`` holds NaN or Inf, or ``init`` is unknown.
        RankError: ``rank`` is not a positive int.

    Shape:
        tensor ``(d_1, ..., d_N)`` -> weights ``(R,)``, factors ``[(d_k, R)]``.

    Example:
        >>> a, b, c = (torch.randn(n, 3, dtype=torch.float64) for n in (5, 6, 7))
        >>> t = torch.einsum("ir,jr,kr->ijk", a, b, c)
        >>> weights, factors, err = cp_als(t, 3)
        >>> tuple(weights.shape), [tuple(f.shape) for f in factors], err < 1e-3
        ((3,), [(5, 3), (6, 3), (7, 3)], True)
    """
    with torch.no_grad(), small_work_threads(work_estimate(tensor, rank)):
        prep = prepare(tensor, compute_dtype)
        x = prep.x
        if isinstance(rank, bool) or int(rank) != rank or int(rank) < 1:
            raise RankError(f"rank={rank!r} must be a positive int for a CP decomposition")
        rank = int(rank)
        if init not in ("svd", "random"):
            raise DecompositionError(f"init={init!r} is not supported; use 'svd' or 'random'")
        if ridge is None:
            ridge = 1e-12 if prep.dtype == torch.float64 else 1e-6
        small = x.numel() * rank <= _SMALL_PROBLEM
        if n_starts is None:
            n_starts = (64 if x.numel() * rank <= _TINY_PROBLEM else 16) if small else 1
        gen = make_generator(generator)
        factors = _init_factors(x, rank, init, gen)
        if prep.norm == 0:
            return x.new_zeros(rank), factors, 0.0

        n_iter_max = max(1, int(n_iter_max))
        n_starts = max(1, int(n_starts))
        if n_starts == 1:
            best = _als(x, factors, n_iter_max, tol, ridge, small)
        else:
            # Tournament: every start gets a short burn-in, the few best run to the end.
            burn_in = max(1, n_iter_max // 4)
            trials = [_als(x, factors, burn_in, tol, ridge, small)]
            for start in range(1, n_starts):
                if init == "svd" and start % 2 == 1:
                    # SVD starts with other random paddings, alternating with random starts.
                    padding = "uniform" if start % 4 == 1 else "normal"
                    factors = _init_factors(x, rank, "svd", gen, padding)
                else:
                    factors = _init_factors(x, rank, "random", gen)
                trials.append(_als(x, factors, burn_in, tol, ridge, small))
            # The primary start always reaches the final: a slow starter may still win.
            ranked = [trials[0]] + sorted(trials[1:], key=lambda t: t[2])[: _FINALISTS - 1]
            best = min(ranked, key=lambda t: t[2])
            if n_iter_max > burn_in:
                for _, f, _ in ranked:
                    # A copy: ``best`` may hold this very list, and _als rebinds its entries.
                    trial = _als(x, list(f), n_iter_max - burn_in, tol, ridge, small)
                    if trial[2] < best[2]:
                        best = trial

        weights, factors, err = best
        order = torch.argsort(weights, descending=True)
        weights = weights[order] * prep.norm
        return weights, [f[:, order].contiguous() for f in factors], err


def _dense_error(
    x_mat: torch.Tensor,
    weights: torch.Tensor,
    factors: Sequence[torch.Tensor],
    left: Sequence[int],
    right: Sequence[int],
    rank: int,
) -> float:
    """``||x - x_hat||_F`` through one ``(left, R) @ (R, right)`` GEMM."""
    kr_l = _khatri_rao([factors[j] for j in left], rank, x_mat)
    kr_r = _khatri_rao([factors[j] for j in right], rank, x_mat)
    return float(torch.linalg.vector_norm(x_mat - (kr_l * weights) @ kr_r.mT))
