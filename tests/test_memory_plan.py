"""The memory plan: a training step's need measured by probe steps before training, settings chosen to fit a
budget, and a run that cannot fit stopped before it trains."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from metalstm.core import EpisodeBatch
from metalstm.errors import ConfigError, ResourceError
from metalstm.learners.conv4 import Conv4, Conv4Config
from metalstm.memory_plan import Estimate, measure, parse_bytes, plan
from metalstm.meta.maml import MAML, MAMLConfig
from metalstm.objectives import Classification

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("text,expected", [("8GB", 8 * 10**9), ("512MiB", 512 * 2**20), ("1.5 gb", int(1.5e9)),
                                           (1000000, 10**6), ("2TiB", 2 * 2**40), (None, None)])
def test_memory_amounts_are_read_with_their_units(text, expected):
    assert parse_bytes(text) == expected


@pytest.mark.parametrize("text", ["8 parsecs", "GB", "-1GB", "0", "eight"])
def test_a_memory_amount_without_sense_is_refused_with_examples(text):
    with pytest.raises(ConfigError, match="memory_budget=8GB"):
        parse_bytes(text)


def test_the_estimate_is_linear_in_the_tasks_alive_and_finds_the_most_that_fit():
    estimate = Estimate(base=100, fixed=50, per_task=10)
    assert estimate.need(1) == 160 and estimate.need(8) == 230
    assert estimate.most_alive(230) == 8 and estimate.most_alive(229) == 7 and estimate.most_alive(159) == 0
    assert Estimate(base=100, fixed=50, per_task=0).most_alive(150) > 10**6


def conv4_maml(**options) -> tuple[MAML, EpisodeBatch]:
    """Second-order MAML on Conv-4 with images large enough that a task's graph is megabytes."""
    torch.manual_seed(0)
    spec = {"task_type": "classification", "input_shape": (1, 28, 28), "output_dim": 5}
    learner = Conv4(Conv4Config(filters=32, downsample="maxpool"), spec)
    maml = MAML(learner, Classification().loss, spec, MAMLConfig(inner_lr=0.4, inner_steps=5, **options))
    g = torch.Generator().manual_seed(1)
    y = torch.arange(5).repeat(5).expand(4, -1)
    batch = EpisodeBatch(torch.randn(4, 25, 1, 28, 28, generator=g), y.contiguous(),
                         torch.randn(4, 25, 1, 28, 28, generator=g), y.contiguous())
    return maml, batch


def test_probe_steps_leave_no_trace():
    """Parameters, BatchNorm buffers, gradients and the random stream are as before the probes."""
    maml, batch = conv4_maml(learned_lr="per_layer_per_step")
    before = {k: v.clone() for k, v in maml.state_dict().items()}
    torch.manual_seed(5)
    expected_draw = torch.rand(3)
    torch.manual_seed(5)
    assert measure(maml, batch, torch.device("cpu"), "32-true") is not None
    assert torch.equal(torch.rand(3), expected_draw)
    assert all(torch.equal(before[k], v) for k, v in maml.state_dict().items())
    assert all(p.grad is None for p in maml.parameters())
    assert maml.cfg.task_chunk == 0 and maml.cfg.checkpoint_inner is False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the CPU measure is the resident set (Linux)")
def test_a_budget_below_the_configured_need_gets_smaller_chunks_or_a_checkpointed_inner_loop():
    maml, batch = conv4_maml(vectorize="grouped")
    cpu = torch.device("cpu")
    estimate = measure(maml, EpisodeBatch(*(t[:2] for t in batch)), cpu, "32-true")
    assert estimate.per_task > 0
    draw = lambda tasks: EpisodeBatch(*(t[:tasks] for t in batch))  # noqa: E731
    configured = plan(maml, draw, 4, cpu, "32-true", budget=None, drivers="")
    assert configured.changes == {} and abs(configured.need - estimate.need(4)) < 0.25 * estimate.need(4)  # re-measured
    budget = estimate.need(2) + estimate.per_task // 2  # room for two tasks' graphs, not four
    chosen = plan(maml, draw, 4, cpu, "32-true", budget=budget, drivers="")
    assert chosen.changes and chosen.need <= budget
    assert maml.cfg.task_chunk == chosen.changes["task_chunk"]
    assert chosen.changes["task_chunk"] < 4 or maml.cfg.checkpoint_inner  # fewer graphs alive, or each inner step
    with pytest.raises(ResourceError, match=r"needs about .* GiB.*more than the budget memory_budget .*"
                                            r"task_chunk=1 and meta_learner.checkpoint_inner=true"):
        plan(maml, draw, 4, cpu, "32-true", budget=estimate.base, drivers="data.meta_batch_size=4")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the CPU measure is the resident set (Linux)")
def test_a_validation_batch_larger_than_a_training_step_sets_the_need():
    """A validation batch (here 1,500 queries a task against a training step's 25) is probed too, so the need
    covers it."""
    maml, batch = conv4_maml(vectorize="grouped")
    cpu = torch.device("cpu")
    g = torch.Generator().manual_seed(2)
    evaluation = EpisodeBatch(batch.support_x, batch.support_y, torch.randn(4, 1500, 1, 28, 28, generator=g),
                              torch.arange(5).repeat(300).expand(4, -1).contiguous())
    draw = lambda tasks: EpisodeBatch(*(t[:tasks] for t in batch))  # noqa: E731
    training = plan(maml, draw, 4, cpu, "32-true", budget=None, drivers="")
    both = plan(maml, draw, 4, cpu, "32-true", budget=None, drivers="", evaluation=evaluation)
    activation = 1500 * 32 * 28 * 28 * 4  # block 1's output over a task's queries (150 MB), scored task by task
    assert both.need - training.need > activation // 2


def train(tmp_path: Path, *overrides: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "train.py", f"hydra.run.dir={tmp_path / 'run'}", "trainer.max_steps=2",
                           "trainer.val_check_interval=2", "data.val_tasks=4", "data.test_tasks=4", *overrides],
                          cwd=REPO, env={**os.environ, "WANDB_MODE": "disabled"}, capture_output=True, text=True)


def test_a_run_over_its_budget_stops_before_training_naming_need_limit_and_settings(tmp_path):
    result = train(tmp_path, "memory_budget=1MB")
    assert result.returncode == 2, result.stderr[-2000:]
    message = result.stderr.strip().splitlines()[-1]
    assert "needs about" in message and "budget memory_budget (0.00 GiB" in message and "nothing was trained" in message
    assert "data.meta_batch_size" in message and "Traceback" not in result.stderr
    assert not (tmp_path / "run").exists()  # a refused run leaves no folder: nor checkpoints, nor logger files


def test_a_run_records_its_estimate_and_measured_peak(tmp_path):
    result = train(tmp_path, "memory_budget=64GB")
    assert result.returncode == 0, result.stderr[-2000:]
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    plan_record = results["memory_plan"]
    assert plan_record["budget_gb"] == round(64e9 / 2**30, 3) and plan_record["changes"] == {}
    assert 0 < plan_record["estimated_peak_gb"] <= plan_record["limit_gb"]
    assert results["peak_memory_gb"]["meta_training"] > 0


def test_a_budget_without_sense_is_refused_before_any_data_is_read(tmp_path):
    result = train(tmp_path, "memory_budget=lots", "data=omniglot", "data.root=/nonexistent")
    assert result.returncode == 2
    assert "memory_budget='lots' is not an amount of memory" in result.stderr and "Traceback" not in result.stderr
