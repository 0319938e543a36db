"""Running out of memory: refused before any work where the need is known in advance, explained where it is not."""
from __future__ import annotations

import math
import os
import sys
from typing import Any

import torch

from metalstm.errors import ResourceError

GIB = 2**30


def available_bytes(device: torch.device) -> int | None:
    """Free memory of ``device``: the GPU's free memory; on a CPU (Linux) the least of MemAvailable, the room left
    in this process's cgroup (a container's memory.max) and in its address-space limit (ulimit -v); None where
    unknown."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            fields = dict(line.split(":", 1) for line in f)
        free = int(fields["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return None
    return min([free] + [room for room in (cgroup_room(), address_space_room()) if room is not None])


def cgroup_room() -> int | None:
    """The memory limit of this process's cgroup less its use (v2 memory.max, or v1 memory.limit_in_bytes), or
    None where there is no such limit."""
    try:
        with open("/proc/self/cgroup") as f:
            entries = [line.strip().split(":", 2) for line in f]
    except OSError:
        return None
    for _, controllers, path in entries:
        if controllers == "":  # v2
            files = (f"/sys/fs/cgroup{path}".rstrip("/") + "/memory.max", "memory.current")
        elif "memory" in controllers.split(","):  # v1
            files = (f"/sys/fs/cgroup/memory{path}".rstrip("/") + "/memory.limit_in_bytes", "memory.usage_in_bytes")
        else:
            continue
        try:
            with open(files[0]) as f:
                limit = f.read().strip()
            with open(files[0].rsplit("/", 1)[0] + "/" + files[1]) as f:
                used = int(f.read())
        except (OSError, ValueError):
            continue
        if limit != "max" and int(limit) < 2**60:  # v1 writes "no limit" as a page-rounded 2^63
            return max(int(limit) - used, 0)
    return None


def address_space_room() -> int | None:
    """The address-space limit (RLIMIT_AS) less this process's virtual size, or None where unlimited."""
    try:
        import resource

        soft, _ = resource.getrlimit(resource.RLIMIT_AS)
        if soft == resource.RLIM_INFINITY:
            return None
        with open("/proc/self/statm") as f:
            size = int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
    except (ImportError, OSError, ValueError):
        return None
    return max(soft - size, 0)


def current_bytes(device: torch.device) -> int | None:
    """The memory in use now: allocated by torch on a GPU, the process's resident set on a CPU (Linux); None
    where unknown."""
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device)
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, IndexError, ValueError, AttributeError):
        return None


def peak_bytes(device: torch.device) -> int | None:
    """The peak memory since the last ``reset_peak``: allocated by torch on a GPU, the process's resident set on a
    CPU (Linux: VmHWM; elsewhere the process's lifetime peak); None where unknown."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    try:
        with open("/proc/self/status") as f:
            fields = dict(line.split(":", 1) for line in f if ":" in line)
        return int(fields["VmHWM"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        try:
            import resource
        except ImportError:  # not Unix
            return None
        scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB on Linux
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def reset_peak(device: torch.device) -> None:
    """Start a new peak at the present use (a GPU's allocator statistics; on Linux the resident high-water mark)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def memory_kind(device: torch.device) -> str:
    return "gpu_allocated" if device.type == "cuda" else "cpu_resident"


def drivers(settings: Any) -> str:
    """The settings of this run that drive its memory, with their values."""
    data, meta, base = settings.data.config, settings.meta_learner.config, settings.base_learner.config
    keys = [("data", data, k) for k in ("meta_batch_size", "ways", "train_ways", "shots", "train_shots", "query",
                                          "image_size", "eval_batch_size")]
    keys += [("meta_learner", meta, k) for k in ("inner_steps", "first_order", "task_chunk", "hidden")]
    keys += [("base_learner", base, k) for k in ("hidden", "channels", "hidden_size")]
    shown = [f"{group}.{k}={getattr(c, k)}" for group, c, k in keys if getattr(c, k, None) is not None]
    return ", ".join(shown)


def check_batch_fits(settings: Any, device: torch.device) -> None:
    """Refuse, before any data is read, a meta-batch whose examples alone exceed the free memory (a lower bound:
    activations and, for second-order methods, every inner step's graph come on top)."""
    examples = settings.data.config.examples_per_step()
    free = available_bytes(device)
    if examples is None or free is None:
        return
    need = examples * math.prod(settings.spec["input_shape"]) * 4
    if need > free:
        raise ResourceError(
            f"One meta-training batch holds {examples:,} examples of shape {list(settings.spec['input_shape'])}: "
            f"{need / GIB:.1f} GiB for the inputs alone, more than the {free / GIB:.1f} GiB free on {device}. Lower "
            f"data.meta_batch_size, the ways, shots or query per task, or data.image_size (now: {drivers(settings)}).")


def is_out_of_memory(error: BaseException) -> bool:
    if isinstance(error, (MemoryError, torch.OutOfMemoryError)):
        return True
    text = str(error)
    return isinstance(error, RuntimeError) and ("can't allocate memory" in text or "out of memory" in text.lower())


def out_of_memory(error: BaseException, settings: Any, device: torch.device, phase: str) -> ResourceError:
    """The one-paragraph error for an allocation that failed during ``phase``."""
    first = str(error).strip().splitlines()[0][:200] if str(error).strip() else type(error).__name__
    free = available_bytes(device)
    where = f"{device}" + (f", {free / GIB:.1f} GiB free now" if free is not None else "")
    second_order = getattr(settings.meta_learner.config, "first_order", None) is False
    graphs = ", and with second-order MAML the inner steps' graphs" if second_order else ""
    first_order = ", or set meta_learner.first_order=true" if second_order else ""
    gpu = "" if device.type == "cuda" else ", or train on a GPU (trainer=gpu)"
    chunk = ("meta_learner.task_chunk=1 (the same meta-gradient, one task's graph held at a time) and "
             "meta_learner.checkpoint_inner=true (one inner step's graph at a time; with Conv-4 also "
             "meta_learner.checkpoint_query=true, its query pass recomputed), then "
             if hasattr(settings.meta_learner.config, "checkpoint_inner") and phase == "meta-training" else "")
    return ResourceError(
        f"Out of memory during {phase} on {where} ({first}). Memory grows with the tasks per batch, the examples per "
        f"task and their size, the network's width{graphs}; this run has {drivers(settings)}. Set {chunk}lower "
        f"data.meta_batch_size (or data.eval_batch_size for validation and test){first_order}{gpu}. "
        f"Checkpoints written so far are kept.")
