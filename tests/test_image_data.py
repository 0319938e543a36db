"""Bring your own images: image_folder and mini_imagenet on generated fixtures in their published layouts."""
from __future__ import annotations

import json
import os
import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import class_image, make_image_folder, make_mini_imagenet, run_script
from metalstm.data.class_tasks import ClassTasks
from metalstm.data.image_folder import ImageFolderConfig, build_image_folder
from metalstm.data.mini_imagenet import MiniImageNetConfig, build_mini_imagenet
from metalstm.errors import DataError
from test_train_eval import run_dir_of


def test_ragged_classes_never_serve_padding():
    """Train class c holds c+3 examples coded c*100+i; padding is -1 and must never be drawn."""
    counts = torch.tensor([3, 4, 5, 6, 7, 8, 3, 3, 3, 3])
    images = torch.full((10, 8, 1), -1.0)
    for c, n in enumerate(counts.tolist()):
        images[c, :n, 0] = torch.arange(n) + 100.0 * c
    splits = {"train": torch.arange(6), "val": torch.tensor([6, 7]), "test": torch.tensor([8, 9])}
    tasks = ClassTasks(images, splits, ways=2, shots=1, query=2, eval_query=2, counts=counts)
    batch = tasks.sample("train", 300, torch.Generator().manual_seed(0))
    drawn = torch.cat([batch.support_x.flatten(), batch.query_x.flatten()])
    assert (drawn >= 0).all()
    assert set((drawn % 100).long().tolist()) == set(range(8))  # every real slot of the largest class is used


def test_image_folder_splits_classes_and_serves_rgb_episodes(tmp_path, cache_dir):
    root = make_image_folder(tmp_path / "pets", sizes=[20, 22, 25, 20, 21, 20, 23, 20, 24, 20])
    (root / "class_00" / "notes.txt").write_text("not an image")  # skipped
    cfg = ImageFolderConfig(root=str(root), image_size=28, cache_dir=str(cache_dir), ways=2, shots=1, query=5,
                            eval_query=5, class_split=[0.6, 0.2, 0.2])
    tasks = build_image_folder(cfg)
    assert tasks.spec["input_shape"] == (3, 28, 28)
    assert [tasks.num_classes(s) for s in ("train", "val", "test")] == [6, 2, 2]
    names = tasks.describe()["class_names"]
    assert len({n for s in names.values() for n in s}) == 10  # disjoint
    batch = tasks.sample("train", 3, torch.Generator().manual_seed(0))
    assert batch.support_x.shape == (3, 2, 3, 28, 28) and batch.query_x.shape == (3, 10, 3, 28, 28)
    # the same split again from the cache, and another seed gives another split
    assert build_image_folder(cfg).describe()["class_names"] == names
    cfg.split_seed = 1
    assert build_image_folder(cfg).describe()["class_names"] != names


def test_image_folder_with_split_folders(tmp_path, cache_dir):
    root = make_image_folder(tmp_path / "split", sizes=[20] * 9, split_folders=True)
    tasks = build_image_folder(ImageFolderConfig(root=str(root), image_size=16, channels=1, cache_dir=str(cache_dir),
                                                 ways=3))
    assert [tasks.num_classes(s) for s in ("train", "val", "test")] == [3, 3, 3]
    assert tasks.spec["input_shape"] == (1, 16, 16)


@pytest.mark.parametrize("fault, words", [
    ("few", ["class_03", "has 4 image(s)", "data.shots"]),
    ("corrupt", ["img_001.jpg", "not a readable image"]),
    ("missing", ["is not a folder"]),
    ("too large", ["/data/class_0", "is too large to read safely", "Shrink it"]),
])
def test_image_folder_faults_name_the_file_and_the_fix(tmp_path, cache_dir, fault, words, monkeypatch):
    root = make_image_folder(tmp_path / "data", sizes=[20, 20, 20, 4 if fault == "few" else 20, 20])
    if fault == "corrupt":
        (root / "class_02" / "img_001.jpg").write_bytes(b"\xff\xd8 truncated")
    if fault == "too large":  # PIL's decompression-bomb guard, its limit lowered so a fixture image trips it
        monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10)
    cfg = ImageFolderConfig(root=str(root if fault != "missing" else tmp_path / "nope"), image_size=16,
                            cache_dir=str(cache_dir), ways=2)
    with pytest.raises(DataError) as error:
        build_image_folder(cfg)
    for word in words:
        assert word in str(error.value)


def test_mini_imagenet_csv_and_pickle_forms_give_the_same_tasks(tmp_path, cache_dir):
    from_csv = build_mini_imagenet(MiniImageNetConfig(root=str(make_mini_imagenet(tmp_path / "csv", "csv")),
                                                      image_size=32, cache_dir=str(cache_dir)))
    from_pickle = build_mini_imagenet(MiniImageNetConfig(root=str(make_mini_imagenet(tmp_path / "pkl", "pickle")),
                                                         image_size=32, cache_dir=str(cache_dir)))
    for tasks in (from_csv, from_pickle):
        assert [tasks.num_classes(s) for s in ("train", "val", "test")] == [6, 5, 5]
        assert tasks.images.shape == (16, 20, 3, 32, 32) and tasks.spec["input_shape"] == (3, 32, 32)
    # JPEG-decoded vs raw pixels: the same images up to compression
    difference = (from_csv.images.float() - from_pickle.images.float()).abs().mean()
    assert difference < 4, difference


def test_mini_imagenet_pickle_cannot_run_code(tmp_path, cache_dir):
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    root = make_mini_imagenet(tmp_path / "evil", "pickle")
    with open(root / "mini-imagenet-cache-train.pkl", "wb") as f:
        pickle.dump({"image_data": Exploit(), "class_dict": {}}, f)
    with pytest.raises(DataError, match="refusing to load"):
        build_mini_imagenet(MiniImageNetConfig(root=str(root), image_size=16, cache_dir=str(cache_dir)))
    assert not marker.exists()


def test_mini_imagenet_missing_files_say_what_is_expected(tmp_path):
    with pytest.raises(DataError, match="train.csv, val.csv, test.csv"):
        build_mini_imagenet(MiniImageNetConfig(root=str(tmp_path)))


def test_train_on_an_image_folder_then_predict_rgb_images(tmp_path, cache_dir):
    root = make_image_folder(tmp_path / "data", sizes=[20] * 10)
    run = run_script("train.py", "data=image_folder", f"data.root={root}", f"data.cache_dir={cache_dir}",
                     "data.image_size=28", "base_learner=conv4", "base_learner.filters=8", "meta_learner.inner_lr=0.4",
                     "data.ways=2", "data.query=5", "data.eval_query=5", "trainer.max_steps=6",
                     "trainer.val_check_interval=3", "data.val_tasks=4", "data.test_tasks=4", cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    run_dir = run_dir_of(tmp_path)
    assert json.loads((run_dir / "results.json").read_text())["data"]["dataset"] == "image_folder"

    from metalstm import load_learner

    learner = load_learner(run_dir, device="cpu")
    support = [class_image(0, i, size=50) for i in range(2)] + [np.asarray(class_image(5, i, size=40)) for i in range(2)]
    task = learner.adapt(support, ["cat", "cat", "dog", "dog"])
    probs = task.predict([class_image(0, 9), Image.open(root / "class_05" / "img_010.jpg")])
    assert probs.shape == (2, 2) and torch.allclose(probs.sum(1), torch.ones(2)) and task.classes == ["cat", "dog"]
