"""Whole-model conversion: plan, calibrate, tensorize, distill, revert, save and load."""

from .core import ConversionPlan, ConversionReport, LayerPlan, plan, revert, tensorize
from .distill import distill
from .io import load, save

__all__ = [
    "plan",
    "tensorize",
    "revert",
    "distill",
    "save",
    "load",
    "ConversionPlan",
    "ConversionReport",
    "LayerPlan",
]
