"""What ``train.py`` and ``eval.py`` do: assemble the run from its config, train or test it, write results."""
from __future__ import annotations

import logging
import os
import signal
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from hydra.core.hydra_config import HydraConfig
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig, OmegaConf

from metalstm.allocator import release_freed_memory
from metalstm.assembly import (
    Settings,
    build_module,
    check_accelerator,
    instantiate_checked,
    make_callbacks,
    make_loggers,
    parse,
    set_matmul_precision,
)
from metalstm.checkpointing import (
    AtomicCheckpointIO,
    LastCheckpoint,
    StoppedByUser,
    StopTest,
    find_checkpoint,
    load_checkpoint,
    restore_weights,
    stop_on_sigint,
)
from metalstm.cli import experiment_name, remove_empty_run, remove_resume_config
from metalstm.core import EpisodeBatch
from metalstm.data.datamodule import FewShotDataModule, build_datamodule
from metalstm.errors import ConfigError
from metalstm.files import FolderInUse, run_lock, write_json
from metalstm.memory import GIB, check_batch_fits, drivers, is_out_of_memory, memory_kind, out_of_memory, peak_bytes, reset_peak
from metalstm.memory_plan import plan
from metalstm.module import MetaLearningModule
from metalstm.resume import refuse_existing_run, resumed_config

log = logging.getLogger(__name__)
summary_log = logging.getLogger("metalstm.summary")  # log file only: the terminal gets the printed summary


def summary_line(summary: dict[str, float]) -> str:
    n = int(summary.get("test/num_tasks", 0))
    parts = []
    for metric, fmt in (("acc", "{:.2f}"), ("token_acc", "{:.2f}"), ("seq_acc", "{:.2f}"), ("mse", "{:.4f}"),
                        ("point_error", "{:.4f}")):
        if f"test/{metric}" in summary:
            mean, ci = summary[f"test/{metric}"], summary[f"test/{metric}_ci95"]
            parts.append(f"test/{metric} = {fmt.format(mean)} +- {fmt.format(ci)}")
    return f"{', '.join(parts)} ({n} tasks)" if parts else f"no test metrics ({n} tasks)"


@contextmanager
def stopped_test(trainer: pl.Trainer, outcome: str, log_dir: str) -> Iterator[None]:
    """Ctrl-C or SIGTERM during ``trainer``'s test stops it with exit 130 or 143 and no results file (a partial test
    is no result); a folder left holding only this command's config and log is removed."""
    stop = StopTest()
    trainer.callbacks.append(stop)
    try:
        with stop.watching():
            yield
    except BaseException as e:
        # Lightning's SIGTERMException is a SystemExit with code 0; a second Ctrl-C inside vmap surfaces as the
        # teardown's error, raised while handling StoppedByUser
        if not (isinstance(e, (StoppedByUser, SIGTERMException)) or isinstance(e.__context__, StoppedByUser)):
            raise
        name, signum = ("Ctrl-C", signal.SIGINT) if stop.received else ("SIGTERM", signal.SIGTERM)
        print(f"\nmetalstm: stopped by {name} during the test; no results.json was written ({outcome}).", file=sys.stderr)
        if HydraConfig.initialized():
            remove_empty_run(Path(HydraConfig.get().runtime.output_dir), Path(log_dir))
        sys.exit(128 + signum)
    finally:
        trainer.callbacks.remove(stop)


def finished(config: dict, step: int) -> bool:
    """A resumed run that has trained all of trainer.max_steps and been tested: say so and leave its folder as it
    was (the Hydra files this command wrote beside the first ones are removed)."""
    output_dir, max_steps = Path(config["paths"]["output_dir"]), int(config["trainer"].get("max_steps") or -1)
    if not (0 < max_steps <= step and (output_dir / "results.json").is_file()):
        return False
    if HydraConfig.initialized():
        remove_resume_config(output_dir)
    print(f"Nothing to do: {output_dir} finished at step {step} (trainer.max_steps={max_steps}) and was tested; "
          f"its files are unchanged. To train it longer: python train.py resume={output_dir} "
          f"trainer.max_steps={2 * max_steps}")
    return True


def training_device(accelerator: str) -> torch.device:
    """The device Lightning will train on for ``trainer.accelerator``."""
    gpu = accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available()
    return torch.device("cuda" if gpu else "cpu")


@contextmanager
def explained_out_of_memory(settings: Settings, device: torch.device, phase: str) -> Iterator[None]:
    try:
        yield
    except Exception as e:
        if is_out_of_memory(e):
            raise out_of_memory(e, settings, device, phase) from e
        raise


def speed(steps: int, meta_batch_size: int, seconds: float) -> dict[str, float]:
    """Meta-training throughput of this invocation (a resumed run counts its own steps only)."""
    per_second = steps / max(seconds, 1e-9)
    return {"steps_per_second": round(per_second, 2), "tasks_per_second": round(per_second * meta_batch_size, 1)}


def peak_memory(device: torch.device, **earlier: int) -> dict[str, Any]:
    """results.json's peak memory (GB) of each phase: ``earlier`` phases' bytes, and meta-testing's (now)."""
    phases = {**earlier, "meta_testing": peak_bytes(device)}
    return {"peak_memory_gb": {k: None if v is None else round(v / GIB, 2) for k, v in phases.items()},
            "peak_memory_kind": memory_kind(device)}


def memory_line(memory: dict[str, Any]) -> str:
    kind = {"gpu_allocated": "allocated on the GPU", "cpu_resident": "resident, the whole process"}
    phases = ", ".join(f"{gb} GB {phase.replace('_', '-')}" for phase, gb in memory["peak_memory_gb"].items()
                       if gb is not None)
    return f"peak {phases} ({kind[memory['peak_memory_kind']]})" if phases else "peak unknown on this system"


def results_record(module: MetaLearningModule, datamodule: FewShotDataModule, config: dict, **extra: Any) -> dict:
    record = {
        "metrics": module.test_summary,
        "num_tasks": int(module.test_summary.get("test/num_tasks", 0)),
        "bn_policy": module.meta_learner.bn_policy,
        "experiment": config.get("experiment"),
        "seed": config["seed"],
        "meta_learner": config["meta_learner"]["name"],
        "base_learner": config["base_learner"]["name"],
        "data": datamodule.source.describe(),
        "episode_seed": datamodule.episodes.episode_seed,
        "torch": torch.__version__,
        **extra,
    }
    if hasattr(datamodule.source, "reference_metrics"):  # a trivial predictor on the same test tasks (naive forecast)
        e = datamodule.episodes
        record["reference"] = datamodule.source.reference_metrics(e.test_tasks, e.episode_seed)
    return record


# --------------------------------------------------------------------------------------- train


def train(cfg: DictConfig) -> float | None:
    """Meta-train, then meta-test the best checkpoint on the fixed test tasks. Returns the best validation metric."""
    started = time.time()
    OmegaConf.set_struct(cfg, False)
    if cfg.get("resume"):
        config, ckpt_path, resume_step = resumed_config(cfg)
        if finished(config, resume_step):
            return None
    else:
        cfg.experiment = experiment_name()
        config = OmegaConf.to_container(cfg, resolve=True)
        ckpt_path, resume_step = None, None
        refuse_existing_run(Path(config["paths"]["output_dir"]))
    config.setdefault("run_id", uuid.uuid4().hex[:12])  # names the run on dashboards; resume keeps it
    output_dir = Path(config["paths"]["output_dir"])
    output_dir.mkdir(parents=True, exist_ok=True)
    with owned(output_dir):
        return fit_and_test(config, ckpt_path, resume_step, started)


def plan_memory(module: MetaLearningModule, datamodule: FewShotDataModule, settings: Any, trainer: pl.Trainer,
                device: torch.device, config: dict) -> dict | None:
    """Measure what a training step and a validation batch need (probe steps on one and more tasks) and, under
    memory_budget, set MAML's task_chunk, checkpoint_inner and checkpoint_query to fit it; refuse a run that cannot
    fit before it trains."""
    if trainer.max_steps == 0:  # nothing to train (a from-scratch baseline)
        return None
    if trainer.world_size > 1:
        log.info("memory: no estimate under %d processes (each measures its own in train/peak_memory_gb)",
                 trainer.world_size)
        return None
    module.to(device)

    def draw(tasks: int, split: str = "train") -> EpisodeBatch:  # its own generator: the training stream is untouched
        return datamodule.source.sample(split, tasks, torch.Generator().manual_seed(settings.run.seed))

    e = settings.data.config
    evaluated = min(e.eval_batch_size, max(e.val_tasks, e.test_tasks))  # the tasks of a validation or test batch
    with explained_out_of_memory(settings, device, "the memory probe before meta-training"):
        chosen = plan(module.meta_learner, draw, e.meta_batch_size, device,
                      str(config["trainer"].get("precision", "32-true")), settings.run.memory_budget_bytes,
                      drivers(settings), evaluation=draw(evaluated, "val" if e.val_tasks else "test") if evaluated else None)
    if device.type == "cpu":
        release_freed_memory()  # training starts from the heap in use, not the probes' high-water mark
    if chosen is None:
        return None
    limit = f", limit {chosen.limit / GIB:.2f} GiB" if chosen.limit is not None else ""
    log.info("memory: a training step needs about %.2f GiB on %s%s", chosen.need / GIB, device, limit)
    return {"estimated_peak_gb": round(chosen.need / GIB, 3),
            "limit_gb": None if chosen.limit is None else round(chosen.limit / GIB, 3),
            "budget_gb": None if settings.run.memory_budget_bytes is None else round(settings.run.memory_budget_bytes / GIB, 3),
            "changes": {f"meta_learner.{k}": v for k, v in chosen.changes.items()}}


@contextmanager
def owned(output_dir: Path) -> Iterator[None]:
    """One command at a time trains a run folder (DDP's other ranks write into rank 0's)."""
    if os.environ.get("LOCAL_RANK", "0") != "0" or os.environ.get("NODE_RANK", "0") != "0":
        yield
        return
    try:
        with run_lock(output_dir, exclusive=True):
            yield
    except FolderInUse:  # raised only by taking the lock
        raise ConfigError(
            f"{output_dir} is in use by another metalstm command (training, resuming or evaluating it); two commands "
            f"on one run folder would write over each other's checkpoints and metrics. Wait until it ends, or stop it "
            f"(a stopped run continues with resume={output_dir}).") from None


def fit_and_test(config: dict, ckpt_path: Path | None, resume_step: int | None, started: float) -> float | None:
    """Meta-train the run of ``config`` (from ``ckpt_path`` when resuming), then test its best checkpoint."""
    output_dir = Path(config["paths"]["output_dir"])
    settings = parse(config)  # every setting checked, before anything is built or read
    check_accelerator(str(config["trainer"].get("accelerator", "auto")))
    set_matmul_precision(config.get("matmul_precision"))
    pl.seed_everything(settings.run.seed, workers=True, verbose=False)

    module = build_module(settings, settings.spec, config)  # refuses a learner that cannot learn these tasks
    objective = module.objective
    callbacks = make_callbacks(config, objective, keep_best=settings.data.config.val_held_out)
    loggers = make_loggers(config, "train", config["run_id"], resume_step)  # nothing is written until they log
    trainer: pl.Trainer = instantiate_checked(config["trainer"], "trainer", callbacks=callbacks,
                                              logger=loggers or False, plugins=[AtomicCheckpointIO()])
    device = training_device(str(config["trainer"].get("accelerator", "auto")))
    check_batch_fits(settings, device)
    datamodule = build_datamodule(settings.data, seed=settings.run.seed)  # the first time any data is read
    log.info("experiment %s: %s on %s, output in %s%s", config["experiment"], config["meta_learner"]["name"],
             config["data"]["name"], output_dir, f", resumed at step {resume_step}" if ckpt_path else "")

    memory_plan = plan_memory(module, datamodule, settings, trainer, device, config)
    for logger in loggers:  # after the plan: a run it refuses leaves no logger files (the run folder goes)
        logger.log_hyperparams(config)  # the full resolved config, on every dashboard
    fit_started = time.time()
    reset_peak(device)
    try:
        with stop_on_sigint() as interrupts, explained_out_of_memory(settings, device, "meta-training"):
            trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
    except SIGTERMException:
        last = next((c.path for c in trainer.callbacks if isinstance(c, LastCheckpoint)), None)
        saved = f"saved {last}" if last is not None and last.is_file() else "no checkpoint (checkpointing is off)"
        name = "Ctrl-C" if interrupts else "SIGTERM"
        print(f"\nmetalstm: stopped by {name} at step {trainer.global_step}; {saved}. Continue with:\n"
              f"  python train.py resume={output_dir}", file=sys.stderr)
        log.info("stopped by %s at step %d", name, trainer.global_step)
        sys.exit(128 + (signal.SIGINT if interrupts else signal.SIGTERM))
    train_seconds, fit_seconds = time.time() - started, time.time() - fit_started
    checkpoint = next((c for c in trainer.callbacks if isinstance(c, ModelCheckpoint)), None)
    best = checkpoint.best_model_path if checkpoint is not None and checkpoint.best_model_path else None
    test_started = time.time()
    train_peak = max(module.peak_memory, peak_bytes(module.device) or 0)
    reset_peak(module.device)
    stopped = f"training ended at step {trainer.global_step}; test it with: python eval.py run_dir={output_dir}"
    with stopped_test(trainer, stopped, config["paths"]["log_dir"]), explained_out_of_memory(settings, device, "meta-testing"):
        trainer.test(module, datamodule=datamodule, ckpt_path=best, verbose=False)
    test_seconds = time.time() - test_started
    memory = peak_memory(module.device, meta_training=train_peak)
    if trainer.global_rank != 0:
        return None
    score = checkpoint.best_model_score if checkpoint is not None else None
    best_score = score.item() if score is not None else None
    results = results_record(
        module, datamodule, config,
        checkpoint=os.path.relpath(best, output_dir) if best else None,
        best_val={f"val/{objective.monitor}": best_score},
        steps=trainer.global_step,
        train_seconds=round(train_seconds, 1),
        **speed(trainer.global_step - (resume_step or 0), settings.data.config.meta_batch_size, fit_seconds),
        test_seconds=round(test_seconds, 1),
        total_seconds=round(time.time() - started, 1),
        device=str(module.device),
        resumed_at_step=resume_step,
        **memory,
        memory_plan=memory_plan,
    )
    write_json(output_dir / "results.json", results)
    line = summary_line(module.test_summary)
    summary_log.info("%s  [results: %s]", line, output_dir / "results.json")
    if best:
        tested = best
    elif trainer.fast_dev_run:
        tested = "none: a fast dev run (debug=fdr) keeps no checkpoint; the final weights were tested"
    elif not settings.data.config.val_held_out:
        tested = "final weights (data.trainval: the validation classes were trained on, so none is 'best')"
    elif checkpoint is None:
        tested = "none: checkpointing is off"
    else:
        tested = "none: no validation ran, so the final weights were tested"
    print(f"\n{line}\n  run folder:  {output_dir}\n  checkpoint:  {tested}\n  results:     {output_dir / 'results.json'}\n"
          f"  speed:       {results['steps_per_second']} steps/s, {results['tasks_per_second']} tasks/s (meta-training, "
          f"validation included); test {results['test_seconds']} s\n  memory:      {memory_line(memory)}")
    return best_score


# --------------------------------------------------------------------------------------- eval


def check_test_ways(settings: Settings, trained_spec: dict) -> None:
    """``data.ways`` at evaluation may differ from training only for a method without an output per class."""
    ways, trained = settings.spec.get("output_dim"), trained_spec.get("output_dim")
    if ways != trained and not settings.meta_learner.impl.any_ways:
        raise ConfigError(
            f"data.ways={ways}: this run's meta-learner ({settings.meta_learner.name}) has an output for each of the "
            f"{trained} classes it was trained for, so it is tested on {trained}-way tasks. Remove data.ways, or "
            f"train a run for {ways}-way tasks.")


def evaluate(cfg: DictConfig) -> dict:
    """Re-evaluate a trained run on its fixed test tasks (optionally with other data/test settings)."""
    path = find_checkpoint(cfg.get("run_dir"), cfg.get("ckpt_path"))
    run = path.parent.parent if path.parent.name == "checkpoints" else path.parent
    with run_lock(run, exclusive=False):  # no resume of this run can start while it is evaluated
        return evaluate_checkpoint(cfg, path)


def evaluate_checkpoint(cfg: DictConfig, path: Path) -> dict:
    checkpoint = load_checkpoint(path)
    config = checkpoint["metalstm"]["config"]
    for group in ("data", "meta_learner"):
        config[group].update({k: v for k, v in (cfg.get(group) or {}).items() if v is not None})
    check_accelerator(cfg.accelerator)
    settings = parse(config)
    trained_spec = checkpoint["metalstm"].get("spec") or settings.spec
    check_test_ways(settings, trained_spec)
    module = build_module(settings, trained_spec, config)
    restore_weights(module, checkpoint, path)
    datamodule = build_datamodule(settings.data, seed=settings.run.seed)
    logger_group = OmegaConf.to_container(cfg.logger, resolve=True) if cfg.get("logger") else None
    loggers = make_loggers({"logger": logger_group, "experiment": config.get("experiment")}, "eval", uuid.uuid4().hex[:12])
    for logger in loggers:
        logger.log_hyperparams({**config, "evaluated_checkpoint": str(path.resolve())})
    trainer = pl.Trainer(accelerator=cfg.accelerator, devices=1, logger=loggers or False, enable_checkpointing=False,
                         inference_mode=False, enable_model_summary=False)
    test_started = time.time()
    reset_peak(training_device(cfg.accelerator))
    with stopped_test(trainer, "nothing was written", cfg.paths.log_dir), \
            explained_out_of_memory(settings, training_device(cfg.accelerator), "meta-testing"):
        trainer.test(module, datamodule=datamodule, verbose=False)
    output_dir = Path(cfg.paths.output_dir)
    results = results_record(module, datamodule, config, checkpoint=str(path.resolve()),
                             run_dir=str(path.resolve().parent.parent), device=str(module.device),
                             test_seconds=round(time.time() - test_started, 1), **peak_memory(module.device))
    write_json(output_dir / "results.json", results)
    line = summary_line(module.test_summary)
    summary_log.info("%s  [results: %s]", line, output_dir / "results.json")
    print(f"{line}, test {results['test_seconds']} s, memory {memory_line(results)}")
    return results
