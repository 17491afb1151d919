"""Whole-model conversion: plan, tensorize, revert.

``plan`` decides, changing nothing, which ``nn.Linear`` modules are replaced and by what
(format, tensorized shape, resolved rank, parameters). ``tensorize`` fits every replacement
(data-aware when calibration inputs are given) on a private copy of the model, and only
when all of them are built swaps them into the model, so a failure leaves it untouched.
"""

from __future__ import annotations

import contextlib
import copy
import math
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import ConversionError, TensorfoldError
from ..formats import get_format
from ..nn import FactorizedLinear
from ..shapes import tensorized_shape
from ._util import (
    ForwardFn,
    as_batches,
    is_linear,
    linear_view,
    match_modules,
    set_module,
)
from .calibrate import LayerStats, input_groups, record_stats
from .fit import WhitenedProblem, fit_weight, whitened_problem
from .options import (
    FitOptions,
    ModelCall,
    PlanOptions,
    resolve,
)
from .replay import BlockReplay, block_index, find_stack

__all__ = ["LayerPlan", "ConversionPlan", "ConversionReport", "plan", "tensorize", "revert"]

# Modes per side when the user gives none. Fewer modes are more expressive for trained
# weights: one mode makes CP and TT a low-rank matrix factorisation (TT's bond is the
# matrix rank); TT-matrix needs two to compress at all; Tucker with one mode caps the
# matrix rank at its smaller core rank, two modes spend the budget better.
DEFAULT_MODES = {"cp": 1, "tt": 1, "tucker": 2, "ttm": 2}


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


# ---- rank allocation -----------------------------------------------------------------------
@torch.no_grad()
def _sensitivity(
    model: nn.Module,
    name: str,
    problem: WhitenedProblem,
    share: float,
    batches: Sequence[Any],
    refs: Sequence[Tensor],
    call: ModelCall,
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
            y = call.output_fn(call.forward(model, b)).float()
            num += float((y - r).square().sum())
            den += float(r.square().sum())
    finally:
        handle.remove()
    s2 = problem.spectrum()
    rel = float(s2[k:].sum()) / max(float(s2.sum()), 1e-300)
    return (num / max(den, 1e-300)) / max(rel, 1e-12)


def _allocate(
    linears: dict[str, nn.Linear],
    spectra: dict[str, Tensor],
    weights: dict[str, float],
    budget: float,
) -> dict[str, float]:
    """Shares per layer from the whitened spectra: rank-one terms are kept greedily by
    (weighted output error they remove) / (parameters they cost) until the budget is spent.
    Greedy is optimal here because each layer's gains are non-increasing."""
    total = sum(lin.in_features * lin.out_features for lin in linears.values())
    items: list[tuple[float, str]] = []
    ranks: dict[str, int] = {}
    spent = 0
    for name, lin in linears.items():
        cost = lin.in_features + lin.out_features
        s2 = spectra[name]
        gains = (weights[name] * s2 / max(float(s2.sum()), 1e-300) / cost).tolist()
        cap = max(1, (lin.in_features * lin.out_features) // cost)
        ranks[name] = 1
        spent += cost
        items += [(g, name) for g in gains[1:cap]]
    items.sort(key=lambda t: -t[0])
    for _, name in items:
        lin = linears[name]
        cost = lin.in_features + lin.out_features
        if spent + cost > budget * total:
            break
        spent += cost
        ranks[name] += 1
    return {
        n: ranks[n] * (lin.in_features + lin.out_features) / (lin.in_features * lin.out_features)
        for n, lin in linears.items()
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
    forward, output_fn = how.forward, how.output_fn
    names = match_modules(model, targets, exclude)
    if not names:
        raise ConversionError(
            f"no nn.Linear module matches targets={targets!r} exclude={exclude!r} (nor Conv1D); "
            "the model's linear "
            f"modules are {[n for n, m in model.named_modules() if is_linear(m)][:8]}"
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
    base_fmt = formats[0] if fmt != "auto" else "tt"

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

    stats = _stats
    if batches is not None and stats is None:
        bar = tqdm(total=len(batches), desc="calibrating", disable=not progress, leave=False)
        stats = record_stats(model, names, batches, forward, on_batch=bar.update)
        bar.close()

    def problem_of(name: str) -> WhitenedProblem:
        # Built when needed and dropped after: all layers' problems at once would hold
        # several times the model in float64.
        return whitened_problem(linears[name].weight, stats.get(name) if stats else None)

    if opts.allocation == "uniform":
        shares = dict.fromkeys(names, budget)
        sens = dict.fromkeys(names, float("nan"))
    else:
        spectra: dict[str, Tensor] = {}
        sens = dict.fromkeys(names, 1.0)
        probe = [] if batches is None else batches[: max(1, min(len(batches), 2))]
        refs = [output_fn(forward(model, b)).float() for b in probe]
        desc = "sensitivity" if probe else "spectra"
        bar = tqdm(total=len(names), desc=desc, disable=not progress, leave=False)
        for n in names:
            problem = problem_of(n)
            spectra[n] = problem.spectrum()
            if probe:
                sens[n] = _sensitivity(model, n, problem, budget, probe, refs, how)
            del problem
            bar.update()
        bar.close()
        shares = _allocate(linears, spectra, sens, budget)
    layers = [_layer_plan(n, linears[n], base_fmt, shares[n], n_tensorized_modes) for n in names]
    layers = _fit_budget(layers, shares, linears, budget, n_tensorized_modes)
    for lp in layers:
        lp.sensitivity = sens[lp.name]
    if fmt == "auto":
        bar = tqdm(
            total=len(names) * len(formats),
            desc="choosing formats",
            disable=not progress,
            leave=False,
        )
        chosen = []
        for lp in layers:
            best: LayerPlan | None = None
            problem = problem_of(lp.name)
            for f in formats:
                cand = _layer_plan(lp.name, linears[lp.name], f, lp.share, n_tensorized_modes)
                layer = FactorizedLinear(
                    cand.in_modes, cand.out_modes, bias=False, factorization=f, rank=cand.rank
                )
                cand.error = fit_weight(
                    layer.weight, problem, refine_steps=0, data_aware=batches is not None
                )
                lp.candidates[f] = cand.error
                if best is None or cand.error < best.error - 1e-9:
                    best = cand
                bar.update()
            assert best is not None
            best.candidates, best.sensitivity = lp.candidates, lp.sensitivity
            chosen.append(best)
        bar.close()
        layers = chosen
    result = ConversionPlan(layers, budget, fmt, batches is not None)
    total = result.params_after
    if abs(total - budget * result.params_before) > 0.02 * budget * result.params_before:
        raise ConversionError(
            f"cannot meet budget={budget} within 2%: the formats resolve to {total:,} of "
            f"{result.params_before:,} parameters ({result.kept:.3f}); "
            "try another factorization or budget"
        )
    return result


@contextlib.contextmanager
def _about(lp: LayerPlan) -> Iterator[None]:
    """Re-raise a library error from deep inside with the module's name and modes."""
    try:
        yield
    except ConversionError:
        raise
    except TensorfoldError as exc:
        raise ConversionError(
            f"module {lp.name!r} ({lp.factorization}, out modes {lp.out_modes}, in modes "
            f"{lp.in_modes}, rank {lp.rank}): {exc}"
        ) from exc


def _build(lp: LayerPlan, linear: nn.Linear, implementation: str) -> FactorizedLinear:
    layer = FactorizedLinear(
        lp.in_modes,
        lp.out_modes,
        bias=lp.bias,
        factorization=lp.factorization,
        rank=lp.rank,
        implementation=implementation,
        device=linear.weight.device,
        dtype=linear.weight.dtype,
    )
    if lp.bias:
        with torch.no_grad():
            layer.bias.copy_(linear.bias)
    return layer


def _fit_sequential(
    work: nn.Module,
    orig: nn.Module,
    linears: dict[str, nn.Linear],
    modules: dict[str, nn.Module],
    by_name: dict[str, LayerPlan],
    built: dict[str, FactorizedLinear],
    batches: list[Any],
    forward: ForwardFn,
    refine_steps: int,
    implementation: str,
    in_place: bool,
    tick: Callable[..., Any],
) -> None:
    """Fit each group of layers on the inputs it sees in ``work`` (partly converted)
    against ``orig``'s layer inputs and outputs; fills ``built``."""
    groups = input_groups(orig, list(by_name), batches[0], forward)
    missing = set(by_name) - {n for g in groups for n in g}
    groups += [[n] for n in by_name if n in missing]
    # Blocks of a stack whose layers are all fitted are replayed, not recomputed, in
    # the copy and in the original.
    stack = find_stack(work, list(by_name))
    starts = [
        None
        if stack is None or g[0] in missing
        # never run: no constraint
        else min((i for n in g if (i := block_index(stack[0], n)) is not None), default=None)
        for g in groups
    ]
    # The original runs beside the copy in every pass (replayed too), so no activations
    # beyond the replayed block outputs are ever kept, however many batches there are.
    replays = {}
    if stack is not None:
        replays[id(work)] = BlockReplay(work, stack[1], batches, forward)
        blocks = orig.get_submodule(stack[0])
        assert isinstance(blocks, nn.ModuleList)  # the same structure as in work
        replays[id(orig)] = BlockReplay(orig, blocks, batches, forward)

    def replayed_forward(m: nn.Module, batch: Any) -> Any:
        return replays[id(m)].forward(m, batch) if id(m) in replays else forward(m, batch)

    for g, group in enumerate(groups):
        # Blocks before the earliest block any unfitted group lives in are final.
        upto = min((s for s in starts[g:] if s is not None), default=0)
        with contextlib.ExitStack() as active:
            for rep in replays.values():
                rep.advance(upto)
                active.enter_context(rep.active())
            gstats = record_stats(work, group, batches, replayed_forward, original=orig)
        for name in group:
            lp = by_name[name]
            with _about(lp):
                layer = _build(lp, linears[name], implementation)
                problem = whitened_problem(linears[name].weight, gstats.get(name))
                lp.error = fit_weight(layer.weight, problem, refine_steps)
            built[name] = layer
            # In place the layer goes in as it is (memory shrinks as fitting goes on); in
            # the private copy the same function as a dense layer runs faster.
            set_module(work, name, layer if in_place else layer.to_linear())
            tick()


def tensorize(
    model: nn.Module,
    options: PlanOptions | None = None,
    calibration: Iterable[Any] | None = None,
    *,
    fit: FitOptions | None = None,
    call: ModelCall | None = None,
    from_plan: ConversionPlan | None = None,
    reference: nn.Module | None = None,
    progress: bool = True,
    **fields: Any,
) -> ConversionReport:
    """Replace the matched ``nn.Linear`` modules of ``model`` in place by ``FactorizedLinear``.

    Args are those of :func:`plan`, plus:
        fit: a :class:`~tensorfold.convert.options.FitOptions` (sequential, refine_steps,
            implementation), also as keywords.
        from_plan: a plan from :func:`plan` to apply as is (``options`` then unused).
        reference: an unchanged copy of ``model`` (e.g. the teacher kept for distillation).
            Sequential fitting then converts ``model`` itself group by group and reads the
            original layers' inputs from ``reference``, instead of working on a private
            deep copy: one copy of the model less in memory.

    Returns:
        A :class:`ConversionReport`. On any error (or Ctrl-C) the model is left as it was.

    Example:
        >>> import torch, tensorfold
        >>> from torch import nn
        >>> net = nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4))
        >>> report = tensorfold.tensorize(net, budget=0.5, progress=False)
        >>> type(net[0]).__name__
        'FactorizedLinear'
    """
    from tqdm.auto import tqdm

    groups = (PlanOptions, FitOptions, ModelCall)
    opts = resolve("tensorize", PlanOptions, options, fields, groups)
    how_fit = resolve("tensorize", FitOptions, fit, fields, groups)
    how = resolve("tensorize", ModelCall, call, fields, groups)
    sequential, refine_steps = how_fit.sequential, how_fit.refine_steps
    implementation, forward = how_fit.implementation, how.forward
    start = time.perf_counter()
    batches = as_batches(calibration)
    stats = None
    if from_plan is None:
        names = match_modules(model, opts.targets, opts.exclude)
        if batches is not None and names:
            # Rank allocation needs only the spectra: a subset of the batches is enough when
            # the layers are then fitted sequentially on all of them.
            alloc = batches[: max(1, len(batches) // 4)] if sequential else batches
            bar = tqdm(total=len(alloc), desc="calibrating", disable=not progress, leave=False)
            stats = record_stats(model, names, alloc, forward, on_batch=bar.update)
            bar.close()
        from_plan = plan(model, opts, batches, call=how, progress=progress, _stats=stats)
        if sequential:
            stats = None  # fitted on statistics of its own; these hold as much as the model
    layers = [copy.copy(lp) for lp in from_plan.layers]
    modules = {lp.name: model.get_submodule(lp.name) for lp in layers}
    for lp in layers:
        lin = modules[lp.name]
        if not is_linear(lin) or (linear_view(lin).in_features, linear_view(lin).out_features) != (
            lp.in_features,
            lp.out_features,
        ):
            raise ConversionError(
                f"plan does not fit the model: module {lp.name!r} is {lin!r}, the plan expects "
                f"nn.Linear({lp.in_features}, {lp.out_features})"
            )
    linears = {n: linear_view(m) for n, m in modules.items()}
    built: dict[str, FactorizedLinear] = {}
    bar = tqdm(total=len(layers), desc="fitting layers", disable=not progress, leave=False)
    by_name = {lp.name: lp for lp in layers}
    if batches is not None and sequential:
        # Fit on a private copy (or on the model itself, with the reference as the
        # original): the work model is converted group by group and recalibrated.
        if reference is None:
            try:
                work = copy.deepcopy(model)
            except Exception as exc:  # pragma: no cover - exotic modules
                raise ConversionError(
                    f"cannot copy the model for sequential calibration ({exc}); "
                    "pass sequential=False or reference="
                ) from exc
            orig = model
        else:
            work, orig = model, reference
        try:
            _fit_sequential(
                work,
                orig,
                linears,
                modules,
                by_name,
                built,
                batches,
                forward,
                refine_steps,
                implementation,
                in_place=reference is not None,
                tick=bar.update,
            )
        except BaseException:
            if reference is not None:  # put the original modules back
                for name, module in modules.items():
                    set_module(model, name, module)
            raise
        del work
    else:
        if batches is not None and stats is None:
            stats = record_stats(model, list(by_name), batches, forward)
        for lp in layers:
            with _about(lp):
                layer = _build(lp, linears[lp.name], implementation)
                problem = whitened_problem(
                    linears[lp.name].weight, stats.get(lp.name) if stats else None
                )
                lp.error = fit_weight(
                    layer.weight, problem, refine_steps, data_aware=stats is not None
                )
            built[lp.name] = layer
            bar.update()
    bar.close()
    for name, layer in built.items():  # all replacements exist: now swap (cannot fail)
        set_module(model, name, layer)
    return ConversionReport(
        layers,
        from_plan.budget,
        from_plan.factorization,
        from_plan.data_aware,
        seconds=time.perf_counter() - start,
    )


def revert(model: nn.Module) -> int:
    """Replace every ``FactorizedLinear`` in ``model`` by an equivalent dense ``nn.Linear``.

    Returns:
        The number of modules reverted.
    """
    names = [n for n, m in model.named_modules() if isinstance(m, FactorizedLinear) and n]
    dense = {}
    for n in names:
        layer = model.get_submodule(n)
        assert isinstance(layer, FactorizedLinear)
        if layer.layer_shape:
            raise ConversionError(
                f"module {n!r} holds n_layers={layer.n_layers}; revert handles single layers"
            )
        dense[n] = layer.to_linear()
    for n, lin in dense.items():
        set_module(model, n, lin)
    return len(names)
