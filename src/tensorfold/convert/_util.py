"""Small helpers shared by the conversion modules: module lookup, model calls, outputs."""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import ConversionError

ForwardFn = Callable[[nn.Module, Any], Any]

# Keys tried, in order, when a model returns a mapping (Hugging Face outputs, sentence-transformers).
_OUTPUT_KEYS = ("sentence_embedding", "last_hidden_state", "logits", "token_embeddings")


def call_model(model: nn.Module, item: Any) -> Any:
    """Run ``model`` on one calibration item.

    The rule: a ``tuple``/``list`` is unpacked as positional arguments; anything else
    (a tensor, or a mapping such as a tokenizer's output, which sentence-transformers
    models take as one argument) is passed as the single argument. Pass ``forward=`` to
    the public functions to call the model another way, e.g. ``lambda m, b: m(**b)``.
    """
    if isinstance(item, (tuple, list)):
        return model(*item)
    if isinstance(item, Mapping):
        return model(dict(item))
    return model(item)


class StopForward(Exception):
    """Raised from a hook to end a forward pass early: nothing after that point is needed."""


def run_until_stopped(forward: ForwardFn, model: nn.Module, batch: Any) -> None:
    """``forward(model, batch)``, where a hook may end the pass with :class:`StopForward`."""
    try:
        forward(model, batch)
    except StopForward:
        pass


def output_tensor(output: Any) -> Tensor:
    """The tensor that stands for a model's output, used to measure fidelity.

    A tensor is itself; a mapping gives the first of ``sentence_embedding``,
    ``last_hidden_state``, ``logits``, ``token_embeddings`` it holds, else its last
    floating-point tensor; a tuple/list gives its first floating-point tensor.
    """
    if isinstance(output, Tensor):
        return output
    if isinstance(output, Mapping):
        for key in _OUTPUT_KEYS:
            if isinstance(output.get(key), Tensor):
                return output[key]
        values = [v for v in output.values() if isinstance(v, Tensor) and v.is_floating_point()]
        if values:
            return values[-1]
    if isinstance(output, (tuple, list)):
        for v in output:
            if isinstance(v, Tensor) and v.is_floating_point():
                return v
    raise ConversionError(
        f"cannot find a floating-point tensor in the model output of type {type(output).__name__}; "
        "pass output_fn= to say which part of the output to compare"
    )


def set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def match_modules(
    model: nn.Module,
    targets: str | Sequence[str] | None,
    exclude: str | Sequence[str] | None,
    kind: type[nn.Module] | tuple[type[nn.Module], ...] = nn.Linear,
) -> list[str]:
    """Names of the modules of type ``kind`` selected by ``targets`` minus ``exclude``.

    The matching rule: each pattern is a shell-style glob (:func:`fnmatch.fnmatchcase`)
    matched against the module's full dotted name from ``model.named_modules()``; ``*``
    also crosses dots. ``targets=None`` selects every module of type ``kind``. A module is
    converted when it matches at least one target pattern and no exclude pattern.
    Example: ``targets="*encoder*"``, ``exclude=["*.pooler.*", "*lm_head"]``.
    """

    def patterns(value: str | Sequence[str] | None, name: str) -> list[str] | None:
        if value is None:
            return None
        if isinstance(value, str):
            return [value]
        if not all(isinstance(v, str) for v in value):
            raise ConversionError(
                f"{name}={value!r} must be a glob string or a list of glob strings"
            )
        return list(value)

    tgt = patterns(targets, "targets")
    exc = patterns(exclude, "exclude") or []
    names = []
    for name, module in model.named_modules():
        if not name or type(module) not in (kind if isinstance(kind, tuple) else (kind,)):
            continue
        if tgt is not None and not any(fnmatch.fnmatchcase(name, p) for p in tgt):
            continue
        if any(fnmatch.fnmatchcase(name, p) for p in exc):
            continue
        names.append(name)
    return names


def as_batches(calibration: Iterable[Any] | None) -> list[Any] | None:
    """Materialise calibration inputs once (they are iterated several times)."""
    if calibration is None:
        return None
    if isinstance(calibration, (Tensor, Mapping)):
        raise ConversionError(
            "calibration must be an iterable of model inputs (e.g. a list of batches), "
            f"not a single {type(calibration).__name__}; wrap it in a list"
        )
    batches = list(calibration)
    if not batches:
        raise ConversionError("calibration is empty: give at least one batch of model inputs")
    return batches


def model_device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")
