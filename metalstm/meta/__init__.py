"""Meta-learners. Adding one: a module with a config dataclass and a ``MetaLearner`` subclass,
an entry in ``META_LEARNERS``, a YAML in ``configs/meta_learner/``.
"""
from __future__ import annotations

from metalstm.config import from_dict
from metalstm.errors import ConfigError
from metalstm.learners.base import BaseLearner
from metalstm.meta.base import LossFn, MetaLearner, MetaOutput
from metalstm.meta.maml import MAML, MAMLConfig

META_LEARNERS: dict[str, tuple[type, type[MetaLearner]]] = {
    "maml": (MAMLConfig, MAML),
}


def build_meta_learner(cfg: dict, learner: BaseLearner, loss_fn: LossFn) -> MetaLearner:
    cfg = dict(cfg)
    name = cfg.pop("name", None)
    if name not in META_LEARNERS:
        raise ConfigError(f"meta_learner.name={name!r} is not a known meta-learner; choose one of {sorted(META_LEARNERS)}.")
    config_class, meta_class = META_LEARNERS[name]
    return meta_class(learner, loss_fn, from_dict(config_class, cfg, "meta_learner"))


__all__ = ["META_LEARNERS", "MetaLearner", "MetaOutput", "build_meta_learner"]
