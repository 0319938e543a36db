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
        for key in ("shots", "query", "eval_query"):
            if getattr(cfg, key) < 1:
                raise ConfigError(f"data.{key}={getattr(cfg, key)} must be a positive integer.")
        for key in ("amplitude", "phase", "x_range"):
            low, high = getattr(cfg, key)
            if not low < high:
                raise ConfigError(f"data.{key}=[{low}, {high}] must be an interval [low, high] with low < high.")
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
