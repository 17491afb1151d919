"""The inference cache of a :class:`~tensorfold.FactorizedLinear`, and its memory policy.

In inference (no gradient reaches the factors) a layer may keep operands it rebuilt, the
split pair ``W = up @ down`` or the dense ``W``, for later calls. What it may keep is its
``cache`` policy:

=============  ===========================================================================
``'none'``     nothing: every operand is built in the call that uses it
``'split'``    the split pair only, where the layer's parameters plus the pair stay below
               its dense weight (a side that is one factor is a view of it: no bytes);
               nothing for int8 factors, whose pair would undo what quantizing saved
``'weights'``  the split pair and the dense ``W``, wherever they are faster
int ``n``      any operand of at most ``n`` bytes (per layer index)
=============  ===========================================================================

``'auto'`` then runs the fastest path the policy allows (:func:`tensorfold.choice.choose`
with the operands the policy keeps). Where the model's answer is contested (the runner-up
is predicted within the model's error of the pick), the layer times both paths on the
first batch of each batch bucket, and takes the runner-up for that bucket only where it
ran clearly faster.

Entries are keyed by each factor's version counter (bumped by every in-place update,
optimiser steps and ``load_state_dict`` included) and storage address; ``.to()`` and
friends and ``load_state_dict`` clear the cache. It is a plain attribute, never in
``state_dict``, and dropped on copy and pickle. Bypassed under ``torch.compile``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from ..choice import Choice, LayerProgram, Path, choose, layer_program
from ..contraction import batch_bucket
from ..errors import ImplementationError
from ..functional import run_factorized

if TYPE_CHECKING:
    from .linear import FactorizedLinear

__all__ = ["CACHE_POLICIES", "CachePolicy", "Decision", "Explanation", "InferenceCache"]

CachePolicy = Literal["none", "split", "weights"] | int
CACHE_POLICIES: tuple[str, ...] = ("none", "split", "weights")
_OPERAND = {"split": "split", "reconstructed": "weight"}  # path -> the operand it caches
# Alternations of the two timed paths; the fastest call of each is kept (noise only adds
# time). The runner-up replaces the model's pick only where it is clearly faster.
_MEASURE_ROUNDS = 5
_MEASURED_WIN = 1.05


def check_cache(cache: object) -> CachePolicy:
    """Return the canonical cache policy or raise a clear error."""
    if isinstance(cache, str) and cache.lower() in CACHE_POLICIES:
        return cache.lower()  # type: ignore[return-value]
    if isinstance(cache, int) and not isinstance(cache, bool) and cache >= 0:
        return cache
    raise ImplementationError(
        f"cache={cache!r} is not one of 'none', 'split', 'weights' or a byte budget (int >= 0)"
    )


@dataclass(frozen=True)
class Decision:
    """What a layer runs at one batch bucket in inference, and why.

    Attributes:
        path: what runs.
        model: the cost model's :class:`~tensorfold.choice.Choice` under the policy.
        measured: the fastest of several timed calls of each contested path, else None;
            the runner-up replaces the model's pick only where it was clearly faster.
    """

    path: Path
    model: Choice
    measured: dict[str, float] | None = None


OWN_PATH = "format"  # Explanation.path where the format's own computation runs


@dataclass
class Explanation:
    """Why a layer runs the path it runs for a batch; ``str()`` prints the answer.

    Attributes:
        layer: the layer's ``extra_repr``.
        rows, bucket: the batch's row count and the bucket planned for.
        regime: ``'inference'`` (no gradient reaches the factors) or ``'training'``.
        implementation: the layer's ``implementation``.
        policy: the layer's ``cache`` policy; ``cacheable``: the operands it may keep.
        choice: the model's :class:`~tensorfold.choice.Choice` (None where the
            implementation is fixed and nothing is chosen).
        measured: the timed paths where the model's answer was contested, else None.
        path: what ``forward`` runs for this batch (:data:`OWN_PATH`: the format's own
            computation, ``FactorizedTensor.linear``).
        operand_bytes: bytes the path keeps for this layer index once it ran (0: none).
        cached_bytes: what the layer's cache holds now, all indices.
        program: the layer's :class:`~tensorfold.choice.LayerProgram` (plans and prices).
    """

    layer: str
    rows: int
    bucket: int
    regime: str
    implementation: str
    policy: CachePolicy
    cacheable: frozenset[str]
    choice: Choice | None
    measured: dict[str, float] | None
    path: str
    operand_bytes: int
    cached_bytes: int
    program: LayerProgram = field(repr=False)

    def __str__(self) -> str:
        keeps = ", ".join(sorted(self.cacheable)) or "nothing"
        lines = [
            f"FactorizedLinear({self.layer})",
            f"{self.rows} row(s) -> batch bucket {self.bucket}; {self.regime}; "
            f"implementation='{self.implementation}'; cache={self.policy!r} (may keep: {keeps})",
        ]
        if self.path == OWN_PATH:
            lines.append("the format computes the layer itself (FactorizedTensor.linear)")
        elif self.choice is not None:
            lines.append(str(self.choice))
        else:
            lines.append(f"implementation='{self.implementation}' is fixed: nothing to choose")
        if self.measured is not None:
            timed = ", ".join(f"'{p}' {s * 1e6:.1f} us" for p, s in self.measured.items())
            lines.append(f"timed at first use (fastest of {_MEASURE_ROUNDS}): {timed}")
        lines.append(
            f"runs: '{self.path}'; keeps {self.operand_bytes:,} bytes for it; "
            f"cache holds {self.cached_bytes:,} bytes"
        )
        return "\n".join(lines)


class InferenceCache:
    """Operands kept between inference calls of one layer, and the choice per bucket.

    Attributes:
        measure_ties: time a contested choice at first use (class-wide switch; with
            False the cost model's pick always stands).
    """

    measure_ties: bool = True

    def __init__(self) -> None:
        self._entries: dict[tuple[tuple[int, ...], str], tuple[tuple, object]] = {}
        # (bucket, policy, implementation) -> (program, cacheable operands, decision)
        self._buckets: dict[tuple[int, CachePolicy, str], _Bucket] = {}

    # ---- inspection ----------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: object) -> bool:
        return key in self._entries

    def get(self, indices: tuple[int, ...], path: str) -> object | None:
        """The kept operand of ``path``: ``(down, up)`` for ``'split'``, ``W`` otherwise."""
        hit = self._entries.get((indices, path))
        return None if hit is None else hit[1]

    def nbytes(self, exclude: set[int] = frozenset()) -> int:  # type: ignore[assignment]
        """Bytes of the storages the entries hold, each counted once, ``exclude`` left out
        (the data pointers of the layer's parameters: a view of a factor costs nothing)."""
        seen: dict[int, int] = {}
        for _, value in self._entries.values():
            for t in value if isinstance(value, tuple) else (value,):
                storage = t.untyped_storage()
                if storage.data_ptr() not in exclude:
                    seen[storage.data_ptr()] = storage.nbytes()
        return sum(seen.values())

    def clear(self) -> None:
        self._entries.clear()
        self._buckets.clear()

    def decision(self, rows: int, policy: CachePolicy, implementation: str) -> Decision | None:
        """The decision kept for ``rows``' bucket, if one was made."""
        hit = self._buckets.get((batch_bucket(rows), policy, implementation))
        return None if hit is None else hit.decision

    # ---- policy --------------------------------------------------------------------------
    @staticmethod
    def cacheable(
        policy: CachePolicy,
        program: LayerProgram,
        factors: Sequence[Tensor],
        built: bool = False,
    ) -> frozenset[str]:
        """The operands ``policy`` lets the layer keep for one index (``factors``: their
        values in the working dtype; ``built``: each is built per call, so no kept side is a
        view, see :attr:`~tensorfold.formats.FactorizedTensor.built_values`)."""
        if policy == "none" or (policy == "split" and built):
            return frozenset()
        if policy == "weights":
            return frozenset({"split", "weight"})
        itemsize = factors[0].element_size()
        dense = program.in_features * program.out_features * itemsize
        pair = math.inf if program.split is None else program.split.built_bytes(factors, built)
        if policy == "split":
            params = sum(f.numel() * f.element_size() for f in factors)
            return frozenset({"split"}) if params + pair < dense else frozenset()
        allowed = {"split"} if pair <= policy else set()
        return frozenset(allowed | ({"weight"} if dense <= policy else set()))

    # ---- running -------------------------------------------------------------------------
    def operand(
        self,
        layer: FactorizedLinear,
        program: LayerProgram,
        idx: tuple[int, ...],
        path: str,
        keep: bool,
    ) -> object:
        """The split pair or ``W`` for ``idx``: from the cache, or built (and kept if ``keep``)."""
        factors_params = layer.weight.factors._parameters.values()
        key = tuple([(p._version, p.data_ptr()) for p in factors_params])  # type: ignore[union-attr]
        hit = self._entries.get((idx, path))
        if hit is not None and hit[0] == key:
            return hit[1]
        if self._entries and next(iter(self._entries.values()))[0] != key:
            self._entries.clear()  # the factors changed: every index's entry is stale
        with torch.no_grad():
            factors = layer.weight.layer_factors(idx)
            if path == "split":
                assert program.split is not None  # only asked for where a split exists
                value: object = program.split(factors)
            else:
                value = program.rebuild(*factors).reshape(layer.out_features, layer.in_features)
        if keep:
            self._entries[(idx, path)] = (key, value)
        return value

    def run(
        self,
        layer: FactorizedLinear,
        path: str,
        program: LayerProgram,
        cacheable: frozenset[str],
        x: Tensor,
        idx: tuple[int, ...],
        bias: Tensor | None,
    ) -> Tensor:
        if path == "factorized":
            return run_factorized(program, x, layer.weight.layer_factors(idx), bias)
        value = self.operand(layer, program, idx, path, _OPERAND[path] in cacheable)
        if isinstance(value, tuple):  # the split pair
            down, up = value
            return F.linear(F.linear(x, down), up, bias)
        assert isinstance(value, Tensor)
        return F.linear(x, value, bias)

    def decide(
        self,
        layer: FactorizedLinear,
        program: LayerProgram,
        cacheable: frozenset[str],
        x: Tensor,
        idx: tuple[int, ...],
        bias: Tensor | None,
    ) -> Decision:
        """The path for ``x``'s bucket under ``cacheable`` (timed where contested)."""
        model = choose(program, cacheable)
        decision = Decision(model.path, model)
        if model.contested is not None and self.measure_ties and x.numel():

            def call(path: Path) -> Callable[[], Tensor]:
                return lambda: self.run(layer, path, program, cacheable, x, idx, bias)

            pair = (model.path, model.contested)
            timed = self._time({p: call(p) for p in pair}, x.device)
            pick, runner = pair
            fastest = runner if timed[runner] * _MEASURED_WIN < timed[pick] else pick
            decision = Decision(fastest, model, timed)
        return decision

    @staticmethod
    def _time(runs: dict[str, Callable[[], Tensor]], device: torch.device) -> dict[str, float]:
        sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        times: dict[str, list[float]] = {p: [] for p in runs}
        for fn in runs.values():
            fn()  # builds what the path keeps, and warms it
        for _ in range(_MEASURE_ROUNDS):
            for path, fn in runs.items():
                sync()
                start = time.perf_counter()
                fn()
                sync()
                times[path].append(time.perf_counter() - start)
        return {p: min(v) for p, v in times.items()}

    def forward(
        self, layer: FactorizedLinear, x: Tensor, idx: tuple[int, ...], bias: Tensor | None
    ) -> Tensor:
        """The inference forward: the decided path, with what the policy lets it keep."""
        state = self.state(layer, x, idx, bias)
        return self.run(layer, state.decision.path, state.program, state.cacheable, x, idx, bias)

    def state(
        self, layer: FactorizedLinear, x: Tensor, idx: tuple[int, ...], bias: Tensor | None
    ) -> _Bucket:
        """Program, cacheable operands and decision for ``x``'s bucket, made once per bucket."""
        bucket = batch_bucket(x.numel() // layer.in_features)
        key = (bucket, layer.cache, layer.implementation)
        state = self._buckets.get(key)
        if state is not None:
            return state
        factors = layer.weight.layer_factors(idx)
        f0 = factors[0]
        program = layer_program(
            layer.weight.network,
            tuple(tuple(f.shape) for f in factors),
            bucket,
            f0.device.type,
            f0.element_size(),
        )
        cacheable = self.cacheable(layer.cache, program, factors, layer.weight.built_values)
        if layer.implementation == "auto":
            decision = self.decide(layer, program, cacheable, x, idx, bias)
        else:
            path: Path = layer.implementation
            decision = Decision(path, choose(program, cacheable))
        state = _Bucket(program, cacheable, decision)
        self._buckets[key] = state
        used = {s.decision.path for s in self._buckets.values()}
        for entry in [k for k in self._entries if k[1] not in used]:
            del self._entries[entry]  # built only to be timed
        return state


@dataclass(frozen=True)
class _Bucket:
    program: LayerProgram
    cacheable: frozenset[str]
    decision: Decision
