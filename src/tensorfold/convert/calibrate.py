"""Recording the input statistics of linear layers on calibration inputs.

For a layer ``y = W x + b`` we accumulate over every calibration token (in float64 for
fitting; float32 where only rank allocation reads them):
``C = sum x_c x_c^T`` (inputs of the layer in the model being compressed) and
``M = sum x_o x_c^T`` (the original model's input times the compressed model's input).
The output error of a replacement ``W_hat`` fed the compressed model's inputs, against the
original layer fed the original inputs, is then
``sum ||W x_o - W_hat x_c||^2 = tr(W_hat C W_hat^T) - 2 tr(W M W_hat^T) + const``,
so no activation is ever stored. When both models are the same, ``M = C`` and this is the
familiar ``||(W - W_hat) C^{1/2}||_F^2``.
"""

from __future__ import annotations

from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ._util import ForwardFn, StopForward, call_model, run_until_stopped
from .replay import BlockReplay, block_index, find_stack


@dataclass
class LayerStats:
    """Second moments of one layer's inputs (float64, ``(in, in)``)."""

    cov: Tensor  # sum x_c x_c^T
    cross: Tensor  # sum x_o x_c^T
    tokens: int


def pack_stats(stats: dict[str, LayerStats]) -> dict[str, dict[str, Any]]:
    """``stats`` as nested dicts of tensors and ints (for a :class:`SpillCache`), each shared
    ``LayerStats`` once; :func:`unpack_stats` undoes it."""
    owner: dict[str, str] = {}
    first: dict[int, str] = {}
    for name, st in stats.items():
        owner[name] = first.setdefault(id(st), name)
    packed: dict[str, dict[str, Any]] = {"owner": owner, "cov": {}, "cross": {}, "tokens": {}}
    for name in set(owner.values()):
        st = stats[name]
        packed["cov"][name] = st.cov
        if st.cross is not st.cov:  # without an original model they are one tensor
            packed["cross"][name] = st.cross
        packed["tokens"][name] = st.tokens
    return packed


def unpack_stats(packed: dict[str, dict[str, Any]]) -> dict[str, LayerStats]:
    shared = {
        o: LayerStats(cov, packed["cross"].get(o, cov), packed["tokens"][o])
        for o, cov in packed["cov"].items()
    }
    return {name: shared[o] for name, o in packed["owner"].items()}


def _flat(x: Tensor) -> Tensor:
    return x.detach().reshape(-1, x.shape[-1]).float()


def _accumulate(acc: Tensor | None, a: Tensor, b: Tensor, dtype: torch.dtype) -> Tensor:
    # The product is one float32 GEMM per batch (fast); the running sum is in ``dtype``.
    prod = (a.T @ b).to(dtype)
    return prod if acc is None else acc.add_(prod)


class _NotShared(Exception):
    """A layer read another tensor than the layer it shared statistics with."""


@torch.no_grad()
def record_stats(
    model: nn.Module,
    names: Sequence[str],
    batches: Sequence[Any],
    forward: ForwardFn = call_model,
    original: nn.Module | None = None,
    on_batch: Callable[[], None] | None = None,
    dtype: torch.dtype = torch.float64,
) -> dict[str, LayerStats]:
    """Accumulate :class:`LayerStats` for the named ``nn.Linear``-like modules.

    Layers that read the same input tensor (query, key and value) share one set of
    statistics (the same ``LayerStats`` object), accumulated once.

    Args:
        model: the model whose layers' inputs are recorded (``x_c``).
        names: module names in ``model`` (and in ``original`` when given).
        batches: calibration inputs, each passed to ``forward(model, batch)``.
        forward: how to call the model on one batch.
        original: when given, the same model before compression (``x_o``), run on each
            batch just before ``model``; otherwise ``x_o = x_c``. The forward passes stop
            right after the last named layer.
        on_batch: called after each batch (progress bars).
        dtype: of the running sums. Fitting needs float64; rank allocation, which only
            compares spectra, is as well served by float32 at half the memory (all layers'
            statistics are held at once there).

    Returns:
        ``{name: LayerStats}`` for the named modules that ran (unused ones are left out).
    """
    try:
        return _record_stats(model, names, batches, forward, original, on_batch, dtype, True)
    except _NotShared:
        return _record_stats(model, names, batches, forward, original, on_batch, dtype, False)


def _record_stats(
    model: nn.Module,
    names: Sequence[str],
    batches: Sequence[Any],
    forward: ForwardFn,
    original: nn.Module | None,
    on_batch: Callable[[], None] | None,
    dtype: torch.dtype,
    share: bool,
) -> dict[str, LayerStats]:
    wanted = set(names)
    cov: dict[str, Tensor | None] = dict.fromkeys(names)
    cross: dict[str, Tensor | None] = dict.fromkeys(names)
    tokens = dict.fromkeys(names, 0)
    owner: dict[str, str] = {}  # layer -> the layer whose statistics it shares (first batch)
    read: dict[int, tuple[Tensor, str]] = {}  # this batch: id(input) -> (input, first reader)
    seen_o: set[str] = set()
    seen_c: set[str] = set()
    buf: dict[str, Tensor] = {}
    handles = []

    def hook_o(name: str) -> Callable[..., None]:
        def fn(module: nn.Module, args: tuple[Any, ...]) -> None:
            buf[name] = _flat(args[0])
            seen_o.add(name)
            if seen_o == wanted:
                raise StopForward

        return fn

    def hook_c(name: str) -> Callable[..., None]:
        def fn(module: nn.Module, args: tuple[Any, ...]) -> None:
            src = args[0]
            first = read.get(id(src))
            reader = first[1] if share and first is not None and first[0] is src else name
            if owner.setdefault(name, reader) != reader:
                raise _NotShared
            if reader == name:
                read[id(src)] = (src, name)  # holding src keeps its id unique in this batch
                x = _flat(src)
                cov[name] = _accumulate(cov[name], x, x, dtype)
                if original is not None:
                    cross[name] = _accumulate(cross[name], buf.pop(name), x, dtype)
                tokens[name] += x.shape[0]
            seen_c.add(name)
            if seen_c == wanted:
                raise StopForward

        return fn

    try:
        for name in names:
            handles.append(model.get_submodule(name).register_forward_pre_hook(hook_c(name)))
            if original is not None:
                handles.append(original.get_submodule(name).register_forward_pre_hook(hook_o(name)))
        for batch in batches:
            if original is not None:
                seen_o.clear()
                run_until_stopped(forward, original, batch)
            seen_c.clear()
            run_until_stopped(forward, model, batch)
            buf.clear()
            read.clear()
            if on_batch is not None:
                on_batch()
    finally:
        for h in handles:
            h.remove()
    out: dict[str, LayerStats] = {}
    for name in names:
        first = owner.get(name)
        if first is None:  # never called on the calibration inputs: no statistics
            continue
        if first not in out:
            c = cov[first]
            assert c is not None
            x = cross[first] if original is not None else c
            assert x is not None
            out[first] = LayerStats(c, x, tokens[first])
        out[name] = out[first]
    return out


def stats_by_block(
    model: nn.Module,
    names: Sequence[str],
    batches: Sequence[Any],
    forward: ForwardFn = call_model,
    dtype: torch.dtype = torch.float32,
) -> Generator[tuple[list[str], dict[str, LayerStats]]]:
    """:func:`record_stats` one block of the model's stack at a time: yields ``(names of
    the block, their statistics)`` in block order, then the layers outside the stack.

    Only one block's statistics are held at once (all layers' together can take more than
    the model). The model must not change while this runs: blocks before the one being
    recorded are replayed from their kept outputs (:class:`BlockReplay`), so all blocks
    cost about two block evaluations per batch. Close the generator (or run it out) to
    remove the replay's files.
    """
    stack = find_stack(model, names)
    if stack is None:
        yield list(names), record_stats(model, names, batches, forward, dtype=dtype)
        return
    prefix, blocks = stack
    chunks: dict[int, list[str]] = {}
    rest = []
    for n in names:
        i = block_index(prefix, n)
        if i is None:
            rest.append(n)
        else:
            chunks.setdefault(i, []).append(n)
    bound = sum(p.numel() * p.element_size() for p in model.parameters()) // 4
    replay = BlockReplay(model, blocks, batches, forward, bound)
    try:
        for i in sorted(chunks):
            replay.advance(i)
            with replay.active():
                stats = record_stats(model, chunks[i], batches, replay.forward, dtype=dtype)
            yield chunks[i], stats
            del stats
        replay.close()
        if rest:
            yield rest, record_stats(model, rest, batches, forward, dtype=dtype)
    finally:
        replay.close()


@torch.no_grad()
def input_groups(
    model: nn.Module, names: Sequence[str], batch: Any, forward: ForwardFn = call_model
) -> list[list[str]]:
    """Named modules in the order they first run, grouped when they read the same input tensor.

    Layers in one group (e.g. query/key/value) can be calibrated in one sequential pass.
    Modules never called on ``batch`` are left out.
    """
    order: list[tuple[str, Tensor]] = []
    handles = []

    def hook(name: str) -> Callable[..., None]:
        def fn(module: nn.Module, args: tuple[Any, ...]) -> None:
            if all(n != name for n, _ in order):
                order.append((name, args[0]))  # kept alive, so identity is meaningful

        return fn

    try:
        for name in names:
            handles.append(model.get_submodule(name).register_forward_pre_hook(hook(name)))
        forward(model, batch)
    finally:
        for h in handles:
            h.remove()
    groups: list[list[str]] = []
    last: Any = None
    for name, x in order:
        if groups and x is last:
            groups[-1].append(name)
        else:
            groups.append([name])
        last = x
    return groups
