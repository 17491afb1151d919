"""Shared plumbing of the decompositions: input checks, scaling, dtypes, subspaces.

Every decomposition works on ``x = T / ||T||`` (unit Frobenius norm) so that huge and tiny
tensors behave the same, and rescales its result at the end.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from tensorfold.errors import DecompositionError, RankError

__all__ = [
    "Prepared",
    "balanced_split",
    "check_int_ranks",
    "lapack_thread",
    "complete_columns",
    "leading_left_singular",
    "make_generator",
    "prepare",
    "randn",
    "round_off_floor",
    "small_work_threads",
    "work_estimate",
]

# Below this many flops per step, threading only adds synchronisation: MKL's threaded
# Cholesky of an 8x8 matrix was measured at ~20 ms on a busy 2-core box vs ~2 us on one thread.
_SMALL_WORK = 5_000_000


def work_estimate(tensor: object, ranks: object) -> int:
    """Rough multiply-adds of one step: ``numel * max(ranks)`` (0 for invalid input)."""
    try:
        r = max(int(v) for v in ranks) if isinstance(ranks, Sequence) else int(ranks)  # type: ignore[call-overload]
        return int(tensor.numel()) * max(1, r)  # type: ignore[attr-defined]
    except (AttributeError, TypeError, ValueError):
        return 0


@contextmanager
def small_work_threads(work: int) -> Iterator[None]:
    """Run tiny problems on one intra-op thread (restored on exit); no-op for large ones.

    Note: ``torch.set_num_threads`` is process-wide, so a concurrent caller sees one thread
    while a small decomposition runs.
    """
    with _threads(1 if work < _SMALL_WORK else None):
        yield


@contextmanager
def lapack_thread() -> Iterator[None]:
    """Run one LAPACK factorization (SVD, eigh, QR, Cholesky) on a single thread.

    These matrices are at most a few thousand wide. On a busy 2-core box MKL's threaded
    LAPACK was measured 3-12x slower than one thread (a 992 x 1024 SVD: 15.5 s vs 1.3 s;
    a 1613^2 Cholesky: 0.26 s vs 0.19 s); the GEMMs around them keep every thread.
    """
    with _threads(1):
        yield


@contextmanager
def _threads(n: int | None) -> Iterator[None]:
    old = torch.get_num_threads()
    if n is None or n == old:
        yield
        return
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


@dataclass(frozen=True)
class Prepared:
    """A tensor ready to decompose.

    Attributes:
        x: ``T / ||T||`` in the compute dtype on the input's device (all zeros if ``T == 0``).
        norm: ``||T||_F`` as a Python float (0.0 for an all-zero tensor).
        dtype: The compute dtype (float32 or float64).
    """

    x: torch.Tensor
    norm: float
    dtype: torch.dtype


def prepare(
    tensor: torch.Tensor, compute_dtype: torch.dtype | None, name: str = "tensor"
) -> Prepared:
    """Check ``tensor``, cast it to the compute dtype and scale it to unit norm.

    Math: ``x = T / ||T||_F`` (``x = 0`` when ``||T||_F = 0``).
    """
    if not isinstance(tensor, torch.Tensor):
        raise DecompositionError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    if tensor.is_complex():
        raise DecompositionError(f"{name} has complex dtype {tensor.dtype}; only real tensors")
    if tensor.ndim == 0 or tensor.numel() == 0:
        raise DecompositionError(
            f"{name} has shape {tuple(tensor.shape)}; a non-empty tensor with ndim >= 1 is needed"
        )
    if not bool(torch.isfinite(tensor).all()):
        raise DecompositionError(
            f"{name} contains NaN or Inf; a decomposition needs finite values "
            "(clean or mask the tensor first)"
        )
    if compute_dtype is None:
        dtype = torch.float64 if tensor.dtype == torch.float64 else torch.float32
    elif compute_dtype in (torch.float32, torch.float64):
        dtype = compute_dtype
    else:
        raise DecompositionError(
            f"compute_dtype={compute_dtype} is not supported; use torch.float32 or torch.float64"
        )
    x = tensor.detach().to(dtype)
    # Scale by the max first: squaring 1e20-sized entries would overflow float32.
    amax = float(x.abs().max())
    if amax == 0.0:
        return Prepared(torch.zeros_like(x, memory_format=torch.contiguous_format), 0.0, dtype)
    x = x / amax
    inner = float(torch.linalg.vector_norm(x))
    return Prepared((x / inner).contiguous(), amax * inner, dtype)


def balanced_split(shape: Sequence[int]) -> int:
    """Number of leading modes whose size product is closest to ``sqrt(numel)`` (>= 1)."""
    if len(shape) == 1:
        return 1
    logs = [math.log(d) for d in shape]
    total = sum(logs)
    return min(range(1, len(shape)), key=lambda k: abs(2 * sum(logs[:k]) - total))


def make_generator(generator: torch.Generator | None) -> torch.Generator:
    """Return ``generator``, or a fresh one with a fixed seed so results are reproducible."""
    if generator is not None:
        return generator
    return torch.Generator().manual_seed(0)


def randn(shape: Sequence[int], generator: torch.Generator, like: torch.Tensor) -> torch.Tensor:
    """Standard normal samples drawn on the generator's device, returned like ``like``."""
    out = torch.randn(tuple(shape), generator=generator, device=generator.device, dtype=like.dtype)
    return out.to(like.device)


def round_off_floor(dtype: torch.dtype) -> float:
    """Smallest relative error that ``1 - ||x_hat||^2``-style estimates can resolve."""
    return 10.0 * float(torch.finfo(dtype).eps) ** 0.5


def leading_left_singular(a: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Leading left singular vectors and values of a matrix.

    Math: ``a = U S V^T``; returns ``U[:, :k], S[:k]`` with ``k = min(r, m, n)``.

    A wide matrix (``n >= 2 m``) goes through the eigenvectors of its Gram ``a a^T``, formed
    in float64 whatever the compute dtype: much faster than an SVD or QR of a very wide
    matrix, and the float64 Gram keeps the leading subspace accurate to float32 round-off
    (and to ``eps64 * (s_1 / s_k)^2`` in float64).
    """
    m, n = a.shape
    if n >= 2 * m:
        a64 = a.double()
        gram = a64 @ a64.mT
        with lapack_thread():
            evals, evecs = torch.linalg.eigh(gram)
        k = min(r, m)
        # eigh sorts ascending; a zero Gram still gives an orthonormal basis.
        u = evecs.flip(-1)[:, :k].to(a.dtype)
        s = evals.flip(-1)[:k].clamp_min(0).sqrt().to(a.dtype)
        return u, s
    with lapack_thread():
        u, s, _ = torch.linalg.svd(a, full_matrices=False)
    k = min(r, u.shape[1])
    return u[:, :k], s[:k]


def complete_columns(u: torch.Tensor, r: int, generator: torch.Generator) -> torch.Tensor:
    """Pad orthonormal columns ``u`` (m, c) to ``r`` columns.

    Math: ``[u, q]`` with ``q^T u = 0`` and ``q^T q = I`` for the first ``m - c`` new columns;
    columns beyond ``m`` (no orthonormal room left) are random unit vectors.

    The new columns are never zero, so a parameter built from them keeps receiving gradients
    even where the matching slice of the other factor is zero.
    """
    m, c = u.shape
    if c >= r:
        return u[:, :r]
    n_orth = min(r, m) - c
    cols = [u]
    if n_orth > 0:
        g = randn((m, n_orth), generator, u)
        # Two rounds of projection: one is not enough in float32 when u is nearly full.
        for _ in range(2):
            g = g - u @ (u.mT @ g)
        with lapack_thread():
            q = torch.linalg.qr(g).Q
        cols.append(q)
    n_extra = r - c - max(n_orth, 0)
    if n_extra > 0:
        e = randn((m, n_extra), generator, u)
        cols.append(e / torch.linalg.vector_norm(e, dim=0, keepdim=True))
    return torch.cat(cols, dim=1)


def check_int_ranks(ranks: Sequence[int], length: int, what: str) -> list[int]:
    """Validate a sequence of positive Python ints of the given length."""
    try:
        out = [int(r) for r in ranks]
    except (TypeError, ValueError):
        raise RankError(f"ranks={ranks!r} must be a sequence of ints for {what}") from None
    if any(int(r) != r for r in ranks):
        raise RankError(f"ranks={tuple(ranks)} must be integers for {what}")
    if len(out) != length:
        raise RankError(f"ranks={tuple(out)} has length {len(out)}, but {what} needs {length}")
    if any(r < 1 for r in out):
        raise RankError(f"ranks={tuple(out)} must all be >= 1 for {what}")
    return out
