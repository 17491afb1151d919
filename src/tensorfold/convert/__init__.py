"""Whole-model conversion: plan, calibrate, tensorize, distill, quantize, revert, save, load."""

from .core import revert, tensorize
from .distill import distill
from .io import load, save
from .options import DistillOptions, FitOptions, ModelCall, PlanOptions
from .planner import ConversionPlan, ConversionReport, LayerPlan, plan
from .quantize import quantize_factors

__all__ = [
    "plan",
    "tensorize",
    "revert",
    "distill",
    "quantize_factors",
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
