"""Every numeric setting of every config group, walked from the schemas: a word, a fraction where a count
belongs, zero and a negative number each stop the run with one clear message naming the key, exit code 2,
before any data is read (or, for zero where zero is allowed, get as far as the data)."""
from __future__ import annotations

import copy
import functools
import subprocess
import sys
from dataclasses import fields
from pathlib import Path
from typing import get_type_hints

import pytest
from hydra import compose, initialize_config_dir
from hydra._internal.config_loader_impl import ConfigLoaderImpl
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import DictConfig

from conftest import CONFIG_DIR, REPO, run_script
from helpers import assert_one_clear_message, cli, exit_of
from metalstm import jobs
from metalstm.assembly import RunConfig
from metalstm.cli import run_cli
from metalstm.config import _optional, rule_of
from metalstm.data import DATASETS
from metalstm.learners import BASE_LEARNERS
from metalstm.meta import META_LEARNERS
from metalstm.module import OptimConfig


def numeric_keys() -> list[tuple[str, str | None, str, type, object]]:
    """(group, option, key, int or float, rule) of every int/float setting in every schema."""
    keys = []
    schemas = [(registry.group, name, entry.config) for registry in (DATASETS, BASE_LEARNERS, META_LEARNERS)
               for name, entry in sorted(registry.items())]
    for group, option, config_class in [*schemas, ("optim", None, OptimConfig), ("", None, RunConfig)]:
        hints = get_type_hints(config_class)
        for f in fields(config_class):
            kind, _ = _optional(hints[f.name])
            if kind in (int, float):
                keys.append((group, option, f.name, kind, rule_of(f)))
    return keys


KEYS = numeric_keys()


@functools.cache
def composed(base: tuple[str, ...]) -> DictConfig:
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose("train", overrides=list(base))


def train_with(base: list[str], override: str, output_dir: Path, capsys) -> tuple[int, str]:
    """``cli("train", [*base, override], ...)`` at a tenth of the cost: ``base`` is composed once, and the override
    applied to a copy by Hydra's own code for a ``key=value`` on the command line."""
    cfg = copy.deepcopy(composed(tuple(base)))
    parsed = OverridesParser.create().parse_overrides([f"paths.output_dir={output_dir}", override])
    ConfigLoaderImpl._apply_overrides_to_config(parsed, cfg)
    return exit_of(lambda: run_cli(jobs.train, cfg), capsys)


class DataReached(Exception):
    """Raised in place of reading the data: the config was accepted."""


def test_the_walk_covers_every_group_and_every_number_has_a_rule():
    groups = {(g, o) for g, o, *_ in KEYS}
    assert {("meta_learner", "maml"), ("data", "omniglot"), ("base_learner", "conv4"), ("optim", None), ("", None)} <= groups
    assert len(KEYS) > 80
    for group, option, key, _, rule in KEYS:  # a number without a lower bound would let a negative one through
        bounded = (rule.minimum is not None and rule.minimum >= 0) or (rule.choices and min(rule.choices) > 0)
        assert bounded, f"{group}.{key} ({option}) has no rule"


@pytest.mark.parametrize("group, option, key, kind, rule", KEYS,
                         ids=[f"{g or 'run'}-{o}-{k}" for g, o, k, *_ in KEYS])
def test_a_bad_number_is_refused_before_the_data_is_read(group, option, key, kind, rule, tmp_path, capsys, monkeypatch):
    def no_data(*args, **kwargs):
        raise DataReached

    monkeypatch.setattr(jobs, "build_datamodule", no_data)
    name = f"{group}.{key}" if group else key
    base = [f"{group}={option}"] if option else []
    if group == "data":  # a base learner that can read this data set's tasks, so zero gets as far as the data
        config_class = DATASETS[option].config
        root = {"root": str(tmp_path / "absent")} if "root" in {f.name for f in fields(config_class)} else {}
        spec = config_class(**root).spec()
        learner = next(n for n, (c, impl) in sorted(BASE_LEARNERS.items()) if impl.refusal(c(), spec) is None)
        base += [f"base_learner={learner}", *(f"data.{k}={v}" for k, v in root.items())]
    zero_allowed = (rule.minimum == 0 and not rule.exclusive) or 0 in (rule.choices or ())
    above = [] if rule.maximum is None else [rule.maximum * 2 + 1]  # seed: 2**33 - 1, which numpy cannot take
    bad = ["bogus", -1, *([] if zero_allowed else [0]), *([1.5] if kind is int else []), *above]
    for value in bad:
        code, err = train_with(base, f"{name}={value}", tmp_path / f"run{value}", capsys)
        assert_one_clear_message(code, err, f"{name}=", "must be")
    if zero_allowed:
        with pytest.raises(DataReached):
            train_with(base, f"{name}=0", tmp_path / "run0", capsys)


def test_the_message_is_the_same_for_a_word_and_a_negative_number(tmp_path, capsys):
    messages = []
    for value in ("many", -3, 2.5):
        code, err = cli("train", [f"data.meta_batch_size={value}"], tmp_path / str(value), capsys)
        messages.append(err.strip().replace(str(value), "<v>").replace("'<v>'", "<v>"))
    assert messages[0] == messages[1] == messages[2], messages
    assert "data.meta_batch_size=<v> must be a whole number >= 1 (default 25)" in messages[0]


def test_from_the_command_line(tmp_path):
    run = run_script("train.py", "meta_learner.inner_steps=1.5", cwd=tmp_path, timeout=120)
    assert run.returncode == 2 and "Traceback" not in run.stderr
    assert "meta_learner.inner_steps=1.5 must be a whole number >= 0" in run.stderr
    assert not list(tmp_path.glob("outputs/*/*/csv")), "nothing is logged for a run that never started"


def test_importing_the_meta_learners_loads_no_data_set():
    code = ("import sys, metalstm.meta, metalstm.meta.protonet; "
            "print(sorted(m for m in sys.modules if m.startswith(('metalstm.data', 'PIL', 'lightning'))))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]", out


def test_the_registries_and_functional_api_load_without_lightning():
    """Data sets, learners and meta-learners import without Lightning (0.19 GB of memory): only the DataModule,
    the LightningModule and the jobs need it."""
    code = ("import sys, metalstm.data, metalstm.learners, metalstm.meta, metalstm.objectives; "
            "print(sorted(m for m in sys.modules if m.startswith(('lightning', 'pytorch_lightning'))))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]", out
