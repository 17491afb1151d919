"""Layers built on factorized tensors."""

from .linear import FactorizedLinear, SubFactorizedLinear

__all__ = ["FactorizedLinear", "SubFactorizedLinear"]
