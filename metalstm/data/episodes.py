"""Episodes: the few-shot tasks every meta-learner trains and is evaluated on.

A task source (Omniglot, sinusoid, ...) samples whole meta-batches as stacked tensors:

    support_x [B, ways*shots, *x]   support_y [B, ways*shots(, *y)]
    query_x   [B, ways*query, *x]   query_y   [B, ways*query(, *y)]

Validation and test tasks are fixed: task ``i`` of a split is drawn from a generator seeded by
``(seed, split, i)``, so the same 600 test tasks come back on every run and any batch size.
"""
from __future__ import annotations

import hashlib
from typing import Iterator, NamedTuple, Protocol

import torch
from torch import Tensor
from torch.utils.data import Dataset, IterableDataset

SPLITS = ("train", "val", "test")


class EpisodeBatch(NamedTuple):
    """A meta-batch of B tasks; see the module docstring for shapes."""

    support_x: Tensor
    support_y: Tensor
    query_x: Tensor
    query_y: Tensor

    @property
    def num_tasks(self) -> int:
        return self.support_x.shape[0]


class TaskSource(Protocol):
    """A task distribution with train/val/test splits."""

    task_type: str  # "classification", "regression", "seq2seq" or "forecast"
    spec: dict  # TaskSpec: task_type, input_shape of one example, output_dim (vocab, output_length)

    def sample(self, split: str, num_tasks: int, generator: torch.Generator) -> EpisodeBatch:
        """Draw ``num_tasks`` tasks of ``split`` as one stacked batch."""

    def describe(self) -> dict:
        """Plain-data summary of the source (sizes, split, preprocessing) for results files."""


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
