"""Handing memory that was freed back to the operating system.

glibc's ``malloc`` keeps freed memory resident in its arenas for reuse, and tensors of
changing sizes (batches of different lengths, per-layer problems) rarely fit the holes
earlier ones left: the process's resident memory then grows past what it holds.
``malloc_trim`` returns the free pages. Other C libraries (musl, macOS, Windows) have no
such call; there these functions do nothing. None of them changes a computed value.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import gc
import os
import sys
from collections.abc import Callable, Iterator

from torch import nn

__all__ = [
    "TrimOnGrowth",
    "free_pages_before_forwards",
    "release_free_memory",
    "resident_bytes",
    "return_free_pages",
]


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    """glibc's ``malloc_trim``, or ``None`` where the C library has none."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        trim: Callable[[int], int] = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return None
    return trim


def return_free_pages() -> bool:
    """Return the C allocator's free pages to the operating system; whether it could."""
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True


def release_free_memory() -> bool:
    """Free unreachable Python objects (tensors held in reference cycles), then return
    the free pages (:func:`return_free_pages`). For the boundaries between stages."""
    gc.collect()
    return return_free_pages()


@contextlib.contextmanager
def free_pages_before_forwards(*models: nn.Module) -> Iterator[None]:
    """Within the block, return the free pages before every forward of ``models``: the
    last batch's activations are freed by then, and a longer batch's seldom fit their
    holes (batches are often sorted by length)."""

    def before(*args: object) -> None:  # a pre-hook that returns nothing keeps the inputs
        return_free_pages()

    handles = [m.register_forward_pre_hook(before) for m in models]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def resident_bytes() -> int | None:
    """This process's resident memory (Linux), or ``None`` where it cannot be read."""
    try:
        with open("/proc/self/statm") as fh:
            pages = int(fh.read().split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return pages * _page_size()


@functools.cache
def _page_size() -> int:
    return os.sysconf("SC_PAGE_SIZE")


class TrimOnGrowth:
    """Return the free pages when resident memory has climbed ``margin`` bytes above the
    highest level it was trimmed at (or first seen at): a loop whose working set is steady
    but whose freed blocks seldom fit the next allocations (batches of every length)
    creeps upwards. After a trim the loop grows back to its working set, below that level,
    so trims stay rare: each costs the pages faulted in again. Checking is one read of
    ``/proc/self/statm``."""

    def __init__(self, margin: int) -> None:
        self.margin = margin
        self.mark: int | None = None
        self.trims = 0

    def __call__(self) -> bool:
        """Check, and return the free pages if memory grew by the margin; whether it did."""
        now = resident_bytes()
        if now is None or _malloc_trim() is None:
            return False
        if self.mark is None:
            self.mark = now
            return False
        if now - self.mark < self.margin:
            return False
        return_free_pages()
        self.trims += 1
        self.mark = now
        return True
