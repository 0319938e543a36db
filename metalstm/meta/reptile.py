"""Reptile (Nichol, Achiam & Schulman 2018).

Per task: phi = k steps of Adam (or SGD) on minibatches of the support set, starting from theta.
Outer update: theta <- theta + eps_t * (mean_tasks(phi) - theta), eps_t annealed linearly from
``outer_lr`` to ``outer_lr_final``. We express it as a loss whose gradient is
eps_t * (theta - mean phi) and step it with plain SGD of rate 1, so the module's loop is unchanged.
The tasks of a meta-batch adapt together: their weights are stacked [tasks, ...] and one
``vmap(grad(...))`` gives every task's gradient (Adam is elementwise, so stacking changes nothing).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor
from torch.func import grad, vmap

from metalstm.data.episodes import EpisodeBatch
from metalstm.errors import ConfigError
from metalstm.learners.base import Params
from metalstm.meta.base import MetaLearner, MetaOutput

ADAM_BETA2, ADAM_EPS = 0.999, 1e-8  # beta1 = 0, as the paper


@dataclass
class ReptileConfig:
    inner_lr: float = 0.001
    inner_optimizer: str = "adam"  # adam (beta1 = 0, as the paper) | sgd
    inner_steps: int = 5  # meta-training
    test_inner_steps: int = 50
    inner_batch_size: int = 10  # support examples per inner step (all, if fewer)
    outer_lr: float = 1.0  # eps, the meta step size (optim.meta_lr is not used by Reptile)
    outer_lr_final: float = 0.0


class Reptile(MetaLearner):
    def __init__(self, learner, loss_fn, spec, cfg: ReptileConfig):
        super().__init__(learner, loss_fn)
        if cfg.inner_optimizer not in ("adam", "sgd"):
            raise ConfigError(f"meta_learner.inner_optimizer={cfg.inner_optimizer!r}; choose adam or sgd.")
        for key in ("inner_lr", "outer_lr", "inner_batch_size"):
            if getattr(cfg, key) <= 0:
                raise ConfigError(f"meta_learner.{key}={getattr(cfg, key)} must be positive.")
        self.cfg = cfg

    def outer_optimizer(self, meta_lr: float) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=1.0)  # the step size is in the loss (eps_t)

    def task_loss(self, params: Params, x: Tensor, y: Tensor) -> Tensor:
        return self.loss_fn(self.learner.forward_with(params, x, y), y)

    def adapt(self, x: Tensor, y: Tensor, steps: int, generator: torch.Generator | None = None) -> Params:
        """Support sets x [tasks, n, ...], y [tasks, n] -> phi, every weight stacked [tasks, ...] (detached).

        Each task cycles over its own random order of its support set, ``inner_batch_size`` at a time.
        """
        tasks, n = y.shape[:2]
        batch = min(self.cfg.inner_batch_size, n)
        order = torch.rand(tasks, n, generator=generator).argsort(dim=1).to(x.device)
        rows = torch.arange(tasks, device=x.device)[:, None]
        phi = {k: v.detach().expand(tasks, *v.shape).clone() for k, v in self.learner.params().items()}
        second_moment = {k: torch.zeros_like(v) for k, v in phi.items()}
        with torch.enable_grad():
            for step in range(steps):
                idx = order[:, (torch.arange(batch, device=x.device) + step * batch) % n]  # [tasks, batch]
                grads = vmap(grad(self.task_loss))(phi, x[rows, idx], y[rows, idx])
                for k, g in grads.items():
                    if self.cfg.inner_optimizer == "sgd":
                        phi[k] = phi[k] - self.cfg.inner_lr * g
                        continue
                    second_moment[k].mul_(ADAM_BETA2).addcmul_(g, g, value=1 - ADAM_BETA2)
                    denom = (second_moment[k] / (1 - ADAM_BETA2 ** (step + 1))).sqrt() + ADAM_EPS
                    phi[k] = phi[k] - self.cfg.inner_lr * g / denom
        return phi

    def query_outputs(self, phi: Params, query_x: Tensor) -> Tensor:
        with torch.no_grad():
            return vmap(self.learner.forward_with)(phi, query_x)

    def meta_loss(self, batch: EpisodeBatch) -> MetaOutput:
        theta = self.learner.params()
        phi = self.adapt(batch.support_x, batch.support_y, self.cfg.inner_steps)
        eps = self.cfg.outer_lr + (self.cfg.outer_lr_final - self.cfg.outer_lr) * self.progress
        # d/d theta of eps/2 ||theta - mean_phi||^2 = eps (theta - mean_phi)
        loss = sum(((theta[k] - phi[k].mean(0)) ** 2).sum() for k in theta) * (eps / 2)
        return MetaOutput(loss, self.query_outputs(phi, batch.query_x))

    def predict(self, batch: EpisodeBatch) -> Tensor:
        generator = torch.Generator().manual_seed(0)  # fixed minibatch order: evaluation is repeatable
        phi = self.adapt(batch.support_x, batch.support_y, self.cfg.test_inner_steps, generator)
        return self.query_outputs(phi, batch.query_x)
