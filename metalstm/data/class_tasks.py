"""N-way K-shot episodes over a labelled tensor of examples (Omniglot images, pen trajectories, ...)."""
from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from metalstm.config import count
from metalstm.core import TaskSpec
from metalstm.data.episodes import SPLITS, EpisodeBatch, EpisodeConfig
from metalstm.errors import ConfigError, DataError

log = logging.getLogger(__name__)


@dataclass
class ClassEpisodeConfig(EpisodeConfig):
    """N-way K-shot classification episodes; the data set's config adds where its examples come from."""

    ways: int = count(5)
    train_ways: int | None = count(None)  # classes per meta-training task (ProtoNet trains 60-way); null: = ways
    shots: int = count(1)
    train_shots: int | None = count(None)  # support shots in meta-training (Reptile uses more); null: = shots
    query: int = count(15)  # per class, meta-training
    eval_query: int = count(15)  # per class, validation and test

    def example_shape(self) -> tuple[int, ...]:
        """The shape of one example, e.g. (channels, size, size)."""
        raise NotImplementedError

    def spec(self) -> TaskSpec:
        return class_spec(self.example_shape(), self.ways, self.train_ways)

    def examples_per_step(self) -> int:
        ways = self.train_ways or self.ways
        shots = self.shots if self.train_shots is None else self.train_shots
        return self.meta_batch_size * ways * (shots + self.query)

    def examples_per_class(self) -> int:
        """The examples an episode draws from one class: support and query, in training or at test."""
        shots = self.shots if self.train_shots is None else self.train_shots
        return max(shots + self.query, self.shots + self.eval_query)


def drawable_classes(names: list[str], sizes: list[int], needed: int, dataset: str, examples: str, where: str,
                     add: str) -> list[int]:
    """Indices of the classes with at least ``needed`` examples; the others are logged as left out. Fewer than
    three left (a class each for train, val and test): DataError, naming ``where`` they came from and what to
    ``add``."""
    small = [n for n, size in zip(names, sizes) if size < needed]
    if small:
        log.info("%s: left out %d class(es) with fewer than %d %s (shots + query): %s", dataset, len(small), needed,
                 examples, ", ".join(small))
    keep = [i for i, size in enumerate(sizes) if size >= needed]
    if len(keep) < 3:
        raise DataError(f"Only {len(keep)} class(es) of {where} have at least {needed} {examples} (shots + query); "
                        f"a few-shot split needs train, val and test classes: {add} or lower "
                        f"data.shots/data.query/data.eval_query.")
    return keep


def class_spec(input_shape: tuple[int, ...], ways: int, train_ways: int | None, stream: bool = False) -> TaskSpec:
    spec: TaskSpec = {"task_type": "stream" if stream else "classification", "input_shape": tuple(input_shape),
                      "output_dim": ways}
    if train_ways is not None and train_ways != ways:
        spec["train_ways"] = train_ways
    return spec


class ClassTasks:
    """Samples classification episodes by index arithmetic on one tensor.

    images: the examples [num_classes, samples_per_class, ...]: uint8 images [.., channels, H, W]
        (0..255, served as floats in [0, 1]) or float examples of any shape (served as they are).
    counts: examples of each class [num_classes] when classes differ in size (the rest of each row of
        ``images`` is padding, never drawn); None when every class has ``images.shape[1]``.
    split_classes: for each of train/val/test, the indices of its classes (pairwise disjoint, except that
        ``val_in_train`` lets the train split hold the val classes: meta-training on train + val).
    rotate_splits: splits whose image classes are augmented with 90/180/270-degree rotations,
        each rotation counted as a new class (Santoro et al. 2016, Vinyals et al. 2016).
    groups: a group id for every class [num_classes] (Omniglot: its alphabet): each task then draws all its
        classes from one group, chosen uniformly among the split's groups with enough classes; None: any classes.
    stream: Santoro et al.'s (2016) online episodes: no support set; the query set is a stream of ``query``
        (``eval_query`` at validation and test) examples of each class in random order, every one answered
        before its label is shown (task_type "stream"); ``shots`` is not used.
    """

    task_type = "classification"

    def __init__(
        self,
        images: Tensor,
        split_classes: dict[str, Tensor],
        ways: int,
        shots: int,
        query: int,
        eval_query: int,
        rotate_splits: Sequence[str] = (),
        info: dict | None = None,
        train_shots: int | None = None,
        counts: Tensor | None = None,
        train_ways: int | None = None,
        groups: Tensor | None = None,
        val_in_train: bool = False,
        stream: bool = False,
    ):
        if (images.dtype == torch.uint8) != (images.dim() == 5) or images.dim() < 3:
            raise ValueError("examples must be uint8 images [classes, samples, channels, H, W] or float [classes, samples, ...]")
        self.images, self.ways, self.shots = images, ways, shots
        self.train_shots = shots if train_shots is None else train_shots
        self.train_ways = ways if train_ways is None else train_ways
        self.query, self.eval_query = query, eval_query
        self.split_classes = {s: torch.as_tensor(c, dtype=torch.long) for s, c in split_classes.items()}
        self.rotate_splits = tuple(rotate_splits)
        self.info = info or {}
        self.counts = counts
        self.groups = groups
        self.val_in_train = val_in_train
        self.stream = stream
        if stream:
            self.task_type, self.shots, self.train_shots = "stream", 0, 0
        # within groups: per split, the group of each (class, rotation) pair and the groups with enough classes
        self.pair_groups: dict[str, Tensor] = {}
        self.eligible_groups: dict[str, Tensor] = {}
        if groups is not None:
            for split in SPLITS:
                n_rot = 4 if split in self.rotate_splits else 1
                self.pair_groups[split] = groups[self.split_classes[split]].repeat_interleave(n_rot)
                ids, sizes = self.pair_groups[split].unique(return_counts=True)
                self.eligible_groups[split] = ids[sizes >= self.split_ways(split)]
        self._check()

    def split_ways(self, split: str) -> int:
        return self.train_ways if split == "train" else self.ways

    def _check(self) -> None:
        if self.rotate_splits and self.images.dtype != torch.uint8:
            raise ValueError("rotate_splits rotates images, but these examples are not images")
        train, val, test = (set(self.split_classes[s].tolist()) for s in SPLITS)
        if test & (train | val):
            raise ValueError("split 'test' shares classes with an earlier split")
        if self.val_in_train and not val <= train:
            raise ValueError("val_in_train: the train split must hold every val class")
        if not self.val_in_train and train & val:
            raise ValueError("split 'val' shares classes with an earlier split")
        per_class = self.images.shape[1] if self.counts is None else int(self.counts.min())
        for split in SPLITS:
            available = self.num_classes(split)
            ways, w_key = (self.train_ways, "train_ways") if split == "train" and self.train_ways != self.ways else (
                self.ways, "ways")
            if ways > available:
                raise ConfigError(
                    f"data.{w_key}={ways} is more than the {available} classes of the {split} split; "
                    f"lower data.{w_key} or choose a split with more classes."
                )
            if self.groups is not None and not len(self.eligible_groups[split]):
                largest = int(self.pair_groups[split].unique(return_counts=True)[1].max())
                raise ConfigError(
                    f"data.{w_key}={ways}: tasks draw their classes from one alphabet (data.within_alphabet=true), "
                    f"but the largest alphabet of the {split} split has {largest} classes; lower data.{w_key}."
                )
            shots, key = (self.train_shots, "train_shots") if split == "train" else (self.shots, "shots")
            query, q_key = (self.query, "query") if split == "train" else (self.eval_query, "eval_query")
            if shots + query > per_class:
                raise ConfigError(
                    f"data.{key} + data.{q_key} = {shots + query} samples per class, but "
                    f"{'each class' if self.counts is None else 'the smallest class'} has only {per_class}; "
                    f"lower data.{key} or data.{q_key}."
                )

    @property
    def spec(self) -> TaskSpec:
        return class_spec(tuple(self.images.shape[2:]), self.ways, self.train_ways, self.stream)

    def to(self, device: torch.device | str) -> ClassTasks:
        """Keep the examples on ``device`` (one tensor; Omniglot at 28 px is 25 MB): episodes are gathered there,
        with no host copy of the images per step."""
        self.images = self.images.to(device)
        return self

    def num_classes(self, split: str) -> int:
        """Classes of a split, rotations counted as classes."""
        return len(self.split_classes[split]) * (4 if split in self.rotate_splits else 1)

    def sample(self, split: str, num_tasks: int, generator: torch.Generator) -> EpisodeBatch:
        n_rot = 4 if split in self.rotate_splits else 1
        classes = self.split_classes[split]
        train = split == "train"
        shots, query = (self.train_shots, self.query) if train else (self.shots, self.eval_query)
        ways = self.split_ways(split)
        per_task = shots + query
        # ways distinct (class, rotation) pairs per task; their order is the task's label order
        scores = torch.rand(num_tasks, len(classes) * n_rot, generator=generator)
        if self.groups is not None:  # pairs outside the task's group sort last, never drawn
            eligible = self.eligible_groups[split]
            chosen = eligible[torch.randint(len(eligible), (num_tasks,), generator=generator)]
            scores.masked_fill_(self.pair_groups[split][None, :] != chosen[:, None], 2.0)
        virtual = scores.argsort(1)[:, :ways]
        base, rotation = classes[virtual // n_rot], virtual % n_rot  # [B, N]
        scores = torch.rand(num_tasks, ways, self.images.shape[1], generator=generator)
        if self.counts is not None:  # padding slots sort last, never drawn
            scores.masked_fill_(torch.arange(self.images.shape[1]) >= self.counts[base].unsqueeze(-1), 2.0)
        draws = scores.argsort(-1)[..., :per_task]
        # indices are drawn on the CPU (the same tasks on every device); the gather runs where the examples are
        device = self.images.device
        x = self.images[base.unsqueeze(-1).to(device, non_blocking=True), draws.to(device, non_blocking=True)]
        if n_rot > 1:  # [B, N, K+Q, C, H, W]; torch.where instead of masked writes: no device-to-host sync
            turns = rotation.to(device, non_blocking=True)[:, :, None, None, None, None]
            x = sum(torch.where(turns == k, torch.rot90(x, k, dims=(-2, -1)), 0) for k in range(n_rot))
        if x.dtype == torch.uint8:
            x = x.float().div_(255.0)
        shape = x.shape[3:]
        labels = torch.arange(ways, device=device)
        batch = EpisodeBatch(
            # (no -1: a stream has no support); contiguous: a view would keep the whole draw, query included, alive
            support_x=x[:, :, :shots].reshape(num_tasks, ways * shots, *shape).contiguous(),
            support_y=labels.repeat_interleave(shots).expand(num_tasks, -1).contiguous(),
            query_x=x[:, :, shots:].reshape(num_tasks, -1, *shape),
            query_y=labels.repeat_interleave(query).expand(num_tasks, -1).contiguous(),
        )
        if not self.stream:
            return batch
        order = torch.rand(num_tasks, ways * query, generator=generator).argsort(1).to(device)  # the stream's order
        return batch._replace(query_x=batch.query_x[torch.arange(num_tasks, device=device)[:, None], order],
                              query_y=batch.query_y.gather(1, order))

    def describe(self) -> dict:
        return {
            **self.info,
            "ways": self.ways,
            "train_ways": self.train_ways,
            "shots": self.shots,
            "train_shots": self.train_shots,
            "query": self.query,
            "eval_query": self.eval_query,
            "classes": {s: self.num_classes(s) for s in SPLITS},
            "rotate_splits": list(self.rotate_splits),
            "within_groups": self.groups is not None,
            "stream": self.stream,
            "example_shape": list(self.images.shape[2:]),
        }
