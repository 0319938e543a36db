"""Reptile (Nichol, Achiam & Schulman 2018).

Per task: phi = k steps of Adam (or SGD) on minibatches of the support set, starting from theta.
Outer update: theta <- theta + eps_t * (mean_tasks(phi) - theta), eps_t annealed linearly from
``outer_lr`` to ``outer_lr_final``. We express it as a loss whose gradient is
eps_t * (theta - mean phi) and step it with plain SGD of rate 1, so the module's loop is unchanged.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from metalstm.data.episodes import EpisodeBatch
from metalstm.errors import ConfigError
from metalstm.learners.base import Params
from metalstm.meta.base import MetaLearner, MetaOutput


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

    def adapt(self, x: Tensor, y: Tensor, steps: int, generator: torch.Generator | None = None) -> Params:
        """Train a detached copy of theta on one support set; returns phi."""
        phi = {k: v.detach().clone().requires_grad_() for k, v in self.learner.params().items()}
        if self.cfg.inner_optimizer == "adam":
            opt = torch.optim.Adam(phi.values(), lr=self.cfg.inner_lr, betas=(0.0, 0.999))
        else:
            opt = torch.optim.SGD(phi.values(), lr=self.cfg.inner_lr)
        n = len(x)
        batch = min(self.cfg.inner_batch_size, n)
        order = torch.randperm(n, generator=generator, device="cpu").to(x.device)
        with torch.enable_grad():
            for step in range(steps):
                idx = order[(torch.arange(batch, device=x.device) + step * batch) % n]  # cycle over the support set
                opt.zero_grad()
                self.loss_fn(self.learner.forward_with(phi, x[idx]), y[idx]).backward()
                opt.step()
        return {k: v.detach() for k, v in phi.items()}

    def meta_loss(self, batch: EpisodeBatch) -> MetaOutput:
        theta = self.learner.params()
        mean_phi = {k: torch.zeros_like(v) for k, v in theta.items()}
        outputs = []
        for sx, sy, qx, _ in zip(*batch):
            phi = self.adapt(sx, sy, self.cfg.inner_steps)
            for k in mean_phi:
                mean_phi[k] += phi[k] / batch.num_tasks
            with torch.no_grad():
                outputs.append(self.learner.forward_with(phi, qx))
        eps = self.cfg.outer_lr + (self.cfg.outer_lr_final - self.cfg.outer_lr) * self.progress
        # d/d theta of eps/2 ||theta - mean_phi||^2 = eps (theta - mean_phi)
        loss = sum(((theta[k] - mean_phi[k]) ** 2).sum() for k in theta) * (eps / 2)
        return MetaOutput(loss, torch.stack(outputs))

    def predict(self, batch: EpisodeBatch) -> Tensor:
        generator = torch.Generator().manual_seed(0)  # fixed minibatch order: evaluation is repeatable
        outputs = []
        for sx, sy, qx, _ in zip(*batch):
            phi = self.adapt(sx, sy, self.cfg.test_inner_steps, generator)
            with torch.no_grad():
                outputs.append(self.learner.forward_with(phi, qx))
        return torch.stack(outputs)
