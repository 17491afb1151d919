"""Factorized tensor formats, looked up by name with :func:`get_format`; :func:`names`
lists them."""

from .base import FORMATS, FactorizedTensor, FormatName, RankSpec, get_format, names, register
from .cp import CPTensor
from .lowrank import LowRankTensor
from .tt import TTTensor
from .ttm import TTMTensor
from .tucker import TuckerTensor

__all__ = [
    "FORMATS",
    "FactorizedTensor",
    "FormatName",
    "RankSpec",
    "get_format",
    "names",
    "register",
    "CPTensor",
    "LowRankTensor",
    "TuckerTensor",
    "TTTensor",
    "TTMTensor",
]
