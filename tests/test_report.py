"""A sweep, then the comparison report on it: tables, seed aggregates, plots, and the HTML page in a real browser."""
from __future__ import annotations

import csv
import json
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from PIL import Image

from conftest import REPO, run_script
from metalstm.report import natural_key, student_t_ci95


def compare(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "scripts" / "compare_runs.py"), *args], cwd=cwd,
                          capture_output=True, text=True, timeout=120)


def rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def render(page: Path) -> str:
    """The page's DOM after load, from headless Chromium (Debian's package; .ci/run installs it)."""
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        pytest.skip("Chromium is not installed (apt-get install chromium; .ci/run does)")
    with tempfile.TemporaryDirectory() as profile:
        result = subprocess.run(
            [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
             "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={profile}",
             "--virtual-time-budget=5000", "--dump-dom", page.as_uri()],
            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout


def test_sweep_then_compare_runs_report(tmp_path):
    sweep = run_script("train.py", "-m", "+experiment=sinusoid", "meta_learner.inner_lr=0.01,0.02", "seed=1,2",
                       "trainer.max_steps=40", "trainer.val_check_interval=20", "trainer.log_every_n_steps=10",
                       "data.val_tasks=10", "data.test_tasks=20", cwd=tmp_path)
    assert sweep.returncode == 0, sweep.stderr[-3000:]
    (sweep_dir,) = tmp_path.glob("outputs/multirun/*/*")
    runs = sorted(p for p in sweep_dir.iterdir() if p.is_dir())
    assert [p.name for p in runs] == ["0", "1", "2", "3"]  # one folder per job, none shared
    assert all((p / "results.json").is_file() and (p / "checkpoints" / "best.ckpt").is_file() for p in runs)

    result = compare(str(sweep_dir), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    report = sweep_dir / "report"
    table = rows(report / "runs.csv")
    assert len(table) == 4
    grid = {(r["meta_learner.inner_lr"], r["seed"]) for r in table}
    assert grid == {("0.01", "1"), ("0.01", "2"), ("0.02", "1"), ("0.02", "2")}
    assert all(re.fullmatch(r"[\d.]+ ± [\d.e+-]+", r["test/mse"]) and r["status"] == "done" for r in table)
    assert "| meta_learner.inner_lr | seed |" in (report / "runs.md").read_text()
    seeds = rows(report / "seeds.csv")
    assert [(r["meta_learner.inner_lr"], r["seeds"]) for r in seeds] == [("0.01", "1, 2"), ("0.02", "1, 2")]
    for name in ("curves.png", "final.png"):
        with Image.open(report / name) as image:
            assert image.format == "PNG" and image.width > 300
    page = (report / "report.html").read_text()
    assert "http://" not in page and "https://" not in page  # opens offline: plots are embedded

    dom = render(report / "report.html")
    assert 'data-rows="4"' in dom and 'data-images-loaded="2"' in dom
    assert dom.count('<tr class="run">') == 4 and dom.count('<tr class="group">') == 2


def test_compare_runs_on_a_folder_without_runs(tmp_path):
    result = compare(str(tmp_path), cwd=tmp_path)
    assert result.returncode == 2 and "No runs found" in result.stderr and "Traceback" not in result.stderr


def test_seed_interval_uses_students_t():
    mean, ci = student_t_ci95([1.0, 2.0, 3.0])
    assert mean == 2.0 and ci == pytest.approx(4.303 * 1.0 / 3 ** 0.5, rel=1e-4)


def test_an_unfinished_run_is_listed_without_metrics(tmp_path):
    from metalstm.report import write_report

    for name, lr, results in (("a", 0.1, {"metrics": {"test/acc": 50.0, "test/acc_ci95": 2.0}, "steps": 10}),
                              ("b", 0.2, None), ("c", 0.3, None)):
        run = tmp_path / "sweep" / name
        (run / ".hydra").mkdir(parents=True)
        (run / ".hydra" / "config.yaml").write_text(f"seed: 1\nmeta_learner:\n  inner_lr: {lr}\n")
        if results:
            (run / "results.json").write_text(json.dumps(results))
        if name == "b":  # stopped after some training: its curve is there, its test is not
            (run / "csv").mkdir()
            (run / "csv" / "metrics.csv").write_text("epoch,step,train/loss\n0,4,1.5\n")
    written = write_report([tmp_path / "sweep"], tmp_path / "out")
    table = rows(tmp_path / "out" / "runs.csv")
    assert [(r["run"], r["status"], r["meta_learner.inner_lr"], r["test/acc"]) for r in table] == [
        ("sweep/a", "done", "0.1", "50 ± 2"), ("sweep/b", "unfinished", "0.2", "")]
    assert "seeds" not in written and "final" in written
    assert "Left out, as they hold no training: sweep/c" in (tmp_path / "out" / "report.html").read_text()


def test_runs_and_layers_sort_by_their_numbers():
    """Sweep jobs 2 before 10 (a named folder beside numbered ones must not break the sort); Conv-4 layers in order."""
    paths = [Path("sweep/10/.hydra"), Path("sweep/extra/.hydra"), Path("sweep/2/.hydra")]
    assert sorted(paths, key=lambda p: natural_key(p.parts)) == [paths[2], paths[0], paths[1]]
    layers = ["head", "body.10", "body.3", "body.0"]
    assert sorted(layers, key=lambda s: natural_key([s])) == ["body.0", "body.3", "body.10", "head"]


def test_stream_runs_plot_accuracy_by_instance(tmp_path):
    """Santoro-protocol runs (test/acc_<k>) get instances.png; runs without those metrics do not."""
    from metalstm.report import Run, build_report, instance_accuracy, plot_instances

    metrics = {"test/acc": 50.0, "test/acc_1": 30.0, "test/acc_1_ci95": 2.0, "test/acc_10": 80.0,
               "test/acc_10_ci95": 1.5, "test/acc_2": 60.0, "test/acc_2_ci95": 2.5, "test/acc_5": float("nan")}
    stream = Run(tmp_path / "a", "a", {"meta_learner.attention": True}, {"metrics": metrics})
    assert instance_accuracy(stream) == [(1, 30.0, 2.0), (2, 60.0, 2.5), (10, 80.0, 1.5)]  # NaN (no 5th) left out
    plain = Run(tmp_path / "b", "b", {"meta_learner.attention": False}, {"metrics": {"test/acc": 90.0}})
    assert instance_accuracy(plain) == []
    assert not plot_instances(build_report([plain]), tmp_path / "none.png") and not (tmp_path / "none.png").exists()
    assert plot_instances(build_report([stream, plain]), tmp_path / "instances.png")
    with Image.open(tmp_path / "instances.png") as image:
        assert image.format == "PNG"


def test_lstm_optimizer_run_reports_its_gates(tmp_path):
    """A Ravi LSTM-optimizer run logs its gates per inner step and layer; the report plots them."""
    from metalstm.report import find_runs, gate_values, write_report

    train = run_script("train.py", "meta_learner=lstm_optimizer", "meta_learner.inner_steps=3", "trainer.max_steps=4",
                       "trainer.log_every_n_steps=2", "trainer.val_check_interval=4", "data.val_tasks=5",
                       "data.test_tasks=5", "hydra.run.dir=run", cwd=tmp_path)
    assert train.returncode == 0, train.stderr[-3000:]
    (run,) = find_runs([tmp_path / "run"])
    gates = gate_values(run)
    assert set(gates) == {"input", "forget"}
    assert set(gates["input"]) == {"body.1", "body.3", "head"}  # the MLP's two hidden layers and its head
    assert sorted(step for step, _, _ in gates["input"]["head"]) == [1, 2, 3]
    # computed and logged on the steps Lightning writes (every log_every_n_steps), not on every step
    assert [s for s, _ in run.curves["train/gates/input/head/step1"]] == [s for s, _ in run.curves["train/loss"]] == [1, 3]
    assert all(0 < mean < 1 and spread >= 0 for layer in gates["forget"].values() for _, mean, spread in layer)
    written = write_report([tmp_path / "run"], tmp_path / "out")
    with Image.open(written["gates"]) as image:
        assert image.format == "PNG" and image.width > 600  # two panels: input and forget
    assert "<h2>The learned optimizer's gates per inner step and layer</h2>" in (tmp_path / "out" / "report.html").read_text()


def fake_run(folder: Path, config: str, choices: dict[str, str], curves: str | None, results: dict | None) -> None:
    """A run folder as train.py leaves it: its config, Hydra's record of the group choices, metrics and results."""
    (folder / ".hydra").mkdir(parents=True)
    (folder / ".hydra" / "config.yaml").write_text(config)
    (folder / ".hydra" / "hydra.yaml").write_text("hydra:\n  runtime:\n    choices:\n" +
                                                  "".join(f"      {k}: {v}\n" for k, v in choices.items()))
    if curves:
        (folder / "csv").mkdir()
        (folder / "csv" / "metrics.csv").write_text(curves)
    if results:
        (folder / "results.json").write_text(json.dumps(results))


def test_mixed_runs_show_only_what_tells_them_apart_with_readable_figures(tmp_path):
    from metalstm.report import LABEL_CHARS, build_report, find_runs, run_label

    plumbing = "paths:\n  output_dir: {out}\nlogger:\n  csv:\n    _target_: metalstm.loggers.CSVLogger\n    save_dir: {out}\n"
    sinusoid = ("seed: 1\ndata:\n  name: sinusoid\n  amplitude: [0.1, 5.0]\n  meta_batch_size: 25\n"
                "meta_learner:\n  name: maml\n  inner_lr: {lr}\ntrainer:\n  val_check_interval: 500\n" + plumbing)
    omniglot = ("seed: 1\ndata:\n  name: omniglot\n  ways: 5\n  meta_batch_size: 32\nmeta_learner:\n  name: protonet\n"
                "trainer:\n  val_check_interval: 500\n" + plumbing)
    loss = "epoch,step,train/loss\n" + "".join(f"0,{s},{2 / (1 + s / 50) + 0.2 * (s % 3)}\n" for s in range(49, 400, 50))
    mse = {"metrics": {"test/mse": 0.5, "test/mse_ci95": 0.05}, "steps": 400, "steps_per_second": 20.0}
    sweep = tmp_path / "mixed"
    fake_run(sweep / "maml_a", sinusoid.format(lr=0.01, out="a"), {"experiment": "sinusoid"}, loss, mse)
    fake_run(sweep / "maml_b", sinusoid.format(lr=0.02, out="b"), {"experiment": "sinusoid"}, loss, mse)
    fake_run(sweep / "proto", omniglot.format(out="c"), {"experiment": "omniglot_5way_protonet"}, loss,
             {"metrics": {"test/acc": 97.5, "test/acc_ci95": 0.4}, "steps": 400})
    fake_run(sweep / "refused", sinusoid.format(lr=-1, out="d"), {"experiment": "sinusoid"}, None, None)

    report = build_report(find_runs([sweep]))
    # group choices first, then keys two runs both set differently; not where files go, not keys one group lacks
    assert report.keys == ["experiment", "meta_learner.name", "data.name", "data.meta_batch_size", "meta_learner.inner_lr"]
    assert [r.name for r in report.empty] == ["mixed/refused"]
    assert all(len(run_label(r, report)) <= LABEL_CHARS + 4 for r in report.runs)
    assert run_label(report.runs[0], report).startswith("1. sinusoid/maml/sinusoid, meta_batch_size=25, inner_lr=0.01"[:40])

    result = compare(str(sweep), "--out", str(tmp_path / "out"), cwd=tmp_path)
    assert result.returncode == 0 and "Warning" not in result.stderr, result.stderr
    for name in ("curves", "final"):
        with Image.open(tmp_path / "out" / f"{name}.png") as image:
            assert image.width >= 1400  # page-wide, not a thumbnail
    page = tmp_path / "out" / "report.html"
    dom = render(page)
    assert 'data-rows="3"' in dom and 'data-images-loaded="2"' in dom and "mixed/refused" in dom
    assert "logger.csv" not in dom and "paths.output_dir" not in dom and "data.amplitude" not in dom

    shot = tmp_path / "page.png"  # what a reader sees: the page renders to a screenshot with the figures in it
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    with tempfile.TemporaryDirectory() as profile:
        subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", f"--user-data-dir={profile}",
                        "--window-size=1400,2000", f"--screenshot={shot}", page.as_uri()], capture_output=True, timeout=120)
    with Image.open(shot) as image:
        assert image.size == (1400, 2000) and len(image.convert("RGB").getcolors(1 << 20) or []) > 200


def test_a_damaged_run_is_skipped_with_a_warning_and_the_others_reported(tmp_path):
    good = {"metrics": {"test/acc": 50.0, "test/acc_ci95": 2.0}, "steps": 10}
    for name in ("a", "b", "c", "d"):
        fake_run(tmp_path / "sweep" / name, f"seed: 1\nmeta_learner:\n  inner_lr: 0.{ord(name)}\n", {}, None, good)
    (tmp_path / "sweep" / "b" / "results.json").write_text('{"metrics": {"test/acc": 5')  # cut off mid-write
    (tmp_path / "sweep" / "c" / "csv").mkdir()
    (tmp_path / "sweep" / "c" / "csv" / "metrics.csv").write_text("epoch,step,train/loss\n0,x,1.0\n")
    (tmp_path / "sweep" / "d" / ".hydra" / "config.yaml").write_text("seed: [1\n")
    result = compare(str(tmp_path / "sweep"), "--out", str(tmp_path / "out"), cwd=tmp_path)
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr
    assert [line.split(":")[0] for line in result.stderr.splitlines()] == ["warning"] * 3
    assert all(f"sweep/{n}" in result.stderr for n in "bcd")
    assert [r["run"] for r in rows(tmp_path / "out" / "runs.csv")] == ["sweep/a"]
