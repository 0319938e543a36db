"""LSTM base learners and the sequence data sets: second-order MAML through the recurrence, masks,
teacher forcing vs greedy decoding, rule splits, the official stroke files."""
from __future__ import annotations

import zipfile

import pytest
import torch

from conftest import central_differences, make_strokes
from metalstm.data.episodes import SPLITS, EpisodeBatch
from metalstm.data.omniglot_strokes import OmniglotStrokesConfig, build_omniglot_strokes, parse_strokes
from metalstm.data.seq_tasks import SeqTasks, SeqTasksConfig
from metalstm.data.sinusoid import SinusoidSeqConfig, SinusoidSeqTasks
from metalstm.errors import DataError
from metalstm.learners.conv1d import Conv1D, Conv1DConfig
from metalstm.learners.lstm import LSTMEncoder, LSTMEncoderConfig, LSTMLayer, LSTMSeq2Seq, LSTMSeq2SeqConfig
from metalstm.meta.maml import MAML, MAMLConfig
from metalstm.objectives import Forecast, Seq2Seq


def test_functional_lstm_layer_equals_torch_lstm():
    torch.manual_seed(0)
    ours, reference = LSTMLayer(3, 5), torch.nn.LSTM(3, 5, batch_first=True)
    with torch.no_grad():
        reference.weight_ih_l0.copy_(ours.weight_ih)
        reference.weight_hh_l0.copy_(ours.weight_hh)
        reference.bias_ih_l0.copy_(ours.bias)
        reference.bias_hh_l0.zero_()
    x = torch.randn(4, 7, 3)
    out, (h, c) = ours(x)
    ref_out, (ref_h, ref_c) = reference(x)
    assert torch.allclose(out, ref_out, atol=1e-6) and torch.allclose(c, ref_c[0], atol=1e-6)


def test_padding_does_not_change_the_encoding():
    spec = SeqTasks(SeqTasksConfig(max_length=6)).spec
    torch.manual_seed(0)
    encoder = LSTMEncoder(LSTMEncoderConfig(hidden=8, input_dim=4), {**spec, "task_type": "classification",
                                                                       "output_length": None})
    short = torch.tensor([[3, 1, 4, 0, 0, 0]])
    longer_pad = torch.tensor([[3, 1, 4, 0, 0, 0, 0, 0, 0]])
    different = torch.tensor([[3, 1, 4, 1, 0, 0]])
    params = encoder.params()
    z = encoder.embed_with(params, short)
    assert torch.allclose(z, encoder.embed_with(params, longer_pad))
    assert not torch.allclose(z, encoder.embed_with(params, different))


def masked_series(values: torch.Tensor, length: int) -> torch.Tensor:
    """values [n, steps, d] -> [n, length, d + 1]: observed steps, zero padding after, the step mask last."""
    out = torch.zeros(values.shape[0], length, values.shape[2] + 1, dtype=values.dtype)
    out[:, : values.shape[1], :-1], out[:, : values.shape[1], -1] = values, 1.0
    return out


@pytest.mark.parametrize("tokens", [False, True])
def test_temporal_conv_features_ignore_the_padding_after_a_sequence(tokens):
    """Without BatchNorm, a sequence padded to 9 steps or to 40 has the same features; an observed change does not."""
    torch.manual_seed(0)
    if tokens:
        spec = {"task_type": "classification", "input_shape": (9,), "vocab": 6, "output_dim": 3}
        short = torch.tensor([[3, 1, 4, 5, 2, 0, 0, 0, 0]])
        longer, different = torch.cat([short, torch.zeros(1, 31, dtype=torch.long)], 1), short.clone()
        different[0, 4] = 1
    else:
        spec = {"task_type": "classification", "input_shape": (9, 3), "step_mask": True, "output_dim": 3}
        values = torch.randn(2, 5, 2)
        short, longer = masked_series(values, 9), masked_series(values, 40)
        different = short.clone()
        different[0, 4, 0] += 1.0
    net = Conv1D(Conv1DConfig(filters=4, blocks=3, kernel=3, input_dim=4, norm="none"), spec)
    params = net.params()
    features = net.embed_with(params, short)
    assert features.shape == (short.shape[0], 4)
    assert torch.allclose(features, net.embed_with(params, longer), atol=1e-6)
    assert not torch.allclose(features[0], net.embed_with(params, different)[0], atol=1e-4)


def test_second_order_maml_through_the_temporal_conv_matches_finite_differences():
    """MAML's meta-gradient through conv1d with transductive BatchNorm and masked series, against central differences."""
    torch.manual_seed(0)
    spec = {"task_type": "classification", "input_shape": (6, 2), "step_mask": True, "output_dim": 2}
    learner = Conv1D(Conv1DConfig(filters=3, blocks=2, kernel=3, input_dim=2), spec).double()
    maml = MAML(learner, torch.nn.functional.cross_entropy, spec, MAMLConfig(inner_lr=0.5, inner_steps=2, vectorize="loop"))
    g = torch.Generator().manual_seed(1)
    x = torch.cat([masked_series(torch.randn(1, 6 - i % 3, 1, generator=g, dtype=torch.float64), 6) for i in range(8)])
    x = x.view(2, 4, 6, 2)  # 2 tasks of 4 series, 4 to 6 observed steps each
    y = torch.tensor([0, 1, 0, 1]).expand(2, -1)
    batch = EpisodeBatch(x[:, :2], y[:, :2], x[:, 2:], y[:, 2:])
    maml.meta_loss(batch).loss.backward()
    analytic = torch.cat([p.grad.flatten() for p in maml.parameters()])
    numeric = central_differences(lambda: maml.meta_loss(batch).loss, list(maml.parameters()))
    assert torch.allclose(analytic, numeric, rtol=1e-5, atol=1e-7), (analytic - numeric).abs().max()


def seq2seq_problem(first_order: bool) -> tuple[MAML, EpisodeBatch]:
    torch.manual_seed(0)
    source = SeqTasks(SeqTasksConfig(alphabet=4, min_length=2, max_length=3, shots=3, query=2))
    learner = LSTMSeq2Seq(LSTMSeq2SeqConfig(hidden=3, input_dim=2), source.spec).double()
    maml = MAML(learner, Seq2Seq().loss, source.spec, MAMLConfig(inner_lr=0.5, inner_steps=2, first_order=first_order))
    return maml, source.sample("train", 2, torch.Generator().manual_seed(1))


def test_second_order_maml_through_the_lstm_encoder_decoder_matches_finite_differences():
    maml, batch = seq2seq_problem(first_order=False)
    maml.zero_grad()
    maml.meta_loss(batch).loss.backward()
    analytic = torch.cat([p.grad.flatten() for p in maml.parameters()])
    numeric = central_differences(lambda: maml.meta_loss(batch).loss, list(maml.parameters()))
    assert torch.allclose(analytic, numeric, rtol=1e-5, atol=1e-7), (analytic - numeric).abs().max()
    first_order, _ = seq2seq_problem(first_order=True)
    first_order.meta_loss(batch).loss.backward()
    assert not torch.allclose(analytic, torch.cat([p.grad.flatten() for p in first_order.parameters()]), rtol=1e-3)


def test_teacher_forcing_reads_targets_and_greedy_decoding_reads_its_own_outputs():
    source = SeqTasks(SeqTasksConfig())
    torch.manual_seed(0)
    net = LSTMSeq2Seq(LSTMSeq2SeqConfig(hidden=8, input_dim=4), source.spec)
    batch = source.sample("train", 1, torch.Generator().manual_seed(0))
    x, y = batch.support_x[0], batch.support_y[0]
    params = net.params()
    forced = net.forward_with(params, x, y)
    greedy = net.forward_with(params, x)
    assert forced.shape == greedy.shape == (*y.shape, source.spec["output_dim"])
    # the first step sees only the start vector either way; later steps differ by what they read
    assert torch.allclose(forced[:, 0], greedy[:, 0], atol=1e-6)
    # greedy decoding fed its own argmax equals teacher forcing on those argmaxes
    assert torch.allclose(net.forward_with(params, x, greedy.argmax(-1)), greedy, atol=1e-5)


def test_seq_task_rules_are_disjoint_across_splits_and_hold_on_every_pair():
    source = SeqTasks(SeqTasksConfig(alphabet=5, max_length=5))
    g = torch.Generator().manual_seed(0)
    seen = {}
    for split in SPLITS:
        for _ in range(40):
            rule = source.draw_rule(split, g)
            assert source.split_of(rule) == split
            seen.setdefault(rule.key(), set()).add(split)
    assert all(len(splits) == 1 for splits in seen.values())
    batch = source.sample("test", 3, g)
    for x, y in ((batch.support_x, batch.support_y), (batch.query_x, batch.query_y)):
        assert torch.equal(x == 0, y == 0)  # targets have their input's length
    # one rule per task: equal inputs map to equal outputs within a task
    for t in range(3):
        pairs = {}
        for x, y in zip(torch.cat([batch.support_x[t], batch.query_x[t]]), torch.cat([batch.support_y[t], batch.query_y[t]])):
            pairs.setdefault(tuple(x.tolist()), tuple(y.tolist()))
            assert pairs[tuple(x.tolist())] == tuple(y.tolist())


def test_seq2seq_metrics_ignore_padding():
    targets = torch.tensor([[[1, 2, 0], [3, 0, 0]]])  # [tasks 1, n 2, H 3]
    outputs = torch.nn.functional.one_hot(torch.tensor([[[1, 2, 4], [2, 4, 4]]]), 5).float() * 10
    metrics = Seq2Seq().task_metrics(outputs, targets)
    assert metrics["token_acc"].item() == pytest.approx(200 / 3)  # 2 of 3 real tokens
    assert metrics["seq_acc"].item() == pytest.approx(50.0)  # the first sequence is all right


def test_sinusoid_forecast_windows_continue_one_sine_per_task():
    cfg = SinusoidSeqConfig(window=4, horizon=3, dt=0.5)
    batch = SinusoidSeqTasks(cfg).sample("train", 2, torch.Generator().manual_seed(0))
    assert batch.support_x.shape == (2, cfg.shots, 4, 1) and batch.support_y.shape == (2, cfg.shots, 3, 1)
    assert batch.support_x.abs().max() <= 5.0
    forecast = Forecast().task_metrics(batch.query_y, batch.query_y)
    assert forecast["point_error"].abs().max() == 0


def test_stroke_loader_reads_zips_and_folders_alike_and_dedupes_shared_characters(tmp_path):
    zipped = build_omniglot_strokes(OmniglotStrokesConfig(root=str(make_strokes(tmp_path / "z")), download=False))
    folders = build_omniglot_strokes(OmniglotStrokesConfig(root=str(make_strokes(tmp_path / "f", zipped=False)),
                                                           download=False))
    assert zipped.images.shape == (30, 20, 48, 4)  # 16 + 16 characters, 2 of them in both subsets
    assert torch.equal(zipped.images, folders.images)
    xy, t, pen_up = zipped.images[..., :2], zipped.images[..., 2], zipped.images[..., 3]
    assert xy.mean(2).abs().max() < 0.2 and t[..., 0].eq(0).all() and t[..., -1].eq(1).all()
    assert pen_up[..., -1].eq(1).all() and set(pen_up.unique().tolist()) <= {0.0, 1.0}
    complete = build_omniglot_strokes(OmniglotStrokesConfig(root=str(tmp_path / "z"), download=False, task="complete"))
    batch = complete.sample("train", 2, torch.Generator().manual_seed(0))
    assert batch.support_x.shape == (2, 1, 24, 4) and batch.support_y.shape == (2, 1, 24, 2)


def test_a_malformed_stroke_file_is_named_with_its_line(tmp_path):
    root = make_strokes(tmp_path / "bad")
    path = root / "strokes_background_small2.zip"
    with zipfile.ZipFile(path) as archive:
        files = {n: archive.read(n) for n in archive.namelist()}
    victim = next(n for n in sorted(files) if "/0020_05" in n)  # a character only this subset has
    lines = files[victim].decode().splitlines()
    lines[3] = "12.5;-40.1;88"
    files[victim] = ("\n".join(lines) + "\n").encode()
    with zipfile.ZipFile(path, "w") as archive:
        for name, data in files.items():
            archive.writestr(name, data)
    with pytest.raises(DataError, match=rf"{victim.split('/', 1)[1]} line 4: expected 'x,y,time_ms'"):
        build_omniglot_strokes(OmniglotStrokesConfig(root=str(root), download=False))
    with pytest.raises(DataError, match="line 1: expected START"):
        parse_strokes("1,2,3\nBREAK\n", "some.txt")


def test_missing_stroke_files_say_where_to_get_them(tmp_path):
    with pytest.raises(DataError, match="strokes_background_small1.zip.*data.root"):
        build_omniglot_strokes(OmniglotStrokesConfig(root=str(tmp_path), download=False))


def test_real_strokes_when_present(real_omniglot):
    source = build_omniglot_strokes(OmniglotStrokesConfig(root=str(real_omniglot), download=False))
    assert source.images.shape == (242, 20, 48, 4)
    assert {s: source.num_classes(s) for s in SPLITS} == {"train": 145, "val": 48, "test": 49}
