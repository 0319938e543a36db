"""What a user sees on the terminal: quick answers before torch loads, one paragraph for a mistake, no folder
left by a refused command, no third-party noise, and the run's speed in its summary."""
from __future__ import annotations

import csv
import json
import os
import resource
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from conftest import CONFIG_DIR, REPO, run_script
from helpers import assert_one_clear_message, cli
from metalstm import jobs
from metalstm.loggers import WandbLogger, wandb_has_login
from metalstm.memory import is_out_of_memory


def isolated(home: Path, **env: str) -> dict[str, str]:
    """Environment of a user whose home is ``home``: its own config-group cache, no W&B login."""
    return {"HOME": str(home), **env}


def run_folders(cwd: Path) -> list[Path]:
    return [p for p in (cwd / "outputs").rglob("*") if (p / ".hydra").is_dir()] if (cwd / "outputs").is_dir() else []


def test_composing_imports_neither_torch_nor_lightning_once_the_cache_exists(tmp_path):
    command = [sys.executable, "-X", "importtime", str(REPO / "train.py"), "--cfg", "job"]
    for _ in range(2):  # the first call writes the config-group cache
        result = run_script("train.py", "--cfg", "job", cwd=tmp_path, env=isolated(tmp_path))
        assert result.returncode == 0 and "meta_learner:" in result.stdout, result.stderr
    result = subprocess.run(command, cwd=tmp_path, env={**os.environ, **isolated(tmp_path)}, capture_output=True, text=True)
    imported = {line.split("|")[-1].strip() for line in result.stderr.splitlines() if line.startswith("import time:")}
    assert result.returncode == 0 and "hydra" in imported
    assert "torch" not in imported and "lightning" not in imported
    assert len(list((tmp_path / ".cache" / "metalstm").glob("config_groups-*.json"))) == 1

    cache = next((tmp_path / ".cache" / "metalstm").glob("config_groups-*.json"))
    cache.write_text("{damaged")  # a damaged cache is rebuilt
    result = run_script("train.py", "--cfg", "job", cwd=tmp_path, env=isolated(tmp_path))
    assert result.returncode == 0 and "inner_lr" in result.stdout and json.loads(cache.read_text())


def test_a_command_line_hydra_cannot_compose_is_one_paragraph_and_exit_2(tmp_path):
    cases = {
        "data.waysx=3": ["data.waysx is not a setting", "--cfg job"],
        "meta_learner=mamlx": ["meta_learner=mamlx is not an option", "maml, memory_lstm"],
        "+experiment=omniglot5way": ["experiment=omniglot5way is not an option", "omniglot_5way,"],
        "resume": ["Error parsing override 'resume'", "key=value"],
    }
    for override, words in cases.items():
        result = run_script("train.py", override, cwd=tmp_path)
        assert_one_clear_message(result.returncode, result.stderr, *words)
    assert not run_folders(tmp_path)
    (tmp_path / "a_file").write_text("not a folder")  # a run folder that cannot be made
    result = run_script("train.py", f"hydra.run.dir={tmp_path / 'a_file' / 'run'}", cwd=tmp_path)
    assert_one_clear_message(result.returncode, result.stderr, "cannot create or write", "hydra.run.dir=")


def test_a_refused_command_leaves_no_run_folder(tmp_path):
    for script, args in (("train.py", ["data.meta_batch_size=0"]), ("eval.py", ["run_dir=nowhere"]),
                         ("predict.py", ["run_dir=nowhere", "support=a", "query=b"])):
        result = run_script(script, *args, cwd=tmp_path)
        assert_one_clear_message(result.returncode, result.stderr, "metalstm error")
    assert not run_folders(tmp_path) and not [p for p in (tmp_path / "outputs").rglob("*") if p.is_file()]


def test_wandb_without_a_login_says_how_to_log_in_or_go_offline(tmp_path, monkeypatch):
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    result = subprocess.run([sys.executable, str(REPO / "train.py"), "logger=wandb", "trainer.max_steps=2"], cwd=tmp_path,
                            env={**env, "HOME": str(tmp_path)}, capture_output=True, text=True, stdin=subprocess.DEVNULL)
    assert_one_clear_message(result.returncode, result.stderr, "wandb login", "WANDB_MODE=offline", "logger.wandb.offline")
    assert not run_folders(tmp_path)

    for name in [k for k in os.environ if k.startswith("WANDB_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))
    assert not wandb_has_login()
    (tmp_path / "netrc").write_text("machine api.wandb.ai\n  login user\n  password " + "x" * 40 + "\n")
    assert wandb_has_login()
    (tmp_path / "netrc").unlink()
    logger = WandbLogger(offline=True, save_dir=str(tmp_path))  # offline needs no login
    assert "anonymous" not in logger._wandb_init  # wandb warns on every run when it is passed


def test_logger_tensorboard_keeps_the_csv_the_report_reads():
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        for choice in ("tensorboard", "wandb"):
            cfg = compose("train", overrides=[f"logger={choice}"])
            assert set(cfg.logger) == {"csv", choice}


def test_a_short_run_is_quiet_logs_its_last_step_and_reports_its_speed(tmp_path):
    """Reptile: its train/loss is the query loss, like every method's, not its meta-objective (a surrogate near 0)."""
    run = tmp_path / "run"
    result = run_script("train.py", "meta_learner=reptile", "trainer.max_steps=30", f"hydra.run.dir={run}", cwd=tmp_path,
                        env={"PYTHONWARNINGS": ""})
    assert result.returncode == 0, result.stderr
    terminal = result.stdout + result.stderr
    for noise in ("Warning", "warn", "GPU available", "TPU available", "Tip:", "litlogger", "LeafSpec", "Epoch 0"):
        assert noise not in terminal, (noise, terminal)
    assert terminal.count("test/mse =") == 1  # the summary once (the log file has it too)
    assert "steps/s" in result.stdout and "tasks/s" in result.stdout
    results = json.loads((run / "results.json").read_text())
    assert results["steps"] == 30 and results["steps_per_second"] > 0 and results["test_seconds"] >= 0
    assert results["tasks_per_second"] > results["steps_per_second"]  # 25 tasks a step
    peaks = results["peak_memory_gb"]  # the process's resident set: at least the torch it loaded
    assert results["peak_memory_kind"] == "cpu_resident" and 0.1 < peaks["meta_training"] < 64
    assert 0.1 < peaks["meta_testing"] < 64 and "GB meta-training" in result.stdout
    assert "test/mse" in (run / "train.log").read_text()
    with open(run / "csv" / "metrics.csv") as f:  # log_every_n_steps is 50: the last step is written anyway
        rows = [r for r in csv.DictReader(f) if r.get("train/loss")]
    assert [int(r["step"]) for r in rows] == [29] and float(rows[0]["train/loss"]) > 0.1  # an untrained sinusoid MSE
    assert 0.1 < float(rows[0]["train/peak_memory_gb"]) <= peaks["meta_training"] + 0.01


def test_a_batch_larger_than_the_memory_is_refused_before_the_data_is_read(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(jobs, "build_datamodule", lambda *a, **k: pytest.fail("the data was read"))
    code, err = cli("train", ["data=omniglot", "base_learner=conv4", "data.image_size=3000", "data.meta_batch_size=64",
                              f"data.root={tmp_path}"], tmp_path / "run", capsys)
    assert_one_clear_message(code, err, "GiB for the inputs alone", "data.meta_batch_size=64", "data.image_size=3000")


def test_running_out_of_memory_names_the_settings_to_lower(tmp_path):
    """An address-space limit makes the allocator fail as a full machine would."""
    limit = 4 * 2**30
    result = subprocess.run(
        [sys.executable, str(REPO / "train.py"), "data.meta_batch_size=100000", "trainer.max_steps=3"], cwd=tmp_path,
        env={**os.environ, "WANDB_MODE": "disabled"}, capture_output=True, text=True,
        preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_AS, (limit, limit)))
    # the probe steps before training find that it cannot fit (an address-space limit counts as the machine's)
    assert_one_clear_message(result.returncode, result.stderr, "A training step of this run needs", "nothing was trained",
                             "data.meta_batch_size=100000", "memory_budget", "meta_learner.task_chunk")
    assert not list(tmp_path.rglob("*.ckpt"))
    assert is_out_of_memory(torch.OutOfMemoryError("CUDA out of memory")) and not is_out_of_memory(RuntimeError("shape"))
