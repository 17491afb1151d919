"""The options of ``plan``, ``tensorize`` and ``distill``: each group defined and checked once.

The functions take an options object (``tensorize(model, PlanOptions(budget=0.25))``) or the
same fields as keywords (``tensorize(model, budget=0.25)``); keywords override the object's
fields. An unknown keyword is refused with the list of known ones.

Example:
    >>> from tensorfold.convert.options import PlanOptions
    >>> PlanOptions(budget=0.25, factorization="Tucker")
    PlanOptions(budget=0.25, factorization='tucker', ...)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar, cast

from torch import Tensor

from ..errors import ConversionError, TensorfoldError
from ..formats import get_format, names
from ._util import ForwardFn, call_model, output_tensor

__all__ = [
    "AUTO_CANDIDATES",
    "DistillOptions",
    "FitOptions",
    "ModelCall",
    "PlanOptions",
    "check_budget",
    "check_factorization",
]

# What 'auto' tries per layer. 'lowrank' holds a larger rank than one-mode TT or CP at the
# same count (the same matrices, without the pair's redundancy), so at a given share it
# always fits at least as well; on MiniLM, offered beside Tucker, it won all 36 layers, and
# TT-matrix and CP never won a used layer (benchmarks/RESULTS.md): trying the tensor
# formats costs fitting time only on trained weights. Pass candidates to compare them.
AUTO_CANDIDATES: tuple[str, ...] = ("lowrank",)


def check_budget(budget: object) -> float | None:
    if budget is None:
        return None
    if (
        isinstance(budget, bool)
        or not isinstance(budget, (int, float))
        or not 0 < float(budget) <= 1
    ):
        raise ConversionError(
            f"budget={budget!r} must be a float in (0, 1]: the fraction of the matched "
            "linear parameters to keep"
        )
    return float(budget)


def check_factorization(factorization: object) -> str:
    if not isinstance(factorization, str):
        raise ConversionError(f"factorization={factorization!r} must be one of {names()} or 'auto'")
    if factorization.lower() == "auto":
        return "auto"
    try:
        return get_format(factorization).name
    except TensorfoldError as exc:
        raise ConversionError(
            f"factorization={factorization!r} is not known: {exc}; use one of {names()} or 'auto'"
        ) from exc


@dataclass(frozen=True, repr=False)
class _Options:
    def __repr__(self) -> str:
        # Callables and long lists make a repr unreadable; show the fields set differently.
        changed = [
            f"{f.name}={getattr(self, f.name)!r}"
            for f in dataclasses.fields(self)
            if getattr(self, f.name) != f.default
        ]
        return f"{type(self).__name__}({', '.join(changed + ['...'])})"


@dataclass(frozen=True, repr=False)
class PlanOptions(_Options):
    """What is compressed and to what size (``plan`` and ``tensorize``).

    Attributes:
        budget: fraction in (0, 1] of the matched layers' weight parameters to keep, met
            within 2% overall. ``None`` uses ``rank`` for every layer instead.
        factorization: a format name (``tensorfold.formats.names()``) or ``'auto'`` (the
            default: per layer the candidate with the lowest calibrated error at the layer's
            share; with the default candidates, ``'lowrank'`` everywhere).
        targets: glob pattern(s) on full module names (``*`` crosses dots); ``None`` matches
            every ``nn.Linear`` (and ``Conv1D``) but a model's output head.
        exclude: glob pattern(s); matching modules are never converted.
        rank: with ``budget=None``, the rank of every layer (any ``FactorizedLinear`` rank).
        n_tensorized_modes: modes per side (int, or dict format -> int); default one per
            side for 'cp'/'tt' (a low-rank matrix), two for 'tucker'/'ttm'.
        allocation: ``'global'`` (shares allocated across layers from their calibrated
            spectra) or ``'uniform'`` (every layer keeps ``budget`` of its parameters).
        candidates: the formats ``'auto'`` tries per layer.
    """

    budget: float | None = 0.5
    factorization: str = "auto"
    targets: str | Sequence[str] | None = None
    exclude: str | Sequence[str] | None = None
    rank: Any = None
    n_tensorized_modes: int | dict[str, int] | None = None
    allocation: str = "global"
    candidates: Sequence[str] = AUTO_CANDIDATES

    def __post_init__(self) -> None:
        object.__setattr__(self, "budget", check_budget(self.budget))
        object.__setattr__(self, "factorization", check_factorization(self.factorization))
        if self.allocation not in ("global", "uniform"):
            raise ConversionError(f"allocation={self.allocation!r} must be 'global' or 'uniform'")
        if self.budget is None and self.rank is None:
            raise ConversionError(
                "give budget= (a fraction of the linear parameters) or rank= (per layer)"
            )
        if self.factorization == "auto":
            chosen = tuple(check_factorization(c) for c in self.candidates)
            if not chosen or "auto" in chosen:
                raise ConversionError(
                    f"candidates={self.candidates!r} must name one or more formats"
                )
            object.__setattr__(self, "candidates", chosen)

    @property
    def formats(self) -> tuple[str, ...]:
        """The formats tried per layer: the candidates under ``'auto'``, else the one."""
        return tuple(self.candidates) if self.factorization == "auto" else (self.factorization,)


@dataclass(frozen=True, repr=False)
class FitOptions(_Options):
    """How ``tensorize`` fits the planned layers.

    Attributes:
        sequential: with calibration, fit each layer against the inputs it sees in the
            partly compressed model (and the original layer's outputs), so later layers
            correct earlier errors. One calibration pass per group of layers sharing an input.
        refine_steps: L-BFGS iterations of the layer-wise refinement (formats that cannot
            hold the optimal whitened low-rank matrix exactly).
        implementation: forward implementation of the new layers.
    """

    sequential: bool = True
    refine_steps: int = 50
    implementation: str = "auto"


@dataclass(frozen=True, repr=False)
class ModelCall(_Options):
    """How the library runs a model on one batch and which output it judges.

    Attributes:
        forward: ``forward(model, batch)``; the default unpacks a mapping into keywords
            (Hugging Face models) and passes anything else as the one argument.
        output_fn: maps the model's output to the tensor whose distortion is measured.
    """

    forward: ForwardFn = call_model
    output_fn: Callable[[Any], Tensor] = output_tensor


def _check_optional_int(value: object, name: str, low: int) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < low):
        raise ConversionError(f"{name}={value!r} must be an int >= {low} (or None: no limit)")


@dataclass(frozen=True, repr=False)
class DistillOptions(_Options):
    """How ``distill`` trains the student.

    Attributes:
        steps: optimiser steps (AdamW).
        lr: peak learning rate.
        parameters: ``'factorized'``, ``'factorized+norms'`` or ``'all'``.
        features: glob pattern(s) on module names (the same rule as ``targets``, any module
            type) whose outputs are matched to the teacher's.
        feature_weight: weight of the feature loss.
        warmup: fraction of the steps spent warming the learning rate up.
        weight_decay: AdamW weight decay.
        max_seconds: a time limit: the learning-rate schedule then runs on whichever of
            steps done and time spent is further along, and training ends when either is
            used up (a slow machine does fewer steps but still anneals to zero).
        cache_teacher: keep the teacher's outputs (and matched features) of a batch that
            the shuffled schedule visits again, until its last visit, so later passes skip
            the teacher's forward. Costs the memory of those outputs; nothing is kept when
            ``steps`` is at most the number of batches (no batch comes round again).
        cache_bytes: with ``cache_teacher``, the most bytes of outputs kept in memory;
            ``None``: no limit.
        cache_disk: with ``cache_teacher``, outputs beyond ``cache_bytes`` go to a
            temporary directory (removed when ``distill`` returns) while they take less
            than half the disk's free space; ``False``: those batches run the teacher
            every time.
        checkpoint_blocks: recompute each block of the student's stack (the
            ``nn.ModuleList`` holding its factorized layers) during the backward pass
            instead of keeping its activations (``torch.utils.checkpoint``): activation
            memory drops to about one block's, for roughly a third more time per step.
        activation_bytes: the most bytes a student forward may keep for its backward pass
            (its activations). A batch estimated above it is split along its first
            dimension into chunks that run one after another, each chunk's loss weighted
            by its share of the batch's rows, their gradients summed before the step: the
            same step in expectation, less memory, a little more time. The estimate scales
            the activation bytes one forward of the largest batch keeps by each batch's
            elements (with ``checkpoint_blocks``, as recomputed). ``None``: batches run
            whole.
    """

    steps: int = 200
    lr: float = 1e-4
    parameters: str = "factorized"
    features: str | Sequence[str] | None = None
    feature_weight: float = 1.0
    warmup: float = 0.05
    weight_decay: float = 0.0
    max_seconds: float | None = None
    cache_teacher: bool = False
    cache_bytes: int | None = None
    cache_disk: bool = True
    checkpoint_blocks: bool = False
    activation_bytes: int | None = None

    def __post_init__(self) -> None:
        _check_optional_int(self.activation_bytes, "activation_bytes", 1)
        if not isinstance(self.checkpoint_blocks, bool):
            raise ConversionError(
                f"checkpoint_blocks={self.checkpoint_blocks!r} must be True or False"
            )
        _check_optional_int(self.cache_bytes, "cache_bytes", 0)
        if self.max_seconds is not None and not self.max_seconds > 0:
            raise ConversionError(
                f"max_seconds={self.max_seconds!r} must be > 0 (or None: no limit)"
            )
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 0:
            raise ConversionError(f"steps={self.steps!r} must be an int >= 0")


OptionsT = TypeVar("OptionsT", bound=_Options)


def resolve(
    function: str,
    kind: type[OptionsT],
    given: object,
    fields: dict[str, Any],
    known: Sequence[type],
) -> OptionsT:
    """``given`` (or the defaults) with the keywords in ``fields`` that belong to ``kind``
    applied; those are removed from ``fields``. ``known`` lists every group ``function``
    takes, for the message when a keyword belongs to none of them."""
    if given is not None and not isinstance(given, kind):
        raise ConversionError(
            f"{function}() got {given!r} where a {kind.__name__} belongs; give the other "
            "options as keywords"
        )
    own = {f.name for f in dataclasses.fields(kind)}
    mine = {k: fields.pop(k) for k in list(fields) if k in own}
    stray = [k for k in fields if not any(k in _names(g) for g in known)]
    if stray:
        allowed = sorted(n for g in known for n in _names(g))
        raise ConversionError(f"{function}() got unknown option(s) {stray}; known: {allowed}")
    if given is None:
        return kind(**mine)
    base = cast(OptionsT, given)
    return dataclasses.replace(base, **mine) if mine else base


def _names(kind: type) -> set[str]:
    return {f.name for f in dataclasses.fields(kind)}
