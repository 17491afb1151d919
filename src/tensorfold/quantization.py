"""Symmetric int8 storage of a factor: int8 values and one float scale per slice.

A factor ``F`` is stored as ``q`` (int8, ``|q| <= 127``) and ``scale`` with
``F ~= q * scale``. There is one scale per index of the factor's largest axis (the first,
on a tie), the absolute maximum over the other axes divided by 127: for a low-rank pair
``W = U V`` that is one scale per output channel of ``U`` and per input channel of ``V``,
which keeps the error of ``W`` lower than one scale per rank component does on trained
weights. The values are computed in the working dtype, ``q.to(scale.dtype) * scale``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .errors import FactorizationError

__all__ = ["FACTOR_DTYPES", "dequantize", "quantize_int8"]

FACTOR_DTYPES: tuple[str, ...] = ("int8",)  # storage dtypes a factor may be quantized to
_INT8_MAX = 127


def quantize_int8(factor: Tensor) -> tuple[Tensor, Tensor]:
    """``(q, scale)`` with ``q`` int8 and ``q * scale`` the nearest such values to ``factor``.

    ``scale`` has ``factor``'s dtype and ``factor.ndim`` axes (size 1 but along the largest
    axis), so it broadcasts against ``q``. An all-zero slice gets scale 1.

    Example:
        >>> q, scale = quantize_int8(torch.tensor([[0.5, -1.0], [2.0, 0.0], [0.0, 0.0]]))
        >>> q.tolist(), scale.flatten().tolist()
        ([[64, -127], [127, 0], [0, 0]], [0.007874015718698502, 0.015748031437397003, 1.0])
    """
    if not factor.dtype.is_floating_point:
        raise FactorizationError(f"cannot quantize a factor of dtype {factor.dtype}")
    if not bool(torch.isfinite(factor).all()):
        raise FactorizationError("cannot quantize a factor holding NaN or Inf")
    work = factor.detach()
    if work.ndim == 0:
        work = work.reshape(1)
    axis = max(range(work.ndim), key=lambda d: (work.shape[d], -d))
    others = [d for d in range(work.ndim) if d != axis]
    peak = work.abs().amax(dim=others, keepdim=True) if others else work.abs()
    scale = torch.where(peak > 0, peak / _INT8_MAX, torch.ones_like(peak))
    q = torch.round(work / scale).clamp_(-_INT8_MAX, _INT8_MAX).to(torch.int8)
    if factor.ndim == 0:
        return q.reshape(()), scale.reshape(())
    return q, scale


def dequantize(q: Tensor, scale: Tensor) -> Tensor:
    """The factor's values in the scale's dtype."""
    return q.to(scale.dtype) * scale
