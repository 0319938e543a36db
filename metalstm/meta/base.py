"""The protocol every meta-learner implements, and the base of their configs."""
from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, NamedTuple

import torch
from torch import Tensor, nn

from metalstm.config import Config
from metalstm.core import EpisodeBatch
from metalstm.learners.base import BaseLearner

LossFn = Callable[[Tensor, Tensor], Tensor]  # (outputs [n, out], targets [n(, out)]) -> scalar


def key(name: str) -> str:
    """A parameter name as a ParameterDict key or buffer name, which cannot hold dots."""
    return name.replace(".", "-")


@dataclass
class MetaConfig(Config):
    group: ClassVar[str] = "meta_learner"


class MetaOutput(NamedTuple):
    loss: Tensor  # scalar meta-loss; its gradient w.r.t. the meta-parameters is the meta-gradient
    query_outputs: Tensor  # [B, n_query, out], predictions on the query sets after adaptation
    diagnostics: dict[str, Tensor] | None = None  # scalars the module logs as train/<name> (the LSTM's gates)


class GradientInForward(torch.autograd.Function):
    """The sum of ``fn(part)`` -> (scalar loss, outputs) over ``parts``, whose gradient w.r.t. ``params`` (the
    leaves ``fn`` reads) is taken in the forward, part by part: only one part's graph is alive at a time, so
    memory follows the part, not the whole. The backward scales the summed gradient; same result as one
    backward through every part's graph. Outputs: ``fn``'s, concatenated (not differentiable)."""

    @staticmethod
    def forward(ctx: Any, parts: Sequence[Any], fn: Callable[[Any], tuple[Tensor, Tensor]],
                *params: Tensor) -> tuple[Tensor, Tensor]:
        total, outputs, grads = None, [], [None] * len(params)
        for part in parts:
            with torch.enable_grad():
                loss, out = fn(part)
                part_grads = torch.autograd.grad(loss, params, allow_unused=True)
            grads = [g if d is None else d if g is None else g + d for g, d in zip(grads, part_grads)]
            total = loss.detach() if total is None else total + loss.detach()
            outputs.append(out.detach())
        ctx.grads = grads
        out = torch.cat(outputs)
        ctx.mark_non_differentiable(out)
        return total, out

    @staticmethod
    def backward(ctx: Any, grad_loss: Tensor, _: Tensor) -> tuple[Tensor | None, ...]:
        return None, None, *(None if g is None else g * grad_loss for g in ctx.grads)  # None: a leaf fn never read


class MetaLearner(nn.Module, ABC):
    """Learns, across tasks, how ``learner`` should adapt to a new task from its support set.

    A meta-learner sees only the base learner's functional interface and an episode batch:
    it never imports a data set or a concrete network.
    """

    task_types: tuple[str, ...] = ("classification", "regression", "seq2seq", "forecast")  # what it can learn
    any_ways: bool = False  # classifies tasks of any number of classes (no output layer per class)
    running_norm: bool = False  # runs the base learner outside vmap, so BatchNorm can keep running statistics

    def __init__(self, learner: BaseLearner, loss_fn: LossFn):
        super().__init__()
        self.learner, self.loss_fn = learner, loss_fn
        self.progress = 0.0  # fraction of meta-training done, set by the module (for annealing)
        self.diagnose = True  # report MetaOutput.diagnostics; the module turns it off on steps that log nothing

    @property
    def bn_policy(self) -> str:
        """How meta-test normalises (results.json): the base learner's policy unless the method changes it."""
        return self.learner.bn_policy

    def outer_optimizer(self, meta_lr: float) -> torch.optim.Optimizer:
        """The optimizer of the meta-parameters; Adam unless the algorithm prescribes another."""
        return torch.optim.Adam(self.parameters(), lr=meta_lr)

    @abstractmethod
    def meta_loss(self, batch: EpisodeBatch) -> MetaOutput:
        """Meta-training: adapt to each task's support set, score its query set."""

    @abstractmethod
    def predict(self, batch: EpisodeBatch) -> Tensor:
        """Meta-test: adapt to each support set, return query outputs [B, n_query, out].

        Called with gradients enabled (adaptation may need them) but nothing is trained.
        """
