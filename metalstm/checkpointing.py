"""Checkpoints that survive a kill (atomic writes, a periodic last.ckpt), and reading them back without
unpickling code."""
from __future__ import annotations

import os
import signal
import sys
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Checkpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities.exceptions import SIGTERMException

from metalstm.errors import CheckpointError, ConfigError
from metalstm.files import atomic_write

# 2: the LSTM optimizer's update-rule weights live under meta_learner.update.* (were meta_learner.*)
CHECKPOINT_FORMAT = 2
RULE_WEIGHTS = ("input_lstm.", "w_input", "w_forget", "b_input", "b_forget", "lstm1.", "lstm2.", "out.")


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes each checkpoint to a temporary file beside it, then renames it into place.

    A process killed mid-write leaves the previous checkpoint intact (Lightning writes in place).
    Checkpoints are read with ``weights_only=True``: a crafted file cannot run code.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        with atomic_write(path, "wb", fsync=True) as f:
            torch.save(checkpoint, f)

    def load_checkpoint(self, path: Any, map_location: Any | None = None, weights_only: bool | None = None) -> dict[str, Any]:
        return torch.load(path, map_location=map_location or "cpu", weights_only=True)


class LastCheckpoint(Checkpoint):
    """``checkpoints/last.ckpt`` every ``every_n_steps`` meta-training steps and when training ends: the point
    ``python train.py resume=<run dir>`` continues from.

    A step followed by validation is saved after it (and after ModelCheckpoint's update of the best score,
    which Lightning runs first, being listed first): resuming then neither repeats nor skips that validation.
    """

    def __init__(self, dirpath: str, every_n_steps: int):
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


class StoppedByUser(BaseException):
    """Ctrl-C outside training (Lightning would catch a KeyboardInterrupt and exit 1 without a word)."""


class StopTest(pl.Callback):
    """While ``watching()``: the first Ctrl-C stops a test before its next batch of tasks, a second at once; both
    raise StoppedByUser. (A KeyboardInterrupt raised by the signal handler itself can land inside torch.func.vmap,
    whose unwound transform stack then makes Lightning's teardown fail: the first one waits for a safe point.)
    SIGTERM during the last batch, which Lightning lets finish, stops it too: a test stopped is no result."""

    def __init__(self) -> None:
        self.received: list[int] = []

    @contextmanager
    def watching(self) -> Iterator[None]:
        previous = signal.getsignal(signal.SIGINT)

        def second_interrupt(signum: int, frame: Any) -> None:
            self.received.append(signum)
            raise StoppedByUser

        def first_interrupt(signum: int, frame: Any) -> None:
            self.received.append(signum)
            print("\nCtrl-C: stopping the test after this batch of tasks (Ctrl-C again to stop at once)",
                  file=sys.stderr)
            signal.signal(signal.SIGINT, second_interrupt)

        signal.signal(signal.SIGINT, first_interrupt)
        try:
            yield
        except BaseException:
            # once stopping, a further Ctrl-C would only break the clean exit (a traceback from an atexit hook)
            signal.signal(signal.SIGINT, signal.SIG_IGN if self.received else previous)
            raise
        signal.signal(signal.SIGINT, previous)

    def stop_if_asked(self) -> None:
        if self.received:
            raise StoppedByUser

    def on_test_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        self.stop_if_asked()

    def on_test_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.stop_if_asked()
        if trainer.received_sigterm:
            raise SIGTERMException


# ------------------------------------------------------------------------------------------ reading them


def find_checkpoint(run_dir: str | None, ckpt_path: str | None) -> Path:
    """The checkpoint ``ckpt_path`` names, or the best (else last) one of the run folder ``run_dir``."""
    if ckpt_path:
        path = Path(ckpt_path).expanduser()
        if not path.is_file():
            raise CheckpointError(
                f"ckpt_path={ckpt_path} does not exist. Pass a .ckpt file of a metalstm run, or run_dir=<run folder>."
            )
        return path
    if not run_dir:
        raise ConfigError(
            "eval.py needs run_dir=<a train run folder, e.g. outputs/2026-01-01/12-00-00> or ckpt_path=<file.ckpt>."
        )
    folder = Path(run_dir).expanduser()
    for name in ("best.ckpt", "last.ckpt"):
        if (folder / "checkpoints" / name).is_file():
            return folder / "checkpoints" / name
    raise CheckpointError(
        f"No checkpoint in {folder / 'checkpoints'} (looked for best.ckpt and last.ckpt). Is run_dir the folder of a "
        f"finished or interrupted train run (it holds .hydra/ and checkpoints/)?"
    )


def load_checkpoint(path: Path) -> dict:
    """A metalstm checkpoint, loaded without unpickling code (weights_only), its weights in today's names."""
    try:
        with warnings.catch_warnings():  # torch warns about the pickle protocol of files it then refuses
            warnings.simplefilter("ignore")
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        reason = f"{type(e).__name__}: {str(e).splitlines()[0]}" if str(e).strip() else f"{type(e).__name__}: empty or cut off"
        raise CheckpointError(f"{path} is not a readable checkpoint ({reason}).") from e
    meta = checkpoint.get("metalstm") if isinstance(checkpoint, dict) else None
    if not isinstance(meta, dict) or "config" not in meta:
        raise CheckpointError(f"{path} is not a metalstm checkpoint (it has no 'metalstm' section with the run's config).")
    if meta.get("format", 0) > CHECKPOINT_FORMAT:
        raise CheckpointError(
            f"{path} was written by a newer metalstm (checkpoint format {meta['format']}, this one reads up to "
            f"{CHECKPOINT_FORMAT}); upgrade metalstm to evaluate it."
        )
    if upgrades_rule_weights(checkpoint):
        checkpoint["state_dict"] = {
            (f"meta_learner.update.{k[len('meta_learner.'):]}"
             if k.startswith("meta_learner.") and k[len("meta_learner."):].startswith(RULE_WEIGHTS) else k): v
            for k, v in checkpoint["state_dict"].items()}
    return checkpoint


def upgrades_rule_weights(checkpoint: dict) -> bool:
    """A format-1 LSTM-optimizer checkpoint: its update-rule weights are renamed when loaded (and its optimizer
    state, ordered by the old names, cannot continue a run)."""
    meta = checkpoint["metalstm"]
    return meta.get("format", 1) < 2 and (meta["config"].get("meta_learner") or {}).get("name") == "lstm_optimizer"


def restore_weights(module: torch.nn.Module, checkpoint: dict, path: Path) -> None:
    try:
        module.load_state_dict(checkpoint["state_dict"])
    except RuntimeError as e:
        raise CheckpointError(f"{path} does not match the model its config describes ({str(e).splitlines()[0]}).") from e
