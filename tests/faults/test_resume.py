"""Resuming: a run killed with SIGKILL and resumed ends exactly where the uninterrupted run ends."""
from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from conftest import REPO, run_script
from metalstm.errors import CheckpointError
from metalstm.resume import resumable_run, resumed_config
from test_train_eval import run_dir_of

RUN = ["trainer.max_steps=240", "trainer.val_check_interval=60", "callbacks.last_checkpoint.every_n_steps=30",
       "data.val_tasks=20", "data.test_tasks=40", "seed=7"]


def checkpoint_step(path: Path) -> int:
    try:
        return int(torch.load(path, map_location="cpu", weights_only=True)["global_step"])
    except (OSError, RuntimeError, EOFError, KeyError):
        return -1


def kill_after_checkpoint(cwd: Path, min_step: int) -> Path:
    """Start train.py, SIGKILL it once last.ckpt holds step >= ``min_step``; the run folder."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "WANDB_MODE": "disabled"}
    process = subprocess.Popen([sys.executable, str(REPO / "train.py"), *RUN], cwd=cwd, env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    try:
        while time.time() < deadline and process.poll() is None:
            ckpts = list(cwd.glob("outputs/*/*/checkpoints/last.ckpt"))
            if ckpts and checkpoint_step(ckpts[0]) >= min_step:
                break
            time.sleep(0.05)
        assert process.poll() is None, "the run ended before it could be killed"
        process.send_signal(signal.SIGKILL)
    finally:
        process.kill()
        process.wait()
    return run_dir_of(cwd)


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_sigkill_then_resume_matches_the_uninterrupted_run(tmp_path):
    whole_dir, killed_dir = tmp_path / "whole", tmp_path / "killed"
    whole_dir.mkdir(), killed_dir.mkdir()
    whole = run_script("train.py", *RUN, cwd=whole_dir)
    assert whole.returncode == 0, whole.stderr[-3000:]
    expected = json.loads((run_dir_of(whole_dir) / "results.json").read_text())

    run = kill_after_checkpoint(killed_dir, min_step=90)
    assert not (run / "results.json").exists()
    killed_at = checkpoint_step(run / "checkpoints" / "last.ckpt")
    first_config = digest(run / ".hydra" / "config.yaml")

    resumed = run_script("train.py", f"resume={run}", cwd=killed_dir)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert run_dir_of(killed_dir) == run  # no second folder: the run continued in its own
    results = json.loads((run / "results.json").read_text())
    assert results["resumed_at_step"] == killed_at and results["steps"] == 240
    for key in ("test/mse", "test/mse_ci95"):
        assert results["metrics"][key] == expected["metrics"][key], (key, killed_at)
    assert results["best_val"] == expected["best_val"]
    # the run's first Hydra files are kept; the resume's own sit beside them
    assert digest(run / ".hydra" / "config.yaml") == first_config
    assert len(list((run / ".hydra").glob("*/overrides.yaml"))) == 1
    # metrics.csv continues: every training step logged once, in order
    lines = (run / "csv" / "metrics.csv").read_text().splitlines()
    header = lines[0].split(",")
    steps = [int(line.split(",")[header.index("step")]) for line in lines[1:] if line.split(",")[header.index("train/loss")]]
    assert steps == sorted(set(steps)) and steps[0] < killed_at < steps[-1]


def test_resume_refuses_what_it_cannot_continue(tmp_path):
    cfg = OmegaConf.create({"resume": str(tmp_path / "nope"), "paths": {"output_dir": str(tmp_path / "new")}})
    with pytest.raises(CheckpointError, match="is not a run folder"):
        resumed_config(cfg)
    run = tmp_path / "outputs" / "old"
    (run / "checkpoints").mkdir(parents=True)
    cfg.resume = str(run)
    with pytest.raises(CheckpointError, match="no checkpoints/last.ckpt"):
        resumed_config(cfg)
    # Hydra is not pointed at such a folder: nothing is written into it
    assert resumable_run(run) is None and resumable_run(None) is None


def test_resume_changes_only_trainer_settings_and_continues_the_wandb_run(tmp_path):
    offline = {"WANDB_MODE": "offline"}
    first = run_script("train.py", "trainer.max_steps=20", "trainer.val_check_interval=10", "data.test_tasks=10",
                       "logger=[csv,wandb]", cwd=tmp_path, timeout=120, env=offline)
    assert first.returncode == 0, first.stderr[-3000:]
    run = run_dir_of(tmp_path)
    refused = run_script("train.py", f"resume={run}", "meta_learner.inner_lr=0.5", cwd=tmp_path, timeout=60)
    assert refused.returncode == 2 and "meta_learner.inner_lr=0.5" in refused.stderr and "trainer." in refused.stderr
    longer = run_script("train.py", f"resume={run}/checkpoints/last.ckpt", "trainer.max_steps=30", cwd=tmp_path,
                        timeout=120, env=offline)
    assert longer.returncode == 0, longer.stderr[-3000:]
    results = json.loads((run / "results.json").read_text())
    assert results["resumed_at_step"] == 20 and results["steps"] == 30
    # both W&B offline runs carry the run's id: `wandb sync` appends the second to the first
    run_ids = {p.name.rsplit("-", 1)[-1] for p in run.glob("wandb/offline-run-*")}
    assert len(list(run.glob("wandb/offline-run-*"))) == 2 and len(run_ids) == 1


def test_resuming_a_finished_run_says_so_and_changes_nothing(tmp_path):
    run = tmp_path / "run"
    assert run_script("train.py", "trainer.max_steps=4", f"hydra.run.dir={run}", cwd=tmp_path).returncode == 0
    before = {p: digest(p) for p in run.rglob("*") if p.is_file()}
    result = run_script("train.py", f"resume={run}", cwd=tmp_path)
    assert result.returncode == 0 and "Nothing to do" in result.stdout and "trainer.max_steps=8" in result.stdout
    assert {p: digest(p) for p in run.rglob("*") if p.is_file()} == before  # not one file added or changed
