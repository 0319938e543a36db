"""Few-shot task sources, registered by name.

Adding a data set: one module with a config dataclass (extending ``EpisodeConfig``: its settings,
their defaults and rules, and the ``spec`` of its tasks) and a builder, and one ``DATASETS.register``
line. A data set never imports a model. The Lightning DataModule that serves a data set's episodes is in
``metalstm.data.datamodule``, so this registry, the learners and the meta-learners import without Lightning.
"""
from __future__ import annotations

from metalstm.config import Registry
from metalstm.data.episodes import EpisodeConfig
from metalstm.data.image_folder import ImageFolderConfig, build_image_folder
from metalstm.data.mini_imagenet import MiniImageNetConfig, build_mini_imagenet
from metalstm.data.omniglot import OmniglotConfig, build_omniglot
from metalstm.data.omniglot_strokes import OmniglotStrokesConfig, build_omniglot_strokes
from metalstm.data.seq_tasks import SeqTasks, SeqTasksConfig
from metalstm.data.series_forecast import SeriesForecastConfig, build_series_forecast
from metalstm.data.sinusoid import SinusoidConfig, SinusoidSeqConfig, SinusoidSeqTasks, SinusoidTasks
from metalstm.data.text import TextConfig, build_text
from metalstm.data.timeseries import TimeSeriesConfig, build_timeseries

# name -> (config dataclass, builder: config -> TaskSource)
DATASETS = Registry("data", "data set")
DATASETS.register("omniglot", OmniglotConfig, build_omniglot)
DATASETS.register("sinusoid", SinusoidConfig, SinusoidTasks)
DATASETS.register("sinusoid_seq", SinusoidSeqConfig, SinusoidSeqTasks)
DATASETS.register("omniglot_strokes", OmniglotStrokesConfig, build_omniglot_strokes)
DATASETS.register("seq_tasks", SeqTasksConfig, SeqTasks)
DATASETS.register("image_folder", ImageFolderConfig, build_image_folder)
DATASETS.register("mini_imagenet", MiniImageNetConfig, build_mini_imagenet)
DATASETS.register("timeseries", TimeSeriesConfig, build_timeseries)
DATASETS.register("series_forecast", SeriesForecastConfig, build_series_forecast)
DATASETS.register("text", TextConfig, build_text)


__all__ = ["DATASETS", "EpisodeConfig"]
