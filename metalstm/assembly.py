"""From a resolved config (plain dict) to the objects of a run: every setting parsed and checked once, in
its dataclass, before anything is built; then the module (which needs only the task spec), the trainer
and its callbacks and loggers, and last the data."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.callbacks import ModelCheckpoint

from metalstm.config import Component, Config, from_dict, setting
from metalstm.core import TaskSpec
from metalstm.data import DATASETS
from metalstm.data.datamodule import FewShotDataModule, build_datamodule
from metalstm.errors import ConfigError, MetalstmError
from metalstm.learners import BASE_LEARNERS, build_base_learner
from metalstm.memory_plan import parse_bytes
from metalstm.meta import META_LEARNERS, build_meta_learner
from metalstm.module import MetaLearningModule, OptimConfig
from metalstm.objectives import Objective, get_objective

MATMUL_PRECISION = ("highest", "high", "medium")


@dataclass
class RunConfig(Config):
    """The top-level settings of a run that its components read (the default is in train.yaml)."""

    group: ClassVar[str] = ""
    seed: int = setting(minimum=0, maximum=2**32 - 1)  # numpy's seeds are 32-bit
    memory_budget: str | int | None = None  # e.g. 8GB: the most a training step may use (memory_plan.py); null: all free

    def check(self) -> None:
        self.memory_budget_bytes = parse_bytes(self.memory_budget)


@dataclass
class Settings:
    """A run's config groups, parsed and checked."""

    data: Component
    base_learner: Component
    meta_learner: Component
    optim: OptimConfig
    run: RunConfig

    @property
    def spec(self) -> TaskSpec:
        return self.data.config.spec()


SCHEMAS: dict[str, Any] = {"data": DATASETS, "base_learner": BASE_LEARNERS, "meta_learner": META_LEARNERS}


def parse(config: dict) -> Settings:
    """Every component's config, checked (types, rules, names, keys), before any data is read."""
    groups = {group: registry.parse(config[group]) for group, registry in SCHEMAS.items()}
    run = RunConfig(seed=config.get("seed"), memory_budget=config.get("memory_budget"))
    return Settings(**groups, optim=from_dict(OptimConfig, config.get("optim") or {}, "optim"), run=run)


def build_module(settings: Settings, spec: TaskSpec, config: dict) -> MetaLearningModule:
    """The module for tasks of ``spec`` (a TaskSpec), without touching any data: a base learner or
    meta-learner that cannot learn such tasks is refused here."""
    objective = get_objective(spec["task_type"])
    learner = build_base_learner(settings.base_learner, spec)
    meta_learner = build_meta_learner(settings.meta_learner, learner, objective.loss, spec)
    return MetaLearningModule(meta_learner, objective, settings.optim, config=config, spec=spec)


def build(config: dict) -> tuple[MetaLearningModule, FewShotDataModule]:
    """Module and data from a resolved config: parsed, module built from the spec, then the data read."""
    settings = parse(config)
    module = build_module(settings, settings.spec, config)
    return module, build_datamodule(settings.data, seed=settings.run.seed)


def check_accelerator(accelerator: str) -> None:
    if accelerator in ("gpu", "cuda") and not torch.cuda.is_available():
        raise ConfigError(
            f"trainer.accelerator={accelerator} asks for a GPU, but torch sees none (torch.cuda.is_available() is "
            f"False; torch {torch.__version__}). Use trainer=cpu, or run on a machine with a CUDA GPU and a CUDA build of torch."
        )


def set_matmul_precision(precision: str) -> None:
    """float32 matmul/conv precision; ``high`` lets Ampere+ GPUs use TF32 (cuDNN convolutions too)."""
    if precision not in MATMUL_PRECISION:
        raise ConfigError(f"matmul_precision={precision!r}; choose one of {list(MATMUL_PRECISION)}.")
    torch.set_float32_matmul_precision(precision)
    torch.backends.cudnn.allow_tf32 = precision != "highest"


def instantiate_checked(entry: dict, where: str, **kwargs: Any) -> Any:
    """``instantiate`` whose failures (an unknown or impossible setting) name the config entry."""
    try:
        return instantiate(entry, **kwargs)
    except (InstantiationException, MisconfigurationException, TypeError, ValueError) as e:
        cause = e.__cause__ or e
        if isinstance(cause, MetalstmError):
            raise cause from None
        reason = " ".join(str(cause).split())
        raise ConfigError(f"{where} ({entry.get('_target_')}) cannot be built: {reason[:400]}. Check the "
                          f"{where}.* settings on the command line and in the experiment.") from e


def instantiate_group(entries: dict | None, where: str, **auto: Any) -> list[Any]:
    """Instantiate every entry of a callbacks/logger group; a value ``auto`` whose key is in ``auto`` is filled in."""
    objects = []
    for name, entry in (entries or {}).items():
        if isinstance(entry, dict) and "_target_" in entry:
            filled = {k: v for k, v in auto.items() if entry.get(k) == "auto"}
            objects.append(instantiate_checked(entry, f"{where}.{name}", **filled))
    return objects


def make_callbacks(config: dict, objective: Objective, keep_best: bool = True) -> list[Any]:
    """The ``callbacks`` group; checkpoints follow the objective's validation metric. Without ``keep_best``
    (validation classes are trained on) no best checkpoint is kept: the final weights are what is tested."""
    callbacks = instantiate_group(config.get("callbacks"), "callbacks", monitor=f"val/{objective.monitor}",
                                  mode=objective.monitor_mode)
    return [c for c in callbacks if keep_best or not isinstance(c, ModelCheckpoint)]


def make_loggers(config: dict, job_type: str, run_id: str | None = None, resume_step: int | None = None) -> list[Any]:
    """The ``logger`` group: W&B runs grouped by experiment and identified by ``run_id`` (a resumed run keeps
    its own); a resumed run's CSV and TensorBoard logs continue after ``resume_step``."""
    return instantiate_group(config.get("logger"), "logger", group=config.get("experiment") or "default", job_type=job_type,
                             id=run_id, purge_step=resume_step, resume_step=resume_step)
