"""Real runs of train.py and eval.py, as a user types them."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import fixture_overrides, run_script
from metalstm.checkpointing import load_checkpoint


def run_dir_of(stdout_dir: Path) -> Path:
    runs = sorted((stdout_dir / "outputs").glob("20*/*"))
    assert len(runs) == 1, runs
    return runs[0]


def test_train_then_eval_on_omniglot_fixture(tmp_path, omniglot_fixture, cache_dir):
    train = run_script(
        "train.py", "+experiment=omniglot_5way", *fixture_overrides(omniglot_fixture, cache_dir),
        "trainer.max_steps=30", "trainer.val_check_interval=15", "trainer.log_every_n_steps=10", "data.meta_batch_size=4",
        "data.val_tasks=20", "data.test_tasks=40", "data.eval_batch_size=20", "meta_learner.test_inner_steps=3",
        cwd=tmp_path,
    )
    assert train.returncode == 0, train.stderr[-3000:]
    run = run_dir_of(tmp_path)
    results = json.loads((run / "results.json").read_text())
    assert results["num_tasks"] == 40 and results["experiment"] == "omniglot_5way"
    assert results["bn_policy"] == "transductive" and results["steps"] == 30
    acc, ci = results["metrics"]["test/acc"], results["metrics"]["test/acc_ci95"]
    assert 0 <= acc <= 100 and 0 < ci < 50
    assert f"test/acc = {acc:.2f} +- {ci:.2f} (40 tasks)" in train.stdout
    assert (run / "checkpoints" / "best.ckpt").is_file() and (run / "checkpoints" / "last.ckpt").is_file()
    assert load_checkpoint(run / "checkpoints" / "best.ckpt")["metalstm"]["config"]["data"]["ways"] == 5
    metrics_csv = (run / "csv" / "metrics.csv").read_text()
    for key in ("train/loss", "train/acc", "val/acc", "test/acc", "test/acc_ci95"):
        assert key in metrics_csv

    evaluation = run_script("eval.py", f"run_dir={run}", cwd=tmp_path)
    assert evaluation.returncode == 0, evaluation.stderr[-3000:]
    # the same checkpoint on the same fixed tasks gives the same number
    assert f"test/acc = {acc:.2f} +- {ci:.2f} (40 tasks)" in evaluation.stdout
    eval_results = sorted((tmp_path / "outputs" / "eval").glob("*/*/results.json"))
    assert len(eval_results) == 1
    assert json.loads(eval_results[0].read_text())["metrics"]["test/acc"] == pytest.approx(acc)


def test_protonet_with_running_batchnorm_statistics_trains_and_evaluates(tmp_path, omniglot_fixture, cache_dir):
    """base_learner.norm=running: the statistics travel in the checkpoint, and eval.py tests with them."""
    train = run_script(
        "train.py", "+experiment=omniglot_5way_protonet", *fixture_overrides(omniglot_fixture, cache_dir),
        "base_learner.norm=running", "data.train_ways=10", "trainer.max_steps=6", "trainer.val_check_interval=3",
        "data.val_tasks=4", "data.test_tasks=10", cwd=tmp_path,
    )
    assert train.returncode == 0, train.stderr[-3000:]
    run = run_dir_of(tmp_path)
    results = json.loads((run / "results.json").read_text())
    assert results["bn_policy"] == "running"
    state = load_checkpoint(run / "checkpoints" / "last.ckpt")["state_dict"]
    assert int(state["meta_learner.learner.body.1.num_batches_tracked"]) == 6  # one update per training episode
    assert not torch.allclose(state["meta_learner.learner.body.1.running_var"], torch.ones(64))
    evaluation = run_script("eval.py", f"run_dir={run}", cwd=tmp_path)
    assert evaluation.returncode == 0, evaluation.stderr[-3000:]
    eval_results = sorted((tmp_path / "outputs" / "eval").glob("*/*/results.json"))
    assert len(eval_results) == 1
    again = json.loads(eval_results[0].read_text())
    assert again["bn_policy"] == "running"
    assert again["metrics"]["test/acc"] == pytest.approx(results["metrics"]["test/acc"])  # same statistics, same tasks


def test_trainval_run_tests_its_final_weights(tmp_path, omniglot_fixture, cache_dir):
    """data.trainval: validation classes are trained on, so no best checkpoint is kept; train.py and eval.py
    both test the final weights (last.ckpt), on the same tasks, with the same number."""
    train = run_script(
        "train.py", "+experiment=omniglot_5way_protonet", *fixture_overrides(omniglot_fixture, cache_dir),
        "data.trainval=true", "data.train_ways=10", "trainer.max_steps=6", "trainer.val_check_interval=3",
        "data.val_tasks=4", "data.test_tasks=10", cwd=tmp_path,
    )
    assert train.returncode == 0, train.stderr[-3000:]
    assert "checkpoint:  final weights (data.trainval" in train.stdout
    run = run_dir_of(tmp_path)
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["last.ckpt"]
    assert load_checkpoint(run / "checkpoints" / "last.ckpt")["global_step"] == 6
    results = json.loads((run / "results.json").read_text())
    assert results["checkpoint"] is None and results["data"]["trainval"] is True
    evaluation = run_script("eval.py", f"run_dir={run}", cwd=tmp_path)
    assert evaluation.returncode == 0, evaluation.stderr[-3000:]
    again = json.loads(sorted((tmp_path / "outputs" / "eval").glob("*/*/results.json"))[0].read_text())
    assert again["metrics"]["test/acc"] == pytest.approx(results["metrics"]["test/acc"])


def test_default_sinusoid_run_learns(tmp_path):
    """The embedded default, shortened: MAML beats the unadapted initialisation on the fixed test tasks."""
    result = run_script("train.py", "trainer.max_steps=500", "trainer.val_check_interval=250", "data.test_tasks=200",
                        cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads((run_dir_of(tmp_path) / "results.json").read_text())
    # measured on these 200 test tasks: the untrained initialisation adapted for 10 steps scores 4.19
    # (trainer.max_steps=0); after 500 meta-training steps 1.52
    assert results["metrics"]["test/mse"] < 2.5 and results["data"]["dataset"] == "sinusoid"


def test_debug_fdr_runs(tmp_path):
    result = run_script("train.py", "debug=fdr", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "test/mse" in result.stdout


def test_missing_data_fails_fast_with_one_clear_message(tmp_path):
    result = run_script("train.py", "+experiment=omniglot_5way", "trainer.max_steps=3", "data.root=/nonexistent",
                        cwd=tmp_path, timeout=60)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    message = result.stderr.strip()
    assert "metalstm error:" in message and "/nonexistent" in message and "data.root" in message
    # fails in data setup, before any step: nothing was trained, so no run folder is left behind
    assert not [p for p in (tmp_path / "outputs").rglob("*") if p.is_file()]
