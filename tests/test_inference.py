"""load_learner -> adapt -> predict: a trained meta-learner on a task given as plain images."""
from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from PIL import Image

from conftest import run_script
from metalstm import load_learner
from metalstm.assembly import build
from metalstm.errors import ConfigError, DataError
from metalstm.meta import META_LEARNERS
from test_meta_learners import METHODS, compose_meta_name, tiny_config

IMAGE_METHODS = [(m, v) for m, v in METHODS if "classification" in META_LEARNERS[compose_meta_name(m)].impl.task_types]


def trained_run(meta, variant, base, data, root, cache, tmp_path, **data_settings):
    """A run trained for 2 steps; its checkpoint written as train.py writes it."""
    config = tiny_config(meta, variant, base, data, root, cache, tmp_path)
    config["data"].update(data_settings)
    module, datamodule = build(config)
    trainer = pl.Trainer(max_steps=2, limit_val_batches=0, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, inference_mode=False,
                         use_distributed_sampler=False, default_root_dir=tmp_path)
    trainer.fit(module, datamodule=datamodule)
    (tmp_path / "checkpoints").mkdir()
    trainer.save_checkpoint(tmp_path / "checkpoints" / "last.ckpt")
    return module, datamodule


def as_raw_images(x: torch.Tensor) -> list[Image.Image]:
    """Dataset tensors [n, 1, S, S] (inverted, in [0, 1]) back to images as a user has them: dark strokes."""
    pixels = 255 - (x[:, 0] * 255).round().to(torch.uint8).numpy()
    return [Image.fromarray(p) for p in pixels]


@pytest.mark.parametrize("meta, variant", IMAGE_METHODS, ids=[f"{m}-{v}" if v else m for m, v in IMAGE_METHODS])
def test_every_meta_learner_round_trips_through_load_learner(meta, variant, tmp_path, omniglot_fixture, cache_dir):
    module, datamodule = trained_run(meta, variant, "conv4", "omniglot", omniglot_fixture, cache_dir, tmp_path)
    episode = datamodule.source.sample("test", 1, torch.Generator().manual_seed(5))
    with torch.enable_grad():
        expected = module.meta_learner.predict(episode)[0].softmax(-1)

    learner = load_learner(tmp_path, device="cpu")  # the run folder: its last checkpoint
    names = [f"char{int(y)}" for y in episode.support_y[0]]
    task = learner.adapt(as_raw_images(episode.support_x[0]), names)
    probs = task.predict(as_raw_images(episode.query_x[0]))
    assert task.classes == [f"char{i}" for i in range(5)]
    # integer labels: column i is label i in numeric order (label 10 after label 9, not after label 1)
    numbers = torch.tensor([2, 9, 10, 11, 100])  # in text order: 10, 100, 11, 2, 9
    by_number = learner.adapt(as_raw_images(episode.support_x[0]), numbers[episode.support_y[0]])
    assert by_number.classes == [2, 9, 10, 11, 100]
    assert torch.allclose(by_number.predict(as_raw_images(episode.query_x[0])), probs, atol=1e-6)
    assert probs.shape == (episode.query_x.shape[1], 5) and torch.allclose(probs.sum(1), torch.ones(len(probs)))
    assert torch.allclose(probs, expected, atol=1e-5)


def test_any_image_size_and_files_work_and_bad_inputs_are_explained(tmp_path, omniglot_fixture, cache_dir):
    trained_run("protonet", None, "conv4", "omniglot", omniglot_fixture, cache_dir, tmp_path)
    learner = load_learner(tmp_path / "checkpoints" / "last.ckpt", device="cpu")
    rng = np.random.default_rng(0)
    files = []
    for i in range(5):  # 105x105 RGB files, as a user might draw them
        path = tmp_path / f"support{i}.png"
        Image.fromarray(rng.integers(0, 255, (105, 105, 3), dtype=np.uint8)).save(path)
        files.append(path)
    task = learner.adapt(files, ["a", "b", "c", "d", "e"])
    probs = task.predict([rng.integers(0, 255, (50, 60), dtype=np.uint8) for _ in range(3)])  # uint8 arrays
    assert probs.shape == (3, 5)
    with pytest.raises(DataError, match="5-way.*3 classes"):
        learner.adapt(files[:3], ["a", "b", "c"])
    with pytest.raises(DataError, match="uint8"):
        task.predict([np.zeros((28, 28), dtype=np.float64)])


def test_a_stream_learner_is_refused_with_a_reason(tmp_path, omniglot_fixture, cache_dir):
    trained_run("memory_lstm", None, "conv4", "omniglot", omniglot_fixture, cache_dir, tmp_path, stream=True)
    learner = load_learner(tmp_path, device="cpu")
    with pytest.raises(ConfigError, match="data.stream=true.*no support set"):
        learner.adapt([np.zeros((28, 28), dtype=np.uint8)] * 5, ["a", "b", "c", "d", "e"])


def test_sequence_learner_round_trips_through_load_learner(tmp_path, omniglot_fixture, cache_dir):
    """The in-context sequence learner (no image input): tokens in, the same greedy decoding out."""
    module, datamodule = trained_run("memory_seq2seq", None, "lstm_seq2seq", "seq_tasks", omniglot_fixture, cache_dir,
                                     tmp_path)
    episode = datamodule.source.sample("test", 1, torch.Generator().manual_seed(3))
    expected = module.meta_learner.predict(episode)[0]
    task = load_learner(tmp_path, device="cpu").adapt(episode.support_x[0], episode.support_y[0])
    assert torch.allclose(task.predict(episode.query_x[0]), expected, atol=1e-6)


def test_regression_learner_takes_arrays(tmp_path, omniglot_fixture, cache_dir):
    module, datamodule = trained_run("maml", None, "mlp", "sinusoid", omniglot_fixture, cache_dir, tmp_path)
    episode = datamodule.source.sample("test", 1, torch.Generator().manual_seed(1))
    with torch.enable_grad():
        expected = module.meta_learner.predict(episode)[0]
    task = load_learner(tmp_path, device="cpu").adapt(episode.support_x[0].numpy(), episode.support_y[0])
    assert torch.allclose(task.predict(episode.query_x[0].numpy()), expected, atol=1e-6)
    with pytest.raises(DataError, match=r"shape \[n, 1\]"):
        task.predict(torch.zeros(4, 3))
    query = episode.query_x[0].clone()
    query[2] = float("nan")
    with pytest.raises(DataError, match=r"Examples \[2\] hold NaN or infinite values"):  # not NaN answers that look real
        task.predict(query)
    support = episode.support_x[0].numpy().copy()
    support[0] = np.inf
    with pytest.raises(DataError, match=r"Examples \[0\] hold NaN"):
        load_learner(tmp_path, device="cpu").adapt(support, episode.support_y[0])


def test_predict_script_classifies_a_folder_of_pngs(tmp_path, omniglot_fixture, cache_dir):
    run = tmp_path / "run"
    run.mkdir()
    _, datamodule = trained_run("maml", None, "conv4", "omniglot", omniglot_fixture, cache_dir, run)
    episode = datamodule.source.sample("test", 1, torch.Generator().manual_seed(2))
    support, query = tmp_path / "support", tmp_path / "query"
    for image, y in zip(as_raw_images(episode.support_x[0]), episode.support_y[0].tolist()):
        (support / f"class_{y}").mkdir(parents=True, exist_ok=True)
        image.save(support / f"class_{y}" / "drawing.png")
    query.mkdir()
    for i, image in enumerate(as_raw_images(episode.query_x[0][:4])):
        image.save(query / f"q{i}.png")

    result = run_script("predict.py", f"run_dir={run}", f"support={support}", f"query={query}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = [line.split("\t") for line in result.stdout.strip().splitlines()]
    assert [Path(f).name for f, _, _ in lines] == ["q0.png", "q1.png", "q2.png", "q3.png"]
    task = load_learner(run, device="cpu").adapt(as_raw_images(episode.support_x[0]),
                                                 [f"class_{y}" for y in episode.support_y[0].tolist()])
    probs = task.predict(as_raw_images(episode.query_x[0][:4]))
    assert [label for _, label, _ in lines] == [task.classes[i] for i in probs.argmax(1).tolist()]
    csv_files = list((tmp_path / "outputs" / "predict").glob("*/*/predictions.csv"))
    assert len(csv_files) == 1 and csv_files[0].read_text().count("\n") == 5

    missing = run_script("predict.py", f"run_dir={run}", f"support={support}", f"query={tmp_path / 'nope'}", cwd=tmp_path)
    assert missing.returncode == 2 and "is not a folder" in missing.stderr and "Traceback" not in missing.stderr
