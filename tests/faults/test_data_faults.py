"""Broken data: each fault stops the run with one message naming the file and the fix, and changes no file."""
from __future__ import annotations

import io
import zipfile

import pytest
import torch
from hydra import compose, initialize_config_dir
from PIL import Image

from conftest import CONFIG_DIR, fixture_overrides, make_omniglot, make_strokes
from helpers import assert_one_clear_message, cli, copy_fixture, edited_zip, snapshot
from metalstm.jobs import train

BACKGROUND = "images_background.zip"


def png(size: tuple[int, int]) -> bytes:
    buffer = io.BytesIO()
    Image.new("1", size, 1).save(buffer, format="PNG")
    return buffer.getvalue()


def first_drawing(name: str) -> bool:
    return name.endswith("character01/0001_01.png")


def run_on(root, tmp_path, capsys, *extra: str) -> tuple[int, str]:
    overrides = ["+experiment=omniglot_5way", *fixture_overrides(root, tmp_path / "cache"), "trainer.max_steps=1", *extra]
    return cli("train", overrides, tmp_path / "run", capsys)


def break_background(omniglot_fixture, tmp_path, edit, extra=None):
    root = copy_fixture(omniglot_fixture, tmp_path / "data")
    edited_zip(omniglot_fixture / BACKGROUND, root / BACKGROUND, edit, extra)
    return root


FAULTS = {
    # name: (edit of images_background.zip members, extra members, words the message must hold)
    "corrupt_png": (lambda n, b: (n, b[:40] if first_drawing(n) else b), None, ["0001_01.png", "not a readable PNG"]),
    "wrong_size_png": (lambda n, b: (n, png((80, 90)) if first_drawing(n) else b), None, ["0001_01.png", "80x90", "105x105"]),
    "stray_file": (lambda n, b: (n, b), {"images_background/Alphabet_b0/character01/notes.doc": b"x"},
                   ["character01/notes.doc", "stray file"]),
    "missing_drawing": (lambda n, b: None if first_drawing(n) else (n, b), None,
                        ["images_background/Alphabet_b0/character01", "has 19 drawings"]),
    "empty_class": (lambda n, b: None if "Alphabet_b0/character02/" in n else (n, b),
                    {"images_background/Alphabet_b0/character02/": b""}, ["character02", "has 0 drawings"]),
    "zip_slip": (lambda n, b: (n, b), {"images_background/../../evil.png": b"x"}, ["zip slip", "evil.png"]),
}


@pytest.mark.parametrize("fault", sorted(FAULTS))
def test_a_broken_omniglot_zip_is_named(fault, omniglot_fixture, tmp_path, capsys):
    edit, extra, words = FAULTS[fault]
    root = break_background(omniglot_fixture, tmp_path, edit, extra)
    before = snapshot(root)
    code, err = run_on(root, tmp_path, capsys)
    assert_one_clear_message(code, err, BACKGROUND, *words)
    assert snapshot(root) == before
    assert not (tmp_path / "evil.png").exists() and not (tmp_path / "run" / "checkpoints").exists()


def test_a_truncated_zip_says_download_again(omniglot_fixture, tmp_path, capsys):
    root = copy_fixture(omniglot_fixture, tmp_path / "data")
    data = (root / BACKGROUND).read_bytes()
    (root / BACKGROUND).write_bytes(data[: len(data) // 2])
    before = snapshot(root)
    code, err = run_on(root, tmp_path, capsys)
    assert_one_clear_message(code, err, BACKGROUND, "truncated", "download it again")
    assert snapshot(root) == before


def test_a_missing_alphabet_of_the_vinyals_split_is_named(tmp_path, capsys):
    """Official names, but only one alphabet: the Vinyals split names what is missing."""
    root = tmp_path / "data"
    root.mkdir()
    for part, alphabet in (("images_background", "Latin"), ("images_evaluation", "Sylheti")):
        with zipfile.ZipFile(root / f"{part}.zip", "w") as archive:
            for d in range(1, 21):
                archive.writestr(f"{part}/{alphabet}/character01/0001_{d:02d}.png", png((105, 105)))
    code, err = run_on(root, tmp_path, capsys, "data.split=vinyals", "data.rotate_splits=[train]")
    assert_one_clear_message(code, err, "Vinyals split", "Alphabet_of_the_Magi", "incomplete")


def test_an_unreadable_cache_is_rebuilt(omniglot_fixture, tmp_path):
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "omniglot_28px_inv.pt").write_bytes(b"not a torch file")
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("train", overrides=[f"paths.output_dir={tmp_path / 'run'}", "+experiment=omniglot_5way",
                                          *fixture_overrides(omniglot_fixture, cache), "debug=fdr"])
    train(cfg)  # it runs: the cache is rebuilt, not trusted
    assert torch.load(cache / "omniglot_28px_inv.pt", weights_only=True)["data"]["images"].shape[1] == 20


def test_a_malformed_stroke_file_is_named_with_its_line(tmp_path, capsys):
    root = make_strokes(tmp_path / "strokes", zipped=False)
    victim = sorted(root.glob("strokes_background_small1/*/*/*.txt"))[0]
    victim.write_text("START\n1.0,2.0,0\nnot numbers\nBREAK\n")
    before = snapshot(root)
    code, err = cli("train", ["+experiment=strokes_5way_1shot", *fixture_overrides(root, tmp_path, "omniglot_strokes"),
                              "trainer.max_steps=1"], tmp_path / "run", capsys)
    assert_one_clear_message(code, err, victim.name, "line 3", "malformed")
    assert snapshot(root) == before


def test_an_empty_class_folder_is_named(tmp_path, capsys):
    root = make_omniglot(tmp_path / "folders", zipped=False)
    victim = next((root / "images_evaluation").glob("*/character01"))
    for file in victim.iterdir():
        file.unlink()
    code, err = run_on(root, tmp_path, capsys)
    assert_one_clear_message(code, err, "character01", "has 0 drawings")
