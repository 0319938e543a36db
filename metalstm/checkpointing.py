"""Checkpoints that survive a kill: atomic writes, loads without unpickling code, a periodic last.ckpt."""
from __future__ import annotations

import os
import signal
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Checkpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities.exceptions import SIGTERMException

from metalstm.errors import ConfigError


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes each checkpoint to a temporary file beside it, then renames it into place.

    A process killed mid-write leaves the previous checkpoint intact (Lightning writes in place).
    Checkpoints are read with ``weights_only=True``: a crafted file cannot run code.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)

    def load_checkpoint(self, path: Any, map_location: Any | None = None, weights_only: bool | None = None) -> dict[str, Any]:
        return torch.load(path, map_location=map_location or "cpu", weights_only=True)


class LastCheckpoint(Checkpoint):
    """``checkpoints/last.ckpt`` every ``every_n_steps`` meta-training steps and when training ends: the point
    ``python train.py resume=<run dir>`` continues from.

    A step followed by validation is saved after it (and after ModelCheckpoint's update of the best score,
    which Lightning runs first, being listed first): resuming then neither repeats nor skips that validation.
    """

    def __init__(self, dirpath: str, every_n_steps: int = 100):
        if every_n_steps < 1:
            raise ConfigError(f"callbacks.last_checkpoint.every_n_steps={every_n_steps} must be a positive integer.")
        self.path = Path(dirpath) / "last.ckpt"
        self.every_n_steps = every_n_steps
        self._saved_step = -1
        self._after_validation = False

    def save(self, trainer: pl.Trainer) -> None:
        if trainer.global_step != self._saved_step:
            trainer.save_checkpoint(self.path, weights_only=False)
            self._saved_step = trainer.global_step

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if trainer.global_step % self.every_n_steps:
            return
        every = trainer.val_check_batch
        batch_number = trainer.fit_loop.epoch_loop.total_batch_idx + 1
        self._after_validation = (trainer.enable_validation and isinstance(every, int) and every > 0
                                  and batch_number % every == 0)
        if not self._after_validation:
            self.save(trainer)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._after_validation and not trainer.sanity_checking:
            self._after_validation = False
            self.save(trainer)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.save(trainer)

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        # SIGTERM (and our first Ctrl-C, see stop_on_sigint) stops Lightning between steps: a consistent state
        if isinstance(exception, SIGTERMException) and trainer.state.fn == "fit":
            self.save(trainer)


@contextmanager
def stop_on_sigint() -> Iterator[list[int]]:
    """While inside: the first Ctrl-C asks training to stop after the current step, as SIGTERM does (Lightning
    then raises SIGTERMException and LastCheckpoint saves); a second Ctrl-C interrupts at once. Yields the
    signals received."""
    received: list[int] = []
    previous = signal.getsignal(signal.SIGINT)

    def first_interrupt(signum: int, frame: Any) -> None:
        received.append(signum)
        print("\nCtrl-C: stopping after this step and saving checkpoints/last.ckpt (Ctrl-C again to stop at once)",
              file=sys.stderr)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        os.kill(os.getpid(), signal.SIGTERM)

    signal.signal(signal.SIGINT, first_interrupt)
    try:
        yield received
    finally:
        signal.signal(signal.SIGINT, previous)
