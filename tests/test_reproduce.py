"""The reproduction runner: tables compose, a killed table continues where it stopped, the report renders."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from conftest import REPO, fixture_overrides, run_script
from metalstm.assembly import build_module, parse
from metalstm.errors import ConfigError
from metalstm.reproduce import TABLES, load_table
from test_report import render

CONFIG_DIR = REPO / "configs"
TABLE_NAMES = sorted(p.stem for p in TABLES.glob("*.yaml"))
TINY = """
name: tiny
title: A tiny sinusoid table
data_root: false
rows:
  - {id: first, method: MAML, setting: sinusoid 10-shot, experiment: sinusoid,
     overrides: [trainer.max_steps=60, trainer.val_check_interval=30],
     published: {value: 0.5, ci: 0.1, metric: test/mse, source: "a made-up paper"}, protocol: "short"}
  - {id: second, method: MAML, setting: sinusoid 5-shot, experiment: sinusoid,
     overrides: [data.shots=5, trainer.max_steps=400, trainer.val_check_interval=200,
                 callbacks.last_checkpoint.every_n_steps=20],
     published: null, protocol: "long enough to be killed"}
  - {id: again, method: MAML, setting: sinusoid 10-shot, evaluate: first, overrides: [data.test_tasks=40],
     published: null, protocol: "the first row's checkpoint on 40 tasks"}
"""
TRIAL = ["data.val_tasks=10", "data.test_tasks=20"]


def reproduce(*args: str, cwd: Path, **kwargs) -> subprocess.Popen:
    env = {**os.environ, "WANDB_MODE": "disabled", "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, str(REPO / "scripts" / "reproduce.py"), *args], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kwargs)


def wait_for(path: Path, process: subprocess.Popen, timeout: float = 240) -> None:
    deadline = time.time() + timeout
    while not path.exists():
        assert process.poll() is None, process.stdout.read()[-3000:]
        assert time.time() < deadline, f"{path} did not appear"
        time.sleep(0.2)


@pytest.mark.slow  # 25 s: four training runs, a kill and a browser
def test_a_killed_table_continues_where_it_stopped_and_reports(tmp_path):
    table = tmp_path / "tiny.yaml"
    table.write_text(TINY)
    out = tmp_path / "out" / "tiny"
    runner = reproduce(str(table), "--out", str(tmp_path / "out"), *TRIAL, cwd=tmp_path, start_new_session=True)
    wait_for(out / "second" / "checkpoints" / "last.ckpt", runner)
    os.killpg(runner.pid, signal.SIGKILL)  # the runner and its row, as a machine that stops
    runner.wait()
    first = (out / "first" / "results.json").stat().st_mtime_ns
    assert not (out / "second" / "results.json").exists()

    again = reproduce(str(table), "--out", str(tmp_path / "out"), *TRIAL, cwd=tmp_path)
    log, _ = again.communicate(timeout=300)
    assert again.returncode == 0, log[-3000:]
    assert "first: done, kept" in log and "second: resuming" in log and "again: starting" in log
    assert (out / "first" / "results.json").stat().st_mtime_ns == first  # not retrained
    launches = json.loads((out / "second.launches.json").read_text())
    assert [launch["state"] for launch in launches] == ["new", "resumable"]
    assert json.loads((out / "second" / "results.json").read_text())["resumed_at_step"] >= 20
    assert json.loads((out / "again" / "results.json").read_text())["num_tasks"] == 40

    rows = json.loads((out / "report.json").read_text())
    assert [r["status"] for r in rows] == ["done", "done", "done"]
    assert rows[0]["published"] == "0.5 ± 0.1" and rows[0]["intervals overlap"] in ("yes", "no")
    assert float(rows[0]["difference"]) == pytest.approx(float(rows[0]["ours (95% CI)"].split(" ± ")[0]) - 0.5, abs=0.01)
    assert rows[1]["steps"] == "400" and rows[2]["steps"] == "60"  # the evaluated row reports its training row's
    assert rows[2]["command"] == "python eval.py run_dir=outputs/reproduce/tiny/first data.test_tasks=40"
    assert "| MAML | sinusoid 5-shot |" in (out / "report.md").read_text()
    dom = render(out / "report.html")
    assert 'data-rows="3"' in dom and 'data-images-loaded="1"' in dom


def test_report_only_lists_rows_not_run_and_fills_the_readme_block(tmp_path):
    table = tmp_path / "tiny.yaml"
    table.write_text(TINY)
    readme = tmp_path / "README.md"
    readme.write_text("# Title\n\nbefore\n<!-- reproduce:tiny -->\nold table\n<!-- /reproduce:tiny -->\nafter\n")
    runner = reproduce(str(table), "--out", str(tmp_path / "out"), "--report-only", "--readme", str(readme), cwd=tmp_path)
    log, _ = runner.communicate(timeout=120)
    assert runner.returncode == 0, log
    rows = json.loads((tmp_path / "out" / "tiny" / "report.json").read_text())
    assert [r["status"] for r in rows] == ["not run"] * 3
    text = readme.read_text()
    assert "old table" not in text and text.startswith("# Title\n\nbefore\n<!-- reproduce:tiny -->\n| method |")
    assert text.count("| MAML |") == 3 and text.endswith("<!-- /reproduce:tiny -->\nafter\n")
    readme.write_text("no markers\n")
    runner = reproduce(str(table), "--out", str(tmp_path / "out"), "--report-only", "--readme", str(readme), cwd=tmp_path)
    log, _ = runner.communicate(timeout=120)
    assert runner.returncode == 2 and "needs one '<!-- reproduce:tiny -->' line" in log and readme.read_text() == "no markers\n"


@pytest.mark.parametrize("args, words", [
    (["no_such_table"], ["No reproduction table 'no_such_table'", "omniglot_cpu"]),
    (["sinusoid", "--rows", "maml_5shot,nope"], ["--rows nope", "maml_10shot"]),
])
def test_bad_runner_input_is_one_message_and_exit_2(args, words, tmp_path):
    runner = reproduce(*args, "--out", str(tmp_path / "out"), cwd=tmp_path)
    log, _ = runner.communicate(timeout=60)
    assert runner.returncode == 2 and "Traceback" not in log
    assert all(w in log for w in words), log


def test_a_table_with_a_bad_row_is_refused(tmp_path):
    table = tmp_path / "bad.yaml"
    table.write_text("name: bad\nrows:\n  - {id: a, method: m, setting: s, protocol: p, evaluate: b}\n")
    runner = reproduce(str(table), cwd=tmp_path)
    log, _ = runner.communicate(timeout=60)
    assert runner.returncode == 2 and "evaluate='b' names no earlier row" in log


@pytest.mark.parametrize("name", TABLE_NAMES)
def test_every_row_of_every_table_composes_and_parses(name, tmp_path):
    """Each training row's experiment and overrides make a valid config; each evaluation's keys exist."""
    table = load_table(name)
    for row in table.rows:
        with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
            if row.experiment:
                cfg = compose("train", overrides=[f"+experiment={row.experiment}", *row.overrides,
                                                  f"paths.output_dir={tmp_path}"])
                parse(OmegaConf.to_container(cfg, resolve=True))
            else:
                compose("eval", overrides=[f"run_dir={tmp_path}", *row.overrides])
    assert table.rows and len({r.id for r in table.rows}) == len(table.rows)


def test_protonet_trains_on_more_ways_and_tests_on_others(tmp_path, omniglot_fixture, cache_dir):
    """Snell et al.'s protocol: meta-train 20-way here (60 in the paper), test 5-way, then evaluate 20-way."""
    common = ["+experiment=omniglot_5way_protonet", "data.train_ways=20", "trainer.max_steps=3",
              "trainer.val_check_interval=3", "data.val_tasks=2", "data.test_tasks=2", "base_learner.filters=8",
              *fixture_overrides(omniglot_fixture, cache_dir)]
    trained = run_script("train.py", *common, cwd=tmp_path)
    assert trained.returncode == 0, trained.stderr[-3000:]
    (run,) = [p.parent for p in tmp_path.glob("outputs/*/*/results.json")]
    assert json.loads((run / "results.json").read_text())["data"]["train_ways"] == 20
    wide = run_script("eval.py", f"run_dir={run}", "data.ways=20", f"data.root={omniglot_fixture}", cwd=tmp_path)
    assert wide.returncode == 0, wide.stderr[-3000:]
    assert "test/acc" in wide.stdout
    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):  # refused as train.py refuses
        maml = compose("train", overrides=[*common, "meta_learner=maml", f"paths.output_dir={tmp_path}"])
    with pytest.raises(ConfigError, match="data.train_ways=20: meta_learner=maml has an output per class"):
        settings = parse(OmegaConf.to_container(maml, resolve=True))
        build_module(settings, settings.spec, {})
