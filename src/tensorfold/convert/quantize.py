"""Int8 storage of a converted model's factors, after fitting and distillation."""

from __future__ import annotations

from torch import nn

from ..errors import ConversionError
from ..nn import FactorizedLinear
from ..quantization import FACTOR_DTYPES

__all__ = ["check_factor_dtype", "quantize_factors"]


def check_factor_dtype(factor_dtype: object) -> str | None:
    """``factor_dtype`` if it is ``None`` (the working dtype) or one of ``FACTOR_DTYPES``."""
    if factor_dtype is None or factor_dtype in FACTOR_DTYPES:
        return factor_dtype
    raise ConversionError(
        f"factor_dtype={factor_dtype!r} is not one of {', '.join(map(repr, FACTOR_DTYPES))} "
        "(or None: the working dtype)"
    )


def quantize_factors(model: nn.Module, factor_dtype: str = "int8") -> int:
    """Store the factors of every :class:`~tensorfold.FactorizedLinear` in ``model`` as
    int8 with per-channel scales, in place; returns how many layers were quantized.

    The layers then compute in their working dtype from ``q * scale``; their factors get
    no gradients (quantize after distillation). Norms, biases and dense layers are kept as
    they are. Layers already quantized are left alone.

    Example:
        >>> import torch, tensorfold
        >>> net = torch.nn.Sequential(tensorfold.FactorizedLinear((8,), (8,), rank=0.5))
        >>> tensorfold.quantize_factors(net)
        1
        >>> net[0].weight.factors[0].dtype
        torch.int8
    """
    check_factor_dtype(factor_dtype)
    done = 0
    for module in model.modules():
        if isinstance(module, FactorizedLinear) and not module.weight.quantized:
            module.weight.quantize_()
            module.inference_cache.clear()
            done += 1
    return done
