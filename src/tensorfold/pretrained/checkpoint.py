"""A compressed model as a Hugging Face-style directory, and loading it back.

The directory holds the model's config, its tokenizer or image-processor files (for a
sentence-transformers model: all of its module files), ``model.safetensors`` with every
tensor of the compressed model and the record of its factorized layers
(:func:`tensorfold.save`), and ``tensorfold.json``, which names the loader that rebuilds
the architecture. :func:`from_pretrained` builds the architecture from the config with
that library's own loader and loads the factorized weights: no copy of the original
weights and no user code are needed.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..convert import io
from ..errors import ConversionError
from .models import Loaded, offline_and_quiet

MANIFEST = "tensorfold.json"
_KIND = "tensorfold-pretrained"
_VERSION = 1
_WEIGHT_FILES = ("*.safetensors", "*.bin", "*.pt", "*.pth", "*.h5", "*.msgpack", "*.onnx", "*.ckpt")


def is_output_dir(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is a directory written by :func:`save_pretrained`."""
    manifest = Path(path) / MANIFEST
    try:
        return json.loads(manifest.read_text()).get("format") == _KIND
    except (OSError, ValueError, AttributeError):
        return False


def save_pretrained(
    student: nn.Module, loaded: Loaded, folder: Path, extra: dict[str, Any] | None = None
) -> None:
    """Write the compressed ``student`` of ``loaded``'s model into ``folder`` (which exists
    and is empty: the caller makes it atomic with :func:`tensorfold.files.replacing_dir`)."""
    if loaded.model_class == "SentenceTransformer":
        # Its module layout (pooling, normalisation, tokenizer) lives in the source files.
        shutil.copytree(
            loaded.model_dir,
            folder,
            dirs_exist_ok=True,
            ignore=shutil.ignore_patterns(*_WEIGHT_FILES, ".*"),
        )
    else:
        hf: Any = student
        hf.config.save_pretrained(folder)
        generation = getattr(student, "generation_config", None)
        if generation is not None and loaded.task == "causal-lm":
            generation.save_pretrained(folder)
        loaded.processor.save_pretrained(folder)
    dtype = next((p.dtype for p in student.parameters() if p.is_floating_point()), torch.float32)
    io.save(student, folder / io.WEIGHTS_NAME)
    manifest = {
        "format": _KIND,
        "version": _VERSION,
        "task": loaded.task,
        "model_class": loaded.model_class,
        "dtype": str(dtype).removeprefix("torch."),
        "weights": io.WEIGHTS_NAME,
        **(extra or {}),
    }
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")


def read_manifest(path: str | os.PathLike[str]) -> dict[str, Any]:
    path = Path(path)
    if not path.is_dir():
        raise ConversionError(f"path={str(path)!r} is not a directory")
    if not is_output_dir(path):
        raise ConversionError(
            f"{str(path)!r} is not a tensorfold output directory (no valid {MANIFEST}); "
            "write one with `tensorfold compress MODEL_DIR --out DIR`"
        )
    manifest = json.loads((path / MANIFEST).read_text())
    if manifest.get("version") != _VERSION:
        raise ConversionError(
            f"{str(path)!r}: {MANIFEST} version {manifest.get('version')!r}; this tensorfold "
            f"reads version {_VERSION}"
        )
    return manifest


def from_pretrained(
    path: str | os.PathLike[str], device: str | torch.device | None = None
) -> nn.Module:
    """The compressed model saved in ``path`` by ``tensorfold compress``, in eval mode.

    The architecture is built from the saved config by the loader that built the original
    (``transformers``' Auto class, or ``SentenceTransformer``), then every factorized layer
    is rebuilt from the record and all weights are loaded and checked.

    Args:
        path: the output directory.
        device: where to put the model (default: CPU).
    """
    path = Path(path)
    manifest = read_manifest(path)
    cls = manifest.get("model_class")
    dtype = getattr(torch, str(manifest.get("dtype", "float32")), torch.float32)
    with offline_and_quiet():
        if cls == "SentenceTransformer":
            from sentence_transformers import SentenceTransformer

            # Its loader builds the modules from the saved files; the weights it finds do
            # not fit the dense architecture and are all replaced just below.
            model: nn.Module = SentenceTransformer(str(path), device="cpu")
        else:
            import transformers

            loader = getattr(transformers, str(cls), None)
            if loader is None or not hasattr(loader, "from_config"):
                raise ConversionError(f"{str(path)!r}: unknown model_class {cls!r} in {MANIFEST}")
            config = transformers.AutoConfig.from_pretrained(str(path))
            model = loader.from_config(config, dtype=dtype)
    model.to(dtype)
    io.load(path / str(manifest.get("weights", io.WEIGHTS_NAME)), model)
    if device is not None:
        model.to(device)
    return model.eval()
