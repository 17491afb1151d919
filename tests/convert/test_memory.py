"""Returning freed memory to the operating system (``convert/_memory.py``)."""

from __future__ import annotations

import ctypes
import gc
import sys
import weakref

import pytest
import torch

from tensorfold.convert import _memory

GLIBC = sys.platform.startswith("linux") and hasattr(ctypes.CDLL(None), "mallinfo2")


@pytest.fixture
def trims(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The arguments ``malloc_trim`` is called with (a recording stand-in)."""
    calls: list[int] = []

    def fake(pad: int) -> int:
        calls.append(pad)
        return 1

    monkeypatch.setattr(_memory, "_malloc_trim", lambda: fake)
    return calls


def test_free_pages_are_returned_with_malloc_trim(trims: list[int]) -> None:
    assert _memory.return_free_pages() is True
    assert trims == [0]  # no padding kept at the top of the heap


def test_without_malloc_trim_nothing_happens(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_memory, "_malloc_trim", lambda: None)
    assert _memory.return_free_pages() is False
    assert _memory.release_free_memory() is False


def test_malloc_trim_is_looked_up_only_on_linux(monkeypatch: pytest.MonkeyPatch) -> None:
    _memory._malloc_trim.cache_clear()
    try:
        monkeypatch.setattr(sys, "platform", "darwin")
        assert _memory._malloc_trim() is None
        _memory._malloc_trim.cache_clear()
        monkeypatch.setattr(sys, "platform", "linux")
        assert (_memory._malloc_trim() is not None) == GLIBC
    finally:
        _memory._malloc_trim.cache_clear()


def test_release_collects_cycles_before_trimming(trims: list[int]) -> None:
    class Holder:
        pass

    a, b = Holder(), Holder()
    a.other, b.other = b, a  # type: ignore[attr-defined]
    a.tensor = torch.zeros(4)  # type: ignore[attr-defined]
    gone = weakref.ref(a)
    del a, b
    gc.disable()  # the cycle is freed by release_free_memory, not by an automatic pass
    try:
        assert _memory.release_free_memory() is True
    finally:
        gc.enable()
    assert gone() is None and trims == [0]


def _rss_bytes() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * _page_size()


def _page_size() -> int:
    import os

    return os.sysconf("SC_PAGE_SIZE")


@pytest.mark.skipif(not GLIBC, reason="glibc's allocator only")
def test_freed_heap_memory_leaves_the_resident_set() -> None:
    libc = ctypes.CDLL(None)
    libc.malloc.restype = ctypes.c_void_p
    libc.malloc.argtypes = [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    size, count = 64 << 10, 1024  # below the mmap threshold: on the heap, 64 MiB in all
    blocks = [libc.malloc(size) for _ in range(count)]
    pin = libc.malloc(size)  # in use above them: the heap's top cannot shrink past it
    try:
        for p in blocks:
            ctypes.memset(p, 1, size)  # touched: resident
        for p in blocks:
            libc.free(p)
        before = _rss_bytes()
        assert _memory.return_free_pages() is True
        assert before - _rss_bytes() > count * size // 2
    finally:
        libc.free(pin)


def test_forwards_free_pages_first_only_inside_the_block_and_keep_their_outputs(
    trims: list[int],
) -> None:
    torch.manual_seed(0)
    outer = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU())
    x = torch.randn(2, 4)
    expected = outer(x)
    seen: list[int] = []
    outer[0].register_forward_pre_hook(lambda m, args: seen.append(len(trims)))
    with _memory.free_pages_before_forwards(outer):
        y = outer(x)
        outer(x)
    assert seen == [1, 2]  # each forward trimmed before its first layer ran
    assert torch.equal(y, expected)
    outer(x)
    assert trims == [0, 0]  # the hook is gone


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_resident_bytes_follows_a_touched_allocation() -> None:
    before = _memory.resident_bytes()
    assert before is not None and before > 0
    block = torch.ones(64 << 20, dtype=torch.uint8)  # 64 MiB, every page touched
    after = _memory.resident_bytes()
    assert after is not None and after - before >= 48 << 20
    del block


def test_trim_on_growth_trims_only_past_the_margin(
    trims: list[int], monkeypatch: pytest.MonkeyPatch
) -> None:
    rss = iter([100, 140, 150, 400, 250, 380, 520, 600])
    monkeypatch.setattr(_memory, "resident_bytes", lambda: next(rss))
    trim = _memory.TrimOnGrowth(margin=200)
    got = [trim() for _ in range(3)]  # marks 100, then 140 and 150 are within the margin
    assert got == [False, False, False] and trims == []
    assert trim() is True and trims == [0]  # 400: grew by 300; the mark is now 400
    # Back down after the trim, then up to the working set again: no trim below 400 + 200.
    assert [trim(), trim(), trim()] == [False, False, False]
    assert trim() is True and trims == [0, 0] and trim.trims == 2  # 600


def test_trim_on_growth_does_nothing_without_malloc_trim(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_memory, "_malloc_trim", lambda: None)
    monkeypatch.setattr(_memory, "resident_bytes", lambda: 10**12)
    trim = _memory.TrimOnGrowth(margin=1)
    assert [trim(), trim()] == [False, False] and trim.trims == 0
