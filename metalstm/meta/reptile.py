"""Reptile (Nichol, Achiam & Schulman 2018).

Per task: phi = k steps of Adam (or SGD) on minibatches of the support set, starting from theta.
Outer update: theta <- theta + eps_t * (mean_tasks(phi) - theta), eps_t annealed linearly from
``outer_lr`` to ``outer_lr_final``. We express it as a loss whose gradient is
eps_t * (theta - mean phi) and step it with plain SGD of rate 1, so the module's loop is unchanged.
The tasks of a meta-batch adapt together: their weights are stacked [tasks, ...] and one
``vmap(grad(...))`` gives every task's gradient (Adam is elementwise, so stacking changes nothing).

Adam's second moment: the paper's code keeps the inner Adam's state across tasks (only the weights are
reset to theta), so step sizes follow the running gradient scale of all tasks seen, not sign(g) as a
fresh Adam's first step would. ``carry_adam_state`` (default, as the paper's code) keeps one running
second moment and step count: every task of a meta-batch starts from it, and afterwards it becomes the
tasks' mean. Evaluation starts from it too but leaves it unchanged.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor
from torch.func import grad, vmap

from metalstm.config import choice, count, positive, setting
from metalstm.core import EpisodeBatch
from metalstm.learners.base import Params
from metalstm.meta.base import MetaConfig, MetaLearner, MetaOutput, key

ADAM_BETA2, ADAM_EPS = 0.999, 1e-8  # beta1 = 0, as the paper


@dataclass
class ReptileConfig(MetaConfig):
    """Defaults: the paper's Omniglot settings."""

    inner_lr: float = positive(0.001)
    inner_optimizer: str = choice("adam", ("adam", "sgd"))  # adam (beta1 = 0, as the paper) | sgd
    inner_steps: int = count(5, minimum=0)  # meta-training
    test_inner_steps: int = count(50, minimum=0)
    inner_batch_size: int = count(10)  # support examples per inner step (all, if fewer)
    outer_lr: float = positive(1.0)  # eps, the meta step size, annealed linearly to outer_lr_final (optim.meta_lr is not used)
    outer_lr_final: float = setting(0.0, minimum=0)
    carry_adam_state: bool = True  # inner Adam's second moment carried across tasks, as the paper's code
    # meta-test: true scores all queries in one batch (BatchNorm statistics shared by the queries); false scores
    # each query in a batch with the support set alone (the paper's non-transductive protocol)
    transductive: bool = True


class Reptile(MetaLearner):
    def __init__(self, learner, loss_fn, spec, cfg: ReptileConfig):
        super().__init__(learner, loss_fn)
        self.cfg = cfg
        for name, param in learner.params().items():
            self.register_buffer(f"adam_v-{key(name)}", torch.zeros_like(param))
        self.register_buffer("adam_t", torch.zeros((), dtype=torch.long))

    def carried_moments(self) -> tuple[Params, int]:
        """The running second moments and step count, or a fresh Adam's when not carried."""
        if not self.cfg.carry_adam_state:
            return {n: torch.zeros_like(p) for n, p in self.learner.params().items()}, 0
        return {n: getattr(self, f"adam_v-{key(n)}") for n in self.learner.params()}, int(self.adam_t)

    def outer_optimizer(self, meta_lr: float) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=1.0)  # the step size is in the loss (eps_t)

    def task_loss(self, params: Params, x: Tensor, y: Tensor) -> Tensor:
        return self.loss_fn(self.learner.forward_with(params, x, y), y)

    def adapt(self, x: Tensor, y: Tensor, steps: int, generator: torch.Generator | None = None) -> tuple[Params, Params]:
        """Support sets x [tasks, n, ...], y [tasks, n] -> phi and Adam's second moments, every tensor
        stacked [tasks, ...] (detached).

        Each task cycles over its own random order of its support set, ``inner_batch_size`` at a time.
        """
        tasks, n = y.shape[:2]
        batch = min(self.cfg.inner_batch_size, n)
        order = torch.rand(tasks, n, generator=generator).argsort(dim=1).to(x.device)
        rows = torch.arange(tasks, device=x.device)[:, None]
        phi = {k: v.detach().expand(tasks, *v.shape).clone() for k, v in self.learner.params().items()}
        carried, t0 = self.carried_moments()
        second_moment = {k: v.detach().expand(tasks, *v.shape).clone() for k, v in carried.items()}
        with torch.enable_grad():
            for step in range(steps):
                idx = order[:, (torch.arange(batch, device=x.device) + step * batch) % n]  # [tasks, batch]
                grads = vmap(grad(self.task_loss))(phi, x[rows, idx], y[rows, idx])
                for k, g in grads.items():
                    if self.cfg.inner_optimizer == "sgd":
                        phi[k] = phi[k] - self.cfg.inner_lr * g
                        continue
                    second_moment[k].mul_(ADAM_BETA2).addcmul_(g, g, value=1 - ADAM_BETA2)
                    denom = (second_moment[k] / (1 - ADAM_BETA2 ** (t0 + step + 1))).sqrt() + ADAM_EPS
                    phi[k] = phi[k] - self.cfg.inner_lr * g / denom
        return phi, second_moment

    @property
    def bn_policy(self) -> str:
        if self.cfg.transductive or self.learner.bn_policy == "none":
            return self.learner.bn_policy
        return "non-transductive (each query with the support set)"

    def query_outputs(self, phi: Params, query_x: Tensor) -> Tensor:
        """phi stacked [tasks, ...], queries [tasks, n_q, ...] -> outputs [tasks, n_q, out], one batch per task."""
        with torch.no_grad():
            return vmap(self.learner.forward_with)(phi, query_x)

    def query_outputs_one_by_one(self, phi: Params, support_x: Tensor, query_x: Tensor) -> Tensor:
        """Each query scored in a batch [support; query]: no statistics shared between queries."""
        n_query = query_x.shape[1]
        groups = torch.cat([support_x.unsqueeze(1).expand(-1, n_query, *support_x.shape[1:]), query_x.unsqueeze(2)], 2)
        with torch.no_grad():  # groups [tasks, n_q, n_s + 1, ...]
            outputs = vmap(vmap(self.learner.forward_with, in_dims=(None, 0)))(phi, groups)
        return outputs[:, :, -1]

    def meta_loss(self, batch: EpisodeBatch) -> MetaOutput:
        theta = self.learner.params()
        phi, second_moment = self.adapt(batch.support_x, batch.support_y, self.cfg.inner_steps)
        if self.cfg.carry_adam_state and self.cfg.inner_optimizer == "adam":
            for name, carried in self.carried_moments()[0].items():
                carried.copy_(second_moment[name].mean(0))
            self.adam_t += self.cfg.inner_steps
        eps = self.cfg.outer_lr + (self.cfg.outer_lr_final - self.cfg.outer_lr) * self.progress
        # d/d theta of eps/2 ||theta - mean_phi||^2 = eps (theta - mean_phi)
        loss = sum(((theta[k] - phi[k].mean(0)) ** 2).sum() for k in theta) * (eps / 2)
        return MetaOutput(loss, self.query_outputs(phi, batch.query_x))

    def predict(self, batch: EpisodeBatch) -> Tensor:
        generator = torch.Generator().manual_seed(0)  # fixed minibatch order: evaluation is repeatable
        phi, _ = self.adapt(batch.support_x, batch.support_y, self.cfg.test_inner_steps, generator)
        if self.cfg.transductive:
            return self.query_outputs(phi, batch.query_x)
        return self.query_outputs_one_by_one(phi, batch.support_x, batch.query_x)
