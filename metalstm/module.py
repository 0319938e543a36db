"""The one LightningModule: a meta-learner (which holds its base learner) trained over episodes."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Timer
from torch import Tensor

from metalstm.allocator import release_freed_memory
from metalstm.checkpointing import CHECKPOINT_FORMAT
from metalstm.config import Config, choice, count, defaults_of, fraction, positive, setting, store
from metalstm.core import EpisodeBatch
from metalstm.errors import ConfigError, MetalstmError
from metalstm.memory import GIB, peak_bytes, reset_peak
from metalstm.meta.base import MetaLearner
from metalstm.objectives import Objective, normal_ci95

SCHEDULES = ("constant", "cosine", "step")


@dataclass
class OptimConfig(Config):
    """The outer loop's optimizer (the ``optim`` group)."""

    group: ClassVar[str] = "optim"
    meta_lr: float = positive(1e-3)  # Adam step size of the outer loop
    grad_clip: float | None = positive(None)  # max L2 norm of the meta-gradient (clipped inside the step); null: none
    # constant | cosine (from meta_lr to min_lr over trainer.max_steps) | step (times lr_decay every lr_step_size steps)
    lr_schedule: str = choice("constant", SCHEDULES)
    min_lr: float = setting(0.0, minimum=0)
    lr_step_size: int = count(2000)  # step schedule: steps between decays (Snell et al.: 2000 episodes)
    lr_decay: float = fraction(0.5, exclusive=True)  # step schedule: factor per decay


store("optim", "default", defaults_of(OptimConfig))


class TrainingDiverged(MetalstmError):
    pass


class MetaLearningModule(pl.LightningModule):
    """Training step = one outer update over a meta-batch; val/test = adaptation on fixed tasks.

    Uses manual optimisation, so clipping happens here (``optim.grad_clip``), not on the trainer.
    ``config`` is the run's resolved config as plain data and ``spec`` its task spec; both are stored in
    every checkpoint so ``eval.py`` and ``load_learner`` can rebuild the run without pickled objects.
    """

    def __init__(self, meta_learner: MetaLearner, objective: Objective, optim: OptimConfig, config: dict | None = None,
                 spec: dict | None = None):
        super().__init__()
        self.automatic_optimization = False
        self.meta_learner, self.objective, self.optim = meta_learner, objective, optim
        self.config = config or {}
        self.spec = dict(spec or {})  # the TaskSpec it was built for: load_learner rebuilds it without the data
        self.last_finite_loss: float | None = None
        self.peak_memory = 0  # bytes: the largest train/peak_memory_gb logged (memory.peak_bytes)
        self._per_task: dict[str, list[Tensor]] = {}
        self.test_summary: dict[str, float] = {}

    def configure_optimizers(self):
        optimizer = self.meta_learner.outer_optimizer(self.optim.meta_lr)
        if self.optim.lr_schedule == "constant":
            return optimizer
        if self.optim.lr_schedule == "step":
            step = torch.optim.lr_scheduler.StepLR(optimizer, step_size=self.optim.lr_step_size, gamma=self.optim.lr_decay)
            return {"optimizer": optimizer, "lr_scheduler": {"scheduler": step, "interval": "step"}}
        if self.trainer.max_steps <= 0:
            raise ConfigError("optim.lr_schedule=cosine needs trainer.max_steps (the length of the schedule).")
        cosine = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=self.trainer.max_steps, eta_min=self.optim.min_lr)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": cosine, "interval": "step"}}

    def training_step(self, batch: EpisodeBatch, batch_idx: int) -> Tensor:
        opt = self.optimizers()
        opt.zero_grad()
        self.meta_learner.progress = self.training_progress()
        self.meta_learner.diagnose = self.logs_this_step()  # log() costs ~0.5 ms a call; a Conv-4 has 108 gate statistics
        last = self.last_step()  # before opt.step(), which counts this step in global_step
        out = self.meta_learner.meta_loss(batch)
        if not torch.isfinite(out.loss):
            raise TrainingDiverged(
                f"The meta-loss became {out.loss.item()} at step {self.global_step} (last finite value: "
                f"{self.last_finite_loss}). Usually the inner or meta learning rate is too high: lower "
                f"meta_learner.inner_lr or optim.meta_lr, or set optim.grad_clip. The best checkpoint so far is kept."
            )
        self.last_finite_loss = out.loss.item()
        self.manual_backward(out.loss)
        if self.optim.grad_clip is not None:
            self.clip_gradients(opt, gradient_clip_val=self.optim.grad_clip, gradient_clip_algorithm="norm")
        opt.step()
        if self.optim.lr_schedule != "constant":
            self.lr_schedulers().step()
        if last:
            self.trainer.should_stop = True  # training ends here anyway; Lightning then writes this step's metrics
        # train/loss is the adapted learner's query loss, comparable across methods (Reptile's meta-loss is a surrogate)
        for name, values in self.objective.task_metrics(out.query_outputs, batch.query_y).items():
            self.log(f"train/{name}", values.mean(), prog_bar=True, batch_size=batch.num_tasks)
        for name, value in (out.diagnostics or {}).items():
            self.log(f"train/{name}", value, batch_size=batch.num_tasks)
        if self.meta_learner.diagnose:  # a step whose metrics are written: the peak since the last one, in GB
            peak = peak_bytes(self.device)
            if peak is not None:
                self.peak_memory = max(self.peak_memory, peak)
                self.log("train/peak_memory_gb", peak / GIB, batch_size=batch.num_tasks)
                reset_peak(self.device)
        return out.loss.detach()

    def logs_this_step(self) -> bool:
        """Whether Lightning writes this training step's metrics (every trainer.log_every_n_steps steps)."""
        every = self.trainer.log_every_n_steps
        return every > 0 and ((self.global_step + 1) % every == 0 or self.last_step())

    def last_step(self) -> bool:
        """Whether this is the last step of trainer.max_steps (a short run still logs its training metrics)."""
        return 0 < self.trainer.max_steps <= self.global_step + 1

    def training_progress(self) -> float:
        """Fraction of meta-training done: of trainer.max_steps, or of trainer.max_time if that ends it sooner."""
        fractions = [self.global_step / self.trainer.max_steps] if self.trainer.max_steps > 0 else []
        for callback in self.trainer.callbacks:
            remaining = callback.time_remaining("train") if isinstance(callback, Timer) else None
            if remaining is not None:
                elapsed = callback.time_elapsed("train")
                fractions.append(elapsed / max(elapsed + remaining, 1e-9))
        return min(1.0, max(fractions, default=0.0))

    # ------------------------------------------------------------------ meta-validation and meta-test

    def _collect(self, batch: EpisodeBatch) -> None:
        with torch.enable_grad():  # adaptation needs gradients, even under the eval loop's no_grad
            outputs = self.meta_learner.predict(batch)
        for name, values in self.objective.task_metrics(outputs, batch.query_y).items():
            self._per_task.setdefault(name, []).append(values.detach())

    def _gathered(self) -> dict[str, Tensor]:
        """Per-task metrics of all ranks (each rank evaluated its own share of the tasks)."""
        per_task = {}
        for name in self.objective.metrics:
            values = torch.cat(self._per_task[name]) if name in self._per_task else torch.zeros(0, device=self.device)
            if self.trainer.world_size > 1:  # ranks may hold one task more or less: pad, gather, unpad
                longest = int(self.all_gather(torch.tensor(values.numel(), device=self.device)).max())
                padded, valid = values.new_zeros(longest), torch.zeros(longest, dtype=torch.bool, device=self.device)
                padded[: values.numel()], valid[: values.numel()] = values, True
                values = self.all_gather(padded).flatten()[self.all_gather(valid).flatten()]
            per_task[name] = values.double().cpu()
        self._per_task = {}
        return per_task

    def phase_starts(self) -> None:
        """Training, validation and test hold different tensors: each starts from the memory in use (the heap's
        free pages handed back on a CPU), not from the holes the other phase left, as the memory plan measured
        them (a 20-way run with 10 inner steps: its first training step after validation 1.02 GiB, not 0.83)."""
        if self.device.type == "cpu":
            release_freed_memory()

    def on_validation_epoch_start(self) -> None:
        self.phase_starts()
        self._per_task = {}

    def validation_step(self, batch: EpisodeBatch, batch_idx: int) -> None:
        self._collect(batch)

    def on_validation_epoch_end(self) -> None:
        for name, values in self._gathered().items():
            self.log(f"val/{name}", values.mean().item(), prog_bar=name != "loss", sync_dist=True)
        self.phase_starts()  # training's

    def on_test_epoch_start(self) -> None:
        self.phase_starts()
        self._per_task = {}

    def test_step(self, batch: EpisodeBatch, batch_idx: int) -> None:
        self._collect(batch)

    def on_test_epoch_end(self) -> None:
        summary: dict[str, float] = {}
        for name, values in self._gathered().items():
            mean, ci95 = normal_ci95(values)
            summary[f"test/{name}"], summary[f"test/{name}_ci95"] = mean, ci95
            summary["test/num_tasks"] = values.numel()
        for key, value in summary.items():
            if math.isfinite(value):
                self.log(key, value, sync_dist=True)
        self.test_summary = summary

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["metalstm"] = {"format": CHECKPOINT_FORMAT, "config": self.config, "spec": self.spec}
