"""The fault matrix: each entry point crossed with the classes of fault it can meet. Every cell asserts the promised
outcome: one named message (exit code 2 for commands, a DataError for the API), no traceback, and every file that
existed before byte-identical. Its size is printed in the session header (tests/faults/conftest.py)."""
from __future__ import annotations

import pickle
import shutil
import signal
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import fields
from pathlib import Path
from typing import Any, NamedTuple, get_type_hints

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from helpers import assert_one_clear_message, cli, run_entry, snapshot
from metalstm.config import _optional, rule_of
from metalstm.data import DATASETS
from metalstm.errors import ConfigError, MetalstmError
from metalstm.files import run_lock
from metalstm.inference import load_learner, predict_cli
from metalstm.learners import BASE_LEARNERS
from metalstm.meta import META_LEARNERS
from metalstm.module import OptimConfig
from metalstm.report import write_report
from metalstm.resume import resumed_config


class Cell(NamedTuple):
    entry: str  # train, eval, predict, resume, compare_runs, api
    fault: str  # the class of fault
    case: str
    check: Callable[[Path, Path, Any], None]  # (trained run, scratch folder, capsys)


CELLS: list[Cell] = []


def cell(entry: str, fault: str, case: str) -> Callable:
    def register(check: Callable) -> Callable:
        CELLS.append(Cell(entry, fault, case, check))
        return check
    return register


def unchanged(run: Path, action: Callable[[], Any]) -> Any:
    """Run ``action``; the trained run's files must be byte-identical afterwards."""
    before = snapshot(run)
    outcome = action()
    assert snapshot(run) == before
    return outcome


# ----------------------------------------------------------------------- eval: values of the run's own groups


def bad_values(hint: Any, rule: Any) -> list[Any]:
    """Values a setting of type ``hint`` under ``rule`` must refuse: a wrong type, and one out of range."""
    hint, _ = _optional(hint)
    if hint in (int, float):
        return ["bogus", -1] if rule.minimum is not None and rule.minimum >= 0 else ["bogus"]
    if hint is bool:
        return ["bogus", 7]
    if rule.choices is not None and hint is str:
        return ["bogus", 3]
    if getattr(hint, "__origin__", None) in (list, tuple):
        return ["bogus"]
    return []


def group_cells(group: str, config_class: type) -> None:
    hints = get_type_hints(config_class)
    for f in fields(config_class):
        if f.name in ("root", "cache_dir", "download", "name") or f.name.startswith("_"):
            continue  # where data lives may change at evaluation; the name picks the group
        for value in bad_values(hints[f.name], rule_of(f)):
            key = f"{group}.{f.name}"

            def check(run: Path, scratch: Path, capsys: Any, key: str = key, value: Any = value) -> None:
                code, err = unchanged(run, lambda: cli("eval", [f"run_dir={run}", f"++{key}={value}"], scratch, capsys))
                assert_one_clear_message(code, err, f"{key}=")
            CELLS.append(Cell("eval", "wrong-type or out-of-range value", f"{key}={value}", check))


group_cells("data", DATASETS["sinusoid"].config)
group_cells("meta_learner", META_LEARNERS["maml"].config)


# ----------------------------------------------------------------------- resume: what it may not change


def resume_cells() -> None:
    """Every setting of the trained run's groups, and the logging and checkpoint plumbing: a resumed run keeps its
    config, so changing one is refused (only trainer.*, data.root and data.cache_dir may change)."""
    keys = [f"{group}.{f.name}" for group, config_class in (
        ("data", DATASETS["sinusoid"].config), ("base_learner", BASE_LEARNERS["mlp"].config),
        ("meta_learner", META_LEARNERS["maml"].config), ("optim", OptimConfig)) for f in fields(config_class)
        if f.name not in ("root", "cache_dir")]
    keys += ["seed", "matmul_precision", "callbacks.last_checkpoint.every_n_steps", "logger.csv.name"]
    for key in keys:
        def check(run: Path, scratch: Path, capsys: Any, key: str = key) -> None:
            cfg = OmegaConf.create({"resume": str(run), "paths": {"output_dir": str(run)}})
            with pytest.raises(ConfigError, match=f"'{key}=1' cannot apply.*trainer.max_steps"):
                unchanged(run, lambda: resumed_config(cfg, overrides=[f"{key}=1"]))
        CELLS.append(Cell("resume", "a setting resume cannot change", key, check))


resume_cells()


# ----------------------------------------------------------------------- eval and resume: checkpoint files


def damaged_checkpoint(kind: str, run: Path, scratch: Path) -> Path:
    """A copy of the trained run whose last.ckpt is damaged in one way."""
    copy = scratch / "copy"
    shutil.copytree(run, copy)
    ckpt = copy / "checkpoints" / "last.ckpt"
    (copy / "checkpoints" / "best.ckpt").unlink(missing_ok=True)
    data = ckpt.read_bytes()
    if kind == "truncated":
        ckpt.write_bytes(data[: len(data) // 2])
    elif kind == "empty":
        ckpt.write_bytes(b"")
    elif kind == "garbage":
        ckpt.write_bytes(b"not a checkpoint at all" * 100)
    elif kind == "foreign":  # a torch file of something else
        torch.save({"state_dict": {"w": torch.zeros(2)}}, ckpt)
    elif kind == "hostile":  # a pickle that would run code when loaded without weights_only
        ckpt.write_bytes(pickle.dumps(Exploit()))
    return copy


class Exploit:
    def __reduce__(self):
        return (shutil.rmtree, ("/nonexistent-metalstm-target",))


for kind in ("truncated", "empty", "garbage", "foreign", "hostile"):
    for entry in ("eval", "resume"):
        def check(run: Path, scratch: Path, capsys: Any, kind: str = kind, entry: str = entry) -> None:
            copy = damaged_checkpoint(kind, run, scratch)
            before = snapshot(copy)
            if entry == "eval":
                code, err = cli("eval", [f"run_dir={copy}"], scratch / "out", capsys)
            else:
                code, err = cli("train", [f"resume={copy}"], copy, capsys)
            assert_one_clear_message(code, err, "last.ckpt")
            assert snapshot(copy) == before
        CELLS.append(Cell(entry, "missing, corrupt or hostile file", f"{kind} checkpoint", check))

for entry, args, words in (("eval", ["run_dir={scratch}/nowhere"], "No checkpoint"),
                           ("eval", ["ckpt_path={scratch}/none.ckpt"], "does not exist"),
                           ("resume", ["resume={scratch}/nowhere"], "is not a run folder"),
                           ("resume", ["resume={scratch}/empty_run"], "no checkpoints/last.ckpt")):
    def check(run: Path, scratch: Path, capsys: Any, entry: str = entry, args: list = args, words: str = words) -> None:
        (scratch / "empty_run" / "checkpoints").mkdir(parents=True)
        script = "eval" if entry == "eval" else "train"
        code, err = cli(script, [a.format(scratch=scratch) for a in args], scratch / "out", capsys)
        assert_one_clear_message(code, err, words)
    CELLS.append(Cell(entry, "missing, corrupt or hostile file", " ".join(args), check))


# ----------------------------------------------------------------------- the API: what adapt/predict are given


def api_inputs(kind: str) -> tuple[Any, Any, Any, str]:
    """(support x, support labels, query x, words of the message) for a sinusoid learner ([n, 1] inputs)."""
    x, y, q = np.linspace(-1, 1, 10)[:, None], np.sin(np.linspace(-1, 1, 10))[:, None], np.zeros((4, 1))
    cases = {
        "nan query": (x, y, np.full((4, 1), np.nan), "NaN or infinite"),
        "inf support": (np.where(x > 0.5, np.inf, x), y, q, "NaN or infinite"),
        "wrong shape": (x, y, np.zeros((4, 3)), "shape [n, 1]"),
        "1-d array": (x, y, np.zeros(4), "shape [n, 1]"),
        "text": (x, y, ["a", "b"], "shape [n, 1]"),
        "scalar": (x, y, 3.0, "shape [n, 1]"),
        "a file path": (x, y, "query.png", "shape [n, 1]"),
        "nested lists": (x, y, [[1.0, 2.0]], "shape [n, 1]"),
    }
    return cases[kind]


for kind in ("nan query", "inf support", "wrong shape", "1-d array", "text", "scalar", "a file path", "nested lists"):
    def check(run: Path, scratch: Path, capsys: Any, kind: str = kind) -> None:
        x, y, q, words = api_inputs(kind)
        learner = unchanged(run, lambda: load_learner(run, device="cpu"))
        with pytest.raises(MetalstmError, match=words.replace("[", r"\[").replace("]", r"\]")):
            learner.adapt(x, y).predict(q)
    CELLS.append(Cell("api", "non-finite or wrong-shaped input", kind, check))

for target, words in (("nowhere", "does not exist"), ("a_file.txt", "is not a metalstm checkpoint|not a readable")):
    def check(run: Path, scratch: Path, capsys: Any, target: str = target, words: str = words) -> None:
        (scratch / "a_file.txt").write_text("hello")
        with pytest.raises(MetalstmError, match=words):
            load_learner(scratch / target, device="cpu")
    CELLS.append(Cell("api", "missing, corrupt or hostile file", f"load_learner({target})", check))


# ----------------------------------------------------------------------- predict.py: the folders it reads


def image_run(scratch: Path) -> None:
    """support/ with two classes of PNGs and query/ with PNGs, as predict.py reads them."""
    for name in ("a", "b"):
        (scratch / "support" / name).mkdir(parents=True)
        Image.fromarray(np.zeros((28, 28), np.uint8)).save(scratch / "support" / name / "0.png")
    (scratch / "query").mkdir()
    Image.fromarray(np.zeros((28, 28), np.uint8)).save(scratch / "query" / "q.png")


for case, prepare, words in (
        ("no support folder", lambda s: shutil.rmtree(s / "support"), "is not a folder"),
        ("no query folder", lambda s: shutil.rmtree(s / "query"), "is not a folder"),
        ("support without classes", lambda s: [shutil.rmtree(p) for p in (s / "support").iterdir()], "no class sub-folders"),
        ("empty query", lambda s: (s / "query" / "q.png").unlink(), "holds no images"),
        ("no run", None, "run_dir")):
    def check(run: Path, scratch: Path, capsys: Any, prepare: Any = prepare, words: str = words) -> None:
        image_run(scratch)
        if prepare is not None:
            prepare(scratch)
        target = run if prepare is not None else scratch / "nowhere"
        with pytest.raises(MetalstmError, match=words):
            predict_cli(OmegaConf.create({"run_dir": str(target), "ckpt_path": None, "device": "cpu",
                                          "support": str(scratch / "support"), "query": str(scratch / "query"),
                                          "paths": {"output_dir": str(scratch / "out")}}))
    CELLS.append(Cell("predict", "missing, corrupt or hostile file", case, check))


# ----------------------------------------------------------------------- compare_runs: damaged run folders


def damage(run: Path, how: str) -> None:
    if how == "truncated results":
        (run / "results.json").write_text('{"metrics": {"test/mse": 0.')
    elif how == "results not an object":
        (run / "results.json").write_text("[1, 2]")
    elif how == "metrics not numbers":
        (run / "csv" / "metrics.csv").write_text("epoch,step,train/loss\n0,zero,one\n")
    elif how == "broken config":
        (run / ".hydra" / "config.yaml").write_text("seed: [1\n")
    elif how == "broken hydra record":
        (run / ".hydra" / "hydra.yaml").write_text("hydra: {runtime: [\n")
    elif how == "unreadable results (a folder)":
        (run / "results.json").unlink()
        (run / "results.json").mkdir()


for how in ("truncated results", "results not an object", "metrics not numbers", "broken config", "broken hydra record",
            "unreadable results (a folder)"):
    def check(run: Path, scratch: Path, capsys: Any, how: str = how) -> None:
        for name in ("good", "bad"):
            shutil.copytree(run, scratch / "sweep" / name)
        damage(scratch / "sweep" / "bad", how)
        before = snapshot(scratch / "sweep")
        written = write_report([scratch / "sweep"], scratch / "report")
        err = capsys.readouterr().err
        assert "warning: skipping" in err and "sweep/bad" in err and "Traceback" not in err, err
        assert "runs" in written and snapshot(scratch / "sweep") == before
        assert "sweep/good" in (scratch / "report" / "runs.md").read_text()
    CELLS.append(Cell("compare_runs", "missing, corrupt or hostile file", how, check))


# ----------------------------------------------------------------------- train: resources it does not have


for case, overrides, words in (
        ("a GPU that is not there", ["trainer=gpu"], "asks for a GPU"),
        ("inputs larger than memory", ["data=omniglot", "base_learner=conv4", "data.image_size=5000", "data.root=/x"],
         "GiB for the inputs alone")):
    def check(run: Path, scratch: Path, capsys: Any, overrides: list = overrides, words: str = words) -> None:
        if "trainer=gpu" in overrides and torch.cuda.is_available():
            pytest.skip("this machine has a GPU")
        code, err = cli("train", overrides, scratch / "run", capsys)
        assert_one_clear_message(code, err, words)
    CELLS.append(Cell("train", "resources the machine does not have", case, check))


# ----------------------------------------------------------------------- interrupts, in each phase


@contextmanager
def signal_when(function: str, signum: int, nth: int = 1, path_ends: str | None = None) -> Iterator[list[int]]:
    """Deliver ``signum`` to this process as ``function`` (a Python function's name) is entered the ``nth`` time
    (and, with ``path_ends``, only when its ``path`` argument ends so): a Ctrl-C or SIGTERM at a chosen moment,
    in-process. Yields a list that holds the signal once it was sent."""
    sent: list[int] = []
    calls = 0

    def profile(frame: Any, event: str, arg: Any) -> None:
        nonlocal calls
        if event != "call" or frame.f_code.co_name != function:
            return
        if path_ends is not None and not str(frame.f_locals.get("path", "")).endswith(path_ends):
            return
        calls += 1
        if calls == nth:
            sys.setprofile(None)
            sent.append(signum)
            signal.raise_signal(signum)

    sys.setprofile(profile)
    try:
        yield sent
    finally:
        sys.setprofile(None)


SHORT = ["trainer.max_steps=4", "trainer.val_check_interval=2", "data.val_tasks=4", "data.test_tasks=4",
         "callbacks.last_checkpoint.every_n_steps=1"]
CTRL_C, TERM = (signal.SIGINT, 130, "Ctrl-C"), (signal.SIGTERM, 143, "SIGTERM")
# (phase, where the signal lands, its nth call, the path it writes, which signals, what the run folder keeps)
TRAIN_PHASES = (("data preparation", "build_datamodule", 1, None, (CTRL_C,), "nothing"),
                ("model building", "build_module", 1, None, (CTRL_C,), "nothing"),
                ("a training step", "training_step", 2, None, (CTRL_C, TERM), "last.ckpt"),
                ("validation", "validation_step", 1, None, (CTRL_C, TERM), "last.ckpt"),
                ("writing a checkpoint", "atomic_write", 1, ".ckpt", (CTRL_C, TERM), "last.ckpt"),
                ("the test", "test_step", 1, None, (CTRL_C, TERM), "last.ckpt"),
                ("writing results.json", "write_json", 1, "results.json", (CTRL_C,), "last.ckpt"))


def no_partial_files(folder: Path) -> None:
    assert not list(folder.rglob("results.json")) and not list(folder.rglob(".*.tmp"))


for phase, function, nth, path_ends, signals, keeps in TRAIN_PHASES:
    for signum, code, words in signals:
        def check(run: Path, scratch: Path, capsys: Any, function: str = function, nth: int = nth,
                  path_ends: str | None = path_ends, signum: int = signum, code: int = code, words: str = words,
                  keeps: str = keeps) -> None:
            out = scratch / "run"
            with signal_when(function, signum, nth, path_ends) as sent:
                code_, err = cli("train", SHORT, out, capsys)
            assert sent and code_ == code and f"stopped by {words}" in err and "Traceback" not in err, err
            no_partial_files(scratch)
            if keeps == "last.ckpt":  # a consistent state to resume from
                assert torch.load(out / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] >= 1
                assert f"resume={out}" in err or "no results.json was written" in err, err
        CELLS.append(Cell("train", "interrupt", f"{words} during {phase}", check))

EVAL_PHASES = (("data preparation", "build_datamodule", None, (CTRL_C,)),
               ("the test", "test_step", None, (CTRL_C, TERM)),
               ("writing results.json", "write_json", "results.json", (CTRL_C,)))

for phase, function, path_ends, signals in EVAL_PHASES:
    for signum, code, words in signals:
        def check(run: Path, scratch: Path, capsys: Any, function: str = function, path_ends: str | None = path_ends,
                  signum: int = signum, code: int = code, words: str = words) -> None:
            def evaluate_stopped() -> tuple[int, str]:
                with signal_when(function, signum, 1, path_ends) as sent:
                    code_and_err = cli("eval", [f"run_dir={run}"], scratch / "eval", capsys)
                assert sent
                return code_and_err
            code_, err = unchanged(run, evaluate_stopped)
            assert code_ == code and f"stopped by {words}" in err and "Traceback" not in err, err
            no_partial_files(scratch)
        CELLS.append(Cell("eval", "interrupt", f"{words} during {phase}", check))


# ----------------------------------------------------------------------- one run folder, two commands


def copy_of(run: Path, scratch: Path) -> Path:
    shutil.copytree(run, scratch / "copy")
    return scratch / "copy"


for held, holder in ((True, "training"), (False, "an evaluation")):
    def check(run: Path, scratch: Path, capsys: Any, held: bool = held) -> None:
        copy = copy_of(run, scratch)
        (copy / "results.json").unlink()  # its test is still to run: a resume has work to do
        with run_lock(copy, exclusive=held):  # another command, as the kernel sees it
            code, err = unchanged(copy, lambda: cli("train", [f"resume={copy}"], copy, capsys))
        assert_one_clear_message(code, err, "is in use by another metalstm command", f"resume={copy}")
    CELLS.append(Cell("resume", "concurrent use of one run folder", f"while {holder} holds it", check))


def check_eval_while_training(run: Path, scratch: Path, capsys: Any) -> None:
    copy = copy_of(run, scratch)
    with run_lock(copy, exclusive=True):  # a training command owns the folder: an eval still reads it
        unchanged(copy, lambda: run_entry("eval", [f"run_dir={copy}"], scratch / "eval"))
    assert (scratch / "eval" / "results.json").is_file()


CELLS.append(Cell("eval", "concurrent use of one run folder", "while training holds it", check_eval_while_training))


def check_train_into_a_held_folder(run: Path, scratch: Path, capsys: Any) -> None:
    copy = copy_of(run, scratch)
    with run_lock(copy, exclusive=True):
        code, err = unchanged(copy, lambda: cli("train", ["trainer.max_steps=2"], copy, capsys))
    assert_one_clear_message(code, err, str(copy))


CELLS.append(Cell("train", "concurrent use of one run folder", "hydra.run.dir of a run in training",
                  check_train_into_a_held_folder))


def check_report_of_a_held_folder(run: Path, scratch: Path, capsys: Any) -> None:
    copy = copy_of(run, scratch / "sweep")
    with run_lock(copy, exclusive=True):
        unchanged(copy, lambda: write_report([scratch / "sweep"], scratch / "report"))
    assert "copy" in (scratch / "report" / "runs.md").read_text()


CELLS.append(Cell("compare_runs", "concurrent use of one run folder", "a run in training", check_report_of_a_held_folder))


def check_api_on_a_held_folder(run: Path, scratch: Path, capsys: Any) -> None:
    copy = copy_of(run, scratch)
    with run_lock(copy, exclusive=True):
        learner = unchanged(copy, lambda: load_learner(copy, device="cpu"))
    x = np.linspace(-1, 1, 10)[:, None]
    assert np.isfinite(learner.adapt(x, np.sin(x)).predict(np.zeros((3, 1)))).all()


CELLS.append(Cell("api", "concurrent use of one run folder", "load_learner of a run in training", check_api_on_a_held_folder))


@pytest.mark.parametrize("entry, fault, case, check", CELLS, ids=[f"{c.entry}-{c.case}" for c in CELLS])
def test_fault_matrix(entry, fault, case, check, trained_run, tmp_path, capsys):
    check(trained_run, tmp_path, capsys)


def matrix_size() -> tuple[int, int, int]:
    """(entry points, fault classes, cells) of this file's matrix."""
    return len({c.entry for c in CELLS}), len({c.fault for c in CELLS}), len(CELLS)


def test_every_entry_point_is_in_the_matrix():
    assert {c.entry for c in CELLS} == {"train", "eval", "resume", "predict", "compare_runs", "api"}
    assert len({c.fault for c in CELLS}) == 7 and len(CELLS) >= 130
