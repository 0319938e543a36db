"""What the command-line entry points share: the error wrapper and the resolvers their configs use."""
from __future__ import annotations

import logging
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from metalstm.allocator import keep_freed_memory
from metalstm.errors import MetalstmError
from metalstm.resume import resumable_run

T = TypeVar("T")


def run_cli(task: Callable[[DictConfig], T], cfg: DictConfig) -> T:
    """Run ``task``; a MetalstmError becomes one clear message and exit code 2, its traceback goes to the log file.

    In a sweep (``-m``) the error is raised on after the message, so the sweeper records the job (an Optuna
    trial) as failed instead of the whole sweep exiting."""
    keep_freed_memory()
    try:
        return task(cfg)
    except MetalstmError as e:
        logging.getLogger("metalstm.traceback").error("%s", traceback.format_exc())
        print(f"\nmetalstm error: {e}\n", file=sys.stderr)
        if HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
            raise
        sys.exit(2)


def experiment_name() -> str:
    if HydraConfig.initialized():
        return HydraConfig.get().runtime.choices.get("experiment") or "default"
    return "default"


def hydra_subdir(run_dir: str, stamp: str) -> str:
    """Where Hydra writes its config files: ``.hydra``, or ``.hydra/<stamp>`` when the run folder has them already
    (a resumed run, or a folder named by hand): the first ones are never written over."""
    return f".hydra/{stamp}" if (Path(run_dir) / ".hydra" / "config.yaml").is_file() else ".hydra"


def sqlite_url(path: str) -> str:
    """``sqlite:///<absolute path>`` for a study file, its folder created (SQLite creates no folders)."""
    file = Path(path).expanduser().resolve()
    file.parent.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{file}"


# train.yaml: a resumed run writes into its own folder, its Hydra files beside the first ones
OmegaConf.register_new_resolver(
    "metalstm.run_dir", lambda resume, fresh: str(resumable_run(resume) or fresh), replace=True)
OmegaConf.register_new_resolver("metalstm.hydra_subdir", hydra_subdir, replace=True)
OmegaConf.register_new_resolver("metalstm.sqlite", sqlite_url, replace=True)
