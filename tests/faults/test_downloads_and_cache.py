"""Omniglot files: download with md5 check and atomic rename, the preprocessing cache and its staleness."""
from __future__ import annotations

import hashlib
import shutil

import pytest
import torch

from conftest import make_omniglot
from metalstm.data import omniglot, omniglot_strokes
from metalstm.errors import DataError


def md5(path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


@pytest.fixture
def mirror(omniglot_fixture, monkeypatch):
    """A local 'server' for the official URLs: file:// URLs of the fixture zips."""
    monkeypatch.setattr(omniglot, "BASE_URL", omniglot_fixture.as_uri())
    return omniglot_fixture


def test_download_checks_md5_and_saves_nothing_when_it_differs(mirror, tmp_path):
    root = tmp_path / "fresh"
    with pytest.raises(DataError, match="corrupt.*nothing was saved"):
        omniglot.find_sources(root, download=True)  # the fixture's md5 is not the official one
    assert not root.exists()  # no partial file, and not even the folder, left behind


@pytest.mark.parametrize("official", [omniglot.SOURCES, omniglot_strokes.SOURCES])
def test_download_lands_files_atomically(official, mirror, tmp_path):
    sources = {n: md5(mirror / f"{n}.zip") for n in official}  # the fixture's md5s stand in for the official ones
    root = tmp_path / "fresh"
    found = omniglot.find_sources(root, download=True, sources=sources)
    assert sorted(p.name for p in root.iterdir()) == sorted(f"{n}.zip" for n in official)
    assert all(found[n] == root / f"{n}.zip" for n in official)
    with pytest.raises(DataError, match="corrupt.*nothing was saved"):  # and the official md5s are checked
        omniglot.find_sources(tmp_path / "other", download=True, sources=official)


def test_offline_download_says_what_to_do(tmp_path, monkeypatch):
    monkeypatch.setattr(omniglot, "BASE_URL", "http://127.0.0.1:9/omniglot")  # nothing listens on port 9
    (tmp_path / "mine.txt").write_text("a user's file")
    with pytest.raises(DataError, match="downloading .* failed.*copy images_background.zip"):
        omniglot.find_sources(tmp_path, download=True)
    assert [p.name for p in tmp_path.iterdir()] == ["mine.txt"]


def test_extracted_folders_read_like_the_zips(omniglot_fixture, tmp_path):
    folders = make_omniglot(tmp_path / "folders", zipped=False)
    from_zips, names_z = omniglot.load_omniglot(omniglot_fixture, 28, True, False, str(tmp_path / "c1"))
    from_folders, names_f = omniglot.load_omniglot(folders, 28, True, False, str(tmp_path / "c2"))
    assert names_z == names_f and torch.equal(from_zips, from_folders)


def test_cache_is_reused_and_rebuilt_when_the_source_changes(omniglot_fixture, tmp_path, monkeypatch):
    root = tmp_path / "data"
    shutil.copytree(omniglot_fixture, root)
    first, _ = omniglot.load_omniglot(root, 28, True, False, None)
    assert (root / "omniglot_28px_inv.pt").is_file()  # beside the data when it is writable

    def no_preprocessing(*args):
        raise AssertionError("preprocessed again although the cache is current")

    with monkeypatch.context() as m:
        m.setattr(omniglot, "preprocess", no_preprocessing)
        again, _ = omniglot.load_omniglot(root, 28, True, False, None)
    assert torch.equal(first, again)

    make_omniglot(root, background=7)  # new source files: the cache must not be trusted
    rebuilt, names = omniglot.load_omniglot(root, 28, True, False, None)
    assert rebuilt.shape[0] == 45 and len(names) == 45


def test_read_only_data_folder_is_left_alone(omniglot_fixture, tmp_path, monkeypatch):
    root = tmp_path / "readonly"
    shutil.copytree(omniglot_fixture, root)
    root.chmod(0o555)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    try:
        omniglot.load_omniglot(root, 28, True, False, None)
        assert not list(root.glob("*.pt"))
        assert (tmp_path / "home" / ".cache" / "metalstm" / "omniglot_28px_inv.pt").is_file()
    finally:
        root.chmod(0o755)


def test_a_truncated_zip_is_named(omniglot_fixture, tmp_path):
    root = tmp_path / "broken"
    shutil.copytree(omniglot_fixture, root)
    data = (root / "images_evaluation.zip").read_bytes()
    (root / "images_evaluation.zip").write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match="images_evaluation.zip is not a readable zip"):
        omniglot.load_omniglot(root, 28, True, False, str(tmp_path / "cache"))
