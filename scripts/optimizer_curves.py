"""The learned optimizer against hand-designed ones (Andrychowicz et al. 2016, Figure 2): the training loss of
networks trained from the same initialisation on held-out tasks, step by step, by a meta-trained
``meta_learner=lstm_optimizer`` run and by SGD, Adam and RMSprop, each with its learning rate tuned on the
validation tasks (a grid of half decades, the best final loss).

    python scripts/optimizer_curves.py outputs/<run> [--tasks 100] [--steps 100] [--out <run>/optimizer_curves]

Writes curves.png and curves.json (mean and 95% CI of the loss per step, the tuned learning rates).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from metalstm.startup import stop_quietly_on_ctrl_c  # noqa: E402

stop_quietly_on_ctrl_c()  # exit 130, no traceback

import torch  # noqa: E402

from metalstm.data import DATASETS  # noqa: E402
from metalstm.errors import ConfigError, MetalstmError  # noqa: E402
from metalstm.files import write_json  # noqa: E402
from metalstm.inference import load_learner  # noqa: E402
from metalstm.meta.lstm_optimizer import LSTMOptimizer  # noqa: E402
from metalstm.report import pyplot, save_figure  # noqa: E402

HAND_DESIGNED = {"SGD": torch.optim.SGD, "Adam": torch.optim.Adam, "RMSprop": torch.optim.RMSprop}
LEARNING_RATES = [10 ** (k / 2) for k in range(-8, 2)]  # 1e-4 ... 3.16


def task_losses(meta: LSTMOptimizer, theta: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """theta [tasks, P], x [tasks, n, ...] -> each task's loss [tasks], all tasks at once."""
    return torch.func.vmap(lambda t, xs, ys: meta.task_loss(t, xs, ys)[0])(theta, x, y)


def hand_designed_losses(meta: LSTMOptimizer, name: str, lr: float, x: torch.Tensor, y: torch.Tensor,
                         steps: int) -> torch.Tensor:
    """[steps + 1, tasks]: each task's loss before every step (and after the last) of ``name`` from theta_0.
    The tasks train as one tensor [tasks, P]; the summed loss gives each task its own gradient."""
    theta = meta.flat_init().detach().expand(len(y), -1).clone().requires_grad_(True)
    optimizer = HAND_DESIGNED[name]([theta], lr=lr)
    losses = []
    for _ in range(steps + 1):
        loss = task_losses(meta, theta, x, y)
        losses.append(loss.detach())
        optimizer.zero_grad()
        loss.sum().backward()
        optimizer.step()
    return torch.stack(losses).nan_to_num(float("inf"))


def learned_losses(meta: LSTMOptimizer, x: torch.Tensor, y: torch.Tensor, steps: int) -> torch.Tensor:
    losses: list[torch.Tensor] = []
    with torch.no_grad():
        theta = meta.optimize(x, y, steps, losses=losses)
        final = task_losses(meta, theta, x, y)
    return torch.stack([*losses, final])


def summary(losses: torch.Tensor) -> dict[str, list[float]]:
    mean = losses.mean(1)
    ci = 1.96 * losses.std(1) / len(losses[0]) ** 0.5
    return {"mean": mean.tolist(), "ci95": ci.tolist()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", type=Path, help="a run folder (or checkpoint) of meta_learner=lstm_optimizer")
    parser.add_argument("--tasks", type=int, default=100, help="held-out (test) tasks, and as many to tune on")
    parser.add_argument("--steps", type=int, default=None, help="steps per optimizer (default: the run's test_inner_steps)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    try:
        learner = load_learner(args.run, device="cpu")
        meta = learner.module.meta_learner
        if not isinstance(meta, LSTMOptimizer):
            raise ConfigError(f"{args.run} is a run of meta_learner={learner.config['meta_learner']['name']}; "
                              f"optimizer curves compare a meta_learner=lstm_optimizer run with SGD, Adam and RMSprop.")
        data = DATASETS.parse(learner.config["data"])
        source = data.impl(data.config)
    except MetalstmError as error:
        print(f"metalstm error: {error}", file=sys.stderr)
        sys.exit(2)
    steps = args.steps or meta.cfg.test_inner_steps
    out = args.out or (args.run if args.run.is_dir() else args.run.parent.parent) / "optimizer_curves"
    tune = source.sample("val", args.tasks, torch.Generator().manual_seed(1))
    test = source.sample("test", args.tasks, torch.Generator().manual_seed(2))

    curves, tuned = {"LSTM (learned)": summary(learned_losses(meta, test.support_x, test.support_y, steps))}, {}
    for name in HAND_DESIGNED:
        final = {lr: float(hand_designed_losses(meta, name, lr, tune.support_x, tune.support_y, steps)[-1].mean())
                 for lr in LEARNING_RATES}
        tuned[name] = min(final, key=final.get)
        losses = hand_designed_losses(meta, name, tuned[name], test.support_x, test.support_y, steps)
        curves[f"{name} (lr {tuned[name]:.3g})"] = summary(losses)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "curves.json", {"run": str(args.run), "steps": steps, "tasks": args.tasks,
                                     "tuned_lr": tuned, "curves": curves})

    fig, ax = pyplot().subplots(figsize=(6.5, 4.2))
    for label, curve in curves.items():
        mean, ci = torch.tensor(curve["mean"]), torch.tensor(curve["ci95"])
        ax.plot(range(len(mean)), mean, label=label)
        ax.fill_between(range(len(mean)), (mean - ci).clamp(min=1e-6), mean + ci, alpha=0.15)
    ax.set_yscale("log")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(f"training loss (mean of {args.tasks} held-out tasks)")
    ax.set_title("Learned LSTM optimizer vs hand-designed ones, from the same initialisation", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    save_figure(fig, out / "curves.png")
    finals = ", ".join(f"{label} {curve['mean'][-1]:.4g}" for label, curve in curves.items())
    print(f"final training loss after {steps} steps: {finals}\nwritten: {out / 'curves.png'}, {out / 'curves.json'}")


if __name__ == "__main__":
    main()
