"""The sinusoid regression tasks of MAML (Finn et al. 2017): y = A sin(x - phase).

A ~ U[0.1, 5], phase ~ U[0, pi], x ~ U[-5, 5]; K support points, ``query`` held-out points.
Every split draws from the same distribution; val/test tasks are fixed by their seeds.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from metalstm.data.episodes import EpisodeBatch
from metalstm.errors import ConfigError


def check(cfg: object, counts: tuple[str, ...], intervals: tuple[str, ...]) -> None:
    """Counts must be positive integers, intervals [low, high] with low < high."""
    for key in counts:
        if getattr(cfg, key) < 1:
            raise ConfigError(f"data.{key}={getattr(cfg, key)} must be a positive integer.")
    for key in intervals:
        low, high = getattr(cfg, key)
        if not low < high:
            raise ConfigError(f"data.{key}=[{low}, {high}] must be an interval [low, high] with low < high.")


@dataclass
class SinusoidConfig:
    shots: int = 10  # K support points
    query: int = 10  # query points per task, meta-training
    eval_query: int = 100  # query points per task, validation and test
    amplitude: tuple[float, float] = (0.1, 5.0)
    phase: tuple[float, float] = (0.0, math.pi)
    x_range: tuple[float, float] = (-5.0, 5.0)


class SinusoidTasks:
    task_type = "regression"

    def __init__(self, cfg: SinusoidConfig):
        check(cfg, counts=("shots", "query", "eval_query"), intervals=("amplitude", "phase", "x_range"))
        self.cfg = cfg

    @property
    def spec(self) -> dict:
        return {"task_type": self.task_type, "input_shape": (1,), "output_dim": 1}

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
class SinusoidSeqConfig:
    """The sinusoid family as forecasting: see ``SinusoidSeqTasks``."""

    shots: int = 5  # K windows per task
    query: int = 10
    eval_query: int = 20
    window: int = 5  # points the encoder reads
    horizon: int = 10  # points the decoder predicts
    dt: float = 0.3  # time between points; a window spans (window - 1) * dt
    amplitude: tuple[float, float] = (0.1, 5.0)
    phase: tuple[float, float] = (0.0, math.pi)
    t_range: tuple[float, float] = (-5.0, 5.0)  # where windows start


class SinusoidSeqTasks:
    """y(t) = A sin(t - phase), read as windows: x [window, 1] of y at t0, t0 + dt, ...; the target
    [horizon, 1] is the next ``horizon`` points. A short window does not pin down A and the phase;
    the task's support windows do."""

    task_type = "forecast"

    def __init__(self, cfg: SinusoidSeqConfig):
        check(cfg, counts=("shots", "query", "eval_query", "window", "horizon"), intervals=("amplitude", "phase", "t_range"))
        if cfg.dt <= 0:
            raise ConfigError(f"data.dt={cfg.dt} must be positive.")
        self.cfg = cfg

    @property
    def spec(self) -> dict:
        c = self.cfg
        return {"task_type": self.task_type, "input_shape": (c.window, 1), "output_dim": 1, "output_length": c.horizon}

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
