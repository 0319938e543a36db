"""The real Omniglot from ../shared/data/omniglot (skipped where it is absent)."""
from __future__ import annotations

import json

import torch

from conftest import run_script
from metalstm.data.omniglot import OmniglotConfig, build_omniglot


def test_real_omniglot_vinyals_split(real_omniglot, cache_dir):
    before = {p: p.stat().st_mtime_ns for p in real_omniglot.glob("*.pt")}  # caches earlier runs left there
    tasks = build_omniglot(OmniglotConfig(root=str(real_omniglot), cache_dir=str(cache_dir), download=False))
    assert tasks.images.shape == (1623, 20, 1, 28, 28)
    sizes = {s: len(c) for s, c in tasks.split_classes.items()}
    assert sizes == {"train": 1028, "val": 172, "test": 423}
    sets = [set(tasks.split_classes[s].tolist()) for s in ("train", "val", "test")]
    assert not (sets[0] & sets[1] or sets[0] & sets[2] or sets[1] & sets[2])
    assert tasks.num_classes("train") == 4 * 1028  # rotations as new classes
    batch = tasks.sample("test", 2, torch.Generator().manual_seed(0))
    assert batch.support_x.shape == (2, 5, 1, 28, 28) and batch.query_x.shape == (2, 75, 1, 28, 28)
    # with cache_dir set the data folder is left as it was: the cache went to cache_dir
    assert {p: p.stat().st_mtime_ns for p in real_omniglot.glob("*.pt")} == before
    assert list(cache_dir.glob("*.pt"))


def test_train_on_real_omniglot(real_omniglot, cache_dir, tmp_path):
    result = run_script(
        "train.py", "+experiment=omniglot_5way", f"data.root={real_omniglot}", f"data.cache_dir={cache_dir}",
        "trainer.max_steps=10", "trainer.val_check_interval=10", "data.meta_batch_size=4", "data.val_tasks=10",
        "data.test_tasks=20", "data.eval_batch_size=10", cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads(next((tmp_path / "outputs").glob("20*/*/results.json")).read_text())
    assert results["data"]["split"] == "vinyals" and results["data"]["classes"]["test"] == 423
    assert results["num_tasks"] == 20
