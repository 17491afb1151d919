"""Pretrained models: compress any local Hugging Face or sentence-transformers model.

:func:`compress` runs the whole job from a :class:`CompressConfig`;
:func:`from_pretrained` loads its output directory back; :func:`evaluate` measures it
against the original. ``tensorfold compress`` and ``tensorfold evaluate`` call these.
"""

from .checkpoint import from_pretrained
from .evaluate import evaluate
from .models import TASKS, detect_task
from .pipeline import CompressConfig, CompressResult, compress, default_targets

__all__ = [
    "CompressConfig",
    "CompressResult",
    "compress",
    "default_targets",
    "detect_task",
    "evaluate",
    "from_pretrained",
    "TASKS",
]
