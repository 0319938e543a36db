"""LSTM optimizers: a coordinate-wise LSTM that learns how to update the base learner.

Every parameter coordinate is one row of a batch that shares the LSTM's weights. Gradients and
losses enter as inputs, preprocessed as in Andrychowicz et al. (2016), p = 10:
    x -> (log|x| / p, sign x)   if |x| >= e^-p,   else (-1, e^p x).
They are detached: second derivatives through the learner's gradients are dropped (both papers),
unless ``second_order`` (ravi): the LSTM's inputs stay constants, but the gradient in
theta_t = f_t * theta_{t-1} - i_t * grad_t keeps its graph, so theta_0 gets MAML's meta-gradient.

variant="ravi" (Ravi & Larochelle 2017): the cell state *is* the learner's parameters,
    i_t = sigmoid(W_I [h_t, theta_{t-1}, i_{t-1}] + b_I)        learned step size
    f_t = sigmoid(W_F [h_t, theta_{t-1}, f_{t-1}] + b_F)        learned decay
    theta_t = f_t * theta_{t-1} - i_t * grad_t
with h_t from a first LSTM over (loss, grad), b_F large and b_I small so it starts as plain SGD,
and a learned initial theta_0.

variant="andrychowicz" (Andrychowicz et al. 2016): a 2-layer LSTM maps the gradient to the update,
    theta_t = theta_{t-1} + output_scale * W h_t,
unrolled over the inner steps, backpropagating through the last ``truncation`` of them.
Each variant is an ``UpdateRule`` (a new rule is one class and one ``UPDATE_RULES`` entry).
Both learn theta_0 when ``learn_init`` (the few-shot setting); the meta-loss is the query loss
after the last inner step. The tasks of a meta-batch run together: their coordinates are rows of
one LSTM batch and their support gradients come from one ``vmap(grad(...))``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.func import vmap

from metalstm.config import choice, count, positive
from metalstm.core import EpisodeBatch
from metalstm.learners.base import Params
from metalstm.meta.base import MetaConfig, MetaLearner, MetaOutput
from metalstm.meta.fused_lstm import FusedLSTMCell, row_product

State = tuple[Tensor | None, ...]  # None: an LSTM's zero initial (h, c), which FusedLSTMCell skips
PREDICT_ROWS = 2**21  # coordinates (of all tasks) per learned-optimizer batch at meta-test


def preprocess(x: Tensor, p: float) -> Tensor:
    """[...] -> [..., 2]: scale-free (log magnitude, sign) features of gradients and losses."""
    big = x.abs() >= math.exp(-p)
    magnitude = torch.where(big, x.abs().clamp(min=1e-30).log() / p, torch.full_like(x, -1.0))
    sign = torch.where(big, x.sign(), x * math.exp(p))
    return torch.stack([magnitude, sign], -1)


class UpdateRule(nn.Module):
    """One learned step of every coordinate at once: theta [n], its loss [n] (each coordinate carries its
    task's support loss) and gradient [n] (both constants) -> the next theta [n] and the rule's state."""

    def initial_state(self, n: int, like: Tensor) -> State:
        raise NotImplementedError

    def forward(self, theta: Tensor, loss: Tensor, grad: Tensor, state: State, step: int) -> tuple[Tensor, State]:
        raise NotImplementedError

    def gates(self, state: State) -> dict[str, Tensor]:
        """The rule's interpretable per-coordinate quantities after a step ([n] each), by name; none by default."""
        return {}


class RaviUpdate(UpdateRule):
    """The cell state is the parameters: theta_t = f_t * theta_{t-1} - i_t * grad_t, with the gates
    computed from h_t (an LSTM over the loss and gradient features), theta_{t-1} and the previous gate."""

    def __init__(self, cfg: LSTMOptimizerConfig):
        super().__init__()
        self.hidden, self.p = cfg.hidden, cfg.preprocess_p
        self.input_lstm = FusedLSTMCell(4, cfg.hidden)  # (loss, grad) features -> h_t
        self.w_input = nn.Parameter(torch.empty(cfg.hidden + 2).uniform_(-0.01, 0.01))
        self.w_forget = nn.Parameter(torch.empty(cfg.hidden + 2).uniform_(-0.01, 0.01))
        self.b_input = nn.Parameter(torch.empty(1).uniform_(*cfg.input_bias_init))
        self.b_forget = nn.Parameter(torch.empty(1).uniform_(*cfg.forget_bias_init))

    def initial_state(self, n: int, like: Tensor) -> State:
        return None, None, like.new_zeros(n), like.new_zeros(n)  # h, c (zero), i_{t-1}, f_{t-1}

    def forward(self, theta: Tensor, loss: Tensor, grad: Tensor, state: State, step: int) -> tuple[Tensor, State]:
        h, c, i_prev, f_prev = state
        features = torch.cat([preprocess(loss.detach(), self.p), preprocess(grad.detach(), self.p)], -1)
        h, c = self.input_lstm(features, None if h is None else (h, c))
        # the gates' h_t terms for all rows in one product; their theta and previous-gate terms are per row
        from_h = row_product(h, torch.stack([self.w_input[: self.hidden], self.w_forget[: self.hidden]], 1))  # [n, 2]
        i = torch.sigmoid(from_h[:, 0] + theta * self.w_input[-2] + i_prev * self.w_input[-1] + self.b_input)
        f = torch.sigmoid(from_h[:, 1] + theta * self.w_forget[-2] + f_prev * self.w_forget[-1] + self.b_forget)
        return f * theta - i * grad, (h, c, i, f)

    def gates(self, state: State) -> dict[str, Tensor]:
        return {"input": state[2], "forget": state[3]}  # the learned step size and decay of every coordinate


class AndrychowiczUpdate(UpdateRule):
    """A 2-layer LSTM maps the gradient features to the update: theta_t = theta_{t-1} + scale * W h_t;
    gradients flow back through the last ``truncation`` steps only (all when None)."""

    def __init__(self, cfg: LSTMOptimizerConfig):
        super().__init__()
        self.hidden, self.p, self.scale, self.truncation = cfg.hidden, cfg.preprocess_p, cfg.output_scale, cfg.truncation
        self.lstm1 = FusedLSTMCell(2, cfg.hidden)
        self.lstm2 = FusedLSTMCell(cfg.hidden, cfg.hidden)
        self.out = nn.Linear(cfg.hidden, 1)
        nn.init.normal_(self.out.weight, std=1e-3)  # start with near-zero updates, then learn them
        nn.init.zeros_(self.out.bias)

    def initial_state(self, n: int, like: Tensor) -> State:
        return None, None, None, None  # (h, c) of both layers, zero

    def forward(self, theta: Tensor, loss: Tensor, grad: Tensor, state: State, step: int) -> tuple[Tensor, State]:
        if self.truncation and step and step % self.truncation == 0:
            theta, state = theta.detach(), tuple(s.detach() for s in state)
        first = state[0] is None
        h1, c1 = self.lstm1(preprocess(grad, self.p), None if first else state[:2])
        h2, c2 = self.lstm2(h1, None if first else state[2:])
        step = row_product(h2, self.out.weight.t()).squeeze(-1) + self.out.bias
        return theta + self.scale * step, (h1, c1, h2, c2)


UPDATE_RULES: dict[str, type[UpdateRule]] = {"ravi": RaviUpdate, "andrychowicz": AndrychowiczUpdate}


@dataclass
class LSTMOptimizerConfig(MetaConfig):
    variant: str = choice("ravi", UPDATE_RULES)  # the update rule: ravi | andrychowicz
    inner_steps: int = count(5)
    test_inner_steps: int = count(10, minimum=0)
    hidden: int = count(20)
    preprocess_p: float = positive(10.0)
    learn_init: bool = True  # meta-learn theta_0; otherwise every task starts from the initial draw
    # ravi: f ~ 1 keeps the parameters. Ravi's code draws b_F from U(4, 6), but at f = sigmoid(5) the first
    # step shrinks every parameter by 0.7%, which outweighs the gradient step of a Conv-4 (cosine 0.72 to
    # SGD); from U(8, 9) the first update is within 5% of an SGD step (tests/test_meta_learners.py).
    forget_bias_init: tuple[float, float] = (8.0, 9.0)
    input_bias_init: tuple[float, float] = (-5.0, -4.0)  # ravi: i ~ 0.01, a small SGD step
    output_scale: float = positive(0.1)  # andrychowicz
    truncation: int | None = count(None)  # andrychowicz: backprop through the last N inner steps (null: all)
    rule_lr_scale: float = positive(1.0)  # the update rule's meta learning rate, as a multiple of optim.meta_lr
    second_order: bool = False  # ravi: differentiate through the gradient in theta_t = f theta - i grad (as MAML)

    def check(self) -> None:
        for key in ("forget_bias_init", "input_bias_init"):
            low, high = getattr(self, key)
            if not low <= high:
                self.refuse(f"meta_learner.{key}=[{low}, {high}] must be a range [low, high] with low <= high.")
        if self.second_order and self.variant != "ravi":
            self.refuse(f"meta_learner.second_order=true needs variant=ravi: {self.variant}'s update sees the gradient "
                        "only through the LSTM's inputs, which stay constants. Drop second_order or use variant=ravi.")


class LSTMOptimizer(MetaLearner):
    def __init__(self, learner, loss_fn, spec, cfg: LSTMOptimizerConfig):
        super().__init__(learner, loss_fn)
        self.cfg = cfg
        self.shapes = {k: v.shape for k, v in learner.params().items()}
        if not cfg.learn_init:
            learner.requires_grad_(False)
        self.update = UPDATE_RULES[cfg.variant](cfg)

    def outer_optimizer(self, meta_lr: float) -> torch.optim.Optimizer:
        """Adam over theta_0 at meta_lr and over the update rule at ``rule_lr_scale`` * meta_lr."""
        return torch.optim.Adam([{"params": self.learner.parameters()},
                                 {"params": self.update.parameters(), "lr": meta_lr * self.cfg.rule_lr_scale}], lr=meta_lr)

    # ------------------------------------------------------------------ flat parameter vectors

    def flat_init(self) -> Tensor:
        return torch.cat([p.flatten() for p in self.learner.params().values()])

    def unflatten(self, flat: Tensor) -> Params:
        """[..., P] -> parameter dict with the same leading dims."""
        sizes = [math.prod(s) for s in self.shapes.values()]
        chunks = flat.split(sizes, dim=-1)
        return {k: c.reshape(*flat.shape[:-1], *shape) for (k, shape), c in zip(self.shapes.items(), chunks)}

    def task_loss(self, flat: Tensor, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        loss = self.loss_fn(self.learner.forward_with(self.unflatten(flat), x, y), y)
        return loss, loss.detach()

    def support_gradients(self, theta: Tensor, x: Tensor, y: Tensor, keep_graph: bool = False) -> tuple[Tensor, Tensor]:
        """theta [tasks, P], support x [tasks, n, ...] -> loss [tasks] (a constant) and gradient [tasks, P], all
        tasks at once; the gradient is a constant too unless ``keep_graph`` (second order)."""
        grad, loss = vmap(torch.func.grad(self.task_loss, has_aux=True))(theta if keep_graph else theta.detach(), x, y)
        return loss, grad

    def query_outputs(self, theta: Tensor, x: Tensor, y: Tensor | None = None) -> Tensor:
        """theta [tasks, P], x [tasks, n, ...] -> outputs [tasks, n, out]; y: targets for teacher forcing."""
        if y is None:
            return vmap(lambda flat, xs: self.learner.forward_with(self.unflatten(flat), xs))(theta, x)
        return vmap(lambda flat, xs, ys: self.learner.forward_with(self.unflatten(flat), xs, ys))(theta, x, y)

    # ------------------------------------------------------------------ the learned update

    def optimize(self, x: Tensor, y: Tensor, steps: int, gates: dict[str, Tensor] | None = None,
                 losses: list[Tensor] | None = None) -> Tensor:
        """Run the learned optimizer for ``steps`` on a batch of support sets x [tasks, n, ...];
        returns theta_T [tasks, P]. Every coordinate of every task is one row of the rule's batch.
        ``gates``: filled with the mean and spread of the rule's gates per inner step and layer;
        ``losses``: appended with each task's support loss [tasks] before every step."""
        tasks = y.shape[0]
        theta = self.flat_init().expand(tasks, -1)
        state = self.update.initial_state(theta.numel(), theta)
        second_order = self.cfg.second_order and torch.is_grad_enabled()
        for step in range(steps):
            loss, grad = self.support_gradients(theta, x, y, keep_graph=second_order)
            if losses is not None:
                losses.append(loss)
            flat, state = self.update(theta.flatten(), loss.repeat_interleave(theta.shape[1]), grad.flatten(), state, step)
            theta = flat.view(tasks, -1)
            if gates is not None:
                gates.update(self.gate_summary(state, tasks, step))
        return theta

    def gate_summary(self, state: State, tasks: int, step: int) -> dict[str, Tensor]:
        """gates/<gate>/<layer>/step<t> (mean over the layer's coordinates of all tasks) and .../step<t>_std."""
        summary = {}
        for gate, values in self.update.gates(state).items():
            per_param = values.detach().view(tasks, -1).split([math.prod(s) for s in self.shapes.values()], 1)
            layers: dict[str, list[Tensor]] = {}
            for name, part in zip(self.shapes, per_param):
                layers.setdefault(name.rsplit(".", 1)[0], []).append(part.flatten())
            for layer, parts in layers.items():
                v = torch.cat(parts)
                summary[f"gates/{gate}/{layer}/step{step + 1}"] = v.mean()
                summary[f"gates/{gate}/{layer}/step{step + 1}_std"] = v.std(correction=0)
        return summary

    def meta_loss(self, batch: EpisodeBatch) -> MetaOutput:
        gates: dict[str, Tensor] | None = {} if self.diagnose else None
        theta = self.optimize(batch.support_x, batch.support_y, self.cfg.inner_steps, gates)
        outputs = self.query_outputs(theta, batch.query_x, batch.query_y)
        loss = torch.stack([self.loss_fn(o, y) for o, y in zip(outputs, batch.query_y)]).mean()
        return MetaOutput(loss, outputs.detach(), gates)

    def predict(self, batch: EpisodeBatch) -> Tensor:
        """Tasks in groups of at most ``PREDICT_ROWS`` coordinates: memory stays bounded whatever the eval
        batch size (50 Omniglot tasks of a 64-filter Conv-4 would be 5.6M rows, 1.8 GB of gates per step)."""
        group = max(1, PREDICT_ROWS // self.flat_init().numel())
        outputs = []
        with torch.no_grad():  # the support gradients are taken by torch.func.grad regardless
            for start in range(0, batch.num_tasks, group):
                part = EpisodeBatch(*(t[start : start + group] for t in batch))
                theta = self.optimize(part.support_x, part.support_y, self.cfg.test_inner_steps)
                outputs.append(self.query_outputs(theta, part.query_x))
        return torch.cat(outputs)
