"""Episode invariants: shapes, per-task labels, support/query disjoint, splits disjoint, fixed test tasks."""
from __future__ import annotations

import pytest
import torch

from metalstm.data import EpisodeConfig
from metalstm.data.class_tasks import ClassTasks
from metalstm.data.datamodule import FewShotDataModule
from metalstm.data.episodes import FixedEpisodes, TrainEpisodes
from metalstm.data.omniglot import OmniglotConfig, build_omniglot, load_omniglot, split_characters
from metalstm.data.sinusoid import SinusoidConfig, SinusoidTasks
from metalstm.errors import ConfigError

CLASSES, SAMPLES = 30, 20


def coded_images() -> torch.Tensor:
    """uint8 [30, 20, 1, 4, 4]: pixel (0,0) = class id, pixel (0,1) = sample id, others 0."""
    images = torch.zeros(CLASSES, SAMPLES, 1, 4, 4, dtype=torch.uint8)
    images[:, :, 0, 0, 0] = torch.arange(CLASSES)[:, None]
    images[:, :, 0, 0, 1] = torch.arange(SAMPLES)[None, :]
    return images


def coded_tasks(**kw) -> ClassTasks:
    splits = {"train": torch.arange(0, 18), "val": torch.arange(18, 24), "test": torch.arange(24, 30)}
    args = dict(ways=5, shots=2, query=3, eval_query=4) | kw
    return ClassTasks(coded_images(), splits, **args)


def decode(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """class and sample ids back from coded images [..., 1, 4, 4] (floats in [0, 1])."""
    codes = (x[..., 0, 0, :2] * 255).round().long()
    return codes[..., 0], codes[..., 1]


def test_shapes_and_label_layout():
    batch = coded_tasks().sample("train", 8, torch.Generator().manual_seed(0))
    assert batch.support_x.shape == (8, 5 * 2, 1, 4, 4)
    assert batch.query_x.shape == (8, 5 * 3, 1, 4, 4)
    assert batch.support_y.shape == (8, 10) and batch.query_y.shape == (8, 15)
    assert batch.support_y.dtype == torch.long
    assert torch.equal(batch.support_y[0], torch.arange(5).repeat_interleave(2))
    test = coded_tasks().sample("test", 3, torch.Generator().manual_seed(0))
    assert test.query_x.shape == (3, 5 * 4, 1, 4, 4)  # eval_query per class at test


def test_labels_are_remapped_per_task_and_consistent():
    batch = coded_tasks().sample("val", 16, torch.Generator().manual_seed(1))
    s_class, _ = decode(batch.support_x)
    q_class, _ = decode(batch.query_x)
    first_classes = set()
    for t in range(16):
        for label in range(5):
            support_classes = s_class[t][batch.support_y[t] == label].unique()
            query_classes = q_class[t][batch.query_y[t] == label].unique()
            assert support_classes.numel() == 1 and torch.equal(support_classes, query_classes)
        assert s_class[t].unique().numel() == 5  # 5 distinct classes per task
        first_classes.add(s_class[t][0].item())
    assert len(first_classes) > 1  # label 0 is not always the same class: labels are per task


def test_support_and_query_are_disjoint():
    batch = coded_tasks().sample("test", 16, torch.Generator().manual_seed(2))
    s_class, s_sample = decode(batch.support_x)
    q_class, q_sample = decode(batch.query_x)
    for t in range(16):
        support = set(zip(s_class[t].tolist(), s_sample[t].tolist()))
        query = set(zip(q_class[t].tolist(), q_sample[t].tolist()))
        assert len(support) == 10 and len(query) == 20 and not support & query


@pytest.mark.parametrize("split", ["train", "val", "test"])
def test_tasks_only_use_their_split(split):
    tasks = coded_tasks()
    batch = tasks.sample(split, 32, torch.Generator().manual_seed(3))
    used = set(decode(batch.support_x)[0].unique().tolist()) | set(decode(batch.query_x)[0].unique().tolist())
    assert used <= set(tasks.split_classes[split].tolist())


def test_rotations_are_new_classes_of_the_train_split_only():
    images = torch.zeros(3, 20, 1, 5, 5, dtype=torch.uint8)
    images[:, :, 0, 0, 0] = 255  # a mark in the top-left corner shows the rotation
    splits = {"train": torch.tensor([0]), "val": torch.tensor([1]), "test": torch.tensor([2])}
    tasks = ClassTasks(images, splits, ways=1, shots=1, query=1, eval_query=1, rotate_splits=["train"])
    assert tasks.num_classes("train") == 4 and tasks.num_classes("test") == 1
    corners = set()
    for seed in range(40):
        x = tasks.sample("train", 1, torch.Generator().manual_seed(seed)).support_x[0, 0, 0]
        corners.add(tuple((x == 1).nonzero()[0].tolist()))
    assert corners == {(0, 0), (4, 0), (4, 4), (0, 4)}
    x = tasks.sample("test", 1, torch.Generator().manual_seed(0)).support_x[0, 0, 0]
    assert x[0, 0] == 1


def test_fixed_tasks_repeat_across_runs_and_batch_sizes():
    tasks = coded_tasks()
    a = FixedEpisodes(tasks, "test", 30, batch_size=7, seed=0)
    b = FixedEpisodes(tasks, "test", 30, batch_size=30, seed=0)
    assert len(a) == 5 and a[4].num_tasks == 2
    stacked = torch.cat([a[i].support_x for i in range(len(a))])
    assert torch.equal(stacked, b[0].support_x)
    assert not torch.equal(FixedEpisodes(tasks, "test", 30, 30, seed=1)[0].support_x, b[0].support_x)
    with pytest.raises(IndexError):
        a[5]


def test_train_stream_draws_new_tasks_and_is_seeded():
    stream = iter(TrainEpisodes(coded_tasks(), meta_batch_size=4, seed=0))
    first, second = next(stream), next(stream)
    assert not torch.equal(first.support_x, second.support_x)
    again = next(iter(TrainEpisodes(coded_tasks(), meta_batch_size=4, seed=0)))
    assert torch.equal(first.support_x, again.support_x)


def test_train_stream_resumed_at_a_step_continues_the_same_tasks():
    """A run resumed at step s must see the meta-batches the uninterrupted run saw from step s on."""
    whole = iter(TrainEpisodes(coded_tasks(), meta_batch_size=4, seed=3))
    batches = [next(whole) for _ in range(5)]
    resumed = iter(TrainEpisodes(coded_tasks(), meta_batch_size=4, seed=3, start_step=3))
    for expected in batches[3:]:
        got = next(resumed)
        assert torch.equal(got.support_x, expected.support_x) and torch.equal(got.query_x, expected.query_x)
    other_rank = next(iter(TrainEpisodes(coded_tasks(), meta_batch_size=4, seed=3, rank=1)))
    assert not torch.equal(other_rank.support_x, batches[0].support_x)


def test_datamodule_serves_fixed_val_and_test():
    config = EpisodeConfig(meta_batch_size=4, val_tasks=10, test_tasks=12, eval_batch_size=5)
    dm = FewShotDataModule(coded_tasks(), config, seed=0)
    assert [b.num_tasks for b in dm.test_dataloader()] == [5, 5, 2]
    assert sum(b.num_tasks for b in dm.val_dataloader()) == 10
    assert next(iter(dm.train_dataloader())).num_tasks == 4


@pytest.mark.parametrize(
    "kw, key",
    [({"ways": 7}, "data.ways=7"), ({"shots": 10, "eval_query": 15}, "data.eval_query")],
)
def test_episode_settings_the_data_cannot_serve_are_rejected(kw, key):  # (a zero count: tests/faults/test_config_rules.py)
    with pytest.raises(ConfigError, match=key):
        coded_tasks(**kw)


def test_sinusoid_tasks():
    tasks = SinusoidTasks(SinusoidConfig(shots=10, query=10, eval_query=50))
    batch = tasks.sample("test", 6, torch.Generator().manual_seed(0))
    assert batch.support_x.shape == (6, 10, 1) and batch.query_y.shape == (6, 50, 1)
    assert batch.support_x.abs().max() <= 5 and batch.query_y.abs().max() <= 5
    # every task is one sinusoid: support and query points of a task lie on the same curve
    x = torch.cat([batch.support_x, batch.query_x], 1)[..., 0]
    y = torch.cat([batch.support_y, batch.query_y], 1)[..., 0]
    basis = torch.stack([torch.sin(x), torch.cos(x)], -1)  # A sin(x - p) = a sin x + b cos x
    coef = torch.linalg.lstsq(basis.double(), y.double().unsqueeze(-1)).solution
    assert torch.allclose((basis.double() @ coef).squeeze(-1), y.double(), atol=1e-4)


def test_omniglot_fixture_reads_official_layout(omniglot_fixture, tmp_path):
    cfg = OmniglotConfig(root=str(omniglot_fixture), cache_dir=str(tmp_path), split="lake", download=False)
    tasks = build_omniglot(cfg)
    assert tasks.images.shape == (40, 20, 1, 28, 28) and tasks.images.dtype == torch.uint8
    # inverted: background 0, strokes bright
    assert tasks.images.float().mean() < 80 and tasks.images.max() > 200
    assert tasks.num_classes("test") == 10 and tasks.num_classes("val") == 5 and tasks.num_classes("train") == 4 * 25
    assert list((tmp_path).glob("omniglot_28px_inv.pt"))


def test_omniglot_splits_are_disjoint_and_cover():
    characters = [f"images_background/A{a}/character{c:02d}" for a in range(12) for c in range(10)]
    characters += [f"images_evaluation/E{a}/character{c:02d}" for a in range(4) for c in range(10)]
    for split in ("random", "lake"):
        parts = split_characters(characters, split, seed=0)
        sets = [set(parts[s]) for s in ("train", "val", "test")]
        assert all(sets) and not (sets[0] & sets[1] or sets[0] & sets[2] or sets[1] & sets[2])
        assert set().union(*sets) == set(range(len(characters)))
    lake = split_characters(characters, "lake", seed=0)
    assert {characters[i].split("/")[0] for i in lake["test"]} == {"images_evaluation"}
    val_alphabets = {characters[i].rsplit("/", 1)[0] for i in lake["val"]}
    train_alphabets = {characters[i].rsplit("/", 1)[0] for i in lake["train"]}
    assert not val_alphabets & train_alphabets


def test_train_shots_may_exceed_test_shots():
    tasks = coded_tasks(shots=1, train_shots=4, query=2, eval_query=3)
    train = tasks.sample("train", 2, torch.Generator().manual_seed(0))
    test = tasks.sample("test", 2, torch.Generator().manual_seed(0))
    assert train.support_x.shape[1] == 5 * 4 and torch.equal(train.support_y[0], torch.arange(5).repeat_interleave(4))
    assert test.support_x.shape[1] == 5 * 1 and test.query_x.shape[1] == 5 * 3
    with pytest.raises(ConfigError, match="data.train_shots"):
        coded_tasks(train_shots=19)


DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU"))]


@pytest.mark.parametrize("device", DEVICES)
def test_episodes_gathered_on_the_device_are_the_same_tasks(device):
    """Images kept on the device: the batch comes out there, with exactly the tasks drawn on the host."""
    host = coded_tasks(rotate_splits=["train"])
    on_device = coded_tasks(rotate_splits=["train"]).to(device)
    for split in ("train", "test"):
        a = host.sample(split, 6, torch.Generator().manual_seed(5))
        b = on_device.sample(split, 6, torch.Generator().manual_seed(5))
        assert all(t.device.type == device for t in b)
        for x, y in zip(a, b):
            assert torch.equal(x, y.cpu())


def test_datamodule_moves_the_examples_to_the_training_device():
    import lightning.pytorch as pl

    dm = FewShotDataModule(coded_tasks(), EpisodeConfig(meta_batch_size=4, eval_batch_size=5), seed=0)
    dm.trainer = pl.Trainer(accelerator="auto", devices=1, logger=False, enable_checkpointing=False)
    dm.setup("fit")
    assert dm.source.images.device == dm.trainer.strategy.root_device
    assert next(iter(dm.train_dataloader())).support_x.device == dm.trainer.strategy.root_device


def test_train_ways_sets_the_classes_of_training_tasks_only():
    tasks = coded_tasks(train_ways=12)
    generator = torch.Generator().manual_seed(0)
    train, val = tasks.sample("train", 3, generator), tasks.sample("val", 3, generator)
    assert train.support_y.shape == (3, 12 * 2) and train.query_y.shape == (3, 12 * 3)
    assert val.support_y.shape == (3, 5 * 2) and val.query_y.shape == (3, 5 * 4)
    classes, _ = decode(train.support_x)
    assert all(len(set(task.tolist())) == 12 for task in classes)  # 12 distinct training classes per task
    assert tasks.spec["train_ways"] == 12 and tasks.spec["output_dim"] == 5
    with pytest.raises(ConfigError, match="data.train_ways=19 is more than the 18 classes of the train split"):
        coded_tasks(train_ways=19)


def test_within_group_tasks_draw_every_class_from_one_group():
    groups = torch.arange(CLASSES) // 6  # train classes 0-17: groups 0, 1, 2 ("alphabets" of 6 characters)
    tasks = coded_tasks(groups=groups)
    batch = tasks.sample("train", 200, torch.Generator().manual_seed(0))
    classes, _ = decode(batch.support_x)
    per_task = groups[classes]
    assert (per_task == per_task[:, :1]).all()  # one group per task
    assert set(per_task[:, 0].tolist()) == {0, 1, 2}  # every group with enough classes is drawn
    assert all(len(set(task.tolist())) == 5 for task in classes)
    assert tasks.describe()["within_groups"] is True
    plain = coded_tasks().sample("train", 200, torch.Generator().manual_seed(0))
    assert (groups[decode(plain.support_x)[0]] != groups[decode(plain.support_x)[0]][:, :1]).any()
    with pytest.raises(ConfigError, match="largest alphabet of the train split has 6 classes"):
        coded_tasks(groups=groups, ways=7)


def test_val_classes_may_be_trained_on_only_when_asked():
    trainval = {"train": torch.arange(0, 24), "val": torch.arange(18, 24), "test": torch.arange(24, 30)}
    tasks = ClassTasks(coded_images(), trainval, ways=5, shots=2, query=3, eval_query=4, val_in_train=True)
    drawn = decode(tasks.sample("train", 300, torch.Generator().manual_seed(0)).support_x)[0]
    assert set(drawn.unique().tolist()) == set(range(24))  # validation classes are meta-trained on
    with pytest.raises(ValueError, match="'val' shares classes"):
        ClassTasks(coded_images(), trainval, ways=5, shots=2, query=3, eval_query=4)
    leaky = trainval | {"test": torch.arange(20, 30)}
    with pytest.raises(ValueError, match="'test' shares classes"):
        ClassTasks(coded_images(), leaky, ways=5, shots=2, query=3, eval_query=4, val_in_train=True)
    partial = trainval | {"train": torch.arange(0, 20)}
    with pytest.raises(ValueError, match="must hold every val class"):
        ClassTasks(coded_images(), partial, ways=5, shots=2, query=3, eval_query=4, val_in_train=True)


def test_omniglot_trainval_trains_on_the_validation_characters(omniglot_fixture, cache_dir):
    common = dict(root=str(omniglot_fixture), cache_dir=str(cache_dir), split="lake", download=False)
    plain = build_omniglot(OmniglotConfig(**common)).describe()["classes"]
    trainval = build_omniglot(OmniglotConfig(**common, trainval=True))
    assert trainval.describe()["classes"] == {"train": plain["train"] + 4 * plain["val"], "val": plain["val"],
                                             "test": plain["test"]}  # rotations of the train split only
    assert set(trainval.split_classes["val"].tolist()) <= set(trainval.split_classes["train"].tolist())
    assert not OmniglotConfig(**common, trainval=True).val_held_out and OmniglotConfig(**common).val_held_out


def test_omniglot_within_alphabet_tasks(omniglot_fixture, cache_dir):
    cfg = OmniglotConfig(root=str(omniglot_fixture), cache_dir=str(cache_dir), split="lake", download=False,
                         within_alphabet=True, rotate_splits=[])
    tasks = build_omniglot(cfg)
    batch = tasks.sample("test", 20, torch.Generator().manual_seed(0))
    assert batch.support_x.shape[:2] == (20, 5)
    _, names = load_omniglot(omniglot_fixture, 28, True, False, str(cache_dir))
    alphabet_of = [n.rsplit("/", 1)[0] for n in names]
    pairs = {(alphabet_of[i], int(tasks.groups[i])) for i in range(len(names))}
    assert len(pairs) == len(set(alphabet_of)) == len(set(tasks.groups.tolist())) == 8  # group = alphabet, one to one
