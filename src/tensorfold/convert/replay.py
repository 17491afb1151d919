"""Replaying the finished blocks of a stack, so sequential calibration costs O(depth).

Sequential fitting recalibrates the model once per group of layers, each time on the
partly converted model. Run naively, every pass recomputes all the blocks before the group,
so a model of ``L`` blocks costs ``O(L^2)`` block evaluations. Blocks whose layers are all
fitted never change again: their output on each calibration batch can be kept and handed
back instead of recomputed. :class:`BlockReplay` does that for a stack of blocks (an
``nn.ModuleList``, as in every transformer). The first time it starts replaying it checks,
on the first batch, that the blocks run in order and each at most once, and that the
model's output with replay is bit-identical to a full forward; if not, replay switches
itself off. Replayed outputs are handed out as copies, so a model that updates a block's
output in place cannot change what is kept; the check therefore holds for later blocks too.
The outputs are kept in a :class:`~tensorfold.convert.spill_cache.SpillCache`: in memory up
to a byte bound, then on disk, so memory does not grow with the number of batches.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
import torch.utils._pytree as pytree
from torch import Tensor, nn

from ._util import ForwardFn, StopForward, forwards_replaced, run_until_stopped, tensors_of
from .spill_cache import SpillCache

__all__ = ["BlockReplay", "find_stack"]


def find_stack(model: nn.Module, names: Sequence[str]) -> tuple[str, nn.ModuleList] | None:
    """The ``nn.ModuleList`` holding the named layers in the most of its children (at
    least two), or ``None``."""
    best: tuple[int, str, nn.ModuleList] | None = None
    for prefix, mod in model.named_modules():
        if not isinstance(mod, nn.ModuleList) or len(mod) < 2:
            continue
        heads = {f"{prefix}.{i}." if prefix else f"{i}." for i in range(len(mod))}
        used = sum(any(n.startswith(h) for n in names) for h in heads)
        if used >= 2 and (best is None or used > best[0]):
            best = (used, prefix, mod)
    return None if best is None else (best[1], best[2])


def block_index(prefix: str, name: str) -> int | None:
    """Index of the stack block that contains module ``name``, or ``None``."""
    head = f"{prefix}." if prefix else ""
    if not name.startswith(head):
        return None
    first = name[len(head) :].split(".", 1)[0]
    return int(first) if first.isdigit() else None


def _identical(a: Any, b: Any) -> bool:
    ta, tb = tensors_of(a), tensors_of(b)
    return len(ta) == len(tb) > 0 and all(torch.equal(x, y) for x, y in zip(ta, tb, strict=True))


class BlockReplay:
    """Hands back the cached outputs of blocks ``[0, upto)`` of ``blocks`` during forwards.

    Use :meth:`forward` as the ``forward`` function of the calibration passes (it tells the
    replayed blocks which batch is running), :meth:`advance` once the blocks before
    ``upto`` are final, :meth:`active` around the passes and :meth:`close` at the end.
    Outputs past ``memory_bytes`` (``None``: no bound) go to a temporary directory.
    """

    def __init__(
        self,
        model: nn.Module,
        blocks: nn.ModuleList,
        batches: Sequence[Any],
        forward: ForwardFn,
        memory_bytes: int | None = None,
    ) -> None:
        self.model, self.blocks, self.batches, self._forward = model, blocks, batches, forward
        self._index = {id(b): k for k, b in enumerate(batches)}
        self.upto = 0
        self.enabled = True
        self._memory_bytes = memory_bytes
        self._outputs = SpillCache(0, disk=False)
        self._current = 0
        self._checked = False

    def forward(self, model: nn.Module, batch: Any) -> Any:
        self._current = self._index.get(id(batch), -1)
        return self._forward(model, batch)

    @contextmanager
    def active(self) -> Iterator[None]:
        """Replace the forwards of blocks ``[0, upto)`` by the cached outputs."""
        if not self.enabled or self.upto == 0:
            yield
            return
        outputs = self._outputs

        def replayed(*args: Any, **kwargs: Any) -> Any:
            if self._current < 0:
                raise RuntimeError("BlockReplay: a batch that was not given at construction")
            return outputs.get(self._current)

        def last(*args: Any, **kwargs: Any) -> Any:  # what the rest of the model reads
            return pytree.tree_map_only(Tensor, torch.clone, replayed())

        final = self.blocks[self.upto - 1]
        with forwards_replaced(
            list(self.blocks[: self.upto]), lambda blk: last if blk is final else replayed
        ):
            yield

    @torch.no_grad()
    def advance(self, upto: int) -> None:
        """Cache the output of block ``upto - 1`` on every batch (blocks before it must not
        change any more), so that blocks ``[0, upto)`` are replayed from now on."""
        upto = min(upto, len(self.blocks))
        if not self.enabled or upto <= self.upto:
            return
        last = self.blocks[upto - 1]
        new = SpillCache(self._memory_bytes, disk=True)
        kept: set[int] = set()

        def keep(module: nn.Module, args: Any, output: Any) -> None:
            if new.put(self._current, output):
                kept.add(self._current)
            raise StopForward  # nothing after this block is needed

        handle = last.register_forward_hook(keep)
        try:
            with self.active():
                for batch in self.batches:
                    run_until_stopped(self.forward, self.model, batch)
        except BaseException:
            new.close()
            raise
        finally:
            handle.remove()
        self._outputs.close()
        if len(kept) < len(self.batches):  # the block did not run on some batch, or no room
            new.close()
            self._off()
            return
        self._outputs, self.upto = new, upto
        if not self._checked and not self._check():
            self._off()

    def _check(self) -> bool:
        """On the first batch: every block runs at most once and in order, and replaying
        leaves the model's whole output bit-identical. Run once: blocks that are called
        in order and whose kept outputs cannot be changed replay correctly at any depth."""
        order: list[int] = []
        handles = [
            blk.register_forward_pre_hook(lambda m, a, k=k: order.append(k))
            for k, blk in enumerate(self.blocks)
        ]
        try:
            full = self._forward(self.model, self.batches[0])
        finally:
            for h in handles:
                h.remove()
        if order != sorted(set(order)):
            return False
        with self.active():
            again = self.forward(self.model, self.batches[0])
        self._checked = _identical(full, again)
        return self._checked

    def _off(self) -> None:
        self._outputs.close()
        self.enabled, self.upto = False, 0

    def close(self) -> None:
        """Drop the kept outputs (and their directory)."""
        self._outputs.close()
