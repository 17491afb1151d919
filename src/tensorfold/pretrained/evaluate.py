"""``tensorfold evaluate``: the held-out figures of a compressed model against its original."""

from __future__ import annotations

import os
from typing import Any

import torch

from ..errors import ConversionError
from . import checkpoint, models
from .data import split
from .pipeline import _DEFAULT_COUNTS, _other_source
from .tasks import task_for


def evaluate(
    out_dir: str | os.PathLike[str],
    original: str | os.PathLike[str],
    data: str | os.PathLike[str] | None = None,
    seq_len: int = 128,
    samples: int | None = None,
    device: str | None = None,
) -> dict[str, Any]:
    """Quality of the compressed model in ``out_dir`` against the model in ``original``.

    With ``data``, on up to ``samples`` samples of it (a seeded draw): pass text that the
    compression did not see. Without, on the bundled corpus's held-out part (the same split
    ``compress`` uses by default) and on English text of another source.

    Returns:
        ``{evaluation set name: quality}`` (printable objects).
    """
    manifest = checkpoint.read_manifest(out_dir)
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConversionError(f"device={device!r} but this machine has no CUDA device")
    task_name = manifest["task"]
    loaded = models.load(original, task_name, dev)
    student = checkpoint.from_pretrained(out_dir, device=dev).to(
        next(loaded.model.parameters()).dtype
    )
    task = task_for(loaded, seq_len, dev)
    n_cal, n_eval = _DEFAULT_COUNTS[task_name]
    n = samples or n_eval
    everything = task.samples(None if data is None else str(data))
    if data is None:
        parts = split(everything, n_cal, n, 0, task.unit)
        chosen = parts.evaluation
    else:
        chosen = split(everything, 0, min(n, len(everything)), 0, task.unit).evaluation
    sets = {"held-out" if data is None else "data": task.batches(chosen)}
    other = _other_source(task, n) if data is None else None
    if other:
        sets["other source"] = task.batches(other)
    return {name: task.evaluate(student, loaded.model, b) for name, b in sets.items()}
