"""Keep freed CPU memory in the process for reuse, without letting the heap's high-water mark grow.

glibc's malloc hands every block over 128 KiB-32 MiB back to the kernel when it is freed, so each new tensor of
that size starts with page faults and zero-filled pages. A meta-learning step allocates and frees the same
large tensors every inner step (the LSTM optimizer's gates over every parameter coordinate: ~14 MB each on
sinusoid), so on the CPU a third of its time went to first touches of fresh pages (W4: 45 -> 58 tasks/s;
scripts/bench.py). So glibc keeps its heap (``mallopt``).

A kept heap grows past the tensors alive in it: a freed large block lies between small, long-lived allocations
(autograd nodes, Python objects), and the next tensor of another size is placed above it, on fresh pages. On Linux,
blocks of 64 KiB or more therefore come from metalstm's segment allocator (``csrc/segment_allocator.cpp``, built
once with torch's C++ extension tools into ``~/.cache/metalstm`` or ``$TORCH_EXTENSIONS_DIR``): best fit from 16 MiB
anonymous segments that hold nothing else, split and coalesced, kept for reuse. Second-order MAML on W2 (10 inner
steps, both recomputations, task_chunk=1) peaked at 428-429 MiB instead of 464 MiB with glibc alone, and W1
(checkpoint_inner, task_chunk=8) at about 500 MiB instead of 650-662 MiB (docs/performance.md); lower still since.
Where it cannot be built (no C++ compiler or ninja) glibc serves every block; ``METALSTM_CPU_ALLOCATOR=glibc``
chooses that too.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import hashlib
import importlib.util
import logging
import os
import sys
from pathlib import Path
from types import ModuleType

M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD = -1, -2, -3  # mallopt parameters, glibc's malloc.h
# blocks served from segments; smaller ones stay in glibc's heap. 64 KiB and 16 MiB segments, against 1 MiB and 32 MiB:
# peaks W1 (checkpoint_inner) 495 -> 455-471 MiB, W2 (10 steps, both recomputations) 433 -> 403, W3 585 -> 551; W4
# 254-291 -> 299-315 tasks/s (scripts/bench.py, alternating processes)
SEGMENT_MIN_BYTES = 2**16
SEGMENT_BYTES = 16 * 2**20
SOURCE = Path(__file__).with_name("csrc") / "segment_allocator.cpp"
NAME = "metalstm_cpu_allocator"
log = logging.getLogger(__name__)
_done = False
_segments: ModuleType | None = None
_tried = False
_why_not = "not installed yet (keep_freed_memory)"


def glibc_function(name: str) -> ctypes._CFuncPtr | None:
    """A function of glibc's malloc (``mallopt``, ``malloc_trim``), or None elsewhere (not Linux, musl, ...)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        return getattr(ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6"), name)
    except (OSError, AttributeError):
        return None


def keep_freed_memory() -> bool:
    """Serve large allocations from the heap and keep it on free, and blocks of 64 KiB or more from segments where
    they can be built; True where glibc took the settings."""
    global _done
    install_segments()
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


def build_directory(source: str) -> Path:
    """Where the allocator is built: one folder per source, torch and Python version, under ``$TORCH_EXTENSIONS_DIR``
    or ``~/.cache/metalstm``."""
    import torch

    tag = hashlib.sha1(f"{source}\0{torch.__version__}\0{sys.version}".encode()).hexdigest()[:16]
    root = os.environ.get("TORCH_EXTENSIONS_DIR")  # torch's setting for where extensions build
    return (Path(root) if root else Path.home() / ".cache" / "metalstm") / "cpu_allocator" / tag


def build_segments() -> ModuleType | None:
    """The segment allocator's extension, built the first time (about 20 s) and loaded, not installed; None, with
    ``cpu_allocator()`` saying why, where it is turned off or cannot be built."""
    global _why_not
    if os.environ.get("METALSTM_CPU_ALLOCATOR", "segments") == "glibc":
        _why_not = "METALSTM_CPU_ALLOCATOR=glibc"
        return None
    if not sys.platform.startswith("linux"):
        _why_not = f"segments are built for Linux only, not {sys.platform}"
        return None
    try:
        source = SOURCE.read_text()
        directory = build_directory(source)
        built = directory / f"{NAME}.so"
        if built.is_file():  # loaded as it is: torch's build tools (and setuptools) cost 0.1 s and 4 MiB to import
            import torch  # noqa: F401  (the extension links against the loaded libtorch)

            spec = importlib.util.spec_from_file_location(NAME, built)
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
            return module
        from torch.utils.cpp_extension import load_inline

        print(f"metalstm: building the CPU allocator once (about 20 s) in {directory}", file=sys.stderr)
        directory.mkdir(parents=True, exist_ok=True)
        return load_inline(NAME, cpp_sources=source, functions=["install", "trim", "stats"],
                           build_directory=str(directory), extra_cflags=["-O2"], verbose=False)
    except Exception as error:  # no compiler, no ninja, a read-only cache: glibc serves every block
        lines = str(error).strip().splitlines() or [""]
        _why_not = f"cannot be built here ({type(error).__name__}: {lines[-1][:200]})"
        log.info("metalstm: CPU allocator: glibc only; the segment allocator %s", _why_not)
        return None


def install_segments() -> bool:
    """Install the segment allocator for this process (``build_segments``); False where it is not built. Installed
    for good: torch has no way to put the default back."""
    global _segments, _tried
    if not _tried:  # once a process: where the build fails, later commands in it do not try again
        _tried = True
        if (module := build_segments()) is not None:
            module.install(SEGMENT_MIN_BYTES, SEGMENT_BYTES)
            _segments = module
    return _segments is not None


def cpu_allocator() -> str:
    """Which allocator serves large CPU blocks: ``segments``, or ``glibc (why)``."""
    return "segments" if _segments is not None else f"glibc ({_why_not})"


def segment_stats() -> dict[str, int] | None:
    """Bytes mapped in segments, of them in use, and the most ever mapped; None without segments."""
    if _segments is None:
        return None
    return dict(zip(("mapped", "in_use", "peak_mapped"), _segments.stats()))


def release_freed_memory() -> None:
    """Hand the free pages of glibc's heap (malloc_trim) and of the segments back to the kernel, so the resident set
    is what is in use (``memory_plan`` measures a step's growth from there). Elsewhere nothing happens."""
    if _segments is not None:
        _segments.trim()
    malloc_trim = glibc_function("malloc_trim")
    if malloc_trim is not None:
        malloc_trim(0)
