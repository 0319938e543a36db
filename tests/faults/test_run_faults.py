"""Bad configs, diverging runs, crashes mid-write, reused folders, untrusted checkpoints: a clear message, a
non-zero exit, and no existing file changed."""
from __future__ import annotations

import os
import pickle
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import REPO, fixture_overrides, run_script
from helpers import assert_one_clear_message, cli, snapshot
from metalstm.checkpointing import AtomicCheckpointIO
from metalstm.errors import CheckpointError
from metalstm.files import run_lock
from test_train_eval import run_dir_of

SHORT = ["trainer.max_steps=6", "trainer.val_check_interval=3", "callbacks.last_checkpoint.every_n_steps=1",
         "data.val_tasks=4", "data.test_tasks=4"]


# ------------------------------------------------------------------------------------ config, before any data

@pytest.mark.parametrize("overrides, words", [
    (["meta_learner.inner_lr=-0.1"], ["meta_learner.inner_lr=-0.1", "must be positive"]),
    (["optim.meta_lr=0"], ["optim.meta_lr=0", "must be positive"]),
    (["meta_learner.name=mamll"], ["meta_learner.name='mamll'", "maml", "reptile"]),
    (["+meta_learner.inner_stepz=3"], ["meta_learner.inner_stepz", "inner_steps"]),
    (["data.shots=10", "data.eval_query=15"], ["data.shots + data.eval_query = 25", "Omniglot has 20"]),
    (["meta_learner=lstm_optimizer", "meta_learner.variant=andrychowicz", "meta_learner.second_order=true"],
     ["meta_learner.second_order=true", "variant=ravi"]),
])
def test_impossible_config_is_refused_before_the_data_is_read(overrides, words, tmp_path, capsys):
    # data.root does not exist: the config error must come first
    code, err = cli("train", ["+experiment=omniglot_5way", f"data.root={tmp_path / 'absent'}", "data.download=false",
                              *overrides], tmp_path / "run", capsys)
    assert_one_clear_message(code, err, *words)


def test_a_classification_setting_on_stroke_completion_is_refused(tmp_path, capsys):
    code, err = cli("train", ["+experiment=strokes_completion", f"data.root={tmp_path / 'absent'}", "data.download=false",
                              "data.train_shots=3"], tmp_path / "run", capsys)
    assert_one_clear_message(code, err, "data.train_shots=3", "data.task=complete", "Remove data.train_shots")


@pytest.mark.parametrize("overrides, words", [
    (["data.ways=60"], ["data.ways=60", "classes of the", "split"]),
    (["base_learner=conv4"], ["conv4", "base_learner=mlp"]),  # a CNN cannot read sinusoid points
    (["meta_learner=protonet"], ["meta_learner=protonet", "classification", "regression"]),  # no prototypes of reals
])
def test_impossible_combination_with_the_data_is_refused(overrides, words, omniglot_fixture, cache_dir, tmp_path,
                                                         capsys):
    data = fixture_overrides(omniglot_fixture, cache_dir) if "data.ways=60" in overrides else []
    experiment = "+experiment=omniglot_5way" if data else "+experiment=sinusoid"
    code, err = cli("train", [experiment, *data, *overrides], tmp_path / "run", capsys)
    assert_one_clear_message(code, err, *words)


@pytest.mark.parametrize("override, words", [
    ("trainer.max_steps=-5", ["trainer (lightning.pytorch.Trainer) cannot be built", "max_steps"]),
    ("+trainer.gradient_clip_vall=1", ["trainer (lightning.pytorch.Trainer) cannot be built", "gradient_clip_vall"]),
    ("callbacks.last_checkpoint.every_n_steps=0", ["every_n_steps=0", "positive"]),
])
def test_impossible_trainer_settings_name_the_key(override, words, tmp_path, capsys):
    code, err = cli("train", [override], tmp_path / "run", capsys)
    assert_one_clear_message(code, err, *words)


def test_gpu_trainer_on_a_machine_without_one(tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    code, err = cli("train", ["trainer=gpu"], tmp_path / "run", capsys)
    assert_one_clear_message(code, err, "trainer.accelerator=gpu", "trainer=cpu")


# ------------------------------------------------------------------------------------ training

def test_a_diverging_run_stops_with_its_step_and_keeps_the_last_good_checkpoint(tmp_path, capsys, caplog):
    code, err = cli("train", ["+experiment=sinusoid", "optim.meta_lr=1e6", "trainer.max_steps=200", *SHORT[1:]],
                    tmp_path / "run", capsys)
    assert_one_clear_message(code, err, "meta-loss became", "at step", "last finite value", "optim.meta_lr")
    step = int(err.split("at step ")[1].split()[0])
    last = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)
    assert last["global_step"] == step  # saved after the last finite step, not over with the broken weights
    assert all(torch.isfinite(v).all() for v in last["state_dict"].values() if v.is_floating_point())
    assert "Traceback" in caplog.text  # the full traceback goes to the run's log


def test_a_crash_while_writing_a_checkpoint_leaves_the_previous_one(tmp_path, monkeypatch):
    path = tmp_path / "checkpoints" / "last.ckpt"
    io = AtomicCheckpointIO()
    io.save_checkpoint({"global_step": 1}, path)
    before = snapshot(tmp_path)

    def dies_halfway(obj, f, *args, **kwargs):
        f.write(b"half a checkpoint")
        raise KeyboardInterrupt  # as a kill would stop it mid-write

    monkeypatch.setattr(torch, "save", dies_halfway)
    with pytest.raises(KeyboardInterrupt):
        io.save_checkpoint({"global_step": 2}, path)
    assert snapshot(tmp_path) == before  # the old file intact, no temporary file left
    assert io.load_checkpoint(path)["global_step"] == 1


def test_two_runs_started_together_get_their_own_folders(tmp_path):
    env = {**os.environ, "WANDB_MODE": "disabled"}
    runs = [subprocess.Popen([sys.executable, str(REPO / "train.py"), "debug=fdr"], cwd=tmp_path, env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    for run in runs:
        assert run.wait(timeout=120) == 0, run.stderr.read()[-2000:]
    folders = sorted(tmp_path.glob("outputs/*/*"))
    assert len(folders) == 2 and all((f / ".hydra" / "config.yaml").is_file() for f in folders)


def test_a_run_folder_is_never_written_over(tmp_path):
    first = run_script("train.py", "trainer.max_steps=4", "trainer.val_check_interval=2", "data.test_tasks=4",
                       cwd=tmp_path, timeout=120)
    assert first.returncode == 0, first.stderr[-2000:]
    run = run_dir_of(tmp_path)
    before = {k: v for k, v in snapshot(run).items() if not k.endswith("train.log")}  # the log is appended to
    again = run_script("train.py", f"hydra.run.dir={run}", "trainer.max_steps=4", cwd=tmp_path, timeout=120)
    assert again.returncode == 2 and "holds a run already" in again.stderr and f"resume={run}" in again.stderr
    after = snapshot(run)
    assert all(after[k] == v for k, v in before.items())  # first .hydra/ files, checkpoints, results: untouched


# ------------------------------------------------------------------------------------ untrusted checkpoints

class Exploit:
    marker = ""

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_a_malicious_checkpoint_cannot_run_code(tmp_path, capsys):
    from metalstm import load_learner

    Exploit.marker = str(tmp_path / "pwned")
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    with open(run / "checkpoints" / "last.ckpt", "wb") as f:
        pickle.dump({"metalstm": {"format": 1, "config": {}}, "state_dict": Exploit()}, f, protocol=2)
    (run / "checkpoints" / "best.ckpt").write_bytes((run / "checkpoints" / "last.ckpt").read_bytes())
    before = snapshot(run)
    code, err = cli("eval", [f"run_dir={run}"], tmp_path / "eval", capsys)
    assert_one_clear_message(code, err, "best.ckpt", "not a readable checkpoint")
    with pytest.raises(CheckpointError, match="not a readable checkpoint"):
        load_learner(run)
    code, err = cli("train", [f"resume={run}"], run, capsys)
    assert_one_clear_message(code, err, "last.ckpt", "not a readable checkpoint")
    assert not (tmp_path / "pwned").exists() and snapshot(run) == before


@pytest.mark.parametrize("content, words", [
    ({"metalstm": {"format": 99, "config": {}}, "state_dict": {}}, ["newer metalstm", "format 99", "upgrade"]),
    ({"state_dict": {}}, ["not a metalstm checkpoint"]),  # e.g. a plain Lightning checkpoint
])
def test_a_checkpoint_that_is_not_ours_says_what_it_is(content, words, tmp_path, capsys):
    path = tmp_path / "model.ckpt"
    torch.save(content, path)
    code, err = cli("eval", [f"ckpt_path={path}"], tmp_path / "eval", capsys)
    assert_one_clear_message(code, err, "model.ckpt", *words)


def test_eval_of_a_folder_without_checkpoints(tmp_path, capsys):
    code, err = cli("eval", [f"run_dir={tmp_path}"], tmp_path / "eval", capsys)
    assert_one_clear_message(code, err, "No checkpoint", "best.ckpt", "run_dir")


def whole_files(folder: Path) -> set[str]:
    """Names of the files in ``folder``, less the temporary ones a writer (alive, or killed mid-write) has open."""
    return {p.name for p in folder.iterdir() if not p.name.endswith(".tmp")}


def test_one_command_at_a_time_trains_a_run_folder_and_a_killed_one_frees_it(tmp_path, capsys):
    run = tmp_path / "run"
    env = {**os.environ, "WANDB_MODE": "disabled"}
    training = subprocess.Popen([sys.executable, str(REPO / "train.py"), f"hydra.run.dir={run}", "trainer.max_steps=100000",
                                 "callbacks.last_checkpoint.every_n_steps=5"], env=env, cwd=tmp_path,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and not (run / "checkpoints" / "last.ckpt").is_file():
            time.sleep(0.1)
        before = whole_files(run / "checkpoints")
        code, err = cli("train", [f"resume={run}"], run, capsys)  # a second command on the same folder
        assert_one_clear_message(code, err, f"{run} is in use by another metalstm command", f"resume={run}")
    finally:
        training.kill()  # SIGKILL: no chance to unlock
        training.wait()
    assert whole_files(run / "checkpoints") == before
    (run / "checkpoints" / ".last.ckpt.killed.tmp").write_bytes(b"half a checkpoint")  # one such file, for sure
    with run_lock(run, exclusive=False):  # the kernel freed the killed process's lock; an eval reads the run
        resumed = run_script("train.py", f"resume={run}", cwd=tmp_path)  # and a resume must wait for it
    assert_one_clear_message(resumed.returncode, resumed.stderr, "is in use")
    assert (run / "checkpoints" / ".last.ckpt.killed.tmp").is_file()  # a refused command removes nothing
    with run_lock(run, exclusive=True):  # the next owner of the folder clears what the killed writer left
        assert not list((run / "checkpoints").glob(".*.tmp")) and (run / "checkpoints" / "last.ckpt").is_file()
