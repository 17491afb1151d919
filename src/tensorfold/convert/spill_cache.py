"""Model outputs kept by batch index between passes over the same batches.

Distillation keeps the teacher's outputs so later passes skip its forward; sequential
calibration keeps the outputs of finished blocks (``replay.py``); planning keeps each block's
input statistics between its two passes. Outputs are held in memory
up to a byte budget; past it they can go to a temporary directory on disk (one safetensors
file per batch, read back when the batch comes round again), so memory stays bounded however
much data is used. The directory is removed by :meth:`SpillCache.close`, which the users
call in a ``finally`` (Ctrl-C included). Writing stops, and later batches are recomputed,
once the files would take more than half the disk's free space or a write fails.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
import torch.utils._pytree as pytree
from torch import Tensor

__all__ = ["SpillCache"]


class SpillCache:
    """Outputs by batch index: in memory within ``memory_bytes`` (``None``: no limit), then
    on disk while ``disk`` is true and there is room."""

    def __init__(self, memory_bytes: int | None, disk: bool) -> None:
        self._room = float("inf") if memory_bytes is None else float(memory_bytes)
        self._memory: dict[int, Any] = {}
        # index -> (tree spec, non-tensor leaves by position, device and dtype per tensor)
        self._disk: dict[int, tuple[Any, dict[int, Any], dict[int, torch.device]]] = {}
        self._sizes: dict[int, int] = {}  # tensor bytes of each kept index
        self._spill = disk
        self._dir: Path | None = None
        self._disk_room = 0.0
        self.disk_bytes = 0  # written so far

    def __len__(self) -> int:
        return len(self._memory) + len(self._disk)

    def get(self, index: int) -> Any | None:
        if index in self._memory:
            return self._memory[index]
        if index not in self._disk:
            return None
        from safetensors.torch import load_file

        spec, others, devices = self._disk[index]
        assert self._dir is not None  # set by the first write
        tensors = load_file(str(self._dir / f"{index}.safetensors"))
        n = len(others) + len(devices)
        leaves = [
            others[k] if k in others else tensors[str(k)].to(devices[k], non_blocking=True)
            for k in range(n)
        ]
        return pytree.tree_unflatten(leaves, spec)

    def put(self, index: int, value: Any) -> bool:
        """Keep ``value`` for ``index``; whether it was kept (in memory or on disk)."""
        leaves, spec = pytree.tree_flatten(value)
        tensors = {k: t for k, t in enumerate(leaves) if isinstance(t, Tensor)}
        size = sum(t.numel() * t.element_size() for t in tensors.values())
        if size <= self._room:
            self._room -= size
            self._memory[index] = value
            self._sizes[index] = size
            return True
        return self._spill and self._write(index, spec, leaves, tensors, size)

    def discard(self, index: int) -> None:
        """Forget ``index`` (if kept), returning its room to later :meth:`put` calls."""
        size = self._sizes.pop(index, 0)
        if self._memory.pop(index, None) is not None:
            self._room += size
        elif self._disk.pop(index, None) is not None:
            assert self._dir is not None  # set by the write that kept it
            (self._dir / f"{index}.safetensors").unlink(missing_ok=True)
            self._disk_room += size

    def _write(
        self, index: int, spec: Any, leaves: list[Any], tensors: dict[int, Tensor], size: int
    ) -> bool:
        from safetensors.torch import save_file

        try:
            if self._dir is None:
                self._dir = Path(tempfile.mkdtemp(prefix="tensorfold-outputs-"))
                self._disk_room = shutil.disk_usage(self._dir).free / 2
            if size > self._disk_room:
                self._spill = False
                return False
            # Copies: safetensors refuses tensors that share memory (an output and a feature).
            data = {
                str(k): t.detach().to("cpu", copy=True).contiguous() for k, t in tensors.items()
            }
            save_file(data, str(self._dir / f"{index}.safetensors"))
        except OSError:
            self._spill = False
            return False
        self._disk_room -= size
        self.disk_bytes += size
        self._sizes[index] = size
        others = {k: v for k, v in enumerate(leaves) if k not in tensors}
        self._disk[index] = (spec, others, {k: t.device for k, t in tensors.items()})
        return True

    def close(self) -> None:
        """Forget everything and remove the directory."""
        self._memory.clear()
        self._disk.clear()
        self._sizes.clear()
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None
