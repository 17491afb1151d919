"""Applying a conversion: ``tensorize`` fits every planned replacement and swaps them in.

Fitting is data-aware when calibration inputs are given and sequential by default (each
group of layers fitted on the inputs it sees in the partly converted model). Without a
``reference`` it works on a private copy and swaps the new layers in only when all are
built, so a failure leaves the model untouched. ``revert`` undoes a conversion.
"""

from __future__ import annotations

import contextlib
import copy
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import torch
from torch import nn

from ..errors import ConversionError, TensorfoldError
from ..nn import FactorizedLinear
from ._memory import return_free_pages
from ._util import (
    ForwardFn,
    as_batches,
    is_linear,
    linear_view,
    match_modules,
    set_module,
)
from .calibrate import LayerStats, input_groups, record_stats
from .fit import fit_weight, whitened_problem
from .options import (
    FitOptions,
    ModelCall,
    PlanOptions,
    resolve,
)
from .planner import ConversionPlan, ConversionReport, LayerPlan, plan
from .replay import BlockReplay, block_index, find_stack

__all__ = ["tensorize", "revert"]


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
    # beyond the replayed block outputs are ever kept; past an eighth of the model's bytes
    # each, those go to disk, so memory does not grow with the number of batches.
    replays = {}
    if stack is not None:
        bound = sum(p.numel() * p.element_size() for p in orig.parameters()) // 8
        replays[id(work)] = BlockReplay(work, stack[1], batches, forward, bound)
        blocks = orig.get_submodule(stack[0])
        assert isinstance(blocks, nn.ModuleList)  # the same structure as in work
        replays[id(orig)] = BlockReplay(orig, blocks, batches, forward, bound)

    def replayed_forward(m: nn.Module, batch: Any) -> Any:
        return replays[id(m)].forward(m, batch) if id(m) in replays else forward(m, batch)

    try:
        for g, group in enumerate(groups):
            # Blocks before the earliest block any unfitted group lives in are final.
            upto = min((s for s in starts[g:] if s is not None), default=0)
            with contextlib.ExitStack() as active:
                for rep in replays.values():
                    rep.advance(upto)
                    active.enter_context(rep.active())
                gstats = record_stats(work, group, batches, replayed_forward, original=orig)
            last = _last_readers(group, gstats)
            for name in group:
                lp = by_name[name]
                with _about(lp):
                    layer = _build(lp, linears[name], implementation)
                    problem = whitened_problem(
                        linears[name].weight, gstats.get(name), consume=name in last
                    )
                    lp.error = fit_weight(layer.weight, problem, refine_steps)
                    del problem
                built[name] = layer
                # In place the layer goes in as it is and the dense one is let go (memory
                # shrinks as fitting goes on; a failure restores it from the original); in
                # the private copy the same function as a dense layer runs faster.
                set_module(work, name, layer if in_place else layer.to_linear())
                if in_place:
                    del linears[name], modules[name]
                tick()
            # The group's statistics and workspaces, freed now, are of sizes the next
            # group seldom reuses: their pages go back rather than stay resident.
            del gstats
            return_free_pages()
    finally:
        for rep in replays.values():
            rep.close()


def _last_readers(names: Sequence[str], stats: dict[str, LayerStats]) -> set[str]:
    """The names in ``names`` after which no later name reads the same statistics."""
    last = {id(st): n for n in names if (st := stats.get(n)) is not None}
    return set(last.values())


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
            deep copy: one copy of the model less in memory, and each dense layer is let
            go once its replacement is in (on failure, copies of the reference's layers
            are put back).

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
    if from_plan is None and sequential:
        # Rank allocation needs only the spectra: a subset of the batches is enough when
        # the layers are then fitted sequentially on all of them, each on statistics of its
        # own (the planner records its own block by block).
        alloc = None if batches is None else batches[: max(1, len(batches) // 4)]
        from_plan = plan(model, opts, alloc, call=how, progress=progress)
    elif from_plan is None:
        names = match_modules(model, opts.targets, opts.exclude)
        if batches is not None and names:
            bar = tqdm(total=len(batches), desc="calibrating", disable=not progress, leave=False)
            stats = record_stats(model, names, batches, forward, on_batch=bar.update)
            bar.close()
        from_plan = plan(model, opts, batches, call=how, progress=progress, _stats=stats)
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
                for name in by_name:
                    original = modules.get(name)
                    if original is None:  # converted and let go: the reference's copy
                        original = copy.deepcopy(reference.get_submodule(name))
                    set_module(model, name, original)
            raise
        del work
    else:
        if batches is not None and stats is None:
            stats = record_stats(model, list(by_name), batches, forward)
        last = _last_readers([lp.name for lp in layers], stats or {})
        for lp in layers:
            with _about(lp):
                layer = _build(lp, linears[lp.name], implementation)
                problem = whitened_problem(
                    linears[lp.name].weight,
                    stats.get(lp.name) if stats else None,
                    consume=lp.name in last,
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
