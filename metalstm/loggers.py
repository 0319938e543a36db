"""Loggers that continue a run's own files when it resumes, and W&B that refuses to start without a login."""
from __future__ import annotations

import configparser
import csv
import netrc
import os
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from lightning.pytorch.loggers import CSVLogger as LightningCSVLogger
from lightning.pytorch.loggers import WandbLogger as LightningWandbLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.loggers.logger import rank_zero_experiment

from metalstm.errors import ConfigError
from metalstm.files import atomic_write


class ResumingWriter(ExperimentWriter):
    """Lightning's writer deletes an existing ``metrics.csv``; this one keeps its rows logged before
    ``resume_step`` (later ones are logged again by the resumed run) and appends after them."""

    def __init__(self, log_dir: str, resume_step: int | None):
        self.resume_step = resume_step
        super().__init__(log_dir)

    def _check_log_dir_exists(self) -> None:
        if self.resume_step is None or not os.path.isfile(self.metrics_file_path):
            super()._check_log_dir_exists()
            return
        with open(self.metrics_file_path, newline="") as f:
            reader = csv.DictReader(f)
            keys, rows = list(reader.fieldnames or []), [r for r in reader if int(r["step"]) < self.resume_step]
        with atomic_write(self.metrics_file_path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=keys)
            writer.writeheader()
            writer.writerows(rows)
        self.metrics_keys = keys


class CSVLogger(LightningCSVLogger):
    """``csv/metrics.csv`` of a run; ``resume_step`` (set by ``train.py resume=...``) continues the file."""

    def __init__(self, *args: Any, resume_step: int | None = None, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.resume_step = resume_step

    @property
    @rank_zero_experiment
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            os.makedirs(self.root_dir, exist_ok=True)
            self._experiment = ResumingWriter(self.log_dir, self.resume_step)
        return self._experiment


def wandb_mode_offline() -> bool:
    """Whether W&B will run without the server: WANDB_MODE, WANDB_DISABLED, or `wandb offline` (a settings file)."""
    if os.environ.get("WANDB_MODE", "").lower() in ("offline", "disabled", "dryrun"):
        return True
    if os.environ.get("WANDB_DISABLED", "").lower() in ("true", "1"):
        return True
    config_dir = Path(os.environ.get("WANDB_CONFIG_DIR", Path.home() / ".config" / "wandb"))
    for settings in (Path("wandb") / "settings", config_dir / "settings"):
        parser = configparser.ConfigParser()
        try:
            parser.read(settings)
        except configparser.Error:
            continue
        if parser.get("default", "mode", fallback="").lower() in ("offline", "disabled", "dryrun"):
            return True
    return False


def wandb_host() -> str | None:
    return urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname


def wandb_has_login() -> bool:
    """Whether W&B finds credentials: WANDB_API_KEY, an identity token file, or the host's entry in the netrc file
    (which `wandb login` writes)."""
    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return True
    path = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    try:
        return netrc.netrc(path).authenticators(wandb_host()) is not None
    except (OSError, netrc.NetrcParseError):
        return False


class WandbLogger(LightningWandbLogger):
    """Lightning's W&B logger, checked before anything runs: online without a login, wandb would ask 1/2/3 in a
    terminal or end the run in a traceback once training started. Its deprecated ``anonymous`` setting is not
    passed on (wandb warns about it on every run)."""

    def __init__(self, *args: Any, offline: bool = False, **kwargs: Any):
        if not offline and not wandb_mode_offline() and not wandb_has_login():
            raise ConfigError(
                "logger=wandb logs to the W&B server, but no W&B login was found (no WANDB_API_KEY, no entry for "
                f"{wandb_host()} in ~/.netrc). Log "
                "in once with `wandb login`, or log without an account: WANDB_MODE=offline python train.py "
                "logger=wandb ... (or logger.wandb.offline=true), and upload later with `wandb sync "
                "<run folder>/wandb/offline-run-*`.")
        super().__init__(*args, offline=offline, **kwargs)
        self._wandb_init.pop("anonymous", None)
