"""Small helpers shared by the conversion modules: module lookup, model calls, outputs."""

from __future__ import annotations

import contextlib
import fnmatch
import inspect
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import ConversionError

ForwardFn = Callable[[nn.Module, Any], Any]

# Keys tried, in order, when a model returns a mapping (Hugging Face, sentence-transformers).
_OUTPUT_KEYS = ("sentence_embedding", "last_hidden_state", "logits", "token_embeddings")


def call_model(model: nn.Module, item: Any) -> Any:
    """Run ``model`` on one calibration item.

    The rule: a ``tuple``/``list`` is unpacked as positional arguments; a mapping (a
    tokenizer's or image processor's output) is passed as keyword arguments, as Hugging
    Face models take it, unless the model's ``forward`` has a required first parameter
    that is not one of the mapping's keys (sentence-transformers models take the mapping
    as one argument); anything else is the single argument. Pass ``forward=`` to the
    public functions to call the model another way.
    """
    if isinstance(item, (tuple, list)):
        return model(*item)
    if isinstance(item, Mapping):
        if _takes_mapping(model, item.keys()):
            return model(dict(item))
        return model(**item)
    return model(item)


def _takes_mapping(model: nn.Module, keys: Iterable[str]) -> bool:
    try:
        params = list(inspect.signature(model.forward).parameters.values())
    except (TypeError, ValueError):  # a builtin or C forward: keep the single-argument call
        return True
    first = next(
        (p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)), None
    )
    return first is not None and first.default is first.empty and first.name not in set(keys)


class StopForward(Exception):
    """Raised from a hook to end a forward pass early: nothing after that point is needed."""


def run_until_stopped(forward: ForwardFn, model: nn.Module, batch: Any) -> None:
    """``forward(model, batch)``, where a hook may end the pass with :class:`StopForward`."""
    try:
        forward(model, batch)
    except StopForward:
        pass


def tensors_of(output: Any) -> list[Tensor]:
    """Every tensor in a model output (nested tuples, lists and mappings), in order."""
    if isinstance(output, Tensor):
        return [output]
    if isinstance(output, (tuple, list)):
        return [t for o in output for t in tensors_of(o)]
    if isinstance(output, dict):
        return [t for o in output.values() for t in tensors_of(o)]
    return []


def _first_tensor(batch: Any) -> Tensor | None:
    return next(iter(tensors_of(dict(batch) if isinstance(batch, Mapping) else batch)), None)


def batch_rows(batch: Any) -> int:
    """The length of the first dimension of a batch's first tensor (0: none)."""
    first = _first_tensor(batch)
    return 0 if first is None or first.dim() == 0 else int(first.size(0))


def batch_elements(batch: Any) -> int:
    """The size of a batch's first tensor (token ids, pixels): what a forward's cost and
    activations follow (1 if it has none)."""
    first = _first_tensor(batch)
    return 1 if first is None else max(1, first.numel())


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


def is_conv1d(module: nn.Module) -> bool:
    """Hugging Face's ``Conv1D`` (GPT-2's projections): a linear layer whose weight is
    stored ``(in, out)``. Recognised by name and shape so ``transformers`` need not be
    imported."""
    weight = getattr(module, "weight", None)
    return (
        type(module).__name__ == "Conv1D"
        and hasattr(module, "nf")
        and isinstance(weight, Tensor)
        and weight.dim() == 2
    )


def is_linear(module: nn.Module) -> bool:
    """A module tensorfold can replace: ``nn.Linear``, a ``Conv1D``, or a model library's
    subclass of ``nn.Linear`` whose forward computes the same map (Falcon's
    ``FalconLinear``; see :func:`linear_subclass`)."""
    return type(module) is nn.Linear or is_conv1d(module) or linear_subclass(module)


# The probe runs once per module; the verdicts do not keep a model alive.
_SUBCLASS_VERDICTS: weakref.WeakKeyDictionary[nn.Module, bool] = weakref.WeakKeyDictionary()


def linear_subclass(module: nn.Module) -> bool:
    """Whether ``module`` is a subclass of ``nn.Linear`` that computes ``x W^T + b``.

    torch's own subclasses are refused: their owners read the weight directly
    (``nn.MultiheadAttention``'s ``out_proj``) or they are quantized. Any other subclass
    with a floating-point weight is run once on a random input by its class's forward and
    accepted when the result is ``F.linear``'s (so a LoRA or quantizing subclass, whose
    forward adds or changes something, stays as it is)."""
    cls = type(module)
    if cls is nn.Linear or not isinstance(module, nn.Linear):
        return False
    if cls.__module__.split(".")[0] == "torch":
        return False
    seen = _SUBCLASS_VERDICTS.get(module)
    if seen is not None:
        return seen
    weight = module.weight
    if not isinstance(weight, Tensor) or weight.dim() != 2 or not weight.is_floating_point():
        verdict = False
    elif weight.is_meta:  # nothing to run: trust a class that keeps nn.Linear's forward
        verdict = cls.forward is nn.Linear.forward
    else:
        verdict = _computes_linear(module, weight)
    _SUBCLASS_VERDICTS[module] = verdict
    return verdict


def _computes_linear(module: nn.Linear, weight: Tensor) -> bool:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, weight.shape[1], generator=gen).to(weight.device, weight.dtype)
    with torch.no_grad():
        try:
            out = type(module).forward(module, x)
        except Exception:  # a forward that needs more than one input tensor
            return False
        expected = F.linear(x, weight, module.bias)
    if not isinstance(out, Tensor) or out.shape != expected.shape:
        return False
    tol = 1e-2 if weight.element_size() < 4 else 1e-5
    return bool(torch.allclose(out, expected, rtol=tol, atol=tol * float(expected.abs().max())))


def linear_view(module: nn.Module) -> nn.Linear:
    """``module`` itself for an ``nn.Linear`` (or a subclass :func:`is_linear` accepts);
    for a ``Conv1D`` an ``nn.Linear`` whose weight is a transposed view of the same storage
    (no copy) and whose bias is the same tensor."""
    if type(module) is nn.Linear or linear_subclass(module):
        assert isinstance(module, nn.Linear)  # linear_subclass checked it
        return module
    if not is_conv1d(module):
        raise ConversionError(
            f"{type(module).__name__} is not a linear layer tensorfold can convert"
        )
    w: Tensor = module.weight  # type: ignore[assignment]
    view = nn.Linear(int(w.shape[0]), int(w.shape[1]), bias=False, device="meta")
    view.weight = nn.Parameter(w.detach().T, requires_grad=False)
    bias = getattr(module, "bias", None)
    if bias is not None:
        view.bias = nn.Parameter(bias.detach(), requires_grad=False)
    return view


def output_head_names(model: nn.Module) -> set[str]:
    """Linear layers that map to a vocabulary or share a weight with an embedding: a
    Hugging Face model's ``get_output_embeddings()``, and any linear tied to an
    ``nn.Embedding``. Left dense unless asked for by name."""
    heads: set[int] = set()
    get_out = getattr(model, "get_output_embeddings", None)
    if callable(get_out):
        try:
            head = get_out()
        except (AttributeError, NotImplementedError):
            head = None
        if isinstance(head, nn.Module):
            heads.add(id(head))
    tied = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    return {
        n
        for n, m in model.named_modules()
        if n and is_linear(m) and (id(m) in heads or id(getattr(m, "weight", None)) in tied)
    }


def _patterns(value: str | Sequence[str] | None, name: str) -> list[str] | None:
    if value is None:
        return None
    if isinstance(value, str):
        return [value]
    if not isinstance(value, Sequence) or not all(isinstance(v, str) for v in value):
        raise ConversionError(f"{name}={value!r} must be a glob string or a list of glob strings")
    return list(value)


def matches(name: str, patterns: Sequence[str]) -> bool:
    """The one matching rule: a shell-style glob (``fnmatch.fnmatchcase``) on the full
    dotted module name; ``*`` also crosses dots."""
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def match_names(
    model: nn.Module, patterns: str | Sequence[str], argument: str = "features"
) -> list[str]:
    """Names of the modules of any type whose name matches one of ``patterns``."""
    pats = _patterns(patterns, argument) or []
    return [n for n, _ in model.named_modules() if n and matches(n, pats)]


def match_modules(
    model: nn.Module,
    targets: str | Sequence[str] | None,
    exclude: str | Sequence[str] | None,
) -> list[str]:
    """Names of the linear modules (:func:`is_linear`) selected by ``targets`` minus ``exclude``.

    Each pattern follows :func:`matches`. ``targets=None`` selects every linear module
    except the output heads (:func:`output_head_names`: the LM head, layers tied to an
    embedding); a head is converted only when a target pattern names it. A module is
    converted when it matches at least one target pattern and no exclude pattern.
    Example: ``targets="*encoder*"``, ``exclude=["*.pooler.*"]``.
    """
    tgt = _patterns(targets, "targets")
    exc = _patterns(exclude, "exclude") or []
    heads = output_head_names(model) if tgt is None else set()
    names = []
    for name, module in model.named_modules():
        if not name or not is_linear(module) or name in heads:
            continue
        if tgt is not None and not matches(name, tgt):
            continue
        if matches(name, exc):
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


@contextlib.contextmanager
def forwards_replaced(
    modules: Sequence[nn.Module], make: Callable[[nn.Module], Callable[..., Any]]
) -> Iterator[None]:
    """Within the block, each module's ``forward`` is ``make(module)`` (an instance
    attribute, which shadows the class's; hooks still fire); restored after."""
    own = [m.__dict__.get("forward") for m in modules]  # rare: set on the instance
    for m in modules:
        m.forward = make(m)
    try:
        yield
    finally:
        for m, previous in zip(modules, own, strict=True):
            if previous is None:
                del m.forward
            else:
                m.forward = previous
