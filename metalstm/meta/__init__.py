"""Meta-learners. Adding one: a module with a config dataclass (extending ``MetaConfig``) and a
``MetaLearner`` subclass, and one ``META_LEARNERS.register`` line (here, or in your own code);
``meta_learner=<name>`` then composes its defaults. A variant of a registered one is a YAML in
``configs/meta_learner/`` (``defaults: [maml]`` and the settings that differ, as ``anil.yaml``).
"""
from __future__ import annotations

from metalstm.config import Component, Registry
from metalstm.core import TaskSpec
from metalstm.errors import ConfigError
from metalstm.learners.base import BaseLearner
from metalstm.meta.base import LossFn, MetaConfig, MetaLearner, MetaOutput
from metalstm.meta.lstm_optimizer import LSTMOptimizer, LSTMOptimizerConfig
from metalstm.meta.maml import MAML, MAMLConfig
from metalstm.meta.memory_lstm import MemoryLSTM, MemoryLSTMConfig
from metalstm.meta.memory_seq2seq import MemorySeq2Seq, MemorySeq2SeqConfig
from metalstm.meta.pretrain_finetune import PretrainFinetune, PretrainFinetuneConfig
from metalstm.meta.protonet import ProtoNet, ProtoNetConfig
from metalstm.meta.reptile import Reptile, ReptileConfig

META_LEARNERS = Registry("meta_learner", "meta-learner")
META_LEARNERS.register("maml", MAMLConfig, MAML)
META_LEARNERS.register("reptile", ReptileConfig, Reptile)
META_LEARNERS.register("lstm_optimizer", LSTMOptimizerConfig, LSTMOptimizer)
META_LEARNERS.register("memory_lstm", MemoryLSTMConfig, MemoryLSTM)
META_LEARNERS.register("memory_seq2seq", MemorySeq2SeqConfig, MemorySeq2Seq)
META_LEARNERS.register("protonet", ProtoNetConfig, ProtoNet)
META_LEARNERS.register("pretrain_finetune", PretrainFinetuneConfig, PretrainFinetune)


def refusal(meta: type[MetaLearner], name: str, spec: TaskSpec) -> str | None:
    """Why meta-learner ``meta`` cannot learn tasks of ``spec``, or None if it can."""
    if spec["task_type"] not in meta.task_types:
        return (f"meta_learner={name} learns {' or '.join(meta.task_types)} tasks, but this data set's tasks are "
                f"{spec['task_type']}; choose another meta-learner or data set.")
    if "train_ways" in spec and not meta.any_ways:
        return (f"data.train_ways={spec['train_ways']}: meta_learner={name} has an output per class, so it meta-trains "
                f"on tasks of as many classes as it is tested on (data.ways={spec['output_dim']}). Remove "
                f"data.train_ways, or use a method that classifies any number of classes (protonet).")
    return None


def build_meta_learner(meta: Component, learner: BaseLearner, loss_fn: LossFn, spec: TaskSpec) -> MetaLearner:
    """The parsed ``meta_learner`` group's meta-learner for ``learner`` on tasks of ``spec``; a meaningless
    combination is a ConfigError."""
    reason = refusal(meta.impl, meta.name, spec)
    if reason is None and learner.bn_policy == "running" and not meta.impl.running_norm:
        reason = (f"base_learner.norm=running: meta_learner={meta.name} runs the base learner under vmap over tasks, "
                  f"where BatchNorm cannot update running statistics. Use base_learner.norm=batch (transductive), "
                  f"or a meta-learner that keeps them ({', '.join(n for n, c in META_LEARNERS.items() if c.impl.running_norm)}).")
    if reason is not None:
        raise ConfigError(reason)
    return meta.impl(learner, loss_fn, spec, meta.config)


__all__ = ["META_LEARNERS", "MetaConfig", "MetaLearner", "MetaOutput", "build_meta_learner", "refusal"]
