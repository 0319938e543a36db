"""data=series_forecast: one real series per task, windows held out in time, scaled so MAE is MASE."""
from __future__ import annotations

import pytest
import torch

from metalstm.data.series_forecast import SeriesForecastConfig, SeriesForecastTasks, build_series_forecast
from metalstm.errors import ConfigError, DataError


def ramp_with_jump(length: int, cut: int, slope: float) -> torch.Tensor:
    """slope * t, plus 1000 from the support/query cut on: a window that crossed the cut would show the jump."""
    t = torch.arange(length, dtype=torch.float32)
    return slope * t + 1000.0 * (t >= cut)


def test_windows_stay_on_their_side_of_the_cut_and_are_scaled_by_the_naive_forecast():
    cfg = SeriesForecastConfig(context=8, horizon=4, shots=6, query=6, eval_query=6, support_fraction=0.5)
    series = [ramp_with_jump(100, 50, slope) for slope in (0.5, 1.0, 2.0, 3.0, 4.0, 5.0)]
    tasks = SeriesForecastTasks(series, [f"s{i}" for i in range(6)], cfg)
    for split in ("train", "val", "test"):
        batch = tasks.sample(split, 20, torch.Generator().manual_seed(1))
        # every window of a ramp, scaled by its naive one-step error (= the slope) after subtracting its last value,
        # is the same: context -7..0, horizon 1..4; a window across the jump would not be
        for x, y in ((batch.support_x, batch.support_y), (batch.query_x, batch.query_y)):
            assert torch.allclose(x[..., 0], torch.arange(-7.0, 1.0).expand_as(x[..., 0]), atol=1e-4)
            assert torch.allclose(y[..., 0], torch.arange(1.0, 5.0).expand_as(y[..., 0]), atol=1e-4)
    naive = tasks.reference_metrics(num_tasks=7, episode_seed=0)["naive_forecast"]  # the last value repeated:
    assert naive["test/point_error"] == pytest.approx(2.5) and naive["test/point_error_ci95"] < 1e-6  # mean of 1..4
    assert naive["test/mse"] == pytest.approx(7.5)  # mean of 1, 4, 9, 16
    splits = [set(tasks.splits[s].tolist()) for s in ("train", "val", "test")]
    assert set.union(*splits) == set(range(6)) and sum(map(len, splits)) == 6


def test_a_flat_stretch_does_not_divide_by_zero():
    cfg = SeriesForecastConfig(context=8, horizon=4, shots=4, query=4, support_fraction=0.5)
    flat = torch.cat([torch.zeros(60), torch.sin(torch.arange(60.0))])  # flat support part, moving query part
    tasks = SeriesForecastTasks([flat, flat + 1, flat * 2], ["a", "b", "c"], cfg)
    batch = tasks.sample("train", 5, torch.Generator().manual_seed(0))
    assert all(torch.isfinite(t).all() for t in batch)


def test_series_too_short_are_left_out_and_none_left_is_an_error():
    cfg = SeriesForecastConfig(context=8, horizon=4, support_fraction=0.5)
    long, short = torch.randn(40), torch.randn(20)
    tasks = SeriesForecastTasks([long, long, short, long], list("abcd"), cfg)
    assert tasks.left_out == ["c"] and len(tasks.names) == 3
    with pytest.raises(DataError, match="Only 1 series .* long enough .* 12 points"):
        SeriesForecastTasks([long, short], ["a", "b"], cfg)
    with pytest.raises(ConfigError, match="data.season=8 must be shorter than data.context=8"):
        SeriesForecastConfig(context=8, season=8).check()


def test_a_folder_of_ts_files_gives_one_task_per_series(timeseries_fixture):
    cfg = SeriesForecastConfig(root=str(timeseries_fixture), sets=["SetA", "SetC"], context=4, horizon=2, shots=2,
                               query=2, eval_query=2, support_fraction=0.5)
    tasks = build_series_forecast(cfg)
    assert len(tasks.names) == 36 + 18 and tasks.spec == cfg.spec()  # 6 series a class in each set, all long enough
    batch = tasks.sample("test", 3, torch.Generator().manual_seed(0))
    assert batch.support_x.shape == (3, 2, 4, 1) and batch.query_y.shape == (3, 2, 2, 1)
    assert tasks.describe()["series"] == {"train": 32, "val": 11, "test": 11}
    naive = tasks.reference_metrics(num_tasks=5, episode_seed=3)["naive_forecast"]
    from metalstm.data.episodes import FixedEpisodes
    episodes = FixedEpisodes(tasks, "test", 5, 5, 3)
    expected = torch.stack([episodes.task(i).query_y.abs().mean() for i in range(5)]).mean()
    assert naive["test/point_error"] == pytest.approx(expected.item())  # the fixed test tasks, as the test draws them
