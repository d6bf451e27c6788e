"""Fewer page faults for the training loader's big, short-lived buffers (Linux with glibc).

A 640 px photo's item allocates arrays of 1-1.2 MB (the decode, the resize, a flip, a colour
table's copy) and a batch of 32 is 39 MB. glibc maps allocations that size afresh and gives the
pages back when they are freed, so every 4 KiB page of every item and batch is faulted in again,
epoch after epoch: on this project's 2-core benchmark machine that cost more than the resize
(docs/training-loader.md, "Memory"). Three remedies, all leaving the bytes as they are:

- `tune_allocator()`: glibc serves blocks up to 32 MiB from its heap (M_MMAP_THRESHOLD) and
  keeps up to 256 MiB free at the heap's top (M_TRIM_THRESHOLD), so the next item reuses the
  pages the last one freed. Left alone when the environment sets glibc's malloc itself
  (MALLOC_*_ variables or glibc.malloc tunables), when another allocator is preloaded, and when
  VISIONFLOW_LOADER_MEMORY=default.
- `advise_huge(t)`: a fresh batch buffer of at least 4 MiB (32 MiB with the allocator tuned:
  smaller ones are reused heap memory then) is marked MADV_HUGEPAGE before it is written, so it
  faults in 2 MiB pages where transparent huge pages are on or `madvise`.
- `populate(t)`: a fresh shared-memory batch (a worker's) has its pages populated in one call
  (MADV_POPULATE_WRITE, Linux 5.14+) instead of one fault per page.

Everything is a no-op where the platform lacks it; nothing here can change a pixel.
"""
from __future__ import annotations

import ctypes
import functools
import os
import platform
import sys
from typing import Optional

import torch

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
MMAP_THRESHOLD = 32 << 20  # glibc's maximum on 64-bit
TRIM_THRESHOLD = 256 << 20
MADV_HUGEPAGE, MADV_POPULATE_WRITE = 14, 23
HUGE, PAGE = 2 << 20, 4096
OPT_OUT = "VISIONFLOW_LOADER_MEMORY"  # "default": none of this
_USER_SETTINGS = ("MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TOP_PAD_", "MALLOC_MMAP_MAX_")


def enabled() -> bool:
    return os.environ.get(OPT_OUT, "tuned").strip().lower() != "default"


@functools.lru_cache(maxsize=1)
def _libc() -> Optional[ctypes.CDLL]:
    if not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc":
        return None
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
    except OSError:
        return None
    libc.mallopt.argtypes, libc.mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    libc.madvise.argtypes, libc.madvise.restype = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int], ctypes.c_int
    return libc


def _user_allocator() -> Optional[str]:
    """What in the environment already chose the allocator's behaviour, or None."""
    for name in _USER_SETTINGS:
        if name in os.environ:
            return name
    if "glibc.malloc." in os.environ.get("GLIBC_TUNABLES", ""):
        return "GLIBC_TUNABLES"
    preload = os.environ.get("LD_PRELOAD", "")
    if any(lib in preload for lib in ("jemalloc", "tcmalloc", "mimalloc")):
        return "LD_PRELOAD"
    return None


_tuned: Optional[bool] = None


def tune_allocator() -> bool:
    """glibc's heap kept for reuse (see the module docstring); True when applied. Idempotent:
    process-wide, once per process (a forked worker inherits it)."""
    global _tuned
    if _tuned is None:
        libc = _libc()
        _tuned = bool(enabled() and libc is not None and _user_allocator() is None
                      and libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1
                      and libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1)
    return _tuned


def _advise(t: torch.Tensor, advice: int, align: int) -> bool:
    libc = _libc()
    if libc is None or not enabled():
        return False
    ptr, n = t.data_ptr(), t.numel() * t.element_size()
    start, end = -(-ptr // align) * align, (ptr + n) // align * align
    return end > start and libc.madvise(start, end - start, advice) == 0


def advise_huge(t: torch.Tensor) -> bool:
    """Mark a fresh (not yet written) CPU buffer of at least 2 huge pages for transparent huge
    pages. True when the kernel took the advice. With the allocator tuned, a buffer under its
    mmap threshold is reused heap memory, already faulted in: left alone (no heap range flagged)."""
    n = t.numel() * t.element_size()
    if n < 2 * HUGE or (_tuned and n < MMAP_THRESHOLD):
        return False
    return _advise(t, MADV_HUGEPAGE, HUGE)


def populate(t: torch.Tensor) -> bool:
    """Populate a fresh shared-memory buffer's pages in one call before it is written. True when
    the kernel did (Linux 5.14+)."""
    return t.numel() * t.element_size() >= 2 * HUGE and _advise(t, MADV_POPULATE_WRITE, PAGE)
