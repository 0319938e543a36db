"""metalstm/allocator.py: the segment allocator for large CPU blocks, and glibc where it cannot be built. Each test
runs in a fresh process: an installed CPU allocator stays for the process's life."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from metalstm.allocator import build_segments, cpu_allocator

REPO = Path(__file__).resolve().parents[1]

IN_SEGMENTS = r"""
import json, os, torch
from metalstm.allocator import cpu_allocator, keep_freed_memory, release_freed_memory, segment_stats
from metalstm.memory import current_bytes

MiB = 2**20
rss = lambda: current_bytes(torch.device("cpu")) / MiB
result = {"glibc_settings": keep_freed_memory(), "allocator": cpu_allocator()}
start = segment_stats()
small = torch.ones(1000)
result["small_in_segments"] = segment_stats()["in_use"] - start["in_use"]
a, b = torch.ones(4 * MiB // 4), torch.full((3 * MiB // 4,), 2.0)
result["in_use"] = segment_stats()["in_use"] - start["in_use"]
address = a.data_ptr()
del a
c = torch.zeros(4 * MiB // 4)
result["reused"] = c.data_ptr() == address
result["values"] = [float(b.sum()), float(c.sum()), float(small.sum())]
del b, c
big = torch.ones(96 * MiB // 4)  # its own segment, beyond 16 MiB
result["big_sum"] = float(big.sum())
del big
resident = rss()
release_freed_memory()
result["trimmed_mib"] = resident - rss()
again = torch.ones(96 * MiB // 4)
result["again_sum"], result["mapped_grew"] = float(again.sum()), segment_stats()["peak_mapped"] > 96 * MiB + 32 * MiB
from metalstm.memory import is_out_of_memory
try:
    torch.empty(2**45)  # 128 TiB: the mapping fails
except RuntimeError as error:
    result["too_big"] = is_out_of_memory(error)  # the message the runs turn into their out-of-memory paragraph
pid = os.fork()
if pid == 0:  # a forked child (a DataLoader worker) allocates and frees large blocks of its own
    blocks = [torch.full((2 * MiB,), float(i)) for i in range(4)]
    ok = [float(block[-1]) for block in blocks] == [0.0, 1.0, 2.0, 3.0]
    del blocks
    os._exit(0 if ok and float(torch.ones(3 * MiB).sum()) == 3 * MiB else 1)
result["child_status"] = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
print(json.dumps(result))
"""


def run(script: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={**os.environ, **env})


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the segment allocator is built for Linux")
def test_segment_allocator_serves_large_blocks_reuses_them_and_gives_pages_back():
    if build_segments() is None:
        pytest.skip(f"the segment allocator cannot be built here: {cpu_allocator()}")
    done = run(IN_SEGMENTS)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.splitlines()[-1])
    assert result["allocator"] == "segments" and result["glibc_settings"]
    assert result["small_in_segments"] == 0  # under 64 KiB: glibc's heap
    assert result["in_use"] == 7 * 2**20  # 4 MiB and 3 MiB, page-rounded
    assert result["reused"]  # a freed block is the best fit for the next of its size
    assert result["values"] == [1.5 * 2**20, 0.0, 1000.0]
    assert result["big_sum"] == result["again_sum"] == 24 * 2**20
    assert result["trimmed_mib"] > 80  # the freed 96 MiB block's pages went back to the kernel
    assert not result["mapped_grew"]  # ... and its segment served the same block again
    assert result["child_status"] == 0
    assert result["too_big"]


def test_cpu_allocator_falls_back_to_glibc_when_turned_off_or_not_buildable(tmp_path):
    script = ("import torch; from metalstm.allocator import cpu_allocator, keep_freed_memory, segment_stats; "
              "ok = keep_freed_memory(); x = torch.ones(2**22); "
              "print(cpu_allocator()); print(segment_stats(), float(x.sum()) == 2**22)")
    off = run(script, METALSTM_CPU_ALLOCATOR="glibc")
    assert off.returncode == 0, off.stderr
    assert off.stdout.splitlines() == ["glibc (METALSTM_CPU_ALLOCATOR=glibc)", "None True"]
    if not sys.platform.startswith("linux"):
        return
    # an empty cache and a compiler that fails: the build is tried, fails, and the run goes on with glibc
    broken = run(script, TORCH_EXTENSIONS_DIR=str(tmp_path), CXX="false")
    assert broken.returncode == 0, broken.stderr
    lines = broken.stdout.splitlines()
    assert lines[0].startswith("glibc (cannot be built here") and lines[1] == "None True"
    assert "building the CPU allocator once" in broken.stderr
