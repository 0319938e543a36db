"""Base learners: functional networks any meta-learner can adapt.

Adding one: a module with a config dataclass and a ``BaseLearner`` subclass, an entry in
``BASE_LEARNERS``, a YAML in ``configs/base_learner/``.
"""
from __future__ import annotations

from metalstm.config import choose, from_dict
from metalstm.learners.base import BaseLearner, Params, TaskSpec
from metalstm.learners.conv4 import Conv4, Conv4Config
from metalstm.learners.lstm import LSTMEncoder, LSTMEncoderConfig, LSTMSeq2Seq, LSTMSeq2SeqConfig
from metalstm.learners.mlp import MLP, MLPConfig

BASE_LEARNERS: dict[str, tuple[type, type[BaseLearner]]] = {
    "conv4": (Conv4Config, Conv4),
    "mlp": (MLPConfig, MLP),
    "lstm_encoder": (LSTMEncoderConfig, LSTMEncoder),
    "lstm_seq2seq": (LSTMSeq2SeqConfig, LSTMSeq2Seq),
}


def build_base_learner(cfg: dict, spec: TaskSpec) -> BaseLearner:
    _, (config_class, learner_class), cfg = choose(BASE_LEARNERS, cfg, "base_learner", "base learner")
    return learner_class(from_dict(config_class, cfg, "base_learner", siblings=(c for c, _ in BASE_LEARNERS.values())), spec)


__all__ = ["BASE_LEARNERS", "BaseLearner", "Params", "TaskSpec", "build_base_learner"]
