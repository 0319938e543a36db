"""Keep freed CPU memory in the process for reuse (glibc only; elsewhere nothing changes).

glibc's malloc hands every block over 128 KiB-32 MiB back to the kernel when it is freed, so each new tensor of
that size starts with page faults and zero-filled pages. A meta-learning step allocates and frees the same
large tensors every inner step (the LSTM optimizer's gates over every parameter coordinate: ~14 MB each on
sinusoid), so on the CPU a third of its time went to first touches of fresh pages (W4: 45 -> 58 tasks/s;
scripts/bench.py). The cost: the process's resident memory stays at its peak instead of shrinking.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import sys

M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD = -1, -2, -3  # mallopt parameters, glibc's malloc.h
_done = False


def glibc_function(name: str) -> ctypes._CFuncPtr | None:
    """A function of glibc's malloc (``mallopt``, ``malloc_trim``), or None elsewhere (not Linux, musl, ...)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        return getattr(ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6"), name)
    except (OSError, AttributeError):
        return None


def keep_freed_memory() -> bool:
    """Serve large allocations from the heap and keep it on free; True where glibc took the settings."""
    global _done
    mallopt = None if _done else glibc_function("mallopt")
    if mallopt is None:
        return _done
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    _done = all(mallopt(*setting) == 1 for setting in (
        (M_MMAP_THRESHOLD, 2**30),  # blocks up to 1 GiB come from the heap
        (M_TRIM_THRESHOLD, 2**31 - 1),  # and the heap is never trimmed back to the kernel
        (M_TOP_PAD, 2**28),  # grown 256 MiB at a time
    ))
    return _done


def release_freed_memory() -> None:
    """Hand the heap's free pages back to the kernel (glibc's malloc_trim), so the resident set is what is in use
    (``memory_plan`` measures a step's growth from there). Elsewhere nothing happens."""
    malloc_trim = glibc_function("malloc_trim")
    if malloc_trim is not None:
        malloc_trim(0)
