"""Omniglot pen trajectories (Lake et al. 2015) from the official stroke subsets.

``root`` holds ``strokes_background_small1.zip`` and ``strokes_background_small2.zip`` as downloaded
from the official repository (or the folders they extract to): one text file per drawing,

    START
    x,y,time_ms        one row per pen sample, in the 105x105 canvas (y points up)
    ...
    BREAK              ends each stroke

Greek and Latin are in both subsets; a character (its global id is the XXXX of XXXX_YY.txt) is kept
once: 242 characters, 20 drawings each. Each drawing becomes ``points`` samples of
(x, y, time, pen_up): taken evenly over its pen samples, centred on the drawing's mean, scaled so
1.0 is half the canvas (52.5 px), time in [0, 1], pen_up = 1 where the pen lifts before the next one.
Characters are split at random (seeded) 60/20/20 into train/val/test.

task=classify: N-way K-shot classification of trajectories.
task=complete: a task is one character; an example is the first half of a drawing (all four
features per step) and its target the second half ((x, y) per step): adapt on K drawings of the
character, then complete new ones. The point error is in canvas units (1.0 = 52.5 px).
"""
from __future__ import annotations

import logging
import random
from dataclasses import dataclass
from pathlib import Path

import torch

from metalstm.config import choice, count
from metalstm.core import TaskSpec
from metalstm.data.class_tasks import ClassEpisodeConfig, ClassTasks
from metalstm.data.episodes import SPLITS, EpisodeBatch
from metalstm.data.omniglot import DRAWINGS_PER_CHARACTER, find_sources, read_drawings
from metalstm.errors import DataError

log = logging.getLogger(__name__)

SOURCES = {  # name -> md5 of the official zip
    "strokes_background_small1": "830eb54f8a9297820a4471fcc4f9d9bc",
    "strokes_background_small2": "84d9defc54b809861ffd9886798dcffb",
}
HALF_CANVAS = 52.5
SPLIT_FRACTIONS = (0.6, 0.2)  # train, val; the rest is test
TASKS = ("classify", "complete")


@dataclass
class OmniglotStrokesConfig(ClassEpisodeConfig):
    root: str = "data/omniglot"  # holds the official stroke zips (downloaded there when missing and download=true)
    download: bool = True
    task: str = choice("classify", TASKS)  # classify (N-way trajectories) | complete (second halves of drawings)
    points: int = count(48, minimum=4)  # samples per drawing
    query: int = count(5)  # per class (classify) or per task (complete), meta-training
    eval_query: int = count(5)
    split_seed: int = count(0, minimum=0)
    meta_batch_size: int = count(16)
    eval_batch_size: int = count(50)

    def check(self) -> None:
        for key in ("train_shots", "train_ways"):
            if self.task == "complete" and getattr(self, key) is not None:
                self.refuse(f"data.{key}={getattr(self, key)} applies to classification; data.task=complete adapts on "
                            f"data.shots drawings in training and at test. Remove data.{key}.")
        needed = self.examples_per_class()
        if needed > DRAWINGS_PER_CHARACTER:
            self.refuse(f"data.shots + data.query (or eval_query) = {needed} drawings per class or task, but a "
                        f"character has {DRAWINGS_PER_CHARACTER}; lower them.")

    def example_shape(self) -> tuple[int, ...]:
        return (self.points, 4)

    def spec(self) -> TaskSpec:
        if self.task == "classify":
            return super().spec()
        half = self.points // 2
        return {"task_type": "forecast", "input_shape": (half, 4), "output_dim": 2, "output_length": self.points - half}


def parse_strokes(text: str, where: str) -> list[list[tuple[float, float, float]]]:
    """One drawing file -> its strokes, each a list of (x, y, time_ms)."""
    lines = text.splitlines()
    first = lines[0].strip() if lines else ""
    if first != "START":
        raise DataError(f"{where} line 1: expected START, got {first[:40]!r}; the stroke file is malformed. "
                        f"Replace it with the official download.")
    strokes, current = [], []
    for number, line in enumerate(lines[1:], start=2):
        line = line.strip()
        if line == "BREAK":
            if current:
                strokes.append(current)
            current = []
            continue
        try:
            x, y, t = (float(v) for v in line.split(","))
        except ValueError:
            raise DataError(f"{where} line {number}: expected 'x,y,time_ms' or BREAK, got {line[:40]!r}; the stroke "
                            f"file is malformed. Replace it with the official download.") from None
        current.append((x, y, t))
    if current:
        strokes.append(current)
    if not strokes:
        raise DataError(f"{where} holds no pen samples; replace it with the official download.")
    return strokes


def trajectory(strokes: list[list[tuple[float, float, float]]], points: int) -> torch.Tensor:
    """strokes -> [points, 4] float: (x, y, time, pen_up), normalised as the module says."""
    samples = torch.tensor([s for stroke in strokes for s in stroke], dtype=torch.float64)
    stroke_id = torch.tensor([i for i, stroke in enumerate(strokes) for _ in stroke])
    idx = torch.linspace(0, len(samples) - 1, points).round().long()
    xy = (samples[idx, :2] - samples[:, :2].mean(0)) / HALF_CANVAS
    t = samples[idx, 2] - samples[0, 2]
    t = t / t[-1] if t[-1] > 0 else torch.linspace(0, 1, points, dtype=torch.float64)
    pen_up = torch.ones(points, dtype=torch.float64)
    pen_up[:-1] = (stroke_id[idx[1:]] != stroke_id[idx[:-1]]).double()
    return torch.cat([xy, t[:, None], pen_up[:, None]], 1).float()


def load_strokes(root: Path, download: bool, points: int) -> tuple[torch.Tensor, list[str]]:
    """[characters, 20, points, 4] trajectories and the character keys."""
    sources = find_sources(root, download, SOURCES)
    seen, keys, drawings = set(), [], []
    for name in SOURCES:
        for key, files in sorted(read_drawings(sources[name], name, suffix=".txt").items()):
            character_id = files[0][0].split("_")[0]
            if character_id in seen:  # Greek and Latin appear in both subsets
                continue
            seen.add(character_id)
            keys.append(key)
            drawings.append(torch.stack([
                trajectory(parse_strokes(raw.decode("utf-8", errors="replace"), f"{sources[name]}:{key}/{file}"), points)
                for file, raw in files]))
    counts = {len(d) for d in drawings}
    if len(counts) != 1:
        raise DataError(f"the stroke files in {root} have {sorted(counts)} drawings per character, expected the same "
                        f"number for every character; replace them with the official download.")
    log.info("Omniglot strokes: %d characters, %d drawings each, %d points", len(keys), counts.pop(), points)
    return torch.stack(drawings), keys


def split_characters(n: int, seed: int) -> dict[str, list[int]]:
    order = list(range(n))
    random.Random(seed).shuffle(order)
    n_train, n_val = int(SPLIT_FRACTIONS[0] * n), int(SPLIT_FRACTIONS[1] * n)
    return {"train": order[:n_train], "val": order[n_train : n_train + n_val], "test": order[n_train + n_val :]}


class StrokeCompletionTasks:
    """Few-shot completion: every task is one character (see the module docstring)."""

    task_type = "forecast"

    def __init__(self, drawings: torch.Tensor, splits: dict[str, list[int]], shots: int, query: int,
                 eval_query: int, info: dict):
        per_character = drawings.shape[1]
        if shots + max(query, eval_query) > per_character:
            raise DataError(f"data.shots + data.query (or eval_query) = {shots + max(query, eval_query)} drawings "
                            f"per task, but a character has only {per_character}; lower them.")
        self.half = drawings.shape[2] // 2
        self.drawings, self.splits, self.info = drawings, {s: torch.tensor(v) for s, v in splits.items()}, info
        self.shots, self.query, self.eval_query = shots, query, eval_query

    @property
    def spec(self) -> dict:
        points = self.drawings.shape[2]
        return {"task_type": self.task_type, "input_shape": (self.half, 4), "output_dim": 2,
                "output_length": points - self.half}

    def sample(self, split: str, num_tasks: int, generator: torch.Generator) -> EpisodeBatch:
        n = self.shots + (self.query if split == "train" else self.eval_query)
        characters = self.splits[split]
        chosen = characters[torch.randint(len(characters), (num_tasks,), generator=generator)]
        draws = torch.rand(num_tasks, self.drawings.shape[1], generator=generator).argsort(1)[:, :n]
        d = self.drawings[chosen[:, None], draws]  # [tasks, n, points, 4]
        x, y = d[:, :, : self.half], d[:, :, self.half :, :2]
        return EpisodeBatch(x[:, : self.shots], y[:, : self.shots], x[:, self.shots :], y[:, self.shots :])

    def describe(self) -> dict:
        return {**self.info, "shots": self.shots, "query": self.query, "eval_query": self.eval_query,
                "characters": {s: len(self.splits[s]) for s in SPLITS}}


def build_omniglot_strokes(cfg: OmniglotStrokesConfig) -> ClassTasks | StrokeCompletionTasks:
    drawings, keys = load_strokes(Path(cfg.root).expanduser(), cfg.download, cfg.points)
    splits = split_characters(len(keys), cfg.split_seed)
    info = {"dataset": "omniglot_strokes", "task": cfg.task, "points": cfg.points, "root": str(cfg.root),
            "split_seed": cfg.split_seed}
    if cfg.task == "complete":
        return StrokeCompletionTasks(drawings, splits, cfg.shots, cfg.query, cfg.eval_query, info)
    return ClassTasks(drawings, {s: torch.tensor(v) for s, v in splits.items()}, ways=cfg.ways, shots=cfg.shots,
                      query=cfg.query, eval_query=cfg.eval_query, train_shots=cfg.train_shots,
                      train_ways=cfg.train_ways, info=info)
