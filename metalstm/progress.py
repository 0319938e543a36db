"""The terminal's progress bar during meta-training."""
from __future__ import annotations

from lightning.pytorch.callbacks import RichProgressBar


class ProgressBar(RichProgressBar):
    """Lightning's rich bar, titled by the phase instead of "Epoch 0/-2": meta-training is one endless epoch of
    sampled tasks, counted in steps (trainer.max_steps)."""

    def _get_train_description(self, current_epoch: int) -> str:
        return f"{'Meta-training':{len(self.validation_description)}}"

    def get_metrics(self, trainer, pl_module) -> dict:
        metrics = super().get_metrics(trainer, pl_module)
        metrics.pop("v_num", None)  # a logger's version (W&B's run id): not a metric
        return metrics
