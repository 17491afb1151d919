"""Tensorized shapes: choosing balanced modes and checking user-given ones.

A feature count ``n`` is written as a product of ``order`` modes as close to
``n ** (1 / order)`` as possible, because balanced modes give the factorized
formats the most room (TT bond ranks and Tucker ranks are capped by the modes).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import lru_cache

from .errors import ShapeError

__all__ = ["balanced_modes", "tensorized_shape", "check_modes"]


def _divisors(n: int) -> list[int]:
    small = [d for d in range(1, math.isqrt(n) + 1) if n % d == 0]
    return sorted(set(small + [n // d for d in small]))


@lru_cache(maxsize=1024)
def balanced_modes(n: int, order: int) -> tuple[int, ...]:
    """Split ``n`` into ``order`` integer modes whose logs are as equal as possible.

    Minimises ``sum_k (log d_k - log(n) / order)^2`` over all factorisations
    ``n = d_1 * ... * d_order`` (1-modes allowed, e.g. for primes).

    Args:
        n: the number to split, ``n >= 1``.
        order: the number of modes, ``order >= 1``.

    Returns:
        The modes in non-increasing order.

    Example:
        >>> balanced_modes(1024, 3)
        (16, 8, 8)
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ShapeError(f"n={n!r} must be a positive int")
    if isinstance(order, bool) or not isinstance(order, int) or order < 1:
        raise ShapeError(f"order={order!r} must be a positive int")
    target = math.log(n) / order
    best: tuple[float, tuple[int, ...]] = (math.inf, (n,) + (1,) * (order - 1))

    def search(rest: int, slots: int, cap: int, chosen: tuple[int, ...], cost: float) -> None:
        nonlocal best
        if cost >= best[0]:
            return
        if slots == 1:
            if rest <= cap:
                total = cost + (math.log(rest) - target) ** 2
                if total < best[0]:
                    best = (total, chosen + (rest,))
            return
        for d in _divisors(rest):
            if d > cap:
                break
            # Non-increasing order: the remaining slots must hold rest // d with modes <= d.
            if d**slots < rest:
                continue
            search(rest // d, slots - 1, d, chosen + (d,), cost + (math.log(d) - target) ** 2)

    search(n, order, n, (), 0.0)
    return best[1]


def tensorized_shape(
    in_features: int, out_features: int, order: int = 3
) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Balanced tensorized shapes for a linear layer ``in_features -> out_features``.

    Args:
        in_features: width of the layer's input.
        out_features: width of the layer's output.
        order: number of modes for each side.

    Returns:
        ``(in_tensorized_features, out_tensorized_features)``.

    Example:
        >>> tensorized_shape(768, 3072, 3)
        ((12, 8, 8), (16, 16, 12))
    """
    return balanced_modes(in_features, order), balanced_modes(out_features, order)


def check_modes(modes: object, name: str) -> tuple[int, ...]:
    """Validate a user-given tensorized shape and return it as a tuple of Python ints."""
    if isinstance(modes, int) and not isinstance(modes, bool):
        modes = (modes,)
    if not isinstance(modes, Sequence) or isinstance(modes, str) or len(modes) == 0:
        raise ShapeError(f"{name}={modes!r} must be a non-empty tuple of positive ints")
    out = []
    for m in modes:
        if isinstance(m, bool) or not isinstance(m, int) and not hasattr(m, "__index__"):
            raise ShapeError(f"{name}={tuple(modes)!r} must hold positive ints, got {m!r}")
        m = int(m.__index__())
        if m < 1:
            raise ShapeError(f"{name}={tuple(modes)!r} must hold positive ints, got {m}")
        out.append(m)
    return tuple(out)
