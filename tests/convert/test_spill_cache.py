"""The spill cache: memory within its budget, then disk; exact round trips; cleaned up."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import pytest
import torch

from tensorfold.convert.spill_cache import SpillCache


def _output(seed: int) -> tuple[dict[str, object], dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(2, 5, 4, generator=gen)
    out = {
        "token_embeddings": hidden,
        "sentence_embedding": hidden.mean(1),
        "attention_mask": torch.ones(2, 5, dtype=torch.int64),
        "extra": [None, 3, hidden[:, 0].t()],  # a non-contiguous view, and non-tensors
    }
    return out, {"blocks.1": hidden}  # a feature that is the output's own tensor


def _same(a: object, b: object) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(map(_same, a, b))
    return a == b


def _private_tempdir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> list[Path]:
    made: list[Path] = []

    def mkdtemp(prefix: str = "") -> str:
        path = tmp_path / f"{prefix}{len(made)}"
        path.mkdir()
        made.append(path)
        return str(path)

    monkeypatch.setattr(tempfile, "mkdtemp", mkdtemp)
    return made


def test_outputs_past_the_memory_budget_round_trip_through_disk(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    made = _private_tempdir(monkeypatch, tmp_path)
    first = _output(0)
    one = sum(
        t.numel() * t.element_size()
        for t in torch.utils._pytree.tree_leaves(first)
        if isinstance(t, torch.Tensor)
    )
    cache = SpillCache(memory_bytes=one, disk=True)
    for i in range(4):
        cache.put(i, _output(i))
    assert len(cache) == 4 and cache.get(9) is None
    assert cache.disk_bytes == 3 * one and len(list(made[0].iterdir())) == 3
    assert cache.get(0) is not None and cache._memory.keys() == {0}
    for i in range(4):
        assert _same(cache.get(i), _output(i)), i
    cache.close()
    assert not made[0].exists()


def test_no_disk_or_a_full_disk_means_the_teacher_runs_again(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    made = _private_tempdir(monkeypatch, tmp_path)
    cache = SpillCache(memory_bytes=0, disk=False)
    cache.put(0, _output(0))
    assert cache.get(0) is None and not made

    class Usage:
        free = 100  # bytes: half of it is less than one batch

    monkeypatch.setattr(shutil, "disk_usage", lambda path: Usage())
    cache = SpillCache(memory_bytes=0, disk=True)
    cache.put(0, _output(0))
    cache.put(1, _output(1))
    assert cache.get(0) is None and cache.get(1) is None and cache.disk_bytes == 0
    cache.close()
    assert not made[0].exists()


def test_discard_returns_the_room_and_removes_the_file(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    made = _private_tempdir(monkeypatch, tmp_path)
    one = sum(
        t.numel() * t.element_size()
        for t in torch.utils._pytree.tree_leaves(_output(0))
        if isinstance(t, torch.Tensor)
    )
    cache = SpillCache(memory_bytes=one, disk=True)
    cache.put(0, _output(0))
    cache.put(1, _output(1))  # no room left in memory: on disk
    assert cache._memory.keys() == {0} and len(list(made[0].iterdir())) == 1
    cache.discard(1)
    cache.discard(7)  # never kept: nothing to do
    assert cache.get(1) is None and not list(made[0].iterdir()) and len(cache) == 1
    cache.discard(0)
    cache.put(2, _output(2))  # the discarded batch's room holds the next one
    assert cache._memory.keys() == {2} and _same(cache.get(2), _output(2))
    assert not list(made[0].iterdir())
    cache.close()
