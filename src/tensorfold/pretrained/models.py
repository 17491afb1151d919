"""Which kind of model a directory holds, and loading it with its own library's loaders.

Kinds (``task``):
- ``'sentence-embedding'``: a sentence-transformers directory (``modules.json``);
- ``'causal-lm'``: ``AutoModelForCausalLM`` (GPT-2, Llama, Qwen2, Mistral, ...);
- ``'vision'``: a vision encoder or classifier taking ``pixel_values`` (ViT-style);
- ``'encoder'``: any other ``AutoModel`` (BERT-style text encoders).
The kind comes from the config (``architectures``, ``model_type``, image settings);
``task=`` overrides it.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from ..errors import ConversionError

Task = Literal["sentence-embedding", "encoder", "causal-lm", "vision"]
TASKS: tuple[Task, ...] = ("sentence-embedding", "encoder", "causal-lm", "vision")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
INSTALL = "pip install 'tensorfold[hf]'"


@dataclass
class Loaded:
    """A loaded model with what it needs to read its inputs."""

    model: nn.Module
    processor: Any  # a tokenizer (text) or an image processor (vision)
    task: Task
    model_dir: Path
    model_class: (
        str  # the loader that builds it: 'SentenceTransformer', 'AutoModelForCausalLM', ...
    )

    @property
    def max_positions(self) -> int | None:
        config = getattr(self.model, "config", None)
        if config is None and self.task == "sentence-embedding":
            return int(getattr(self.model, "max_seq_length", 0) or 0) or None
        for key in ("max_position_embeddings", "n_positions", "max_seq_len"):
            value = getattr(config, key, None)
            if isinstance(value, int) and value > 0:
                return value
        return None


@contextlib.contextmanager
def offline_and_quiet() -> Iterator[None]:
    """No hub look-ups, and no per-key load report from transformers."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    from transformers.utils import logging

    level = logging.get_verbosity()
    bars = logging.is_progress_bar_enabled()
    logging.set_verbosity_error()
    logging.disable_progress_bar()  # loading is quick; tensorfold's own bars show the work
    try:
        yield
    finally:
        logging.set_verbosity(level)
        if bars:
            logging.enable_progress_bar()


def _config(model_dir: Path) -> dict[str, Any]:
    path = model_dir / "config.json"
    if not path.is_file():
        raise ConversionError(
            f"MODEL_DIR={str(model_dir)!r} is not a model directory: it has no config.json "
            "(save one with model.save_pretrained(MODEL_DIR))"
        )
    try:
        config = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ConversionError(f"{str(path)!r} is not valid JSON: {exc}") from exc
    if not isinstance(config, dict):
        raise ConversionError(f"{str(path)!r} does not hold a JSON object")
    return config


def detect_task(model_dir: str | os.PathLike[str]) -> Task:
    """The kind of model in ``model_dir``, read from its files (see the module docstring)."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise ConversionError(f"MODEL_DIR={str(model_dir)!r} is not a directory")
    if (model_dir / "modules.json").is_file():
        return "sentence-embedding"
    config = _config(model_dir)
    archs = [a for a in config.get("architectures") or [] if isinstance(a, str)]
    if any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs):
        return "causal-lm"
    vision_config = "image_size" in config and "num_channels" in config
    if vision_config or any(a.endswith("ForImageClassification") for a in archs):
        return "vision"
    return "encoder"


def check_task(task: object) -> Task:
    if task not in TASKS:
        raise ConversionError(f"task={task!r} must be one of {', '.join(TASKS)}")
    return task


def _model_class(task: Task, model_dir: Path) -> str:
    if task == "sentence-embedding":
        return "SentenceTransformer"
    if task == "causal-lm":
        return "AutoModelForCausalLM"
    archs = _config(model_dir).get("architectures") or []
    if task == "vision" and any(str(a).endswith("ForImageClassification") for a in archs):
        return "AutoModelForImageClassification"
    return "AutoModel"


def _processor(task: Task, model_dir: Path) -> Any:
    import transformers

    if task == "vision":
        try:
            return transformers.AutoImageProcessor.from_pretrained(str(model_dir))
        except (OSError, ValueError) as exc:
            raise ConversionError(
                f"MODEL_DIR={str(model_dir)!r} has no image processor files "
                "(preprocessor_config.json): save them with processor.save_pretrained(MODEL_DIR)"
            ) from exc
    try:
        tok = transformers.AutoTokenizer.from_pretrained(str(model_dir))
    except (OSError, ValueError, TypeError) as exc:
        raise ConversionError(
            f"MODEL_DIR={str(model_dir)!r} has no tokenizer files (tokenizer.json, vocab): "
            "save them with tokenizer.save_pretrained(MODEL_DIR)"
        ) from exc
    if len(tok) <= len(tok.all_special_tokens) + 1:  # transformers built an empty vocabulary
        raise ConversionError(
            f"MODEL_DIR={str(model_dir)!r} has no tokenizer files (tokenizer.json, vocab): "
            "save them with tokenizer.save_pretrained(MODEL_DIR)"
        )
    if tok.pad_token is None:  # GPT-2-style tokenizers: padding reuses the end token
        tok.pad_token = tok.eos_token or tok.unk_token
    return tok


def load(
    model_dir: str | os.PathLike[str],
    task: Task | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> Loaded:
    """Load ``model_dir`` with its own library's loader (transformers' Auto classes or
    sentence-transformers), in eval mode, on ``device`` in ``dtype``."""
    model_dir = Path(model_dir)
    task = detect_task(model_dir) if task is None else check_task(task)
    cls = _model_class(task, model_dir)
    try:
        import transformers
    except ImportError as exc:
        raise ConversionError(
            f"loading a Hugging Face model needs transformers: {INSTALL}"
        ) from exc
    with offline_and_quiet():
        try:
            if cls == "SentenceTransformer":
                try:
                    from sentence_transformers import SentenceTransformer
                except ImportError as exc:
                    raise ConversionError(
                        f"a sentence-transformers directory needs sentence-transformers: {INSTALL}"
                    ) from exc
                model: nn.Module = SentenceTransformer(str(model_dir), device=str(device))
                model.to(dtype)
                processor: Any = model.tokenizer
            else:
                loader = getattr(transformers, cls)
                model = loader.from_pretrained(str(model_dir), dtype=dtype).to(device)
                processor = _processor(task, model_dir)
        except ConversionError:
            raise
        except Exception as exc:  # transformers raises many types for an unloadable model
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ConversionError(
                f"cannot load MODEL_DIR={str(model_dir)!r} as {cls} (task {task!r}): {first}"
            ) from exc
    return Loaded(model.eval(), processor, task, model_dir, cls)
