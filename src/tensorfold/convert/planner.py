"""Planning a whole-model conversion: which ``nn.Linear`` modules change, and to what.

``plan`` decides, changing nothing, the format, tensorized shape, rank and parameter count
of every matched layer: ranks are allocated across layers from their whitened spectra
(calibration data) weighted by a measured end-to-end sensitivity, then resolved per format
to meet the budget; ``'auto'`` then picks per layer the candidate with the lowest calibrated
error at that layer's share.
"""

from __future__ import annotations

import contextlib
import heapq
import math
from collections.abc import Callable, Generator, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import ConversionError
from ..formats import get_format
from ..formats.lowrank import next_rank_on_grid
from ..nn import FactorizedLinear
from ..shapes import tensorized_shape
from ._util import (
    ForwardFn,
    as_batches,
    is_linear,
    linear_view,
    match_modules,
)
from .calibrate import LayerStats, pack_stats, stats_by_block, unpack_stats
from .fit import WhitenedProblem, fit_weight, whitened_problem
from .options import (
    ModelCall,
    PlanOptions,
    resolve,
)
from .replay import BlockReplay, block_index, find_stack
from .spill_cache import SpillCache

__all__ = ["LayerPlan", "ConversionPlan", "ConversionReport", "plan"]

# Modes per side when the user gives none. Fewer modes are more expressive for trained
# weights: one mode makes CP and TT a low-rank matrix factorisation (TT's bond is the
# matrix rank); TT-matrix needs two to compress at all; Tucker with one mode caps the
# matrix rank at its smaller core rank, two modes spend the budget better.
DEFAULT_MODES = {"cp": 1, "tt": 1, "lowrank": 1, "tucker": 2, "ttm": 2}
# Iterations of CP's ALS and Tucker's HOOI when 'auto' compares formats: the comparison
# only ranks them, and converged fits cost most of the planning time on wide layers.
_CHOICE_SWEEPS = 5


@dataclass
class LayerPlan:
    """What happens to one ``nn.Linear``."""

    name: str
    in_features: int
    out_features: int
    factorization: str
    in_modes: tuple[int, ...]
    out_modes: tuple[int, ...]
    rank: Any
    params_before: int
    params_after: int
    bias: bool
    sensitivity: float = float("nan")
    error: float = float("nan")  # relative calibrated output error of the fit
    candidates: dict[str, float] = field(default_factory=dict)  # 'auto': error per format

    @property
    def share(self) -> float:
        return self.params_after / self.params_before


def _table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    line = "  ".join(h.ljust(w) for h, w in zip(header, widths, strict=False))
    out = [line, "-" * len(line)]
    out += ["  ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=False)) for r in rows]
    return "\n".join(out)


@dataclass
class ConversionPlan:
    """The printable result of :func:`plan`; :func:`tensorize` applies it."""

    layers: list[LayerPlan]
    budget: float | None
    factorization: str
    data_aware: bool

    @property
    def params_before(self) -> int:
        return sum(lp.params_before for lp in self.layers)

    @property
    def params_after(self) -> int:
        return sum(lp.params_after for lp in self.layers)

    @property
    def kept(self) -> float:
        return self.params_after / max(1, self.params_before)

    def rows(self) -> list[list[str]]:
        return [
            [
                lp.name,
                lp.factorization,
                f"{lp.out_modes}x{lp.in_modes}",
                str(lp.rank),
                f"{lp.params_before:,}",
                f"{lp.params_after:,}",
                f"{lp.share:.3f}",
                "" if math.isnan(lp.error) else f"{lp.error:.4f}",
            ]
            for lp in self.layers
        ]

    def __str__(self) -> str:
        head = (
            f"tensorfold plan: {len(self.layers)} linear layers, "
            f"factorization={self.factorization!r}, "
            f"budget={self.budget}, data-aware={self.data_aware}"
        )
        body = _table(
            self.rows(),
            [
                "module",
                "format",
                "modes (out x in)",
                "rank",
                "params before",
                "params after",
                "kept",
                "calib. error",
            ],
        )
        foot = (
            f"linear parameters: {self.params_before:,} -> {self.params_after:,} "
            f"({100 * self.kept:.1f}% kept)"
        )
        return "\n".join([head, body, foot])


@dataclass
class ConversionReport(ConversionPlan):
    """The plan as applied, with per-layer calibrated errors and the time taken."""

    seconds: float = 0.0

    def __str__(self) -> str:
        return super().__str__().replace("tensorfold plan:", "tensorfold report:", 1) + (
            f"\ntime: {self.seconds:.1f} s"
        )


def _modes_for(
    fmt: str, in_f: int, out_f: int, n_modes: int | dict[str, int] | None
) -> tuple[tuple[int, ...], tuple[int, ...]]:
    order = (
        n_modes.get(fmt, DEFAULT_MODES[fmt])
        if isinstance(n_modes, dict)
        else (n_modes or DEFAULT_MODES[fmt])
    )
    if isinstance(order, bool) or not isinstance(order, int) or order < 1:
        raise ConversionError(
            f"n_tensorized_modes={n_modes!r} must be a positive int (or a dict format -> int)"
        )
    return tensorized_shape(in_f, out_f, order)


def _layer_plan(name: str, linear: nn.Linear, fmt: str, share: float, n_modes: Any) -> LayerPlan:
    in_modes, out_modes = _modes_for(fmt, linear.in_features, linear.out_features, n_modes)
    cls = get_format(fmt)
    dense = linear.in_features * linear.out_features
    rank = cls.resolve_rank(float(min(share, 1.0)), out_modes, in_modes)
    after = cls.count_parameters(rank, out_modes, in_modes)
    return LayerPlan(
        name,
        linear.in_features,
        linear.out_features,
        fmt,
        in_modes,
        out_modes,
        rank,
        dense,
        after,
        linear.bias is not None,
    )


def _best_format(
    lp: LayerPlan,
    problem: WhitenedProblem,
    linear: nn.Linear,
    formats: Sequence[str],
    n_modes: Any,
    data_aware: bool,
    bar: Any,
) -> LayerPlan:
    """The candidate format with the lowest calibrated error at ``lp``'s share."""
    best: LayerPlan | None = None
    for f in formats:
        cand = _layer_plan(lp.name, linear, f, lp.share, n_modes)
        layer = FactorizedLinear(
            cand.in_modes, cand.out_modes, bias=False, factorization=f, rank=cand.rank
        )
        cand.error = fit_weight(
            layer.weight, problem, refine_steps=0, data_aware=data_aware, sweeps=_CHOICE_SWEEPS
        )
        lp.candidates[f] = cand.error
        if best is None or cand.error < best.error - 1e-9:
            best = cand
        bar.update()
    assert best is not None  # formats is never empty
    best.candidates, best.sensitivity = lp.candidates, lp.sensitivity
    return best


# ---- rank allocation -----------------------------------------------------------------------
@torch.no_grad()
def _sensitivity(
    model: nn.Module,
    name: str,
    problem: WhitenedProblem,
    share: float,
    batches: Sequence[Any],
    refs: Sequence[Tensor],
    forward: ForwardFn,
    output_fn: Callable[[Any], Tensor],
) -> float:
    """End-to-end output distortion when only layer ``name`` is replaced by its optimal
    whitened matrix at the uniform share, divided by that layer's own relative squared
    error."""
    lin = model.get_submodule(name)
    n_out, n_in = problem.weight.shape
    k = max(1, int(share * n_in * n_out / (n_in + n_out)))
    ref = linear_view(lin).weight
    delta = (problem.low_rank(k) - problem.weight).to(device=ref.device, dtype=ref.dtype)
    handle = lin.register_forward_hook(lambda m, a, y: y + F.linear(a[0], delta))
    try:
        num = den = 0.0
        for b, r in zip(batches, refs, strict=False):
            y = output_fn(forward(model, b)).float()
            num += float((y - r).square().sum())
            den += float(r.square().sum())
    finally:
        handle.remove()
    s2 = problem.spectrum()
    rel = float(s2[k:].sum()) / max(float(s2.sum()), 1e-300)
    return (num / max(den, 1e-300)) / max(rel, 1e-12)


def _spectra_and_sensitivities(
    model: nn.Module,
    names: Sequence[str],
    problems: Iterable[tuple[str, WhitenedProblem]],
    share: float,
    probe: Sequence[Any],
    how: ModelCall,
    bar: Any,
) -> tuple[dict[str, Tensor], dict[str, float]]:
    """Each layer's whitened spectrum and, with probe batches, its sensitivity."""
    spectra: dict[str, Tensor] = {}
    sens = dict.fromkeys(names, 1.0)
    with torch.no_grad():  # else autograd keeps every activation of these forwards
        refs = [how.output_fn(how.forward(model, b)).float() for b in probe]
    # Layers come in block order: the blocks before a layer's own are unchanged by its
    # replacement, so their outputs on the probe batches are replayed.
    stack = find_stack(model, names) if probe else None
    replay = None if stack is None else BlockReplay(model, stack[1], probe, how.forward)
    run = how.forward if replay is None else replay.forward
    try:
        for n, problem in problems:
            spectra[n] = problem.spectrum()
            if probe:
                block = None if stack is None else block_index(stack[0], n)
                with contextlib.ExitStack() as replaying:
                    if replay is not None and block is not None and block >= replay.upto:
                        replay.advance(block)
                        replaying.enter_context(replay.active())
                    sens[n] = _sensitivity(
                        model, n, problem, share, probe, refs, run, how.output_fn
                    )
            del problem
            bar.update()
    finally:
        if replay is not None:
            replay.close()
    return spectra, sens


def _allocate(
    linears: dict[str, nn.Linear],
    spectra: dict[str, Tensor],
    weights: dict[str, float],
    budget: float,
    gauge: bool = False,
) -> dict[str, float]:
    """Shares per layer from the whitened spectra: rank-one terms are kept greedily by
    (weighted output error they remove) / (parameters they cost) until the budget is spent.
    A term of a pair costs ``m + n``; with ``gauge`` (the gauge-fixed low-rank form) the
    ``j``-th costs ``m + n - 2j + 1``, so that ``k`` terms cost ``k (m + n - k)``. Greedy is
    optimal for pairs because each layer's gains per parameter are non-increasing. With
    ``gauge``, terms are taken in the steps of ranks that the gauge-fixed form resolves
    counts to (:func:`~tensorfold.formats.lowrank.rank_on_grid`)."""
    total = sum(lin.in_features * lin.out_features for lin in linears.values())
    # Per layer, (gain / cost, cost, rank) of each step of terms.
    terms: dict[str, list[tuple[float, int, int]]] = {}
    for name, lin in linears.items():
        m, n = lin.out_features, lin.in_features
        s2 = (spectra[name] / max(float(spectra[name].sum()), 1e-300)).tolist()
        cap = min(m, n, len(s2)) if gauge else max(1, min(len(s2), (m * n) // (m + n)))
        costs = [m + n - (2 * j - 1 if gauge else 0) for j in range(1, cap + 1)]
        terms[name] = []
        j = 0
        while j < cap:
            nxt = min(cap, next_rank_on_grid(j) if gauge else j + 1)
            gain, cost = sum(s2[j:nxt]), sum(costs[j:nxt])
            terms[name].append((weights[name] * gain / cost, cost, nxt))
            j = nxt
    # Each layer keeps its first step, then steps in order, the best next step first: a
    # gauge-fixed term costs less than the one before it, so gains per parameter need not
    # fall, and a term is never kept before the ones above it.
    kept = dict.fromkeys(linears, 1)  # steps kept per layer
    spent = sum(t[0][1] for t in terms.values())
    heap = [(-t[1][0], name) for name, t in terms.items() if len(t) > 1]
    heapq.heapify(heap)
    while heap:
        _, name = heapq.heappop(heap)
        cost = terms[name][kept[name]][1]
        if spent + cost > budget * total:
            break
        spent += cost
        kept[name] += 1
        if kept[name] < len(terms[name]):
            heapq.heappush(heap, (-terms[name][kept[name]][0], name))
    count = (lambda k, m, n: k * (m + n - k)) if gauge else (lambda k, m, n: k * (m + n))
    return {
        name: count(terms[name][kept[name] - 1][2], lin.out_features, lin.in_features)
        / (lin.in_features * lin.out_features)
        for name, lin in linears.items()
    }


def _fit_budget(
    layers: list[LayerPlan],
    shares: dict[str, float],
    linears: dict[str, nn.Linear],
    budget: float,
    n_modes: Any,
) -> list[LayerPlan]:
    """Resolve each layer's rank from its share, then rescale shares until the total lands
    within 2% of the budget (formats resolve ranks in coarse steps)."""
    target = budget * sum(lp.params_before for lp in layers)
    scale = 1.0
    for _ in range(8):
        layers = [
            _layer_plan(
                lp.name, linears[lp.name], lp.factorization, shares[lp.name] * scale, n_modes
            )
            for lp in layers
        ]
        total = sum(lp.params_after for lp in layers)
        if abs(total - target) <= 0.015 * target:
            break
        scale *= target / max(total, 1)
    # Small layers resolve ranks in coarse steps: nudge single layers up or down while that
    # brings the total closer to the target.
    for _ in range(4 * len(layers)):
        total = sum(lp.params_after for lp in layers)
        if abs(total - target) <= 0.01 * target:
            break
        best = None
        for i, lp in enumerate(layers):
            for factor in (1.03, 1.1, 1.25, 1 / 1.03, 1 / 1.1, 1 / 1.25):
                cand = _layer_plan(
                    lp.name, linears[lp.name], lp.factorization, lp.share * factor, n_modes
                )
                gap = abs(total - lp.params_after + cand.params_after - target)
                if cand.params_after != lp.params_after and (best is None or gap < best[0]):
                    best = (gap, i, cand)
                    break
        if best is None or best[0] >= abs(total - target):
            break
        layers[best[1]] = best[2]
    return layers


# ---- public API ----------------------------------------------------------------------------
def plan(
    model: nn.Module,
    options: PlanOptions | None = None,
    calibration: Iterable[Any] | None = None,
    *,
    call: ModelCall | None = None,
    progress: bool = False,
    _stats: dict[str, LayerStats] | None = None,
    **fields: Any,
) -> ConversionPlan:
    """Decide, changing nothing, how each matched ``nn.Linear`` is factorized.

    Args:
        model: any module; its ``nn.Linear`` (and ``Conv1D``) submodules are candidates.
        options: a :class:`~tensorfold.convert.options.PlanOptions` (budget, factorization,
            targets, exclude, rank, n_tensorized_modes, allocation, candidates); its fields
            can also be given as keywords, which override it.
        calibration: iterable of model inputs. With it, ranks are allocated from each
            layer's *whitened* spectrum weighted by its measured end-to-end sensitivity;
            without it, from the spectrum of the weights.
        call: a :class:`~tensorfold.convert.options.ModelCall` (``forward``, ``output_fn``),
            also as keywords.
        progress: show tqdm bars.

    Returns:
        A :class:`ConversionPlan` (print it for a table).

    Example:
        >>> import torch, tensorfold
        >>> from torch import nn
        >>> net = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 8))
        >>> p = tensorfold.plan(net, budget=0.5, targets="0")
        >>> [lp.name for lp in p.layers], round(p.kept, 1)
        (['0'], 0.5)
    """
    groups = (PlanOptions, ModelCall)
    opts = resolve("plan", PlanOptions, options, fields, groups)
    how = resolve("plan", ModelCall, call, fields, groups)
    budget, fmt, targets, exclude = opts.budget, opts.factorization, opts.targets, opts.exclude
    n_tensorized_modes = opts.n_tensorized_modes
    forward = how.forward
    names = match_modules(model, targets, exclude)
    if not names:
        refused = [
            f"{n} ({type(m).__name__})"
            for n, m in model.named_modules()
            if isinstance(m, nn.Linear) and not is_linear(m)
        ]
        why = (
            f"; left alone, subclasses of nn.Linear whose forward is not x W^T + b: {refused[:4]}"
            if refused
            else ""
        )
        raise ConversionError(
            f"no nn.Linear module matches targets={targets!r} exclude={exclude!r} (nor Conv1D); "
            "the model's linear "
            f"modules are {[n for n, m in model.named_modules() if is_linear(m)][:8]}{why}"
        )
    linears = {n: linear_view(model.get_submodule(n)) for n in names}
    for n, lin in linears.items():
        if lin.weight.dim() != 2 or not lin.weight.is_floating_point():
            raise ConversionError(
                f"module {n!r} has a weight of shape {tuple(lin.weight.shape)} and dtype "
                f"{lin.weight.dtype}: only floating-point nn.Linear can be converted"
            )
    batches = as_batches(calibration)
    formats = opts.formats
    # Allocation counts a rank's parameters as the gauge-fixed form does where it may be used.
    gauge = "lowrank" in formats
    choosing = fmt == "auto" and len(formats) > 1  # else every layer gets formats[0]
    base_fmt = "lowrank" if gauge else ("tt" if choosing else formats[0])

    from tqdm.auto import tqdm

    if budget is None:
        layers = []
        for n, lin in linears.items():
            in_modes, out_modes = _modes_for(
                base_fmt, lin.in_features, lin.out_features, n_tensorized_modes
            )
            cls = get_format(base_fmt)
            r = cls.resolve_rank(opts.rank, out_modes, in_modes)
            layers.append(
                LayerPlan(
                    n,
                    lin.in_features,
                    lin.out_features,
                    base_fmt,
                    in_modes,
                    out_modes,
                    r,
                    lin.in_features * lin.out_features,
                    cls.count_parameters(r, out_modes, in_modes),
                    lin.bias is not None,
                )
            )
        return ConversionPlan(layers, None, fmt, batches is not None)

    # 'auto' goes over every layer's problem twice (allocation, then formats): the first
    # pass keeps each block's statistics on disk, so the second does not record them again.
    kept = SpillCache(0, disk=True) if choosing and opts.allocation != "uniform" else None
    recorded = False  # a first pass ran to the end, keeping every chunk in ``kept`` or none

    def problems() -> Generator[tuple[str, WhitenedProblem]]:
        # Each layer's problem is built when needed and dropped after (all at once they
        # would hold several times the model in float64). Statistics not given are
        # recorded one block at a time, so those of all layers are never held together.
        if batches is None or _stats is not None:
            for n in names:
                yield n, whitened_problem(linears[n].weight, _stats.get(n) if _stats else None)
            return
        nonlocal kept, recorded
        if kept is not None and recorded:
            for i in range(len(kept)):
                entry = kept.get(i)
                assert entry is not None  # every chunk was kept
                stats = unpack_stats(entry["stats"])
                for n in entry["chunk"]:
                    yield n, whitened_problem(linears[n].weight, stats.get(n))
            return
        with contextlib.closing(stats_by_block(model, names, batches, forward)) as chunks:
            for i, (chunk, stats) in enumerate(chunks):
                if kept is not None and not recorded:
                    entry = {"chunk": list(chunk), "stats": pack_stats(stats)}
                    if not kept.put(i, entry):
                        kept.close()  # no room on disk: the second pass records again
                        kept = None
                for n in chunk:
                    yield n, whitened_problem(linears[n].weight, stats.get(n))
        recorded = True

    try:
        if opts.allocation == "uniform":
            shares = dict.fromkeys(names, budget)
            sens = dict.fromkeys(names, float("nan"))
        else:
            probe = [] if batches is None else batches[: max(1, min(len(batches), 2))]
            bar = tqdm(
                total=len(names),
                desc="sensitivity" if probe else "spectra",
                disable=not progress,
                leave=False,
            )
            with contextlib.closing(problems()) as each:
                spectra, sens = _spectra_and_sensitivities(
                    model, names, each, budget, probe, how, bar
                )
            bar.close()
            shares = _allocate(linears, spectra, sens, budget, gauge)
        modes = n_tensorized_modes
        layers = [_layer_plan(n, linears[n], base_fmt, shares[n], modes) for n in names]
        layers = _fit_budget(layers, shares, linears, budget, modes)
        for lp in layers:
            lp.sensitivity = sens[lp.name]
        if choosing:
            bar = tqdm(
                total=len(names) * len(formats),
                desc="choosing formats",
                disable=not progress,
                leave=False,
            )
            by_name = {lp.name: lp for lp in layers}
            with contextlib.closing(problems()) as each:
                chosen = {
                    name: _best_format(
                        by_name[name],
                        problem,
                        linears[name],
                        formats,
                        n_tensorized_modes,
                        batches is not None,
                        bar,
                    )
                    for name, problem in each
                }
            bar.close()
            layers = [chosen[lp.name] for lp in layers]
    finally:
        if kept is not None:
            kept.close()  # the kept statistics' directory
    result = ConversionPlan(layers, budget, fmt, batches is not None)
    total = result.params_after
    if abs(total - budget * result.params_before) > 0.02 * budget * result.params_before:
        raise ConversionError(
            f"cannot meet budget={budget} within 2%: the formats resolve to {total:,} of "
            f"{result.params_before:,} parameters ({result.kept:.3f}); "
            "try another factorization or budget"
        )
    return result
