"""MAML (Finn et al. 2017) and first-order MAML.

Inner loop, per task i, from the meta-learned initialisation theta:
    phi_0 = theta,   phi_{s+1} = phi_s - inner_lr * grad_phi L_support_i(phi_s)
Outer loop: theta <- theta - meta_lr * grad_theta  mean_i L_query_i(phi_S).
Second order differentiates through every grad_phi (create_graph=True); first order
(FOMAML) treats each inner gradient as a constant, so d phi_S / d theta = I.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from metalstm.data.episodes import EpisodeBatch
from metalstm.errors import ConfigError
from metalstm.learners.base import BaseLearner, Params, TaskSpec
from metalstm.meta.base import LossFn, MetaLearner, MetaOutput


@dataclass
class MAMLConfig:
    inner_lr: float = 0.01
    inner_steps: int = 1  # adaptation steps in meta-training
    test_inner_steps: int = 10  # adaptation steps at validation and test
    first_order: bool = False


class MAML(MetaLearner):
    def __init__(self, learner: BaseLearner, loss_fn: LossFn, spec: TaskSpec, cfg: MAMLConfig):
        super().__init__(learner, loss_fn, spec)
        if cfg.inner_lr <= 0:
            raise ConfigError(f"meta_learner.inner_lr={cfg.inner_lr} must be positive.")
        if cfg.inner_steps < 0 or cfg.test_inner_steps < 0:
            raise ConfigError("meta_learner.inner_steps and test_inner_steps must be >= 0.")
        self.cfg = cfg

    def adapt(self, params: Params, x: Tensor, y: Tensor, steps: int, create_graph: bool) -> Params:
        """``steps`` SGD steps on one task's support set (x [n, ...], y [n(, out)])."""
        for _ in range(steps):
            loss = self.loss_fn(self.learner.forward_with(params, x), y)
            grads = torch.autograd.grad(loss, list(params.values()), create_graph=create_graph)
            params = {name: p - self.cfg.inner_lr * g for (name, p), g in zip(params.items(), grads)}
        return params

    def meta_loss(self, batch: EpisodeBatch) -> MetaOutput:
        theta = self.learner.params()
        losses, outputs = [], []
        for sx, sy, qx, qy in zip(*batch):
            phi = self.adapt(theta, sx, sy, self.cfg.inner_steps, create_graph=not self.cfg.first_order)
            out = self.learner.forward_with(phi, qx)
            losses.append(self.loss_fn(out, qy))
            outputs.append(out)
        return MetaOutput(torch.stack(losses).mean(), torch.stack(outputs).detach())

    def predict(self, batch: EpisodeBatch) -> Tensor:
        theta = {k: v.detach().requires_grad_() for k, v in self.learner.params().items()}
        outputs = []
        for sx, sy, qx, _ in zip(*batch):
            phi = self.adapt(theta, sx, sy, self.cfg.test_inner_steps, create_graph=False)
            with torch.no_grad():
                outputs.append(self.learner.forward_with(phi, qx))
        return torch.stack(outputs)
