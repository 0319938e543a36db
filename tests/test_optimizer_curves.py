"""scripts/optimizer_curves.py: a learned optimizer's run against SGD, Adam and RMSprop with tuned rates."""
from __future__ import annotations

import json

from conftest import run_script


def test_learned_optimizer_curves_against_hand_designed_ones(tmp_path):
    train = run_script("train.py", "+experiment=sinusoid_learned_optimizer", "trainer.max_steps=2",
                       "meta_learner.inner_steps=4", "meta_learner.truncation=2", "meta_learner.test_inner_steps=6",
                       "trainer.val_check_interval=2", "data.val_tasks=4", "data.test_tasks=4", "hydra.run.dir=run",
                       cwd=tmp_path)
    assert train.returncode == 0, train.stderr[-3000:]
    curves = run_script("scripts/optimizer_curves.py", str(tmp_path / "run"), "--tasks", "5", cwd=tmp_path)
    assert curves.returncode == 0, curves.stderr[-3000:]
    out = tmp_path / "run" / "optimizer_curves"
    result = json.loads((out / "curves.json").read_text())
    assert result["steps"] == 6 and set(result["tuned_lr"]) == {"SGD", "Adam", "RMSprop"}
    assert len(result["curves"]) == 4 and all(len(c["mean"]) == 7 for c in result["curves"].values())
    starts = {round(c["mean"][0], 6) for c in result["curves"].values()}
    assert len(starts) == 1  # every optimizer starts from the same theta_0 on the same tasks
    sgd = next(c for name, c in result["curves"].items() if name.startswith("SGD"))
    assert sgd["mean"][-1] < sgd["mean"][0]  # the tuned rate trains
    assert (out / "curves.png").stat().st_size > 10_000


def test_optimizer_curves_refuse_a_run_of_another_method(tmp_path):
    train = run_script("train.py", "trainer.max_steps=2", "trainer.val_check_interval=2", "data.val_tasks=4",
                       "data.test_tasks=4", "hydra.run.dir=run", cwd=tmp_path)
    assert train.returncode == 0, train.stderr[-3000:]
    curves = run_script("scripts/optimizer_curves.py", str(tmp_path / "run"), cwd=tmp_path)
    assert curves.returncode == 2 and "meta_learner=maml" in curves.stderr and "Traceback" not in curves.stderr
