"""MAML (Finn et al. 2017), first-order MAML, and the MAML++ options (Antoniou et al. 2019).

Inner loop, per task i, from the meta-learned initialisation theta:
    phi_0 = theta,   phi_{s+1} = phi_s - alpha_s * grad_phi L_support_i(phi_s)
Outer loop: theta <- theta - meta_lr * grad_theta  mean_i L_query_i(phi_S).
Second order differentiates through every grad_phi (create_graph=True); first order
(FOMAML) treats each inner gradient as a constant, so d phi_S / d theta = I.

MAML++ options, each off by default:
- multi_step_loss: the query loss after every inner step, sum_s w_s L_query(phi_s); the weights
  start uniform and anneal over the first ``msl_fraction`` of training onto the last step.
- learned_lr: "per_layer_per_step" (LSLR: one learned alpha per parameter tensor and step) or
  "per_parameter" (Meta-SGD, Li et al. 2017: an alpha the shape of each parameter).
- per_step_bn: BatchNorm weights and biases learned separately for each of the S+1 forward passes
  (steps 0..S; not adapted in the inner loop); test steps beyond S reuse the last.
- first_order_until: first-order gradients for this fraction of training, second order after.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from metalstm.data.episodes import EpisodeBatch
from metalstm.errors import ConfigError
from metalstm.learners.base import BaseLearner, Params, TaskSpec
from metalstm.meta.base import LossFn, MetaLearner, MetaOutput

LEARNED_LR = ("none", "per_layer_per_step", "per_parameter")


@dataclass
class MAMLConfig:
    inner_lr: float = 0.01
    inner_steps: int = 1  # adaptation steps in meta-training
    test_inner_steps: int = 10  # adaptation steps at validation and test
    first_order: bool = False
    multi_step_loss: bool = False
    msl_fraction: float = 0.1  # of meta-training over which the multi-step weights anneal
    learned_lr: str = "none"  # none | per_layer_per_step (LSLR) | per_parameter (Meta-SGD)
    per_step_bn: bool = False
    first_order_until: float = 0.0  # fraction of meta-training run first-order


def key(name: str) -> str:
    return name.replace(".", "-")  # ParameterDict keys cannot hold dots


class MAML(MetaLearner):
    def __init__(self, learner: BaseLearner, loss_fn: LossFn, spec: TaskSpec, cfg: MAMLConfig):
        super().__init__(learner, loss_fn)
        if cfg.inner_lr <= 0:
            raise ConfigError(f"meta_learner.inner_lr={cfg.inner_lr} must be positive.")
        if cfg.inner_steps < 0 or cfg.test_inner_steps < 0:
            raise ConfigError("meta_learner.inner_steps and test_inner_steps must be >= 0.")
        if cfg.learned_lr not in LEARNED_LR:
            raise ConfigError(f"meta_learner.learned_lr={cfg.learned_lr!r}; choose one of {list(LEARNED_LR)}.")
        if not 0 < cfg.msl_fraction <= 1 or not 0 <= cfg.first_order_until <= 1:
            raise ConfigError("meta_learner.msl_fraction must be in (0, 1] and first_order_until in [0, 1].")
        self.cfg = cfg
        params = learner.params()
        self.norm_names = {f"{m}.{p}" for m, mod in learner.named_modules()
                           if isinstance(mod, nn.modules.batchnorm._BatchNorm) for p in ("weight", "bias")}
        if cfg.per_step_bn and not self.norm_names:
            raise ConfigError("meta_learner.per_step_bn=true needs a base learner with BatchNorm (e.g. conv4 norm=batch).")
        steps = max(cfg.inner_steps, 1)
        self.step_norms = nn.ParameterDict(
            {key(n): nn.Parameter(params[n].detach().clone().expand(steps + 1, *params[n].shape).clone())
             for n in sorted(self.norm_names)} if cfg.per_step_bn else {}
        )
        self.adapted = [n for n in params if not (cfg.per_step_bn and n in self.norm_names)]
        if cfg.learned_lr == "per_layer_per_step":
            self.inner_lrs = nn.ParameterDict({key(n): nn.Parameter(torch.full((steps,), cfg.inner_lr)) for n in self.adapted})
        elif cfg.learned_lr == "per_parameter":
            self.inner_lrs = nn.ParameterDict({key(n): nn.Parameter(torch.full_like(params[n], cfg.inner_lr)) for n in self.adapted})

    def step_size(self, name: str, step: int) -> Tensor | float:
        if self.cfg.learned_lr == "per_layer_per_step":
            lrs = self.inner_lrs[key(name)]
            return lrs[min(step, len(lrs) - 1)]
        if self.cfg.learned_lr == "per_parameter":
            return self.inner_lrs[key(name)]
        return self.cfg.inner_lr

    def with_step_norms(self, params: Params, step: int) -> Params:
        """params with the BatchNorm weights and biases of inner step ``step`` (per_step_bn)."""
        if not self.cfg.per_step_bn:
            return params
        last = self.step_norms[key(next(iter(self.norm_names)))].shape[0] - 1
        return {**params, **{n: self.step_norms[key(n)][min(step, last)] for n in self.norm_names}}

    def adapt(self, params: Params, x: Tensor, y: Tensor, steps: int, create_graph: bool,
              query: tuple[Tensor, Tensor] | None = None) -> tuple[Params, list[Tensor]]:
        """``steps`` gradient steps on one task's support set (x [n, ...], y [n(, out)]).

        Returns phi_S and, when ``query`` (x, y) is given, the query outputs after every step (for MSL).
        """
        query_outputs = []
        for step in range(steps):
            current = self.with_step_norms(params, step)
            loss = self.loss_fn(self.learner.forward_with(current, x, y), y)
            grads = torch.autograd.grad(loss, [params[n] for n in self.adapted], create_graph=create_graph)
            params = {**params, **{n: params[n] - self.step_size(n, step) * g for n, g in zip(self.adapted, grads)}}
            if query is not None:
                query_outputs.append(self.learner.forward_with(self.with_step_norms(params, step + 1), *query))
        return params, query_outputs

    def step_weights(self, steps: int) -> Tensor:
        """Multi-step loss weights: uniform at the start, annealed onto the last step."""
        t = min(self.progress / self.cfg.msl_fraction, 1.0)
        non_final = (1.0 / steps) * (1 - t) + (0.03 / steps) * t
        weights = torch.full((steps,), non_final)
        weights[-1] = 1.0 - non_final * (steps - 1)
        return weights

    def meta_loss(self, batch: EpisodeBatch) -> MetaOutput:
        theta = self.learner.params()
        steps = self.cfg.inner_steps
        first_order = self.cfg.first_order or self.progress < self.cfg.first_order_until
        multi_step = self.cfg.multi_step_loss and steps > 1
        losses, outputs = [], []
        for sx, sy, qx, qy in zip(*batch):
            phi, per_step = self.adapt(theta, sx, sy, steps, create_graph=not first_order,
                                       query=(qx, qy) if multi_step else None)
            if multi_step:
                losses.append(sum(w * self.loss_fn(out, qy) for w, out in zip(self.step_weights(steps), per_step)))
                out = per_step[-1]
            else:
                out = self.learner.forward_with(self.with_step_norms(phi, steps), qx, qy)
                losses.append(self.loss_fn(out, qy))
            outputs.append(out.detach())
        return MetaOutput(torch.stack(losses).mean(), torch.stack(outputs))

    def predict(self, batch: EpisodeBatch) -> Tensor:
        theta = {k: v.detach().requires_grad_() for k, v in self.learner.params().items()}
        steps = self.cfg.test_inner_steps
        outputs = []
        for sx, sy, qx, _ in zip(*batch):
            phi, _ = self.adapt(theta, sx, sy, steps, create_graph=False)
            with torch.no_grad():
                outputs.append(self.learner.forward_with(self.with_step_norms(phi, steps), qx))
        return torch.stack(outputs)
