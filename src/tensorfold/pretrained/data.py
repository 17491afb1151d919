"""The user's data: reading it, cutting it into samples, and splitting it three ways.

Text (``--data PATH``): a ``.txt`` file (one sample per line, or documents separated by
blank lines when the file has any), a ``.jsonl`` file with a ``text`` field per line, or a
folder of ``.txt`` files (read in name order). Images: a folder of image files.

Samples are split by a seeded permutation into calibration, distillation and held-out
evaluation parts that never share a sample. For causal LMs a sample is a chunk of
``seq_len`` tokens cut from the concatenated documents; for encoders a sample is one text,
truncated to ``seq_len`` tokens; for vision models one image.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, TypeVar

import torch
from torch import Tensor

from ..errors import ConversionError

T = TypeVar("T")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff")


@dataclass
class Split(Generic[T]):
    """Three disjoint parts of the samples."""

    calibration: list[T]
    distillation: list[T]
    evaluation: list[T]

    def counts(self) -> str:
        return (
            f"{len(self.calibration)} calibration, {len(self.distillation)} distillation, "
            f"{len(self.evaluation)} held-out evaluation"
        )


def _check_path(path: str | os.PathLike[str]) -> Path:
    p = Path(path)
    if not p.exists():
        raise ConversionError(f"--data {str(p)!r} does not exist")
    return p


def _texts_of_file(path: Path) -> list[str]:
    try:
        raw = path.read_text(encoding="utf-8", errors="replace")
    except OSError as exc:
        raise ConversionError(f"--data {str(path)!r} cannot be read: {exc}") from exc
    if path.suffix == ".jsonl":
        texts = []
        for i, line in enumerate(raw.splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ConversionError(f"--data {str(path)!r} line {i} is not JSON: {exc}") from exc
            if not isinstance(row, dict) or not isinstance(row.get("text"), str):
                raise ConversionError(f"--data {str(path)!r} line {i} has no string field 'text'")
            texts.append(row["text"])
        return [t for t in texts if t.strip()]
    lines = raw.splitlines()
    if any(not ln.strip() for ln in lines) and sum(1 for ln in lines if ln.strip()) > 1:
        docs, current = [], []
        for ln in lines:
            if ln.strip():
                current.append(ln.strip())
            elif current:
                docs.append(" ".join(current))
                current = []
        if current:
            docs.append(" ".join(current))
        return docs
    return [ln.strip() for ln in lines if ln.strip()]


def read_texts(path: str | os.PathLike[str]) -> list[str]:
    """The text samples (lines or documents) of a ``.txt``/``.jsonl`` file or a folder of
    ``.txt`` files."""
    p = _check_path(path)
    if p.is_dir():
        files = sorted(f for f in p.iterdir() if f.suffix in (".txt", ".jsonl") and f.is_file())
        if not files:
            raise ConversionError(f"--data {str(p)!r} is a folder with no .txt or .jsonl file")
        texts = [t for f in files for t in _texts_of_file(f)]
    elif p.suffix in (".txt", ".jsonl"):
        texts = _texts_of_file(p)
    else:
        raise ConversionError(
            f"--data {str(p)!r} must be a .txt file, a .jsonl file or a folder of .txt files"
        )
    if not texts:
        raise ConversionError(f"--data {str(p)!r} holds no text")
    return texts


def image_files(path: str | os.PathLike[str]) -> list[Path]:
    """The image files of a folder (and its subfolders), in name order."""
    p = _check_path(path)
    if not p.is_dir():
        raise ConversionError(f"--data {str(p)!r} must be a folder of images for a vision model")
    files = sorted(f for f in p.rglob("*") if f.suffix.lower() in IMAGE_SUFFIXES and f.is_file())
    if not files:
        raise ConversionError(
            f"--data {str(p)!r} holds no image file ({', '.join(IMAGE_SUFFIXES)})"
        )
    return files


def token_chunks(texts: Sequence[str], tokenizer: Any, seq_len: int) -> Tensor:
    """The documents tokenized, joined with the end-of-text token and cut into
    ``(n, seq_len)`` chunks (the remainder is dropped)."""
    ids: list[int] = []
    sep = tokenizer.eos_token_id
    for start in range(0, len(texts), 256):
        encoded = tokenizer(list(texts[start : start + 256]), add_special_tokens=False)
        for row in encoded["input_ids"]:
            ids.extend(row)
            if sep is not None:
                ids.append(sep)
    n = len(ids) // seq_len
    return torch.tensor(ids[: n * seq_len], dtype=torch.long).reshape(n, seq_len)


def split(
    samples: Sequence[T],
    n_calibration: int,
    n_evaluation: int,
    n_distillation: int | None,
    what: str,
    seed: int = 0,
) -> Split[T]:
    """Split ``samples`` by a seeded permutation: evaluation first, then calibration, then
    distillation (all the rest, or the first ``n_distillation``; ``0``: none)."""
    need = n_calibration + n_evaluation + (1 if n_distillation is None or n_distillation else 0)
    if len(samples) < need:
        raise ConversionError(
            f"--data is too small for the requested split: {len(samples)} {what}, but "
            f"{n_calibration} calibration + {n_evaluation} evaluation"
            + (" + at least 1 distillation" if need > n_calibration + n_evaluation else "")
            + f" = {need} are needed; give more data or lower the counts"
        )
    order = torch.randperm(len(samples), generator=torch.Generator().manual_seed(seed)).tolist()
    ev = [samples[i] for i in order[:n_evaluation]]
    cal = [samples[i] for i in order[n_evaluation : n_evaluation + n_calibration]]
    rest = [samples[i] for i in order[n_evaluation + n_calibration :]]
    dis = rest if n_distillation is None else rest[:n_distillation]
    return Split(cal, dis, ev)
