"""What ``train.py`` and ``eval.py`` do: build everything from the config, run, write results."""
from __future__ import annotations

import json
import logging
import os
import signal
import sys
import tempfile
import time
import traceback
import uuid
from collections.abc import Callable
from dataclasses import fields
from pathlib import Path
from typing import Any, TypeVar

import lightning.pytorch as pl
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig, OmegaConf

from metalstm.checkpointing import AtomicCheckpointIO, LastCheckpoint, stop_on_sigint
from metalstm.config import choose, from_dict, resume_target
from metalstm.data import FewShotDataModule, build_datamodule
from metalstm.errors import CheckpointError, ConfigError, MetalstmError
from metalstm.learners import BASE_LEARNERS, build_base_learner
from metalstm.meta import META_LEARNERS, build_meta_learner
from metalstm.module import CHECKPOINT_FORMAT, MetaLearningModule, OptimConfig
from metalstm.objectives import Objective, get_objective

log = logging.getLogger(__name__)
T = TypeVar("T")


def run_cli(task: Callable[[DictConfig], T], cfg: DictConfig) -> T:
    """Run ``task``; a MetalstmError becomes one clear message and exit code 2, its traceback goes to the log file.

    In a sweep (``-m``) the error is raised on after the message, so the sweeper records the job (an Optuna
    trial) as failed instead of the whole sweep exiting."""
    try:
        return task(cfg)
    except MetalstmError as e:
        logging.getLogger("metalstm.traceback").error("%s", traceback.format_exc())
        print(f"\nmetalstm error: {e}\n", file=sys.stderr)
        if HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
            raise
        sys.exit(2)


def check_config(config: dict) -> None:
    """What can be checked before any data is read: component names, their keys, positive step sizes."""
    for group, registry, noun in (("base_learner", BASE_LEARNERS, "base learner"),
                                  ("meta_learner", META_LEARNERS, "meta-learner")):
        _, (config_class, _), rest = choose(registry, config[group], group, noun)
        values = from_dict(config_class, rest, group, siblings=(c for c, _ in registry.values()), warn=False)
        for f in fields(values):
            value = getattr(values, f.name)
            if (f.name == "lr" or f.name.endswith("_lr")) and isinstance(value, (int, float)) and value <= 0:
                raise ConfigError(f"{group}.{f.name}={value} must be positive: it is a step size (e.g. {f.default}).")
    from_dict(OptimConfig, config.get("optim", {}), "optim")  # validates itself


def build(config: dict) -> tuple[MetaLearningModule, FewShotDataModule]:
    """Module and data from a resolved config (plain dict): base learner + meta-learner + task source."""
    check_config(config)
    datamodule = build_datamodule(config["data"], seed=config["seed"])
    return build_module(config, datamodule.source.spec), datamodule


def build_module(config: dict, spec: dict) -> MetaLearningModule:
    """The module for tasks described by ``spec`` (a TaskSpec), without touching any data."""
    objective = get_objective(spec["task_type"])
    learner = build_base_learner(config["base_learner"], spec)
    meta_learner = build_meta_learner(config["meta_learner"], learner, objective.loss, spec)
    optim = from_dict(OptimConfig, config.get("optim", {}), "optim")
    return MetaLearningModule(meta_learner, objective, optim, config=config, spec=spec)


def check_accelerator(accelerator: str) -> None:
    if accelerator in ("gpu", "cuda") and not torch.cuda.is_available():
        raise ConfigError(
            f"trainer.accelerator={accelerator} asks for a GPU, but torch sees none (torch.cuda.is_available() is "
            f"False; torch {torch.__version__}). Use trainer=cpu, or run on a machine with a CUDA GPU and a CUDA build of torch."
        )


MATMUL_PRECISION = ("highest", "high", "medium")


def set_matmul_precision(precision: str) -> None:
    """float32 matmul/conv precision; ``high`` lets Ampere+ GPUs use TF32 (cuDNN convolutions too)."""
    if precision not in MATMUL_PRECISION:
        raise ConfigError(f"matmul_precision={precision!r}; choose one of {list(MATMUL_PRECISION)}.")
    torch.set_float32_matmul_precision(precision)
    torch.backends.cudnn.allow_tf32 = precision != "highest"


def experiment_name() -> str:
    if HydraConfig.initialized():
        return HydraConfig.get().runtime.choices.get("experiment") or "default"
    return "default"


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


def make_callbacks(config: dict, objective: Objective) -> list[Any]:
    """The ``callbacks`` group; checkpoints follow the objective's validation metric."""
    return instantiate_group(config.get("callbacks"), "callbacks", monitor=f"val/{objective.monitor}",
                             mode=objective.monitor_mode)


def make_loggers(config: dict, job_type: str, run_id: str | None = None, resume_step: int | None = None) -> list[Any]:
    """The ``logger`` group: W&B runs grouped by experiment and identified by ``run_id`` (a resumed run keeps
    its own); a resumed run's CSV and TensorBoard logs continue after ``resume_step``."""
    return instantiate_group(config.get("logger"), "logger", group=config.get("experiment") or "default", job_type=job_type,
                             id=run_id, purge_step=resume_step, resume_step=resume_step)


def write_json(path: Path, data: dict) -> None:
    """Write atomically: a crash mid-write leaves any previous file intact."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, indent=2, sort_keys=True)
        f.write("\n")
    os.replace(tmp, path)


def summary_line(summary: dict[str, float]) -> str:
    n = int(summary.get("test/num_tasks", 0))
    parts = []
    for metric, fmt in (("acc", "{:.2f}"), ("token_acc", "{:.2f}"), ("seq_acc", "{:.2f}"), ("mse", "{:.4f}"),
                        ("point_error", "{:.4f}")):
        if f"test/{metric}" in summary:
            mean, ci = summary[f"test/{metric}"], summary[f"test/{metric}_ci95"]
            parts.append(f"test/{metric} = {fmt.format(mean)} +- {fmt.format(ci)}")
    return f"{', '.join(parts)} ({n} tasks)" if parts else f"no test metrics ({n} tasks)"


def results_record(module: MetaLearningModule, datamodule: FewShotDataModule, config: dict, **extra: Any) -> dict:
    return {
        "metrics": module.test_summary,
        "num_tasks": int(module.test_summary.get("test/num_tasks", 0)),
        "bn_policy": module.meta_learner.learner.bn_policy,
        "experiment": config.get("experiment"),
        "seed": config["seed"],
        "meta_learner": config["meta_learner"]["name"],
        "base_learner": config["base_learner"]["name"],
        "data": datamodule.source.describe(),
        "episode_seed": datamodule.episodes.episode_seed,
        "torch": torch.__version__,
        **extra,
    }


# --------------------------------------------------------------------------------------- train


def train(cfg: DictConfig) -> float | None:
    """Meta-train, then meta-test the best checkpoint on the fixed test tasks. Returns the best validation metric."""
    started = time.time()
    OmegaConf.set_struct(cfg, False)
    if cfg.get("resume"):
        config, ckpt_path, resume_step = resumed_config(cfg)
    else:
        cfg.experiment = experiment_name()
        config = OmegaConf.to_container(cfg, resolve=True)
        ckpt_path, resume_step = None, None
        refuse_existing_run(Path(config["paths"]["output_dir"]))
    config.setdefault("run_id", uuid.uuid4().hex[:12])  # names the run on dashboards; resume keeps it
    output_dir = Path(config["paths"]["output_dir"])
    check_accelerator(str(config["trainer"].get("accelerator", "auto")))
    set_matmul_precision(config.get("matmul_precision", "highest"))
    pl.seed_everything(config["seed"], workers=True, verbose=False)

    module, datamodule = build(config)
    objective = module.objective
    callbacks = make_callbacks(config, objective)
    loggers = make_loggers(config, "train", config["run_id"], resume_step)
    for logger in loggers:
        logger.log_hyperparams(config)  # the full resolved config, on every dashboard
    trainer: pl.Trainer = instantiate_checked(config["trainer"], "trainer", callbacks=callbacks,
                                              logger=loggers or False, plugins=[AtomicCheckpointIO()])
    log.info("experiment %s: %s on %s, output in %s%s", config["experiment"], config["meta_learner"]["name"],
             config["data"]["name"], output_dir, f", resumed at step {resume_step}" if ckpt_path else "")

    try:
        with stop_on_sigint() as interrupts:
            trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
    except SIGTERMException:
        last = next((c.path for c in trainer.callbacks if isinstance(c, LastCheckpoint)), None)
        saved = f"saved {last}" if last is not None and last.is_file() else "no checkpoint (checkpointing is off)"
        name = "Ctrl-C" if interrupts else "SIGTERM"
        print(f"\nmetalstm: stopped by {name} at step {trainer.global_step}; {saved}. Continue with:\n"
              f"  python train.py resume={output_dir}", file=sys.stderr)
        log.info("stopped by %s at step %d", name, trainer.global_step)
        sys.exit(128 + (signal.SIGINT if interrupts else signal.SIGTERM))
    train_seconds = time.time() - started
    checkpoint = next((c for c in trainer.callbacks if isinstance(c, ModelCheckpoint)), None)
    best = checkpoint.best_model_path if checkpoint is not None and checkpoint.best_model_path else None
    trainer.test(module, datamodule=datamodule, ckpt_path=best, verbose=False)
    if trainer.global_rank != 0:
        return None
    best_score = checkpoint.best_model_score.item() if checkpoint is not None and checkpoint.best_model_score is not None else None
    results = results_record(
        module, datamodule, config,
        checkpoint=os.path.relpath(best, output_dir) if best else None,
        best_val={f"val/{objective.monitor}": best_score},
        steps=trainer.global_step,
        train_seconds=round(train_seconds, 1),
        total_seconds=round(time.time() - started, 1),
        device=str(module.device),
        resumed_at_step=resume_step,
    )
    write_json(output_dir / "results.json", results)
    line = summary_line(module.test_summary)
    log.info("%s  [results: %s]", line, output_dir / "results.json")
    tested = best or ("none: checkpointing is off" if checkpoint is None else
                      "none: no validation ran, so the final weights were tested")
    print(f"\n{line}\n  run folder:  {output_dir}\n  checkpoint:  {tested}\n  results:     {output_dir / 'results.json'}")
    return best_score


def refuse_existing_run(output_dir: Path) -> None:
    """A new run never writes over another one's checkpoints and results."""
    earlier = [p for p in (output_dir / "results.json", *sorted(output_dir.glob("checkpoints/*.ckpt"))) if p.exists()]
    if earlier:
        raise ConfigError(
            f"{output_dir} holds a run already ({', '.join(str(p.relative_to(output_dir)) for p in earlier[:3])}); a "
            f"new run never writes over one. Continue it with resume={output_dir}, or leave hydra.run.dir unset so "
            f"train.py makes a new folder."
        )


RESUMABLE = ("trainer.", "data.root", "data.cache_dir")  # what a resumed run may change


def resumed_config(cfg: DictConfig) -> tuple[dict, Path, int]:
    """``resume=<run folder or checkpoint>``: the run's own config (from its checkpoint), the checkpoint and
    its step. Command-line overrides may change only the keys in RESUMABLE (e.g. a larger trainer.max_steps)."""
    target = resume_target(cfg.resume)
    if target is None:
        given = Path(str(cfg.resume)).expanduser()
        if (given / "checkpoints").is_dir():
            raise CheckpointError(
                f"{given} has no checkpoints/last.ckpt to resume from: the run stopped before its first checkpoint "
                f"(written every callbacks.last_checkpoint.every_n_steps steps). Start it again instead."
            )
        raise CheckpointError(
            f"resume={cfg.resume} is not a run folder (one with checkpoints/last.ckpt, e.g. outputs/<date>/<time>) "
            f"or a checkpoint in a run's checkpoints/ folder. Check the path; train.py prints the run folder when it ends."
        )
    _, path = target
    checkpoint = load_checkpoint(path)
    config = checkpoint["metalstm"]["config"]
    old_dir, new_dir = config["paths"]["output_dir"], str(Path(cfg.paths.output_dir))
    config = relocate(config, old_dir, new_dir)  # the folder may have moved since
    overrides = HydraConfig.get().overrides.task if HydraConfig.initialized() else []
    for override in overrides:
        key = override.split("=", 1)[0].lstrip("+~")
        if key == "resume":
            continue
        if not key.startswith(RESUMABLE):
            raise ConfigError(
                f"resume= continues a run with the config stored in its checkpoint, so {override!r} cannot apply; "
                f"only {', '.join(k + ('*' if k.endswith('.') else '') for k in RESUMABLE)} may change (e.g. "
                f"trainer.max_steps=20000). To change anything else, start a new run."
            )
        parent, _, leaf = key.rpartition(".")
        node = config
        for part in parent.split("."):
            node = node.setdefault(part, {})
        value = OmegaConf.select(cfg, key)
        node[leaf] = OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value
    return config, path, int(checkpoint["global_step"])


def relocate(value: Any, old: str, new: str) -> Any:
    """``value`` with every string path under ``old`` moved under ``new``."""
    if isinstance(value, dict):
        return {k: relocate(v, old, new) for k, v in value.items()}
    if isinstance(value, list):
        return [relocate(v, old, new) for v in value]
    if isinstance(value, str) and (value == old or value.startswith(old + os.sep)):
        return new + value[len(old):]
    return value


# --------------------------------------------------------------------------------------- eval


def find_checkpoint(run_dir: str | None, ckpt_path: str | None) -> Path:
    if ckpt_path:
        path = Path(ckpt_path).expanduser()
        if not path.is_file():
            raise CheckpointError(f"ckpt_path={ckpt_path} does not exist. Pass a .ckpt file of a metalstm run, or run_dir=<run folder>.")
        return path
    if not run_dir:
        raise ConfigError("eval.py needs run_dir=<a train run folder, e.g. outputs/2026-01-01/12-00-00> or ckpt_path=<file.ckpt>.")
    folder = Path(run_dir).expanduser()
    for name in ("best.ckpt", "last.ckpt"):
        if (folder / "checkpoints" / name).is_file():
            return folder / "checkpoints" / name
    raise CheckpointError(
        f"No checkpoint in {folder / 'checkpoints'} (looked for best.ckpt and last.ckpt). Is run_dir the folder of a "
        f"finished or interrupted train run (it holds .hydra/ and checkpoints/)?"
    )


def load_checkpoint(path: Path) -> dict:
    """A metalstm checkpoint, loaded without unpickling code (weights_only)."""
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"{path} is not a readable checkpoint ({type(e).__name__}: {str(e).splitlines()[0]}).") from e
    meta = checkpoint.get("metalstm") if isinstance(checkpoint, dict) else None
    if not isinstance(meta, dict) or "config" not in meta:
        raise CheckpointError(f"{path} is not a metalstm checkpoint (it has no 'metalstm' section with the run's config).")
    if meta.get("format", 0) > CHECKPOINT_FORMAT:
        raise CheckpointError(
            f"{path} was written by a newer metalstm (checkpoint format {meta['format']}, this one reads up to "
            f"{CHECKPOINT_FORMAT}); upgrade metalstm to evaluate it."
        )
    return checkpoint


def restore_weights(module: MetaLearningModule, checkpoint: dict, path: Path) -> None:
    try:
        module.load_state_dict(checkpoint["state_dict"])
    except RuntimeError as e:
        raise CheckpointError(f"{path} does not match the model its config describes ({str(e).splitlines()[0]}).") from e


def evaluate(cfg: DictConfig) -> dict:
    """Re-evaluate a trained run on its fixed test tasks (optionally with other data/test settings)."""
    path = find_checkpoint(cfg.get("run_dir"), cfg.get("ckpt_path"))
    checkpoint = load_checkpoint(path)
    config = checkpoint["metalstm"]["config"]
    for group in ("data", "meta_learner"):
        config[group].update({k: v for k, v in (cfg.get(group) or {}).items() if v is not None})
    check_accelerator(cfg.accelerator)
    module, datamodule = build(config)
    restore_weights(module, checkpoint, path)
    logger_group = OmegaConf.to_container(cfg.logger, resolve=True) if cfg.get("logger") else None
    loggers = make_loggers({"logger": logger_group, "experiment": config.get("experiment")}, "eval", uuid.uuid4().hex[:12])
    for logger in loggers:
        logger.log_hyperparams({**config, "evaluated_checkpoint": str(path.resolve())})
    trainer = pl.Trainer(accelerator=cfg.accelerator, devices=1, logger=loggers or False, enable_checkpointing=False,
                         inference_mode=False, enable_model_summary=False)
    trainer.test(module, datamodule=datamodule, verbose=False)
    output_dir = Path(cfg.paths.output_dir)
    results = results_record(module, datamodule, config, checkpoint=str(path.resolve()),
                             run_dir=str(path.resolve().parent.parent), device=str(module.device))
    write_json(output_dir / "results.json", results)
    line = summary_line(module.test_summary)
    log.info("%s  [results: %s]", line, output_dir / "results.json")
    print(line)
    return results
