"""The types every layer shares: a meta-batch of episodes, a task spec, the task-source protocol.

Imports nothing of metalstm's data sets, networks or meta-learners, so each of those layers can use it
without loading the others.
"""
from __future__ import annotations

from typing import NamedTuple, NotRequired, Protocol, TypedDict

import torch
from torch import Tensor

SPLITS = ("train", "val", "test")
PAD = 0  # token id of padding in token sequences; real tokens are 1..vocab-1


class EpisodeBatch(NamedTuple):
    """A meta-batch of B tasks:

        support_x [B, ways*shots, *x]   support_y [B, ways*shots(, *y)]
        query_x   [B, ways*query, *x]   query_y   [B, ways*query(, *y)]
    """

    support_x: Tensor
    support_y: Tensor
    query_x: Tensor
    query_y: Tensor

    @property
    def num_tasks(self) -> int:
        return self.support_x.shape[0]


class TaskSpec(TypedDict):
    """What a data set tells a base learner about its tasks (plain data, no imports either way)."""

    task_type: str  # "classification" | "regression" | "seq2seq" (a token sequence per example) | "forecast"
    input_shape: tuple[int, ...]  # one example, e.g. (1, 28, 28), (1,), (length,) tokens, (length, features)
    output_dim: int  # ways for classification, target size for regression, vocabulary for seq2seq
    vocab: NotRequired[int]  # inputs are token ids 0..vocab-1 (PAD = padding)
    output_length: NotRequired[int]  # targets are sequences of this many steps
    train_ways: NotRequired[int]  # classification: meta-training tasks have this many classes, not output_dim


class TaskSource(Protocol):
    """A task distribution with train/val/test splits."""

    task_type: str
    spec: TaskSpec

    def sample(self, split: str, num_tasks: int, generator: torch.Generator) -> EpisodeBatch:
        """Draw ``num_tasks`` tasks of ``split`` as one stacked batch."""

    def describe(self) -> dict:
        """Plain-data summary of the source (sizes, split, preprocessing) for results files."""
