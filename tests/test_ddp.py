"""Multi-process data parallel on CPU (gloo): the same meta-gradient as one process, one output folder."""
from __future__ import annotations

import json
import subprocess
import sys

import torch

from conftest import REPO, fixture_overrides, run_script
from metalstm.assembly import build
from metalstm.data.episodes import EpisodeBatch


def test_two_process_ddp_gives_the_single_process_meta_gradient(tmp_path):
    probe = subprocess.run([sys.executable, str(REPO / "tests" / "ddp_probe.py"), str(tmp_path), "2"],
                           capture_output=True, text=True, timeout=300)
    assert probe.returncode == 0, probe.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    assert all(r["world"] == 2 for r in ranks)
    first, second = (EpisodeBatch(*r["batch"]) for r in ranks)
    assert first.num_tasks == second.num_tasks == 2  # the meta-batch of 4 split over 2 ranks
    assert not torch.equal(first.support_x, second.support_x)  # each rank its own tasks

    # one process, the same initial weights, all four tasks
    sys.path.insert(0, str(REPO / "tests"))
    from ddp_probe import CONFIG

    module, _ = build(CONFIG)
    module.meta_learner.load_state_dict(ranks[0]["initial"])
    whole = EpisodeBatch(*(torch.cat(parts) for parts in zip(first, second)))
    module.meta_learner.meta_loss(whole).loss.backward()
    for name, p in module.meta_learner.named_parameters():
        for rank in ranks:
            assert torch.allclose(rank["grads"][name], p.grad, atol=1e-6), name


def test_ddp_cpu_training_run_writes_one_output_folder_and_tests_each_task_once(tmp_path, omniglot_fixture, cache_dir):
    """trainer=ddp_cpu with 2 processes: one run folder, and the 2-rank test (7 tasks: uneven over the ranks,
    which a distributed sampler would pad with repeats) equals a 1-process eval."""
    result = run_script(
        "train.py", "+experiment=omniglot_5way", "trainer=ddp_cpu", "trainer.devices=2", "trainer.max_steps=5",
        *fixture_overrides(omniglot_fixture, cache_dir), "data.meta_batch_size=4", "trainer.val_check_interval=5",
        "data.val_tasks=4", "data.test_tasks=7", "data.eval_batch_size=4", "meta_learner.test_inner_steps=2",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    runs = [p for p in (tmp_path / "outputs").rglob("*") if p.is_dir() and (p / ".hydra").is_dir()]
    assert len(runs) == 1, runs
    folders = [p for p in (tmp_path / "outputs").glob("*/*") if p.is_dir()]
    assert folders == runs, folders  # the second rank wrote into the same folder, made none of its own
    results = json.loads((runs[0] / "results.json").read_text())
    assert results["steps"] == 5 and results["num_tasks"] == 7  # the 7 test tasks, shared over both ranks
    line = next(s for s in result.stdout.splitlines() if s.startswith("test/acc ="))
    single = run_script("eval.py", f"run_dir={runs[0]}", cwd=tmp_path)
    assert single.returncode == 0, single.stderr[-3000:]
    assert line.endswith("(7 tasks)") and line in single.stdout
