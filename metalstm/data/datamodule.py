"""The Lightning DataModule that serves a data set's episodes: a stream of meta-batches for training, fixed
tasks for validation and test."""
from __future__ import annotations

import lightning.pytorch as pl
from torch.utils.data import DataLoader

from metalstm.config import Component
from metalstm.core import TaskSource
from metalstm.data.episodes import EpisodeConfig, FixedEpisodes, TrainEpisodes
from metalstm.errors import ConfigError


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


def build_datamodule(data: Component, seed: int) -> FewShotDataModule:
    """Read the data set that ``data`` (the parsed ``data`` group) describes; its tasks match ``data.config.spec()``."""
    source = data.impl(data.config)
    expected, found = normal(data.config.spec()), normal(source.spec)
    if expected != found:  # a data set whose config and source disagree is a bug in that data set
        raise RuntimeError(f"data={data.name}: the config's spec {expected} differs from the source's {found}")
    return FewShotDataModule(source, data.config, seed)


def normal(spec: dict) -> dict:
    return {k: tuple(v) if isinstance(v, (list, tuple)) else v for k, v in spec.items()}
