"""Writing files so that a crash or a kill mid-write leaves the previous version intact."""
from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any


@contextmanager
def atomic_write(path: str | Path, mode: str = "w", fsync: bool = False, **open_kwargs: Any) -> Iterator[IO]:
    """Open a temporary file beside ``path``; when the block ends without an error it is renamed onto ``path``,
    otherwise removed. Readers see the old file or the whole new one, never half of it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode, **open_kwargs) as f:
            yield f
            if fsync:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_json(path: str | Path, data: Any) -> None:
    """``data`` as indented JSON, written atomically."""
    with atomic_write(path) as f:
        json.dump(data, f, indent=2, sort_keys=True)
        f.write("\n")


class FolderInUse(Exception):
    """Another process holds the run folder."""


def lock_run(folder: Path, exclusive: bool) -> int | None:
    """Lock a run folder while a command uses it: exclusively to train it, shared to read it; returns the descriptor
    to close when done (None where there is no flock, or a reader found the folder training). The lock is the
    kernel's flock on the folder itself (no file is written), so a killed process never leaves it stuck.
    FolderInUse if an exclusive lock cannot be had."""
    try:
        import fcntl
    except ImportError:  # not POSIX: no locking
        return None
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        if exclusive:
            raise FolderInUse(str(folder)) from None
        return None  # a run in training can still be evaluated: its checkpoints are replaced whole
    return fd


def remove_partial_writes(folder: Path) -> None:
    """Remove the temporary files ``atomic_write`` left in ``folder`` and its ``checkpoints/`` when a process was
    killed mid-write (SIGKILL, the OOM killer). Only call it holding the folder's exclusive lock: then no writer is
    alive."""
    for partial in [p for d in (folder, folder / "checkpoints") for p in d.glob(".*.tmp") if p.is_file()]:
        partial.unlink()


@contextmanager
def run_lock(folder: Path, exclusive: bool) -> Iterator[None]:
    """``lock_run`` for the duration of a block; an exclusive lock first removes a killed writer's partial files."""
    fd = lock_run(folder, exclusive)
    try:
        if exclusive and fd is not None:
            remove_partial_writes(folder)
        yield
    finally:
        if fd is not None:
            os.close(fd)
