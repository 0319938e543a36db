"""Fault injection: run train.py/eval.py's own entry function on a composed config, and fingerprint folders."""
from __future__ import annotations

import hashlib
import shutil
import signal
import zipfile
from collections.abc import Callable
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from conftest import CONFIG_DIR
from metalstm.cli import run_cli
from metalstm.jobs import evaluate, train


def snapshot(*folders: Path) -> dict[str, str]:
    """sha256 of every file below ``folders``: compare before and after to show nothing was changed."""
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest()
            for folder in folders for p in sorted(folder.rglob("*")) if p.is_file()}


def cli(script: str, overrides: list[str], output_dir: Path, capsys) -> tuple[int, str]:
    """``python train.py|eval.py <overrides>`` in-process, through the same run_cli the scripts call:
    (exit code, what reached the terminal's stderr)."""
    return exit_of(lambda: run_entry(script, overrides, output_dir), capsys)


def exit_of(command: Callable[[], object], capsys) -> tuple[int, str]:
    """Run ``command``, which must exit: (exit code, what reached the terminal's stderr meanwhile)."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as stop:
        command()
    return stop.value.code, capsys.readouterr().err


def run_entry(script: str, overrides: list[str], output_dir: Path) -> object:
    """``python train.py|eval.py <overrides>`` in-process; what the entry function returns."""
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose(script, overrides=[f"paths.output_dir={output_dir}", *overrides])
    # as the commands do before run_cli (metalstm.cli.launch): Ctrl-C is a KeyboardInterrupt, whatever an earlier test
    # in this process left installed
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        return run_cli({"train": train, "eval": evaluate}[script], cfg)
    finally:  # a command stopped by Ctrl-C ignores further ones while its process exits; this process goes on
        signal.signal(signal.SIGINT, signal.default_int_handler)


def assert_one_clear_message(code: int, err: str, *words: str) -> None:
    """Exit code 2, one 'metalstm error:' paragraph holding ``words``, no traceback."""
    assert code == 2, err
    assert "Traceback" not in err and err.count("metalstm error:") == 1, err
    message = err.strip()
    assert "\n" not in message, message
    for word in words:
        assert word in message, (word, message)


def edited_zip(source: Path, target: Path, edit: Callable[[str, bytes], tuple[str, bytes] | None],
               extra: dict[str, bytes] | None = None) -> Path:
    """A copy of ``source`` with each member passed through ``edit`` (None drops it) and ``extra`` added."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(source) as src, zipfile.ZipFile(target, "w") as dst:
        for name in src.namelist():
            edited = edit(name, src.read(name))
            if edited is not None:
                dst.writestr(*edited)
        for name, data in (extra or {}).items():
            dst.writestr(name, data)
    return target


def copy_fixture(fixture: Path, target: Path) -> Path:
    target.mkdir(parents=True, exist_ok=True)
    for name in ("images_background.zip", "images_evaluation.zip"):
        shutil.copy(fixture / name, target / name)
    return target
