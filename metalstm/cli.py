"""What the command-line entry points share: the error wrapper and the resolvers their configs use."""
from __future__ import annotations

import hashlib
import importlib
import json
import logging
import os
import re
import shutil
import sys
import time
import traceback
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from hydra.errors import HydraException
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from metalstm.allocator import keep_freed_memory
from metalstm.errors import MetalstmError
from metalstm.files import atomic_write
from metalstm.resume import resumable_run
from metalstm.startup import default_ctrl_c

T = TypeVar("T")
STARTED = time.time()  # this process's start, near enough: the entry points import this module first


def run_cli(task: Callable[[DictConfig], T] | str, cfg: DictConfig) -> T:
    """Run ``task`` (or ``"module:function"``, imported here: torch and Lightning load once the config has
    composed); a MetalstmError becomes one clear message and exit code 2, its traceback goes to the log file, and
    Ctrl-C before training or testing (which handle their own) one line and exit code 130.

    In a sweep (``-m``) the error is raised on after the message, so the sweeper records the job (an Optuna
    trial) as failed instead of the whole sweep exiting."""
    keep_freed_memory()
    quiet_third_parties()
    try:
        if isinstance(task, str):
            module, name = task.split(":")
            task = getattr(importlib.import_module(module), name)
        return task(cfg)
    except KeyboardInterrupt:  # atomic writes: a file being written is not there, neither half nor whole
        last = Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt"
        if "resume" in cfg and last.is_file():  # train.py, in a run folder that has trained
            print(f"\nmetalstm: stopped by Ctrl-C before the run finished; its checkpoints are kept. Continue with: "
                  f"python train.py resume={last.parent.parent}", file=sys.stderr)
        else:
            print("\nmetalstm: stopped by Ctrl-C; nothing was written.", file=sys.stderr)
        if HydraConfig.initialized():
            remove_empty_run(Path(HydraConfig.get().runtime.output_dir), Path(cfg.paths.log_dir))
        sys.exit(130)
    except MetalstmError as e:
        logging.getLogger("metalstm.traceback").error("%s", traceback.format_exc())
        print(f"\nmetalstm error: {e}\n", file=sys.stderr)
        if HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
            raise
        if HydraConfig.initialized():
            remove_empty_run(Path(HydraConfig.get().runtime.output_dir), Path(cfg.paths.log_dir))
        sys.exit(2)


def remove_empty_run(folder: Path, log_dir: Path) -> None:
    """Remove the folder Hydra made for a command that was refused before it produced anything: it holds only
    Hydra's config files and the log, all written by this command. Any other file (a resumed run's checkpoints, a
    folder named by hand) keeps the folder, less the config files a refused resume wrote beside the first ones.
    Date folders left empty below ``log_dir`` go too."""
    remove_resume_config(folder)
    hydra_files = {".hydra/config.yaml", ".hydra/hydra.yaml", ".hydra/overrides.yaml"}
    files = [p for p in folder.rglob("*") if p.is_file()]
    names = {p.relative_to(folder).as_posix() for p in files}
    ours = all(p.stat().st_mtime >= STARTED - 1 for p in files)  # Hydra wrote them after this process started
    if ours and names - hydra_files <= {f"{HydraConfig.get().job.name}.log"}:
        shutil.rmtree(folder, ignore_errors=True)
        top = log_dir.resolve()
        for parent in folder.resolve().parents:
            if parent == top or top not in parent.parents or any(parent.iterdir()):
                break
            parent.rmdir()


def remove_resume_config(folder: Path) -> None:
    """Remove the config files Hydra wrote for this command beside a resumed run's first ones (``.hydra/<stamp>``)."""
    subdir = HydraConfig.get().output_subdir
    if subdir and subdir != ".hydra" and (folder / subdir).is_dir():
        shutil.rmtree(folder / subdir, ignore_errors=True)


def quiet_third_parties() -> None:
    """No adverts or foreign warnings on a run's terminal: Lightning's GPU/TPU lines, its tips and its
    "fit stopped" note (info, not warnings), and a deprecation inside Lightning that is not ours to fix."""
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*")
    warnings.filterwarnings("ignore", message=r".*does not have many workers.*")  # episodes are made in-process


def launch(main: Callable[[], Any]) -> None:
    """Run a ``@hydra.main`` entry point. A command line Hydra cannot compose (an unknown key or option, a malformed
    override) gets one paragraph and exit code 2 instead of Hydra's message and exit code 1; with
    ``HYDRA_FULL_ERROR=1`` set by the user, Hydra's own report is kept."""
    default_ctrl_c()  # from here on Ctrl-C is a KeyboardInterrupt, handled below and in run_cli
    if os.environ.get("HYDRA_FULL_ERROR") == "1":
        main()
        return
    os.environ["HYDRA_FULL_ERROR"] = "1"  # Hydra then raises instead of printing and exiting with 1
    try:
        main()
    except KeyboardInterrupt:  # Ctrl-C while Hydra composes (run_cli handles it from then on)
        print("\nmetalstm: stopped by Ctrl-C; nothing was written.", file=sys.stderr)
        sys.exit(130)
    except (HydraException, OmegaConfBaseException) as e:
        print(f"\nmetalstm error: {composition_message(e, Path(sys.argv[0]).name)}\n", file=sys.stderr)
        sys.exit(2)
    except OSError as e:  # Hydra makes the run folder before anything of ours runs
        if not e.filename:
            raise
        print(f"\nmetalstm error: cannot create or write {e.filename} ({e.strerror}). The run folder must be somewhere "
              f"you can write: set hydra.run.dir=<folder>, or paths.log_dir=<folder> for the folder of all runs.\n",
              file=sys.stderr)
        sys.exit(2)
    except MetalstmError:  # a multirun job's error, already reported by run_cli
        sys.exit(2)


def composition_message(error: Exception, script: str) -> str:
    """Hydra's composition error as one paragraph that names the key or option and the fix."""
    cause = error.__cause__
    text = str(error).split("Config search path:")[0]
    key = re.search(r"Could not override '([^']+)'", text)
    if key and cause is not None and "not in struct" in str(cause):
        return (f"{key.group(1)} is not a setting of the config this command line composes. Check its spelling, and "
                f"that the group it belongs to is chosen first (e.g. data=omniglot before data.ways=...). "
                f"`python {script} <your overrides> --cfg job` prints every setting.")
    missing = re.search(r"Could not find '([^']+)/([^']+)'", text)
    options = re.search(r"Available options in '[^']+':(.*)", text, re.S)
    if missing and options:
        group, option = missing.groups()
        return (f"{group}={option} is not an option of the {group} group; the options are: "
                f"{', '.join(options.group(1).split())}. Check the spelling.")
    lines = [line.strip() for line in text.splitlines() if line.strip() and "hydra.cc/docs" not in line]
    joined = " ".join(lines)
    if cause is not None and str(cause).strip() and str(cause).strip() not in joined:
        joined += f" ({str(cause).strip().splitlines()[0]})"
    return f"{joined.rstrip('.')}. Check the command line: overrides are key=value, groups are chosen with group=option."


def register_config_groups(cache: Path = Path.home() / ".cache" / "metalstm") -> None:
    """Give Hydra the data, base_learner, meta_learner and optim options (their defaults come from the config
    dataclasses) without importing torch and Lightning (4 s), so that --help, --cfg job and a typo answer in about a
    second: from a cache keyed on metalstm's source files, written the first time by importing them."""
    package = Path(__file__).parent
    sources = sorted((str(p.relative_to(package)), p.stat().st_mtime_ns, p.stat().st_size) for p in package.rglob("*.py"))
    path = cache / f"config_groups-{hashlib.sha1(json.dumps(sources).encode()).hexdigest()[:16]}.json"
    try:
        stored = json.loads(path.read_text())
    except (OSError, ValueError):
        import metalstm.assembly  # noqa: F401  (the registries: every option stores itself)
        from metalstm.config import STORED

        stored = STORED
        try:
            cache.mkdir(parents=True, exist_ok=True)
            with atomic_write(path, "w") as f:
                json.dump(stored, f)
            for old in cache.glob("config_groups-*.json"):  # of source versions unused for a week
                if old != path and time.time() - old.stat().st_mtime > 7 * 86400:
                    old.unlink(missing_ok=True)
        except OSError:  # a read-only home: composing just stays slower
            pass
    for group, name, node in stored:
        ConfigStore.instance().store(group=group, name=name, node=node)


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


register_config_groups()
# train.yaml: a resumed run writes into its own folder, its Hydra files beside the first ones
OmegaConf.register_new_resolver(
    "metalstm.run_dir", lambda resume, fresh: str(resumable_run(resume) or fresh), replace=True)
OmegaConf.register_new_resolver("metalstm.hydra_subdir", hydra_subdir, replace=True)
OmegaConf.register_new_resolver("metalstm.sqlite", sqlite_url, replace=True)
