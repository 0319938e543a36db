"""The sinusoid regression tasks of MAML (Finn et al. 2017): y = A sin(x - phase).

A ~ U[0.1, 5], phase ~ U[0, pi], x ~ U[-5, 5]; K support points, ``query`` held-out points.
Every split draws from the same distribution; val/test tasks are fixed by their seeds.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from metalstm.config import count, positive
from metalstm.core import EpisodeBatch, TaskSpec
from metalstm.data.episodes import EpisodeConfig


def check_intervals(cfg: EpisodeConfig, keys: tuple[str, ...]) -> None:
    for key in keys:
        low, high = getattr(cfg, key)
        if not low < high:
            cfg.refuse(f"data.{key}=[{low}, {high}] must be an interval [low, high] with low < high.")


@dataclass
class SinusoidConfig(EpisodeConfig):
    shots: int = count(10)  # K support points
    query: int = count(10)  # query points per task, meta-training
    eval_query: int = count(100)  # query points per task, validation and test
    amplitude: tuple[float, float] = (0.1, 5.0)
    phase: tuple[float, float] = (0.0, math.pi)
    x_range: tuple[float, float] = (-5.0, 5.0)
    meta_batch_size: int = count(25)
    eval_batch_size: int = count(100)

    def check(self) -> None:
        check_intervals(self, ("amplitude", "phase", "x_range"))

    def spec(self) -> TaskSpec:
        return {"task_type": "regression", "input_shape": (1,), "output_dim": 1}


class SinusoidTasks:
    task_type = "regression"

    def __init__(self, cfg: SinusoidConfig):
        self.cfg = cfg
        self.spec = cfg.spec()

    def sample(self, split: str, num_tasks: int, generator: torch.Generator) -> EpisodeBatch:
        c = self.cfg
        query = c.query if split == "train" else c.eval_query

        def uniform(shape: tuple[int, ...], bounds: tuple[float, float]) -> torch.Tensor:
            return torch.rand(shape, generator=generator) * (bounds[1] - bounds[0]) + bounds[0]

        amplitude = uniform((num_tasks, 1, 1), c.amplitude)
        phase = uniform((num_tasks, 1, 1), c.phase)
        x = uniform((num_tasks, c.shots + query, 1), c.x_range)
        y = amplitude * torch.sin(x - phase)
        return EpisodeBatch(x[:, : c.shots], y[:, : c.shots], x[:, c.shots :], y[:, c.shots :])

    def describe(self) -> dict:
        c = self.cfg
        return {"dataset": "sinusoid", "shots": c.shots, "query": c.query, "eval_query": c.eval_query,
                "amplitude": list(c.amplitude), "phase": list(c.phase), "x_range": list(c.x_range)}


@dataclass
class SinusoidSeqConfig(EpisodeConfig):
    """The sinusoid family as forecasting: see ``SinusoidSeqTasks``."""

    shots: int = count(5)  # K windows per task
    query: int = count(10)
    eval_query: int = count(20)
    window: int = count(5)  # points the encoder reads
    horizon: int = count(10)  # points the decoder predicts
    dt: float = positive(0.3)  # time between points; a window spans (window - 1) * dt
    amplitude: tuple[float, float] = (0.1, 5.0)
    phase: tuple[float, float] = (0.0, math.pi)
    t_range: tuple[float, float] = (-5.0, 5.0)  # where windows start
    meta_batch_size: int = count(25)
    eval_batch_size: int = count(100)

    def check(self) -> None:
        check_intervals(self, ("amplitude", "phase", "t_range"))

    def spec(self) -> TaskSpec:
        return {"task_type": "forecast", "input_shape": (self.window, 1), "output_dim": 1, "output_length": self.horizon}


class SinusoidSeqTasks:
    """y(t) = A sin(t - phase), read as windows: x [window, 1] of y at t0, t0 + dt, ...; the target
    [horizon, 1] is the next ``horizon`` points. A short window does not pin down A and the phase;
    the task's support windows do."""

    task_type = "forecast"

    def __init__(self, cfg: SinusoidSeqConfig):
        self.cfg = cfg
        self.spec = cfg.spec()

    def sample(self, split: str, num_tasks: int, generator: torch.Generator) -> EpisodeBatch:
        c = self.cfg
        n = c.shots + (c.query if split == "train" else c.eval_query)

        def uniform(shape: tuple[int, ...], bounds: tuple[float, float]) -> torch.Tensor:
            return torch.rand(shape, generator=generator) * (bounds[1] - bounds[0]) + bounds[0]

        amplitude, phase = uniform((num_tasks, 1, 1), c.amplitude), uniform((num_tasks, 1, 1), c.phase)
        t = uniform((num_tasks, n, 1), c.t_range) + torch.arange(c.window + c.horizon) * c.dt
        y = (amplitude * torch.sin(t - phase)).unsqueeze(-1)  # [tasks, n, window + horizon, 1]
        x, target = y[:, :, : c.window], y[:, :, c.window :]
        return EpisodeBatch(x[:, : c.shots], target[:, : c.shots], x[:, c.shots :], target[:, c.shots :])

    def describe(self) -> dict:
        c = self.cfg
        return {"dataset": "sinusoid_seq", "shots": c.shots, "query": c.query, "eval_query": c.eval_query,
                "window": c.window, "horizon": c.horizon, "dt": c.dt, "amplitude": list(c.amplitude),
                "phase": list(c.phase), "t_range": list(c.t_range)}
