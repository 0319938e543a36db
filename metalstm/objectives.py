"""Task objectives: the loss the inner loop minimises and the metrics we report.

A data set declares its ``task_type``; the module picks the objective by that name, so
neither a data set nor a meta-learner needs to know about the other.
"""
from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor

from metalstm.core import PAD


class Objective(Protocol):
    metrics: tuple[str, ...]
    monitor: str  # the validation metric used to pick the best checkpoint
    monitor_mode: str  # "max" or "min"

    def loss(self, outputs: Tensor, targets: Tensor) -> Tensor:
        """Mean loss of one task. outputs [n, out], targets [n] or [n, out]."""

    def task_metrics(self, outputs: Tensor, targets: Tensor) -> dict[str, Tensor]:
        """Per-task metrics. outputs [B, n, out], targets [B, n(, out)] -> each [B]."""


class Classification:
    metrics = ("loss", "acc")
    monitor = "acc"
    monitor_mode = "max"

    def loss(self, outputs: Tensor, targets: Tensor) -> Tensor:
        return F.cross_entropy(outputs, targets)

    def task_metrics(self, outputs: Tensor, targets: Tensor) -> dict[str, Tensor]:
        loss = F.cross_entropy(outputs.flatten(0, 1), targets.flatten(), reduction="none")
        acc = (outputs.argmax(-1) == targets).float().mean(-1) * 100.0  # percent, as papers report
        return {"loss": loss.view(targets.shape).mean(-1), "acc": acc}


class Stream(Classification):
    """Santoro et al.'s online episodes: every example of the stream is answered before its label is shown.
    acc_<k> is the accuracy on the k-th presentation of a class (the paper's instances 1, 2, 3, 5, 10), NaN
    for a task whose classes never appear k times."""

    instances = (1, 2, 3, 5, 10)
    metrics = ("loss", "acc", *(f"acc_{k}" for k in instances))

    def task_metrics(self, outputs: Tensor, targets: Tensor) -> dict[str, Tensor]:
        metrics = super().task_metrics(outputs, targets)
        correct = (outputs.argmax(-1) == targets).float()
        presentation = instance_numbers(targets)
        for k in self.instances:
            at_k = (presentation == k).float()
            metrics[f"acc_{k}"] = (correct * at_k).sum(-1) / at_k.sum(-1) * 100.0  # 0 / 0 = NaN: no k-th instance
        return metrics


def instance_numbers(labels: Tensor) -> Tensor:
    """[B, n] labels -> [B, n]: how many times each position's class has appeared so far, itself included
    (1 for a class's first example)."""
    same = labels.unsqueeze(-1) == labels.unsqueeze(-2)  # [B, n, n]: position t, earlier position s
    return torch.tril(same).sum(-1)


class Regression:
    metrics = ("loss", "mse")
    monitor = "mse"
    monitor_mode = "min"

    def loss(self, outputs: Tensor, targets: Tensor) -> Tensor:
        return F.mse_loss(outputs, targets)

    def task_metrics(self, outputs: Tensor, targets: Tensor) -> dict[str, Tensor]:
        mse = (outputs - targets).pow(2).flatten(1).mean(-1)
        return {"loss": mse, "mse": mse}


class Seq2Seq:
    """Token sequences: outputs [n, H, vocab], targets [n, H] with 0 = padding (ignored)."""

    metrics = ("loss", "token_acc", "seq_acc")
    monitor = "token_acc"
    monitor_mode = "max"

    def loss(self, outputs: Tensor, targets: Tensor) -> Tensor:
        return F.cross_entropy(outputs.flatten(0, -2), targets.flatten(), ignore_index=PAD)

    def task_metrics(self, outputs: Tensor, targets: Tensor) -> dict[str, Tensor]:
        real = targets != PAD  # [B, n, H]
        loss = F.cross_entropy(outputs.flatten(0, -2), targets.flatten(), ignore_index=PAD, reduction="none")
        loss = (loss.view(targets.shape) * real).flatten(1).sum(-1) / real.flatten(1).sum(-1)
        correct = outputs.argmax(-1) == targets
        token_acc = (correct & real).flatten(1).sum(-1) / real.flatten(1).sum(-1) * 100.0
        seq_acc = (correct | ~real).all(-1).float().mean(-1) * 100.0
        return {"loss": loss, "token_acc": token_acc, "seq_acc": seq_acc}


class Forecast(Regression):
    """Real-valued sequences: outputs and targets [n, H, d]; point_error is the mean Euclidean
    distance per step (the mean absolute error when d = 1)."""

    metrics = ("loss", "mse", "point_error")

    def task_metrics(self, outputs: Tensor, targets: Tensor) -> dict[str, Tensor]:
        error = (outputs - targets).norm(dim=-1).flatten(1).mean(-1)
        return {**super().task_metrics(outputs, targets), "point_error": error}


OBJECTIVES: dict[str, type] = {"classification": Classification, "regression": Regression, "forecast": Forecast,
                               "seq2seq": Seq2Seq, "stream": Stream}


def get_objective(task_type: str) -> Objective:
    try:
        return OBJECTIVES[task_type]()
    except KeyError:
        raise ValueError(f"unknown task_type {task_type!r}; known: {sorted(OBJECTIVES)}") from None


def normal_ci95(values: Tensor) -> tuple[float, float]:
    """Mean over tasks and the half-width of its normal-approximation 95% confidence interval (1.96 standard
    errors; hundreds of tasks). Seed aggregates use Student's t instead (``report.student_t_ci95``)."""
    values = values.double()
    n = values.numel()
    std = values.std(unbiased=True).item() if n > 1 else 0.0
    return values.mean().item(), 1.96 * std / n**0.5
