"""Meta-learners. Adding one: a module with a config dataclass and a ``MetaLearner`` subclass,
an entry in ``META_LEARNERS``, a YAML in ``configs/meta_learner/``.
"""
from __future__ import annotations

from metalstm.config import choose, from_dict
from metalstm.errors import ConfigError
from metalstm.learners.base import BaseLearner, TaskSpec
from metalstm.meta.base import LossFn, MetaLearner, MetaOutput
from metalstm.meta.lstm_optimizer import LSTMOptimizer, LSTMOptimizerConfig
from metalstm.meta.maml import MAML, MAMLConfig
from metalstm.meta.memory_lstm import MemoryLSTM, MemoryLSTMConfig
from metalstm.meta.pretrain_finetune import PretrainFinetune, PretrainFinetuneConfig
from metalstm.meta.protonet import ProtoNet, ProtoNetConfig
from metalstm.meta.reptile import Reptile, ReptileConfig

META_LEARNERS: dict[str, tuple[type, type[MetaLearner]]] = {
    "maml": (MAMLConfig, MAML),
    "reptile": (ReptileConfig, Reptile),
    "lstm_optimizer": (LSTMOptimizerConfig, LSTMOptimizer),
    "memory_lstm": (MemoryLSTMConfig, MemoryLSTM),
    "protonet": (ProtoNetConfig, ProtoNet),
    "pretrain_finetune": (PretrainFinetuneConfig, PretrainFinetune),
}


def build_meta_learner(cfg: dict, learner: BaseLearner, loss_fn: LossFn, spec: TaskSpec) -> MetaLearner:
    """A meta-learner for ``learner`` on tasks described by ``spec``; a meaningless combination is a ConfigError."""
    name, (config_class, meta_class), cfg = choose(META_LEARNERS, cfg, "meta_learner", "meta-learner")
    if spec["task_type"] not in meta_class.task_types:
        raise ConfigError(
            f"meta_learner={name} learns {' or '.join(meta_class.task_types)} tasks, but this data set's tasks are "
            f"{spec['task_type']}; choose another meta-learner or data set."
        )
    config = from_dict(config_class, cfg, "meta_learner", siblings=(c for c, _ in META_LEARNERS.values()))
    return meta_class(learner, loss_fn, spec, config)


__all__ = ["META_LEARNERS", "MetaLearner", "MetaOutput", "build_meta_learner"]
