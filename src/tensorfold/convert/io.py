"""Saving and loading converted models: safetensors weights plus a JSON record.

One file holds every tensor of the model's ``state_dict`` and, in the safetensors header's
metadata, a JSON record of each ``FactorizedLinear`` (name, format, tensorized shapes,
resolved rank, bias, int8 factors). It is written to a temporary file in the same directory,
flushed to disk and moved into place with ``os.replace``, so a crash never leaves a partial
file under the final name. Loading validates everything (file integrity, record, every key
and shape) before the model is touched.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import ConversionError, TensorfoldError
from ..files import replacing
from ..nn import FactorizedLinear
from ._util import is_linear, linear_view, set_module
from .quantize import check_factor_dtype

__all__ = ["save", "load"]

_MAGIC = "tensorfold"
WEIGHTS_NAME = "model.safetensors"  # the weights file inside an output directory
_VERSION = 1


def _jsonable_rank(rank: Any) -> Any:
    return list(rank) if isinstance(rank, tuple) else rank


def _rank_from_json(rank: Any) -> Any:
    return tuple(rank) if isinstance(rank, list) else rank


def _record(model: nn.Module) -> list[dict[str, Any]]:
    layers = []
    for name, m in model.named_modules():
        if isinstance(m, FactorizedLinear):
            if m.layer_shape:
                raise ConversionError(
                    f"module {name!r} has n_layers={m.n_layers}; save handles single layers"
                )
            layers.append(
                {
                    "name": name,
                    "factorization": m.factorization,
                    "in_modes": list(m.in_tensorized_features),
                    "out_modes": list(m.out_tensorized_features),
                    "rank": _jsonable_rank(m.rank),
                    "bias": m.bias is not None,
                    "implementation": m.implementation,
                    **({"factor_dtype": "int8"} if m.weight.quantized else {}),
                }
            )
    return layers


def save(model: nn.Module, path: str | os.PathLike[str]) -> Path:
    """Write ``model``'s weights and the record of its factorized layers to ``path``, atomically.

    Args:
        model: a model (converted by :func:`tensorfold.tensorize` or not).
        path: the ``.safetensors`` file to write (its directory must exist).

    Returns:
        The path written.
    """
    from safetensors.torch import save_file

    path = Path(path)
    if not path.parent.is_dir():
        raise ConversionError(f"path={str(path)!r}: directory {str(path.parent)!r} does not exist")
    record = {"format": _MAGIC, "version": _VERSION, "layers": _record(model)}
    tensors: dict[str, Tensor] = {}
    seen: set[int] = set()
    for key, value in model.state_dict().items():
        t = value.detach().cpu()
        ptr = t.untyped_storage().data_ptr() if t.numel() else -1
        # safetensors refuses tensors sharing memory (tied weights): store copies.
        t = t.clone().contiguous() if ptr in seen or not t.is_contiguous() else t
        seen.add(ptr)
        tensors[key] = t
    with replacing(path) as tmp:
        save_file(tensors, str(tmp), metadata={_MAGIC: json.dumps(record)})
    return path


def _read(path: Path) -> tuple[dict[str, Any], dict[str, Tensor]]:
    from safetensors import safe_open

    if not path.is_file():
        raise ConversionError(f"path={str(path)!r} does not exist or is not a file")
    try:
        tensors: dict[str, Tensor] = {}
        with safe_open(str(path), framework="pt") as fh:
            meta = fh.metadata() or {}
            for key in fh.keys():
                tensors[key] = fh.get_tensor(key)
    except Exception as exc:  # safetensors raises its own error types for bad headers/sizes
        raise ConversionError(
            f"cannot read {str(path)!r}: the file is truncated or not a safetensors file "
            f"({type(exc).__name__}: {exc})"
        ) from exc
    if _MAGIC not in meta:
        raise ConversionError(
            f"{str(path)!r} has no tensorfold record: it was not written by tensorfold.save"
        )
    try:
        record = json.loads(meta[_MAGIC])
    except json.JSONDecodeError as exc:
        raise ConversionError(f"{str(path)!r} has a corrupt tensorfold record: {exc}") from exc
    if record.get("format") != _MAGIC or record.get("version") != _VERSION:
        raise ConversionError(
            f"{str(path)!r}: unsupported record format={record.get('format')!r} "
            f"version={record.get('version')!r} (this tensorfold reads version {_VERSION})"
        )
    return record, tensors


def load(path: str | os.PathLike[str], model: nn.Module) -> nn.Module:
    """Load a file written by :func:`save` into ``model`` (the original architecture).

    ``path`` may also be a directory written by ``tensorfold compress`` (its
    ``model.safetensors`` is read); :func:`tensorfold.from_pretrained` rebuilds the model
    from such a directory without one.

    Every recorded layer is rebuilt as a ``FactorizedLinear`` with exactly the saved shapes
    and ranks, then all weights are loaded. The whole file and record are checked against
    the model first: a truncated or mismatched file raises :class:`ConversionError` and the
    model is left untouched.

    Returns:
        ``model``, converted and loaded in place.
    """
    path = Path(path)
    if path.is_dir():  # a directory written by ``tensorfold compress``
        path = path / WEIGHTS_NAME
    record, tensors = _read(path)
    replacements: dict[str, FactorizedLinear] = {}
    for entry in record.get("layers", []):
        name = entry.get("name")
        try:
            current = model.get_submodule(name)
        except AttributeError as exc:
            raise ConversionError(
                f"{str(path)!r} records module {name!r}, which the model does not have"
            ) from exc
        try:
            layer = FactorizedLinear(
                tuple(entry["in_modes"]),
                tuple(entry["out_modes"]),
                bias=entry["bias"],
                factorization=entry["factorization"],
                rank=_rank_from_json(entry["rank"]),
                implementation=entry.get("implementation", "auto"),
            )
            if check_factor_dtype(entry.get("factor_dtype")) is not None:
                layer.weight.quantize_()
        except (KeyError, TypeError, TensorfoldError) as exc:
            raise ConversionError(
                f"{str(path)!r}: invalid record for module {name!r}: {exc}"
            ) from exc
        ref: Tensor
        shape: tuple[int, int]
        if isinstance(current, FactorizedLinear):
            ref = current.bias if current.bias is not None else next(current.parameters())
            shape = (current.in_features, current.out_features)
        elif is_linear(current):
            view = linear_view(current)
            ref, shape = view.weight, (view.in_features, view.out_features)
        else:
            raise ConversionError(
                f"{str(path)!r} records {name!r} as a linear layer, but the model has "
                f"{type(current).__name__} there"
            )
        if shape != (layer.in_features, layer.out_features):
            raise ConversionError(
                f"{str(path)!r} records {name!r} as {layer.in_features} -> "
                f"{layer.out_features}, but the model's module is {shape[0]} -> {shape[1]}"
            )
        replacements[name] = layer.to(
            device=ref.device if ref is not None else None,
            dtype=ref.dtype if ref is not None else None,
        ).train(current.training)  # in the mode of the module it replaces
    # The state_dict the model will have once the replacements are in place.
    expected: dict[str, torch.Size] = {}
    for key, value in model.state_dict().items():
        if not any(key.startswith(n + ".") for n in replacements):
            expected[key] = value.shape
    for name, layer in replacements.items():
        for key, value in layer.state_dict().items():
            expected[f"{name}.{key}"] = value.shape
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise ConversionError(
            f"{str(path)!r} does not match the model: missing keys {missing[:5]}"
            f"{'...' if len(missing) > 5 else ''}, unexpected keys {unexpected[:5]}"
            f"{'...' if len(unexpected) > 5 else ''}"
        )
    for key, size in expected.items():
        if tensors[key].shape != size:
            raise ConversionError(
                f"{str(path)!r}: tensor {key!r} has shape {tuple(tensors[key].shape)}, "
                f"the model expects {tuple(size)}"
            )
    for name, layer in replacements.items():
        set_module(model, name, layer)
    model.load_state_dict(tensors, strict=True)
    return model
