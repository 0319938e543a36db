"""Few-shot task sources and the DataModule that serves their episodes.

Adding a data set: one module with a config dataclass and a builder, one entry in ``DATASETS``,
one YAML in ``configs/data/``. A data set never imports a model.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Any

import lightning.pytorch as pl
from torch.utils.data import DataLoader

from metalstm.config import choose, from_dict
from metalstm.data.episodes import EpisodeBatch, FixedEpisodes, TaskSource, TrainEpisodes
from metalstm.data.image_folder import ImageFolderConfig, build_image_folder
from metalstm.data.mini_imagenet import MiniImageNetConfig, build_mini_imagenet
from metalstm.data.omniglot import OmniglotConfig, build_omniglot
from metalstm.data.omniglot_strokes import OmniglotStrokesConfig, build_omniglot_strokes
from metalstm.data.seq_tasks import SeqTasks, SeqTasksConfig
from metalstm.data.sinusoid import SinusoidConfig, SinusoidSeqConfig, SinusoidSeqTasks, SinusoidTasks
from metalstm.errors import ConfigError

# name -> (config dataclass, builder)
DATASETS: dict[str, tuple[type, Callable[[Any], TaskSource]]] = {
    "omniglot": (OmniglotConfig, build_omniglot),
    "sinusoid": (SinusoidConfig, SinusoidTasks),
    "sinusoid_seq": (SinusoidSeqConfig, SinusoidSeqTasks),
    "omniglot_strokes": (OmniglotStrokesConfig, build_omniglot_strokes),
    "seq_tasks": (SeqTasksConfig, SeqTasks),
    "image_folder": (ImageFolderConfig, build_image_folder),
    "mini_imagenet": (MiniImageNetConfig, build_mini_imagenet),
}


@dataclass
class EpisodeConfig:
    """How episodes are served; the same for every data set."""

    meta_batch_size: int = 32  # tasks per meta-training step
    val_tasks: int = 100
    test_tasks: int = 600
    eval_batch_size: int = 25  # tasks per validation/test batch
    episode_seed: int = 0  # fixes the val/test tasks; independent of the training seed
    on_device: bool = True  # keep image data sets on the training device and gather episodes there


class FewShotDataModule(pl.LightningDataModule):
    def __init__(self, source: TaskSource, episodes: EpisodeConfig, seed: int):
        super().__init__()
        self.source, self.episodes, self.seed = source, episodes, seed

    def rank_and_world(self) -> tuple[int, int]:
        return (self.trainer.global_rank, self.trainer.world_size) if self.trainer else (0, 1)

    def setup(self, stage: str) -> None:
        if self.episodes.on_device and self.trainer is not None and hasattr(self.source, "to"):
            self.source.to(self.trainer.strategy.root_device)
        _, world = self.rank_and_world()
        if stage == "fit" and self.episodes.meta_batch_size % world:
            raise ConfigError(
                f"data.meta_batch_size={self.episodes.meta_batch_size} cannot be split evenly over {world} devices "
                f"(each adapts an equal share of the tasks); choose a multiple of {world}."
            )

    def train_dataloader(self) -> DataLoader:
        e = self.episodes
        rank, world = self.rank_and_world()
        start = self.trainer.global_step if self.trainer else 0  # restored already when a run resumes
        stream = TrainEpisodes(self.source, e.meta_batch_size // world, self.seed, rank, start_step=start)
        return DataLoader(stream, batch_size=None)

    def _fixed(self, split: str, num_tasks: int) -> DataLoader:
        e = self.episodes
        rank, world = self.rank_and_world()
        episodes = FixedEpisodes(self.source, split, num_tasks, e.eval_batch_size, e.episode_seed, rank, world)
        return DataLoader(episodes, batch_size=None)

    def val_dataloader(self) -> DataLoader:
        return self._fixed("val", self.episodes.val_tasks)

    def test_dataloader(self) -> DataLoader:
        return self._fixed("test", self.episodes.test_tasks)


def build_datamodule(cfg: dict, seed: int) -> FewShotDataModule:
    """``cfg`` is the ``data`` config group: ``name``, the episode keys, the data set's own keys."""
    _, (config_class, build), cfg = choose(DATASETS, cfg, "data", "data set")
    episode_keys = {f.name for f in fields(EpisodeConfig)}
    episodes = from_dict(EpisodeConfig, {k: v for k, v in cfg.items() if k in episode_keys}, "data")
    for key in ("meta_batch_size", "val_tasks", "test_tasks", "eval_batch_size"):
        if getattr(episodes, key) < 1:
            raise ConfigError(f"data.{key}={getattr(episodes, key)} must be a positive integer.")
    source = build(from_dict(config_class, {k: v for k, v in cfg.items() if k not in episode_keys}, "data"))
    return FewShotDataModule(source, episodes, seed)


__all__ = ["DATASETS", "EpisodeBatch", "EpisodeConfig", "FewShotDataModule", "build_datamodule"]
