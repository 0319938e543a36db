"""The functional interface every base learner offers to every meta-learner."""
from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, vmap

from metalstm.config import Config
from metalstm.core import TaskSpec
from metalstm.errors import ConfigError
from metalstm.learners.norm import batch_norm

Params = dict[str, Tensor]


@dataclass
class LearnerConfig(Config):
    group: ClassVar[str] = "base_learner"


class BaseLearner(nn.Module):
    """A network whose parameters live in a dict and whose forward runs on any such dict.

    Meta-learners read the meta-learned initialisation with ``params()`` and run adapted
    copies with ``forward_with(params, x)`` (outputs [n, output_dim]) or ``embed_with(params, x)``
    (penultimate features [n, embed_dim]); nothing in a meta-learner depends on the layers.
    Subclasses define ``body`` (x -> features) and ``head`` (features -> outputs), and ``refusal``:
    why they cannot learn tasks of a given spec (None if they can).
    BatchNorm layers normalise each forward with the statistics of its own batch (``bn_policy``
    "transductive"), so adapted copies never share hidden state; or, with ``bn_policy`` "running",
    meta-training forwards also update running statistics that meta-test (eval mode) normalises with.
    """

    bn_policy = "none"  # | "transductive" (each forward's own batch statistics) | "running" (see BatchNorm)
    # MAML's meta_learner.vectorize=auto on a CPU: vmap (over whole tasks) beats a per-task loop for small dense
    # learners; Conv-4 adapts its support sets with forward_tasks, "grouped" (scripts/bench.py, docs/performance.md)
    cpu_vectorize = "vmap"
    embed_dim: int
    body: nn.Module
    head: nn.Module

    @classmethod
    def refusal(cls, cfg: Any, spec: TaskSpec) -> str | None:
        """Why this learner (with ``cfg``) cannot learn tasks of ``spec``, or None if it can."""
        return None

    def check_spec(self, cfg: Any, spec: TaskSpec) -> None:
        reason = self.refusal(cfg, spec)
        if reason is not None:
            raise ConfigError(reason)

    def params(self) -> Params:
        """The meta-learned parameters (leaves), keyed by name."""
        return dict(self.named_parameters())

    def recomputes(self) -> bool:
        """Whether forwards under ``recomputed_activations`` store less (Conv-4 with batch statistics)."""
        return False

    def head_names(self) -> set[str]:
        """Names (as in ``params()``) of the head's parameters: the last layer."""
        return {f"head.{n}" for n, _ in self.head.named_parameters()}

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

    def forward_tasks(self, params: Params, x: Tensor, targets: Tensor | None = None) -> Tensor:
        """Outputs of T tasks at once, each with weights of its own: params values [T, *shape], x [T, n, ...],
        targets [T, n(, ...)] or None -> [T, n, output_dim]. Here ``forward_with`` vmapped over the tasks; a learner
        may write it as larger products (Conv-4: grouped convolutions)."""
        with tasks_vmapped():
            return vmap(self.forward_with, in_dims=(0, 0, None if targets is None else 0))(params, x, targets)


class ThreadFlag:
    """A per-thread switch the learners' forwards read: off, except inside ``with flag.turned_on():`` (nestable)."""

    def __init__(self) -> None:
        self.local = threading.local()

    def on(self) -> bool:
        return getattr(self.local, "on", False)

    @contextmanager
    def turned_on(self) -> Iterator[None]:
        previous, self.local.on = self.on(), True
        try:
            yield
        finally:
            self.local.on = previous


_vmapped, _recomputed = ThreadFlag(), ThreadFlag()


def outside_functorch() -> bool:
    """No torch.func transform (vmap, grad) is running: custom autograd Functions and layout changes are safe."""
    return torch._C._functorch.peek_interpreter_stack() is None


def closed_form_norm(x: Tensor) -> bool:
    """Whether BatchNorm of ``x`` runs through ``learners.norm.batch_norm``: on a CPU (where its second derivative
    was measured faster), outside torch.func transforms (which a custom autograd Function does not support)."""
    return x.device.type == "cpu" and outside_functorch()


def in_tasks_vmap() -> bool:
    return _vmapped.on()


def tasks_vmapped() -> AbstractContextManager[None]:
    """Forwards inside run under ``vmap`` over tasks whose weights differ (see ``BatchNorm``)."""
    return _vmapped.turned_on()


def recomputing() -> bool:
    return _recomputed.on()


def recomputed_activations() -> AbstractContextManager[None]:
    """The forwards inside are differentiated once, never twice: a learner may store less and recompute its
    activations in the backward (Conv-4: ``RecomputedBody``; MAML's ``checkpoint_query``)."""
    return _recomputed.turned_on()


class BatchNorm(nn.BatchNorm2d):
    """BatchNorm over x [n, C, ...]. Transductive (``running=False``): normalised with the batch's own
    statistics, in training and at meta-test alike. ``running=True``: training forwards normalise with the
    batch's statistics and update running averages in place; eval-mode forwards (meta-test) normalise
    with those, so a query's output does not depend on the other queries (Snell et al.'s test protocol).
    Running statistics cannot be updated inside ``vmap`` over tasks: meta-learners that vmap the base
    learner refuse them (``MetaLearner.running_norm``).

    On a CPU, outside torch.func transforms, batch statistics run through ``learners.norm.batch_norm``, whose
    second derivative (second-order MAML) is a few fused passes instead of torch's general one.
    Under ``tasks_vmapped`` the affine map is written out after a weightless batch_norm: torch's fused
    affine batch_norm, vmapped over tasks whose adapted weights differ, gives second derivatives off by
    1-5% (torch 2.13; pytorch/functorch#534). Elsewhere the fused kernel runs (~13% faster on CPU).
    """

    def __init__(self, channels: int, running: bool = False):
        super().__init__(channels, track_running_stats=running)

    def forward(self, x: Tensor) -> Tensor:
        if self.track_running_stats:
            if self.training:
                self.num_batches_tracked.add_(1)
            return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias,
                                training=self.training, momentum=self.momentum, eps=self.eps)
        if closed_form_norm(x):
            return batch_norm(x, self.weight, self.bias, self.eps)
        if not in_tasks_vmap():
            return F.batch_norm(x, None, None, self.weight, self.bias, training=True, eps=self.eps)
        shape = (-1,) + (1,) * (x.dim() - 2)
        return F.batch_norm(x, None, None, training=True, eps=self.eps) * self.weight.view(shape) + self.bias.view(shape)
