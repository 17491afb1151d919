"""Whole-model conversion: plan, calibrate, tensorize, distill, revert, save and load."""

from .core import ConversionPlan, ConversionReport, LayerPlan, plan, revert, tensorize
from .distill import distill
from .io import load, save
from .options import DistillOptions, FitOptions, ModelCall, PlanOptions

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
    "PlanOptions",
    "FitOptions",
    "ModelCall",
    "DistillOptions",
]
