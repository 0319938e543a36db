"""Base learners: functional networks any meta-learner can adapt.

Adding one: a module with a config dataclass (extending ``LearnerConfig``) and a ``BaseLearner``
subclass, and one ``BASE_LEARNERS.register`` line.
"""
from __future__ import annotations

from metalstm.config import Component, Registry
from metalstm.core import TaskSpec
from metalstm.learners.base import BaseLearner, LearnerConfig, Params
from metalstm.learners.conv1d import Conv1D, Conv1DConfig
from metalstm.learners.conv4 import Conv4, Conv4Config
from metalstm.learners.lstm import LSTMEncoder, LSTMEncoderConfig, LSTMSeq2Seq, LSTMSeq2SeqConfig
from metalstm.learners.mlp import MLP, MLPConfig

BASE_LEARNERS = Registry("base_learner", "base learner")
BASE_LEARNERS.register("conv4", Conv4Config, Conv4)
BASE_LEARNERS.register("mlp", MLPConfig, MLP)
BASE_LEARNERS.register("conv1d", Conv1DConfig, Conv1D)
BASE_LEARNERS.register("lstm_encoder", LSTMEncoderConfig, LSTMEncoder)
BASE_LEARNERS.register("lstm_seq2seq", LSTMSeq2SeqConfig, LSTMSeq2Seq)


def build_base_learner(base: Component, spec: TaskSpec) -> BaseLearner:
    """The parsed ``base_learner`` group's network, sized for tasks of ``spec``."""
    return base.impl(base.config, spec)


__all__ = ["BASE_LEARNERS", "BaseLearner", "LearnerConfig", "Params", "TaskSpec", "build_base_learner"]
