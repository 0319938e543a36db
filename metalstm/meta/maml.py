"""MAML (Finn et al. 2017), first-order MAML, and the MAML++ options (Antoniou et al. 2019).

Inner loop, per task i, from the meta-learned initialisation theta:
    phi_0 = theta,   phi_{s+1} = phi_s - alpha_s * grad_phi L_support_i(phi_s)
Outer loop: theta <- theta - meta_lr * grad_theta  mean_i L_query_i(phi_S).
Second order differentiates through every grad_phi; first order
(FOMAML) treats each inner gradient as a constant, so d phi_S / d theta = I.

MAML++ options, each off by default:
- multi_step_loss: the query loss after every inner step, sum_s w_s L_query(phi_s); the weights
  start uniform and anneal over the first ``msl_fraction`` of training onto the last step.
- learned_lr: "per_layer_per_step" (LSLR: one learned alpha per parameter tensor and step) or
  "per_parameter" (Meta-SGD, Li et al. 2017: an alpha the shape of each parameter).
- per_step_bn: BatchNorm weights and biases learned separately for each of the S+1 forward passes
  (steps 0..S; not adapted in the inner loop); test steps beyond S reuse the last.
- first_order_until: first-order gradients for this fraction of training, second order after.

Which parameters the inner loop adapts is ``adapted_names`` (option ``adapt``): ``all`` (MAML), or
``head``, the last layer alone (ANIL, Raghu et al. 2020: the body is meta-learned but frozen per task).
"""
from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from functools import partial
from typing import Any, ClassVar

import torch
from torch import Tensor, nn
from torch.func import grad, vmap

from metalstm.config import choice, count, fraction, positive
from metalstm.core import EpisodeBatch, TaskSpec
from metalstm.errors import ConfigError
from metalstm.learners.base import BaseLearner, Params, in_tasks_vmap, recomputed_activations, tasks_vmapped
from metalstm.meta.base import GradientInForward, LossFn, MetaConfig, MetaLearner, MetaOutput, key

LEARNED_LR = ("none", "per_layer_per_step", "per_parameter")
VECTORIZE = ("auto", "vmap", "loop", "grouped")
ADAPT = ("all", "head")
log = logging.getLogger(__name__)


@dataclass
class MAMLConfig(MetaConfig):
    """Defaults: the paper's sinusoid settings, second order, every MAML++ option off."""

    inner_lr: float = positive(0.01)
    inner_steps: int = count(1, minimum=0)  # adaptation steps in meta-training
    test_inner_steps: int = count(10, minimum=0)  # adaptation steps at validation and test
    first_order: bool = False
    multi_step_loss: bool = False
    msl_fraction: float = fraction(0.1, exclusive=True)  # of meta-training over which the multi-step weights anneal
    learned_lr: str = choice("none", LEARNED_LR)  # none | per_layer_per_step (LSLR) | per_parameter (Meta-SGD)
    per_step_bn: bool = False
    first_order_until: float = fraction(0.0)  # fraction of meta-training run first-order
    adapt: str = choice("all", ADAPT)  # all (MAML) | head: the inner loop adapts the last layer only (ANIL)
    # vmap: a meta-batch's tasks adapt together (torch.func.vmap); loop: one task at a time; grouped: the support
    # sets adapt together through the learner's forward_tasks (Conv-4: grouped convolutions), the query sets one task
    # at a time; auto: vmap, grouped for Conv-4 on a CPU, loop with BatchNorm running statistics
    # (measured, docs/performance.md). Same meta-gradient.
    vectorize: str = choice("auto", VECTORIZE)
    # tasks whose graphs are held at once: the meta-gradient is taken chunk by chunk as the meta-loss is computed
    # (the same gradient; memory follows the chunk, not the meta-batch). 0: auto, one task at a time with loop, 4 with
    # grouped (W1 on a CPU: about 3 % slower than 8, 491 against 553 MiB, below the peer loop's 506-527; W2 834 MiB
    # against 1.4 GB; docs/performance.md), the whole meta-batch with vmap.
    # Validation and test adapt the same number of tasks at a time
    task_chunk: int = count(0, minimum=0)
    # second order without storing the inner loop: each step's activations are recomputed in the meta-backward, one
    # step at a time (CheckpointedStep; the same meta-gradient). Memory: one inner step's graph instead of all of
    # them, for about one more support forward and backward per step. Runs loop or grouped (vmap: grouped)
    checkpoint_inner: bool = False
    # the query pass stores each block's output only (Conv-4 with batch statistics: RecomputedBody),
    # recomputing the rest in its backward, a chunk of images at a time; the same meta-gradient. Memory: W2's query
    # pass (300 images) holds a few MB instead of ~230 MB, for about one more convolution forward per block
    checkpoint_query: bool = False
    RECOMPUTE: ClassVar[tuple[str, ...]] = ("checkpoint_inner", "checkpoint_query")  # recomputation for memory (memory_plan)


class QueryLoss(torch.autograd.Function):
    """``task(t, *values)`` -> (loss, outputs) of one task (``stacked``: values [T, ...], task t reads row t; else
    one task, t None), whose gradient w.r.t. ``values`` is computed in the forward, task by task: the query
    graph is freed before the next task's forward, and the meta-backward only scales the stored gradient.
    Exact: the query loss is differentiated once (phi -> loss); the second-order part is phi's own graph."""

    @staticmethod
    def forward(ctx: Any, task: Callable[..., tuple[Tensor, Tensor]], stacked: bool,
                *values: Tensor) -> tuple[Tensor, Tensor]:
        losses, outputs, grads = [], [], []
        for t in range(values[0].shape[0]) if stacked else [None]:
            with torch.enable_grad():
                leaves = [(v if t is None else v[t]).detach().requires_grad_(v.requires_grad) for v in values]
                loss, out = task(t, *leaves)
                wanted = [leaf for leaf in leaves if leaf.requires_grad]
                found = iter(torch.autograd.grad(loss, wanted, materialize_grads=True) if wanted else [])
                grads.append([next(found) if leaf.requires_grad else None for leaf in leaves])
            losses.append(loss.detach())
            outputs.append(out.detach())
        ctx.grads = [None if per_value[0] is None else torch.stack(per_value) if stacked else per_value[0]
                     for per_value in zip(*grads)]
        loss, out = (torch.stack(losses), torch.stack(outputs)) if stacked else (losses[0], outputs[0])
        ctx.mark_non_differentiable(out)
        return loss, out

    @staticmethod
    def backward(ctx: Any, grad_loss: Tensor, _: Tensor) -> tuple[Tensor | None, ...]:
        # grad_loss: a scalar, or [T] (task t's gradient is in row t of each value)
        return None, None, *(None if g is None else g * grad_loss.reshape(*grad_loss.shape, *[1] * (g.dim() - grad_loss.dim()))
                             for g in ctx.grads)


class CheckpointedStep(torch.autograd.Function):
    """One second-order inner step, phi_{s+1} = step(phi_s, create_graph), that stores no graph: the forward runs
    the step without one and keeps phi_s; the backward recomputes it with its graph (support forward, gradient,
    update) and differentiates it w.r.t. phi_s and the meta-parameters ``params`` the step reads (learned step
    sizes, per-step BatchNorm weights, the weights it does not adapt). Exact: the same operations, twice."""

    @staticmethod
    def forward(ctx: Any, step: Callable[[list[Tensor], bool], list[Tensor]], num_phi: int,
                *inputs: Tensor) -> tuple[Tensor, ...]:
        phi = inputs[:num_phi]
        ctx.step, ctx.params = step, inputs[num_phi:]
        ctx.save_for_backward(*phi)
        with torch.enable_grad():
            new = step([p.detach().requires_grad_() for p in phi], False)
        return tuple(p.detach() for p in new)

    @staticmethod
    def backward(ctx: Any, *grad_new: Tensor) -> tuple[Tensor | None, ...]:
        phi = [p.detach().requires_grad_() for p in ctx.saved_tensors]
        params = [p for p in ctx.params if p.requires_grad]
        with torch.enable_grad():
            new = ctx.step(phi, True)
            # retain_graph: the step may read views (theta stacked over tasks) made outside it, in the meta-loss's graph
            grads = iter(torch.autograd.grad(new, phi + params, grad_new, retain_graph=True, allow_unused=True))
        grad_phi = [next(grads) for _ in phi]
        return None, None, *grad_phi, *(next(grads) if p.requires_grad else None for p in ctx.params)


class MAML(MetaLearner):
    running_norm = True  # adapts one task at a time when BatchNorm keeps running statistics (vectorize_mode)

    def __init__(self, learner: BaseLearner, loss_fn: LossFn, spec: TaskSpec, cfg: MAMLConfig):
        super().__init__(learner, loss_fn)
        self.cfg = cfg
        self.vmap_checked = self.vmap_failed = False  # vmap tried once; a learner it cannot batch falls back
        self.tasks_stacked = False  # set while a meta-batch adapts as one (vectorize=grouped)
        params = learner.params()
        self.norm_names = {f"{m}.{p}" for m, mod in learner.named_modules()
                           if isinstance(mod, nn.modules.batchnorm._BatchNorm) for p in ("weight", "bias")}
        if cfg.per_step_bn and not self.norm_names:
            raise ConfigError("meta_learner.per_step_bn=true needs a base learner with BatchNorm (e.g. conv4 norm=batch).")
        if cfg.vectorize in ("vmap", "grouped") and learner.bn_policy == "running":
            raise ConfigError(f"meta_learner.vectorize={cfg.vectorize} adapts the tasks of a meta-batch together, but "
                              "BatchNorm running statistics are shared by all tasks and updated one forward at a time; "
                              "use meta_learner.vectorize=loop (or auto), or base_learner.norm=batch.")
        if cfg.checkpoint_inner and cfg.vectorize == "vmap":
            raise ConfigError("meta_learner.checkpoint_inner=true recomputes each inner step outside torch.func's "
                              "transforms, which vectorize=vmap runs the whole task under; use meta_learner.vectorize="
                              "grouped (the support sets still adapt together) or auto.")
        steps = max(cfg.inner_steps, 1)
        self.step_norms = nn.ParameterDict(
            {key(n): nn.Parameter(params[n].detach().clone().expand(steps + 1, *params[n].shape).clone())
             for n in sorted(self.norm_names)} if cfg.per_step_bn else {}
        )
        self.adapted = self.adapted_names(params)
        if cfg.learned_lr == "per_layer_per_step":
            self.inner_lrs = nn.ParameterDict({key(n): nn.Parameter(torch.full((steps,), cfg.inner_lr)) for n in self.adapted})
        elif cfg.learned_lr == "per_parameter":
            self.inner_lrs = nn.ParameterDict(
                {key(n): nn.Parameter(torch.full_like(params[n], cfg.inner_lr)) for n in self.adapted}
            )

    def adapted_names(self, params: Params) -> list[str]:
        """The parameters the inner loop adapts; the others are meta-learned and shared by every task."""
        names = [n for n in params if not (self.cfg.per_step_bn and n in self.norm_names)]
        return [n for n in names if n in self.learner.head_names()] if self.cfg.adapt == "head" else names

    def step_size(self, name: str, step: int) -> Tensor | float:
        if self.cfg.learned_lr == "per_layer_per_step":
            lrs = self.inner_lrs[key(name)]
            return lrs[min(step, len(lrs) - 1)]
        if self.cfg.learned_lr == "per_parameter":
            return self.inner_lrs[key(name)]
        return self.cfg.inner_lr

    def with_step_norms(self, params: Params, step: int, tasks: int | None = None) -> Params:
        """params with the BatchNorm weights and biases of inner step ``step`` (per_step_bn), repeated for
        ``tasks`` tasks when the params are stacked over tasks."""
        if not self.cfg.per_step_bn:
            return params
        last = self.step_norms[key(next(iter(self.norm_names)))].shape[0] - 1
        norms = {n: self.step_norms[key(n)][min(step, last)] for n in self.norm_names}
        return {**params, **({n: p.expand(tasks, *p.shape) for n, p in norms.items()} if tasks else norms)}

    def support_loss(self, adapted: Params, params: Params, x: Tensor, y: Tensor, step: int) -> Tensor:
        """One task's support loss; with ``tasks_stacked`` params [T, ...] and x [T, n, ...], the sum of the
        T tasks' losses (so each task's gradient is its own)."""
        params = {**params, **adapted}
        if self.tasks_stacked:
            outputs = self.learner.forward_tasks(self.with_step_norms(params, step, x.shape[0]), x, y)
            return vmap(self.loss_fn)(outputs, y).sum()
        return self.loss_fn(self.learner.forward_with(self.with_step_norms(params, step), x, y), y)

    def query_forward(self, phi: Params, x: Tensor, step: int, targets: Tensor | None = None) -> Tensor:
        """One task's query outputs after ``step`` inner steps (``targets``: teacher forcing in meta-training, see
        ``forward_with``); with ``tasks_stacked``, each task's in turn, stacked [T, n, out]: a task's query set is
        batch enough to run the kernels near their peak."""
        if self.tasks_stacked:
            return torch.stack([self.learner.forward_with(self.with_step_norms({n: p[t] for n, p in phi.items()}, step),
                                                          x[t], None if targets is None else targets[t])
                                for t in range(x.shape[0])])
        return self.learner.forward_with(self.with_step_norms(phi, step), x, targets)

    def query_loss(self, phi: Params, x: Tensor, y: Tensor, step: int) -> tuple[Tensor, Tensor]:
        """Meta-training's query loss after ``step`` inner steps and the query outputs [(T,) n, out]: one task's, or
        with ``tasks_stacked`` each task's [T]. Outside vmap the loss's gradient w.r.t. phi is taken here, task by
        task (``QueryLoss``), so a query set's graph lives only while its own forward and backward run."""
        if in_tasks_vmap():
            out = self.query_forward(phi, x, step, y)
            return self.loss_fn(out, y), out
        phi = self.with_step_norms(phi, step, x.shape[0] if self.tasks_stacked else None)
        names = list(phi)

        def task(t: int | None, *values: Tensor) -> tuple[Tensor, Tensor]:
            qx, qy = (x, y) if t is None else (x[t], y[t])
            with recomputed_activations() if self.cfg.checkpoint_query else nullcontext():
                out = self.learner.forward_with(dict(zip(names, values)), qx, qy)
            return self.loss_fn(out, qy), out

        return QueryLoss.apply(task, self.tasks_stacked, *phi.values())

    def adapt(self, params: Params, x: Tensor, y: Tensor, steps: int, first_order: bool,
              query: tuple[Tensor, Tensor] | None = None) -> tuple[Params, list[Tensor]]:
        """``steps`` gradient steps on one task's support set (x [n, ...], y [n(, out)]), or on every task's
        at once when ``tasks_stacked`` (params [T, ...], x [T, n, ...]).

        Returns phi_S and, when ``query`` (x, y) is given, the query losses and outputs after every step (MSL).
        The graph of each inner gradient is kept (second order) unless ``first_order``.
        """
        adapted = {n: params[n] for n in self.adapted}
        query_losses = []
        checkpoint = self.cfg.checkpoint_inner and not first_order and torch.is_grad_enabled() and not in_tasks_vmap()
        meta_params = [p for p in self.parameters() if p.requires_grad] if checkpoint else []
        for step in range(steps):
            if checkpoint:
                names, stacked = list(adapted), self.tasks_stacked

                def update(values: list[Tensor], create_graph: bool, step: int = step) -> list[Tensor]:
                    with self.stacking(stacked):  # also when the meta-backward recomputes the step
                        loss = self.support_loss(dict(zip(names, values)), params, x, y, step)
                    grads = torch.autograd.grad(loss, values, create_graph=create_graph)
                    return [p - self.step_size(n, step) * g for n, p, g in zip(names, values, grads)]

                adapted = dict(zip(names, CheckpointedStep.apply(update, len(names), *adapted.values(), *meta_params)))
            else:
                if in_tasks_vmap():  # functorch's grad: per task under vmap
                    grads = grad(self.support_loss)(adapted, params, x, y, step)
                    grads = {n: g.detach() for n, g in grads.items()} if first_order else grads
                else:  # plain autograd: less dispatch overhead per op than functorch's transforms
                    loss = self.support_loss(adapted, params, x, y, step)
                    grads = dict(zip(adapted, torch.autograd.grad(loss, list(adapted.values()),
                                                                  create_graph=not first_order)))
                adapted = {n: p - self.step_size(n, step) * grads[n] for n, p in adapted.items()}
            if query is not None:
                query_losses.append(self.query_loss({**params, **adapted}, *query, step + 1))
        return {**params, **adapted}, query_losses

    def step_weights(self, steps: int) -> Tensor:
        """Multi-step loss weights: uniform at the start, annealed onto the last step."""
        t = min(self.progress / self.cfg.msl_fraction, 1.0)
        non_final = (1.0 / steps) * (1 - t) + (0.03 / steps) * t
        weights = torch.full((steps,), non_final)
        weights[-1] = 1.0 - non_final * (steps - 1)
        return weights

    def task_loss(self, theta: Params, weights: Tensor | None, first_order: bool,
                  sx: Tensor, sy: Tensor, qx: Tensor, qy: Tensor) -> tuple[Tensor, Tensor]:
        """One task: adapt theta on its support set; its query loss and query outputs [n_query, out].
        ``weights``: the multi-step loss weights, or None to score the last step only. With ``tasks_stacked``,
        every task at once: theta stacked [T, ...], the data [T, n, ...]; the losses [T] and outputs [T, n, out]."""
        steps = self.cfg.inner_steps
        phi, per_step = self.adapt(theta, sx, sy, steps, first_order, query=None if weights is None else (qx, qy))
        if weights is not None:
            return sum(w * loss for w, (loss, _) in zip(weights, per_step)), per_step[-1][1]
        return self.query_loss(phi, qx, qy, steps)

    @contextmanager
    def stacking(self, stacked: bool) -> Iterator[None]:
        """``tasks_stacked`` set to ``stacked`` inside, restored after."""
        previous, self.tasks_stacked = self.tasks_stacked, stacked
        try:
            yield
        finally:
            self.tasks_stacked = previous

    def vectorize_mode(self, x: Tensor) -> str:
        """``cfg.vectorize`` with ``auto`` resolved for the device of ``x``: vmap, grouped or loop."""
        if self.cfg.vectorize != "auto":
            return self.cfg.vectorize
        if self.learner.bn_policy == "running":
            return "loop"  # running statistics are updated in place, one forward at a time
        if self.cfg.checkpoint_inner and (x.is_cuda or self.learner.cpu_vectorize == "vmap"):
            return "grouped"  # the support sets adapt together outside vmap, where a step can be recomputed
        return "vmap" if x.is_cuda else self.learner.cpu_vectorize

    def over_tasks(self, fn: Callable[..., Any], batch: EpisodeBatch) -> Any:
        """``fn(support_x, support_y, query_x, query_y)`` of every task, stacked over the batch: all tasks at
        once with ``vmap``, one at a time with ``loop``, or with ``grouped`` one call on the whole batch (``fn``
        then gets the meta-batch's tensors [T, ...] and ``tasks_stacked`` is set)."""
        mode = self.vectorize_mode(batch.support_x)
        if mode == "grouped":
            with self.stacking(True):
                return fn(*batch)
        if mode == "vmap" and not self.vmap_failed:
            try:
                with tasks_vmapped():
                    result = vmap(fn)(*batch)
                self.vmap_checked = True
                return result
            except RuntimeError as error:
                if self.vmap_checked:
                    raise
                self.vmap_failed = True
                log.warning("maml: vmap cannot vectorise this base learner (%s); adapting one task at a time.",
                            str(error).splitlines()[0])
        results = [fn(*task) for task in zip(*batch)]
        if isinstance(results[0], tuple):
            return tuple(torch.stack(parts) for parts in zip(*results))
        return torch.stack(results)

    def theta(self, batch: EpisodeBatch, detach: bool = False) -> Params:
        """The meta-learned initialisation, stacked over the batch's tasks (as views) when they adapt together."""
        theta = self.learner.params()
        if detach:
            theta = {n: p.detach().requires_grad_() for n, p in theta.items()}
        if self.vectorize_mode(batch.support_x) == "grouped":
            theta = {n: p.expand(batch.num_tasks, *p.shape) for n, p in theta.items()}
        return theta

    def task_chunk(self, batch: EpisodeBatch) -> int:
        """How many of the batch's tasks hold their graphs at once (``cfg.task_chunk``, auto resolved)."""
        if self.cfg.task_chunk:
            return min(self.cfg.task_chunk, batch.num_tasks)
        mode = self.vectorize_mode(batch.support_x)
        return {"loop": 1, "grouped": min(4, batch.num_tasks)}.get(mode, batch.num_tasks)

    def meta_loss(self, batch: EpisodeBatch) -> MetaOutput:
        steps = self.cfg.inner_steps
        first_order = self.cfg.first_order or self.progress < self.cfg.first_order_until
        weights = self.step_weights(steps) if self.cfg.multi_step_loss and steps > 1 else None

        def chunk(rows: EpisodeBatch) -> tuple[Tensor, Tensor]:  # the chunk's share of the mean loss, its outputs
            losses, outputs = self.over_tasks(partial(self.task_loss, self.theta(rows), weights, first_order), rows)
            return losses.sum() / batch.num_tasks, outputs

        chunks = self.chunks(batch)
        if len(chunks) == 1:
            loss, outputs = chunk(batch)
        else:
            loss, outputs = GradientInForward.apply(chunks, chunk, *(p for p in self.parameters() if p.requires_grad))
        return MetaOutput(loss, outputs.detach())

    def chunks(self, batch: EpisodeBatch) -> list[EpisodeBatch]:
        """The batch in runs of ``task_chunk`` tasks, which adapt together."""
        size = self.task_chunk(batch)
        return [EpisodeBatch(*(t[i : i + size] for t in batch)) for i in range(0, batch.num_tasks, size)]

    def predict(self, batch: EpisodeBatch) -> Tensor:
        """Query outputs after ``test_inner_steps``, ``task_chunk`` tasks at a time: an evaluation batch
        (data.eval_batch_size tasks, each with eval_query examples per class) holds no more than a training step's
        chunk in memory at once."""
        steps = self.cfg.test_inner_steps

        def task(theta: Params, sx: Tensor, sy: Tensor, qx: Tensor, qy: Tensor) -> Tensor:
            phi, _ = self.adapt(theta, sx, sy, steps, first_order=True)
            with torch.no_grad():
                return self.query_forward(phi, qx, steps)

        return torch.cat([self.over_tasks(partial(task, self.theta(rows, detach=True)), rows)
                          for rows in self.chunks(batch)])
