"""Whole-model conversion: plan, calibrate, tensorize, distill, revert, save and load."""

from .core import revert, tensorize
from .distill import distill
from .io import load, save
from .options import DistillOptions, FitOptions, ModelCall, PlanOptions
from .planner import ConversionPlan, ConversionReport, LayerPlan, plan

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
