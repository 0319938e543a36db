"""Episodes: the few-shot tasks every meta-learner trains and is evaluated on.

A task source (Omniglot, sinusoid, ...) samples whole meta-batches as stacked tensors:

    support_x [B, ways*shots, *x]   support_y [B, ways*shots(, *y)]
    query_x   [B, ways*query, *x]   query_y   [B, ways*query(, *y)]

Validation and test tasks are fixed: task ``i`` of a split is drawn from a generator seeded by
``(seed, split, i)``, so the same 600 test tasks come back on every run and any batch size.
"""
from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass
from typing import ClassVar, Iterator

import torch
from torch.utils.data import Dataset, IterableDataset

from metalstm.config import Config, count
from metalstm.core import SPLITS, EpisodeBatch, TaskSource, TaskSpec

__all__ = ["SPLITS", "EpisodeBatch", "EpisodeConfig", "FixedEpisodes", "TaskSource", "TrainEpisodes", "task_seed"]


def split_by_shares(n: int, shares: list[float], seed: int) -> dict[str, list[int]]:
    """Indices 0..n-1 in a seeded random order, cut into train/val/test by ``shares`` (three positive numbers, any
    scale); val and test get at least one each."""
    order = list(range(n))
    random.Random(seed).shuffle(order)
    total = sum(shares)
    n_val = max(1, round(n * shares[1] / total))
    n_test = max(1, round(n * shares[2] / total))
    n_train = n - n_val - n_test
    return {"train": order[:n_train], "val": order[n_train : n_train + n_val], "test": order[n_train + n_val :]}


@dataclass
class EpisodeConfig(Config):
    """How episodes are served. Every data set's config extends it, with its own meta-batch and
    evaluation-batch sizes, and says what its tasks look like (``spec``) without reading any data."""

    group: ClassVar[str] = "data"
    meta_batch_size: int = count()  # tasks per meta-training step
    eval_batch_size: int = count()  # tasks per validation/test batch
    val_tasks: int = count(100)
    test_tasks: int = count(600)
    episode_seed: int = count(0, minimum=0)  # fixes the val/test tasks; independent of the training seed
    on_device: bool = True  # keep image data sets on the training device and gather episodes there

    def spec(self) -> TaskSpec:
        """The TaskSpec of the tasks this config describes (the source built from it has the same)."""
        raise NotImplementedError

    def examples_per_step(self) -> int | None:
        """Examples in one meta-training batch (all tasks, support and query), where the config fixes it."""
        return None

    @property
    def val_held_out(self) -> bool:
        """Whether meta-training never sees the validation classes, so the best validated checkpoint is tested."""
        return True


def task_seed(seed: int, split: str, index: int) -> int:
    """A 63-bit seed for fixed task ``index`` of ``split``; stable across runs and platforms."""
    digest = hashlib.sha256(f"{seed}/{split}/{index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def stack_episodes(episodes: list[EpisodeBatch]) -> EpisodeBatch:
    return EpisodeBatch(*(torch.cat(parts) for parts in zip(*episodes)))


class TrainEpisodes(IterableDataset):
    """An endless stream of random meta-batches from the train split, from step ``start_step`` on.

    The meta-batch of step ``s`` is drawn from a generator seeded by ``(seed, rank, s)`` alone, so a run
    resumed at step ``s`` sees exactly the tasks the uninterrupted run would have seen.
    """

    def __init__(self, source: TaskSource, meta_batch_size: int, seed: int, rank: int = 0, start_step: int = 0):
        self.source, self.meta_batch_size, self.seed, self.rank = source, meta_batch_size, seed, rank
        self.start_step = start_step

    def __iter__(self) -> Iterator[EpisodeBatch]:
        step = self.start_step
        while True:
            generator = torch.Generator().manual_seed(task_seed(self.seed, f"train/rank{self.rank}", step))
            yield self.source.sample("train", self.meta_batch_size, generator)
            step += 1


class FixedEpisodes(Dataset):
    """``num_tasks`` fixed tasks of a split, served ``batch_size`` tasks at a time.

    With several devices, rank ``r`` of ``world`` serves tasks r, r + world, ...: each task once.
    """

    def __init__(self, source: TaskSource, split: str, num_tasks: int, batch_size: int, seed: int,
                 rank: int = 0, world: int = 1):
        self.source, self.split, self.seed = source, split, seed
        self.indices = range(rank, num_tasks, world)
        self.batch_size = max(1, min(batch_size, len(self.indices)))

    def __len__(self) -> int:
        return -(-len(self.indices) // self.batch_size)

    def task(self, index: int) -> EpisodeBatch:
        generator = torch.Generator().manual_seed(task_seed(self.seed, self.split, index))
        return self.source.sample(self.split, 1, generator)

    def __getitem__(self, batch_index: int) -> EpisodeBatch:
        if not 0 <= batch_index < len(self):
            raise IndexError(batch_index)
        start = batch_index * self.batch_size
        return stack_episodes([self.task(i) for i in self.indices[start : start + self.batch_size]])
