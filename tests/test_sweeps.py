"""Hyperparameter search: an Optuna sweep through hydra-optuna-sweeper whose study continues on a second run."""
from __future__ import annotations

import json

import optuna
from hydra import compose, initialize_config_dir

from conftest import CONFIG_DIR, fixture_overrides, run_script

TINY = ["trainer.max_steps=4", "trainer.val_check_interval=2", "data.meta_batch_size=2", "data.val_tasks=4",
        "data.test_tasks=4", "data.eval_batch_size=4", "meta_learner.test_inner_steps=1", "hydra.sweeper.n_trials=2"]


def test_optuna_search_runs_trials_and_continues_its_study(tmp_path, omniglot_fixture, cache_dir):
    command = ["-m", "+experiment=omniglot_5way", "hparams_search=omniglot_optuna",
               *fixture_overrides(omniglot_fixture, cache_dir), *TINY]
    for invocation in (1, 2):
        result = run_script("train.py", *command, cwd=tmp_path)
        assert result.returncode == 0, result.stderr[-3000:]
    storage = f"sqlite:///{tmp_path / 'outputs' / 'optuna' / 'omniglot_5way_maml.db'}"
    study = optuna.load_study(study_name="omniglot_5way_maml", storage=storage)
    trials = study.trials
    assert [t.number for t in trials] == [0, 1, 2, 3]  # the second invocation added to the same study
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in trials)
    assert {"meta_learner.inner_lr", "optim.meta_lr", "meta_learner.inner_steps"} == set(trials[0].params)
    # each trial's value is the best val/acc of its run
    sweeps = sorted((tmp_path / "outputs" / "multirun").glob("*/*"))
    assert len(sweeps) == 2
    first = json.loads((sweeps[0] / "0" / "results.json").read_text())
    assert trials[0].value == first["best_val"]["val/acc"]


def test_slurm_launcher_config_composes():
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("train", overrides=["hydra/launcher=submitit_slurm", "hydra.launcher.partition=gpu"],
                      return_hydra_config=True)
    assert cfg.hydra.launcher._target_.endswith("SlurmLauncher") and cfg.hydra.launcher.partition == "gpu"
