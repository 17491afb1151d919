"""Factorized tensor formats, looked up by name with :func:`get_format`."""

from .base import FORMATS, FactorizedTensor, get_format, register
from .cp import CPTensor
from .tt import TTTensor
from .ttm import TTMTensor
from .tucker import TuckerTensor

__all__ = [
    "FORMATS",
    "FactorizedTensor",
    "get_format",
    "register",
    "CPTensor",
    "TuckerTensor",
    "TTTensor",
    "TTMTensor",
]
