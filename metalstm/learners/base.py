"""The functional interface every base learner offers to every meta-learner."""
from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import NotRequired, TypedDict

import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

Params = dict[str, Tensor]


class TaskSpec(TypedDict):
    """What a data set tells a base learner about its tasks (plain data, no imports either way)."""

    task_type: str  # "classification" | "regression" | "seq2seq" (a token sequence per example)
    input_shape: tuple[int, ...]  # one example, e.g. (1, 28, 28), (1,), (length,) tokens, (length, features)
    output_dim: int  # ways for classification, target size for regression, vocabulary for seq2seq
    vocab: NotRequired[int]  # inputs are token ids 0..vocab-1 (0 = padding)
    output_length: NotRequired[int]  # targets are sequences of this many steps


class BaseLearner(nn.Module):
    """A network whose parameters live in a dict and whose forward runs on any such dict.

    Meta-learners read the meta-learned initialisation with ``params()`` and run adapted
    copies with ``forward_with(params, x)`` (outputs [n, output_dim]) or ``embed_with(params, x)``
    (penultimate features [n, embed_dim]); nothing in a meta-learner depends on the layers.
    Subclasses define ``body`` (x -> features) and ``head`` (features -> outputs).
    BatchNorm layers keep no running statistics: each forward normalises with the statistics
    of its own batch (``bn_policy``), so adapted copies never share hidden state.
    """

    bn_policy = "none"  # "transductive": each forward's own batch statistics, at train and test alike
    vmap_on_cpu = True  # vmap over tasks beats a per-task loop on CPU (scripts/bench.py; not so for convolutions)
    embed_dim: int
    body: nn.Module
    head: nn.Module

    def params(self) -> Params:
        """The meta-learned parameters (leaves), keyed by name."""
        return dict(self.named_parameters())

    def forward(self, x: Tensor, embed: bool = False, targets: Tensor | None = None) -> Tensor:
        features = self.body(x)
        return features if embed else self.head(features)

    def forward_with(self, params: Params, x: Tensor, targets: Tensor | None = None) -> Tensor:
        """Outputs on x. ``targets``: the support or training targets, which a learner that decodes
        sequences reads as its previous outputs (teacher forcing); others ignore them. Leave them
        out for predictions."""
        return functional_call(self, params, (x,), {"targets": targets})

    def embed_with(self, params: Params, x: Tensor) -> Tensor:
        return functional_call(self, params, (x,), {"embed": True})


_vmapped = threading.local()


def in_tasks_vmap() -> bool:
    return getattr(_vmapped, "on", False)


@contextmanager
def tasks_vmapped() -> Iterator[None]:
    """Forwards inside run under ``vmap`` over tasks whose weights differ (see ``BatchNorm``)."""
    previous, _vmapped.on = in_tasks_vmap(), True
    try:
        yield
    finally:
        _vmapped.on = previous


class BatchNorm(nn.BatchNorm2d):
    """Transductive BatchNorm over x [n, C, ...]: normalised with the batch's own statistics.

    Under ``tasks_vmapped`` the affine map is written out after a weightless batch_norm: torch's fused
    affine batch_norm, vmapped over tasks whose adapted weights differ, gives second derivatives off by
    1-5% (torch 2.13; pytorch/functorch#534). Elsewhere the fused kernel runs (~13% faster on CPU).
    """

    def __init__(self, channels: int):
        super().__init__(channels, track_running_stats=False)

    def forward(self, x: Tensor) -> Tensor:
        if not in_tasks_vmap():
            return F.batch_norm(x, None, None, self.weight, self.bias, training=True, eps=self.eps)
        shape = (-1,) + (1,) * (x.dim() - 2)
        return F.batch_norm(x, None, None, training=True, eps=self.eps) * self.weight.view(shape) + self.bias.view(shape)
