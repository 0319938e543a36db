"""Stopping a run: SIGTERM and Ctrl-C save last.ckpt and exit with a message; the run then resumes."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import REPO, run_script

LONG = ["trainer.max_steps=100000", "trainer.val_check_interval=100000", "trainer.log_every_n_steps=10",
        "callbacks.last_checkpoint.every_n_steps=100000", "data.test_tasks=10"]


@pytest.mark.parametrize("signum, code, words", [(signal.SIGTERM, 143, "SIGTERM"), (signal.SIGINT, 130, "Ctrl-C")])
def test_signal_saves_a_checkpoint_and_the_run_resumes(tmp_path, signum, code, words):
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "WANDB_MODE": "disabled"}
    process = subprocess.Popen([sys.executable, str(REPO / "train.py"), *LONG], cwd=tmp_path, env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not list(tmp_path.glob("outputs/*/*/csv/metrics.csv")):
        time.sleep(0.1)  # the CSV logger has written: training is under way
    process.send_signal(signum)
    out, err = process.communicate(timeout=120)
    assert process.returncode == code, err[-3000:]
    (run,) = tmp_path.glob("outputs/*/*")
    assert f"stopped by {words} at step" in err and f"resume={run}" in err and "Traceback" not in err
    step = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["global_step"]
    assert step >= 1

    resumed = run_script("train.py", f"resume={run}", f"trainer.max_steps={step + 20}", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "(10 tasks)" in resumed.stdout


@pytest.mark.parametrize("twice", [False, True])
def test_ctrl_c_during_eval_stops_it_and_writes_nothing(tmp_path, trained_run, twice):
    """A real process, signalled from outside at an arbitrary moment of its test loop (the fault matrix delivers
    Ctrl-C and SIGTERM in-process at chosen moments)."""
    run = trained_run
    files = {p: p.stat().st_mtime_ns for p in run.rglob("*") if p.is_file()}
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "WANDB_MODE": "disabled"}
    process = subprocess.Popen([sys.executable, str(REPO / "eval.py"), f"run_dir={run}", "data.test_tasks=100000"],
                               cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not list(tmp_path.glob("outputs/eval/*/*/eval.log")):
        time.sleep(0.1)
    time.sleep(12)  # past the imports, into the test loop (100,000 tasks take minutes; a loaded machine needs >7 s)
    stopped = time.time()
    process.send_signal(signal.SIGINT)
    if twice:  # the second Ctrl-C stops at once, wherever it lands (inside torch.func.vmap, often)
        time.sleep(0.02)
        process.send_signal(signal.SIGINT)
    out, err = process.communicate(timeout=60)
    assert process.returncode == 130 and time.time() - stopped < 20, err[-3000:]
    assert "stopped by Ctrl-C during the test; no results.json was written" in err and "Traceback" not in err
    assert not list(tmp_path.glob("outputs/eval/**/results.json")) and not (tmp_path / "outputs" / "eval").exists()
    assert {p: p.stat().st_mtime_ns for p in run.rglob("*") if p.is_file()} == files  # the trained run untouched


CTRL_C_ON_IMPORT = """
import importlib.abc, os, runpy, signal, sys
module, sys.argv = sys.argv[1], sys.argv[2:]
class CtrlC(importlib.abc.MetaPathFinder):  # Ctrl-C as the script starts to import the module named first
    def find_spec(self, name, path, target=None):
        if name == module:
            sys.meta_path.remove(self)
            os.kill(os.getpid(), signal.SIGINT)
sys.meta_path.insert(0, CtrlC())
runpy.run_path(sys.argv[0], run_name="__main__")
"""


@pytest.mark.parametrize("script, module", [("train.py", "hydra"), ("eval.py", "hydra"), ("predict.py", "hydra"),
                                            ("scripts/compare_runs.py", "metalstm.report"),
                                            ("scripts/optimizer_curves.py", "torch")])
def test_ctrl_c_while_a_command_imports_is_one_line(tmp_path, script, module):
    result = subprocess.run([sys.executable, "-c", CTRL_C_ON_IMPORT, module, str(REPO / script)], cwd=tmp_path,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 130 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert "stopped by Ctrl-C while starting; nothing was written" in result.stderr and not list(tmp_path.iterdir())
