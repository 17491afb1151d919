"""A short end-to-end refinement of a converted model against the original one.

Besides the model's output, the student can be taught the teacher's *intermediate*
outputs (``features=``: glob patterns of module names, e.g. every transformer block).
Matching every block's output gives each layer a direct training signal, which is far
more sample-efficient than the final output alone.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import ConversionError
from ..nn import FactorizedLinear
from ._memory import TrimOnGrowth
from ._util import (
    as_batches,
    batch_elements,
    batch_rows,
    forwards_replaced,
    match_names,
    output_tensor,
)
from .options import DistillOptions, ModelCall, resolve
from .replay import find_stack
from .spill_cache import SpillCache

__all__ = ["distill", "relative_mse", "trainable_parameters"]

_NORMS = (nn.LayerNorm, nn.GroupNorm, nn.BatchNorm1d, nn.BatchNorm2d, nn.RMSNorm)


def _is_norm(m: nn.Module) -> bool:
    """A normalisation layer: torch's, or a model library's own class (``LlamaRMSNorm``,
    ``T5LayerNorm``, ...), which subclass ``nn.Module`` directly and are known by name."""
    return isinstance(m, _NORMS) or type(m).__name__.endswith("Norm")


def relative_mse(student: Tensor, teacher: Tensor) -> Tensor:
    """``||s - t||^2 / ||t||^2`` over the batch."""
    return (student - teacher).square().sum() / teacher.square().sum().clamp_min(1e-12)


def trainable_parameters(student: nn.Module, parameters: str) -> list[nn.Parameter]:
    """The parameters ``distill`` trains.

    ``'factorized'``: factors and biases of the ``FactorizedLinear`` layers;
    ``'factorized+norms'``: those plus every normalisation layer's parameters and every
    other bias (cheap, and they absorb the shift the compression causes);
    ``'all'``: every parameter of the student that requires a gradient.
    """
    if parameters == "factorized":
        return [
            p for m in student.modules() if isinstance(m, FactorizedLinear) for p in m.parameters()
        ]
    if parameters == "factorized+norms":
        seen: set[int] = set()
        out: list[nn.Parameter] = []
        for m in student.modules():
            if isinstance(m, FactorizedLinear):
                chosen = list(m.parameters())
            elif _is_norm(m):
                chosen = list(m.parameters(recurse=False))
            else:
                chosen = [p for n, p in m.named_parameters(recurse=False) if n == "bias"]
            for p in chosen:
                if id(p) not in seen and p.requires_grad:
                    seen.add(id(p))
                    out.append(p)
        return out
    if parameters == "all":
        return [p for p in student.parameters() if p.requires_grad]
    raise ConversionError(
        f"parameters={parameters!r} must be 'factorized', 'factorized+norms' or 'all'"
    )


def _lr_factor(progress: float, warmup: float) -> float:
    """Linear warmup over the first ``warmup`` of the run, then a cosine decay to zero."""
    if progress < warmup:
        return (progress + 1e-3) / (warmup + 1e-3)
    t = (progress - warmup) / max(1e-9, 1 - warmup)
    return 0.5 * (1 + math.cos(math.pi * min(t, 1.0)))


class _Taps:
    """Forward hooks that keep the outputs of the named modules of one model."""

    def __init__(self, model: nn.Module, names: Sequence[str]) -> None:
        self.out: dict[str, Tensor] = {}
        self.handles = [model.get_submodule(n).register_forward_hook(self._hook(n)) for n in names]

    def _hook(self, name: str) -> Callable[..., None]:
        def fn(module: nn.Module, args: Any, output: Any) -> None:
            self.out[name] = output_tensor(output)

        return fn

    def take(self) -> dict[str, Tensor]:
        out, self.out = self.out, {}
        return out

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def _recomputed(blocks: Sequence[nn.Module]) -> contextlib.AbstractContextManager[None]:
    """Run each block under ``torch.utils.checkpoint``: its activations are recomputed in
    the backward pass instead of kept. The blocks' own hooks still fire once per forward."""
    from torch.utils.checkpoint import checkpoint

    def make(blk: nn.Module) -> Callable[..., Any]:
        inner = blk.forward

        def run(*args: Any, **kwargs: Any) -> Any:
            return checkpoint(inner, *args, use_reentrant=False, **kwargs)

        return run

    return forwards_replaced(blocks, make)


def _split(batch: Any, parts: int) -> list[tuple[Any, float]]:
    """``batch`` cut along its first dimension into ``parts`` chunks (views), each with
    its share of the rows; tensors of another length and non-tensors are kept whole."""
    rows = batch_rows(batch)
    if parts <= 1 or rows <= 1:
        return [(batch, 1.0)]
    parts = min(parts, rows)

    def cut(x: Any, a: int, b: int) -> Any:
        if isinstance(x, Tensor):
            return x[a:b] if x.dim() > 0 and x.size(0) == rows else x
        if isinstance(x, Mapping):
            return {k: cut(v, a, b) for k, v in x.items()}
        if isinstance(x, (tuple, list)):
            return type(x)(cut(v, a, b) for v in x)
        return x

    bounds = [rows * j // parts for j in range(parts + 1)]
    return [(cut(batch, a, b), (b - a) / rows) for a, b in itertools.pairwise(bounds)]


def _saved_bytes(model: nn.Module, forward: Callable[[nn.Module, Any], Any], batch: Any) -> int:
    """Bytes one forward of ``model`` on ``batch`` keeps for backward, its own parameters
    and buffers not counted (each storage once)."""
    own = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    kept: dict[int, int] = {}
    held: list[Tensor] = []  # alive until the end, so that no two storages share an address

    def pack(t: Tensor) -> None:
        storage = t.untyped_storage()
        if storage.data_ptr() not in own:
            kept[storage.data_ptr()] = storage.nbytes()
            held.append(t)
        # Autograd keeps nothing: t itself would tie outputs saved by their own node into
        # reference cycles that outlive the forward. No backward runs on this graph.

    def unpack(_: None) -> Tensor:  # pragma: no cover - never called
        raise RuntimeError("the measuring forward has no backward pass")

    with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        forward(model, batch)
    held.clear()
    return sum(kept.values())


def _pieces(
    student: nn.Module,
    forward: Callable[[nn.Module, Any], Any],
    batches: list[Any],
    activation_bytes: int | None,
) -> list[list[tuple[Any, float]]]:
    """Per batch, the chunks it runs in (see ``DistillOptions.activation_bytes``)."""
    if activation_bytes is None:
        return [[(b, 1.0)] for b in batches]
    # Measured on an eighth of the largest batch: as many elements per row, a fraction of
    # the memory the bound is there to avoid.
    largest = max(batches, key=batch_elements)
    probe = _split(largest, 8)[0][0]
    per_element = _saved_bytes(student, forward, probe) / batch_elements(probe)
    return [
        _split(b, math.ceil(per_element * batch_elements(b) / activation_bytes)) for b in batches
    ]


def _visits(n: int, steps: int, gen: torch.Generator) -> Iterator[tuple[int, bool]]:
    """``steps`` batch indices out of ``n``, in a new shuffled order each pass, each with
    whether that batch comes round again within the steps.

    Shuffled from the first pass on: callers often group batches by length, and a run
    stopped by ``max_seconds`` within its first pass would otherwise see only the shortest
    ones, in order. A batch comes round again exactly when the next pass, cut to the steps
    left, holds it.
    """
    current = torch.randperm(n, generator=gen).tolist()
    done = 0
    while done < steps:
        following = torch.randperm(n, generator=gen).tolist() if done + n < steps else []
        again = set(following[: steps - done - n])
        for i in current[: steps - done]:
            yield i, i in again
        done += n
        current = following


def distill(
    student: nn.Module,
    teacher: nn.Module,
    data: Iterable[Any],
    options: DistillOptions | None = None,
    *,
    loss_fn: Callable[[Any, Any, Any], Tensor] | None = None,
    call: ModelCall | None = None,
    progress: bool = True,
    losses: list[float] | None = None,
    **fields: Any,
) -> list[float]:
    """Train ``student`` for ``steps`` AdamW steps to reproduce ``teacher``.

    ``loss = ||output_fn(student(b)) - output_fn(teacher(b))||^2 / ||output_fn(teacher(b))||^2``
    by default, or ``loss_fn(student_out, teacher_out, batch)``; plus, with ``features``,
    ``feature_weight`` times the mean over the matched modules of the relative squared
    error of their outputs. Both models run in eval mode (no dropout); the teacher under
    ``torch.no_grad()``. The learning rate warms up linearly over the first ``warmup``
    fraction of the steps, then decays to zero on a cosine.

    Args:
        student: the converted model (trained in place).
        teacher: the original model (unchanged).
        data: batches of model inputs, cycled in a new shuffled order each pass.
        options: a :class:`~tensorfold.convert.options.DistillOptions` (steps, lr,
            parameters, features, feature_weight, warmup, weight_decay, max_seconds,
            cache_teacher, cache_bytes, cache_disk, checkpoint_blocks, activation_bytes); its
            fields can also be given as keywords, which override it.
        loss_fn: ``loss_fn(student_out, teacher_out, batch)`` replaces the default loss.
        call: a :class:`~tensorfold.convert.options.ModelCall` (``forward``, ``output_fn``),
            also as keywords.
        progress: show a tqdm bar.
        losses: a list to append each step's loss to as training goes (so a caller that
            catches ``KeyboardInterrupt`` knows how many steps were done); the default is
            a new list.

    Returns:
        The loss at every step.
    """
    from tqdm.auto import tqdm

    groups = (DistillOptions, ModelCall)
    opts = resolve("distill", DistillOptions, options, fields, groups)
    how = resolve("distill", ModelCall, call, fields, groups)
    steps, lr, features, max_seconds = opts.steps, opts.lr, opts.features, opts.max_seconds
    forward, output_fn = how.forward, how.output_fn
    batches = as_batches(data)
    if batches is None:
        raise ConversionError("data must be an iterable of model inputs")
    params = trainable_parameters(student, opts.parameters)
    if not params:
        raise ConversionError(
            "the student has no parameters to train (no FactorizedLinear layers?)"
        )
    names: list[str] = []
    if features is not None:
        names = match_names(student, features, "features")
        if not names:
            raise ConversionError(f"features={features!r} matches no module of the student")
    blocks = None
    if opts.checkpoint_blocks:
        factorized = [n for n, m in student.named_modules() if isinstance(m, FactorizedLinear)]
        stack = find_stack(student, factorized)
        if stack is None:
            raise ConversionError(
                "checkpoint_blocks=True: the student has no stack of blocks (an nn.ModuleList "
                "with factorized layers in at least two of its children)"
            )
        blocks = list(stack[1])
    loss_fn = loss_fn or (lambda s, t, b: relative_mse(output_fn(s), output_fn(t)))
    was_training = (student.training, teacher.training)
    student.eval()
    teacher.eval()
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=opts.weight_decay)
    s_taps = _Taps(student, names) if names else None
    t_taps = _Taps(teacher, names) if names else None
    gen = torch.Generator().manual_seed(0)

    cache = SpillCache(opts.cache_bytes, opts.cache_disk)
    pieces: list[list[tuple[Any, float]]] = []
    first: list[int] = []  # the cache key of each batch's first chunk

    def teacher_outputs(key: int, chunk: Any, again: bool) -> tuple[Any, dict[str, Tensor]]:
        hit = cache.get(key) if opts.cache_teacher else None
        if hit is None:
            with torch.no_grad():
                hit = forward(teacher, chunk), (t_taps.take() if t_taps else {})
            if opts.cache_teacher and again:
                cache.put(key, hit)
        if not again:
            cache.discard(key)  # its last visit: the room goes to batches still to come
        return hit

    losses = [] if losses is None else losses
    # Resident memory creeps up step by step as batches of every length leave holes that
    # later ones do not fit; past an eighth of the student's bytes (16 MiB at least, below
    # which the creep is noise) the free pages go back.
    student_bytes = sum(p.numel() * p.element_size() for p in student.parameters())
    trim = TrimOnGrowth(max(16 << 20, student_bytes // 8))
    start = time.perf_counter()
    # Parameters that are not trained get no gradients (memory and time), for the run only.
    trained = {id(p) for p in params}
    frozen = [p for p in student.parameters() if p.requires_grad and id(p) not in trained]
    checkpointing = _recomputed(blocks) if blocks is not None else contextlib.nullcontext()
    try:
        for p in frozen:
            p.requires_grad_(False)
        with torch.enable_grad(), checkpointing:
            # Measured as the steps run: with checkpoint_blocks, recomputed blocks keep less.
            pieces = _pieces(student, forward, batches, opts.activation_bytes)
            if s_taps is not None:
                s_taps.take()  # the measuring forward's features
            first = list(itertools.accumulate((len(p) for p in pieces), initial=0))
            bar = tqdm(range(steps), desc="distilling", disable=not progress, leave=False)
            schedule = _visits(len(batches), steps, gen)
            for _, (i, again) in zip(bar, schedule, strict=False):
                opt.zero_grad(set_to_none=True)
                total = 0.0
                for j, (chunk, share) in enumerate(pieces[i]):
                    t_out, t_feat = teacher_outputs(first[i] + j, chunk, again)
                    s_out = forward(student, chunk)
                    loss = loss_fn(s_out, t_out, chunk)
                    if s_taps is not None:
                        s_feat = s_taps.take()
                        feat = sum(relative_mse(s_feat[n], t_feat[n]) for n in names if n in t_feat)
                        loss = loss + opts.feature_weight * feat / len(names)
                    (loss * share if share != 1.0 else loss).backward()
                    total += float(loss.detach()) * share
                    del loss, s_out
                # The schedule follows the steps done or, with max_seconds, the time spent,
                # whichever is further along; the run ends when either is used up.
                done = len(losses) / max(1, steps)
                if max_seconds is not None:
                    done = max(done, (time.perf_counter() - start) / max_seconds)
                if done >= 1.0:
                    break
                for group in opt.param_groups:
                    group["lr"] = lr * _lr_factor(done, opts.warmup)
                opt.step()
                losses.append(total)
                trim()
    finally:
        for taps in (s_taps, t_taps):
            if taps is not None:
                taps.remove()
        cache.close()
        opt.zero_grad(set_to_none=True)  # the gradients would outlive the run otherwise
        for p in frozen:
            p.requires_grad_(True)
        student.train(was_training[0])
        teacher.train(was_training[1])
    return losses
