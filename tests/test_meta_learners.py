"""The meta-learner zoo: every combination trains or is refused, and each algorithm's defining math."""
from __future__ import annotations

import functools
import math
from dataclasses import fields

import lightning.pytorch as pl
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf

from conftest import CONFIG_DIR, fixture_overrides, make_text_corpus, make_timeseries, text_overrides, timeseries_overrides
from metalstm.assembly import build
from metalstm.config import default_of, rule_of
from metalstm.core import PAD, EpisodeBatch
from metalstm.data import DATASETS
from metalstm.data.class_tasks import ClassTasks
from metalstm.errors import ConfigError
from metalstm.learners import BASE_LEARNERS, build_base_learner
from metalstm.learners.conv4 import Conv4, Conv4Config
from metalstm.learners.mlp import MLP, MLPConfig
from metalstm.meta import META_LEARNERS, build_meta_learner, fused_lstm, lstm_optimizer, refusal
from metalstm.meta.lstm_optimizer import LSTMOptimizer, LSTMOptimizerConfig, RaviUpdate, preprocess
from metalstm.meta.maml import MAML
from metalstm.meta.memory_lstm import MemoryLSTM, MemoryLSTMConfig, one_step_late
from metalstm.meta.protonet import ProtoNet, ProtoNetConfig
from metalstm.meta.reptile import Reptile, ReptileConfig
from metalstm.objectives import Classification, get_objective


def group_options(group: str) -> list[str]:
    """Every choice Hydra offers for ``group``: the registries' entries and the YAML variants (fomaml, anil, ...)."""
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return sorted(GlobalHydra.instance().config_loader().get_group_options(group))


def setting_variants() -> list[tuple[str, str]]:
    """(meta-learner, override) for every other value of every choice or switch in a meta-learner's schema."""
    variants = []
    for name, (config_class, _) in sorted(META_LEARNERS.items()):
        for f in fields(config_class):
            default, options = default_of(f), rule_of(f).choices
            if options is None and isinstance(default, bool):
                options = (True, False)
            for value in options or ():
                if value != default:
                    variants.append((name, f"{f.name}={str(value).lower() if isinstance(value, bool) else value}"))
    return variants


# every meta_learner option, then every other setting of their choices and switches
METHODS = [(m, None) for m in group_options("meta_learner")] + setting_variants()
CROSS_DATA = sorted(set(DATASETS) - {"image_folder", "mini_imagenet"})  # those two: tests/test_image_data.py


def default_spec(data: str) -> dict:
    """The task spec of a data set's default config (a required root filled in), as the config states it."""
    config_class = DATASETS[data].config
    return config_class(**({"root": "unused"} if "root" in {f.name for f in fields(config_class)} else {})).spec()


def refused(meta: str, base: str, data: str) -> bool:
    """What the registry says: the base learner cannot read these tasks, or the meta-learner cannot learn them."""
    spec, meta_name = default_spec(data), compose_meta_name(meta)
    base_config, base_class = BASE_LEARNERS[base]
    meta_refusal = refusal(META_LEARNERS[meta_name].impl, meta_name, spec)
    return base_class.refusal(base_config(), spec) is not None or meta_refusal is not None


@functools.cache
def compose_meta_name(option: str) -> str:
    """The meta-learner a ``meta_learner=`` option names (fomaml and anil are maml)."""
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose("train", overrides=[f"meta_learner={option}"]).meta_learner.name


def tiny_config(meta: str, variant: str | None, base: str, data: str, root, cache, tmp_path) -> dict:
    overrides = [f"data={data}", f"base_learner={base}", f"meta_learner={meta}", f"paths.output_dir={tmp_path}",
                 "data.meta_batch_size=2", "data.val_tasks=2", "data.test_tasks=3", "data.eval_batch_size=2"]
    if variant:
        overrides.append(f"meta_learner.{variant}")
    if base == "conv4":
        overrides.append("base_learner.filters=8")
    if data in ("omniglot", "omniglot_strokes"):
        overrides += fixture_overrides(root, cache, data)
    if data in ("timeseries", "series_forecast"):
        overrides += timeseries_overrides(data, make_timeseries(tmp_path / "timeseries"))
    if data == "text":
        overrides += text_overrides(make_text_corpus(tmp_path / "text"))
    if base.startswith("lstm"):
        overrides += ["base_learner.hidden=8", "base_learner.input_dim=4"]
    if base == "conv1d":
        overrides += ["base_learner.filters=8", "base_learner.input_dim=4"]
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return OmegaConf.to_container(compose("train", overrides=overrides), resolve=True)


def test_the_refusal_table_from_the_registry_knows_the_basic_facts():
    assert not refused("maml", "conv4", "omniglot") and not refused("maml", "mlp", "sinusoid")
    assert refused("maml", "conv4", "sinusoid") and refused("maml", "mlp", "seq_tasks")  # no CNN on points, no MLP on tokens
    assert refused("protonet", "mlp", "sinusoid") and refused("memory_lstm", "lstm_seq2seq", "seq_tasks")
    assert not refused("protonet", "lstm_encoder", "omniglot_strokes") and not refused("maml", "lstm_seq2seq", "seq_tasks")
    assert {"fomaml", "meta_sgd", "anil", *META_LEARNERS} <= {m for m, _ in METHODS}
    assert ("lstm_optimizer", "variant=andrychowicz") in METHODS and ("memory_lstm", "labels=current") in METHODS


@pytest.mark.parametrize("data", CROSS_DATA)
@pytest.mark.parametrize("base", sorted(BASE_LEARNERS))
@pytest.mark.parametrize("meta", group_options("meta_learner"))
def test_every_combination_trains_two_steps_or_is_refused(meta, base, data, tmp_path, omniglot_fixture, cache_dir):
    trains_two_steps_or_is_refused(meta, None, base, data, tmp_path, omniglot_fixture, cache_dir)


@pytest.mark.parametrize("meta, variant", setting_variants())
def test_every_setting_variant_trains_two_steps(meta, variant, tmp_path, omniglot_fixture, cache_dir):
    trains_two_steps_or_is_refused(meta, variant, "conv4", "omniglot", tmp_path, omniglot_fixture, cache_dir)


def trains_two_steps_or_is_refused(meta, variant, base, data, tmp_path, omniglot_fixture, cache_dir) -> None:
    """The registry loop's check of one combination: refused with a one-line reason if the registry says it
    cannot work, else 2 training steps change the meta-parameters and the test tasks are scored."""
    config = tiny_config(meta, variant, base, data, omniglot_fixture, cache_dir, tmp_path)
    if refused(meta, base, data):
        with pytest.raises(ConfigError) as refusal:
            build(config)
        assert "\n" not in str(refusal.value) and len(str(refusal.value)) > 20
        return
    module, datamodule = build(config)
    before = [p.detach().clone() for p in module.parameters()]
    trainer = pl.Trainer(max_steps=2, val_check_interval=2, check_val_every_n_epoch=None, num_sanity_val_steps=0,
                         logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, inference_mode=False, use_distributed_sampler=False)
    trainer.fit(module, datamodule=datamodule)
    assert trainer.global_step == 2
    assert any(not torch.equal(a, b) for a, b in zip(before, module.parameters())), "nothing was meta-learned"
    trainer.test(module, datamodule=datamodule, verbose=False)
    summary = module.test_summary
    assert summary["test/num_tasks"] == 3 and torch.isfinite(torch.tensor(summary["test/loss"]))


def image_tasks(shots: int = 2, sigma: float = 60.0) -> ClassTasks:
    """A synthetic family: 60 classes of 4x4 'images', a random prototype each plus noise per sample."""
    g = torch.Generator().manual_seed(0)
    prototypes = torch.rand(60, 1, 1, 4, 4, generator=g) * 255
    images = (prototypes + sigma * torch.randn(60, 20, 1, 4, 4, generator=g)).clamp(0, 255).to(torch.uint8)
    splits = {"train": torch.arange(40), "val": torch.arange(40, 50), "test": torch.arange(50, 60)}
    return ClassTasks(images, splits, ways=5, shots=shots, query=5, eval_query=5)


def test_ravi_lstm_starts_as_plain_sgd():
    spec = {"task_type": "classification", "input_shape": (1, 28, 28), "output_dim": 5}
    learner = build_base_learner(BASE_LEARNERS.parse({"name": "conv4", "filters": 16}), spec)
    ravi = LSTMOptimizer(learner, Classification().loss, spec, LSTMOptimizerConfig(variant="ravi"))
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(5, 1, 28, 28, generator=g), torch.arange(5)
    theta0 = ravi.flat_init().detach()
    _, grad = ravi.support_gradients(theta0[None], x[None], y[None])
    with torch.no_grad():
        step = ravi.optimize(x[None], y[None], 1)[0] - theta0
    grad = grad[0]
    sgd_step = -torch.sigmoid(ravi.update.b_input) * grad  # plain SGD at the learned step size sigma(b_I)
    assert torch.nn.functional.cosine_similarity(step, sgd_step, dim=0) > 0.99
    assert (step - sgd_step).norm() / sgd_step.norm() < 0.1


def test_lstm_optimizer_drops_second_derivatives_and_truncates():
    spec = {"task_type": "classification", "input_shape": (1, 4, 4), "output_dim": 5}
    batch = image_tasks().sample("train", 1, torch.Generator().manual_seed(0))
    for truncation, init_gets_gradient in ((None, True), (1, False)):
        torch.manual_seed(0)
        opt = LSTMOptimizer(MLP(MLPConfig(hidden=[8]), spec), Classification().loss, spec,
                            LSTMOptimizerConfig(variant="andrychowicz", inner_steps=3, truncation=truncation))
        opt.meta_loss(batch).loss.backward()
        init_grad = [p.grad for p in opt.learner.parameters()]
        assert all(p.grad is not None for p in opt.update.lstm1.parameters())  # the LSTM itself is meta-learned
        assert any(g is not None and g.abs().sum() > 0 for g in init_grad) == init_gets_gradient


@pytest.mark.parametrize("variant", ["ravi", "andrychowicz"])
def test_lstm_optimizer_runs_a_meta_batch_as_each_task_alone(variant):
    """All tasks share one LSTM batch; their updates and the meta-gradient equal a per-task loop's."""
    spec = {"task_type": "classification", "input_shape": (1, 4, 4), "output_dim": 5}
    torch.manual_seed(0)
    opt = LSTMOptimizer(MLP(MLPConfig(hidden=[8]), spec), Classification().loss, spec,
                        LSTMOptimizerConfig(variant=variant, inner_steps=3))
    batch = image_tasks().sample("train", 3, torch.Generator().manual_seed(0))
    together = opt.optimize(batch.support_x, batch.support_y, 3)
    opt.zero_grad()
    opt.meta_loss(batch).loss.backward()
    batched_grads = [p.grad.clone() for p in opt.parameters()]
    opt.zero_grad()
    for t in range(3):
        alone = EpisodeBatch(*(part[t : t + 1] for part in batch))
        assert torch.allclose(together[t], opt.optimize(alone.support_x, alone.support_y, 3)[0], atol=1e-6)
        (opt.meta_loss(alone).loss / 3).backward()
    for batched, looped in zip(batched_grads, (p.grad for p in opt.parameters())):
        assert torch.allclose(batched, looped, atol=1e-5)


def test_ravi_gates_are_summarised_per_inner_step_and_layer():
    """meta_loss reports the input gate (step size) and forget gate (decay) of every layer after each inner
    step; at initialisation they are sigmoid(b_I) ~ 0.01 and sigmoid(b_F) ~ 1, as the biases were drawn."""
    spec = {"task_type": "classification", "input_shape": (1, 4, 4), "output_dim": 5}
    torch.manual_seed(0)
    opt = LSTMOptimizer(MLP(MLPConfig(hidden=[8]), spec), Classification().loss, spec, LSTMOptimizerConfig(inner_steps=2))
    batch = image_tasks().sample("train", 3, torch.Generator().manual_seed(0))
    gates = opt.meta_loss(batch).diagnostics
    layers = {name.rsplit(".", 1)[0] for name in opt.learner.params()}
    assert set(gates) == {f"gates/{g}/{layer}/step{t}{s}" for g in ("input", "forget") for layer in layers
                          for t in (1, 2) for s in ("", "_std")}
    for layer in layers:
        assert gates[f"gates/input/{layer}/step1"] == pytest.approx(float(torch.sigmoid(opt.update.b_input.detach())), rel=0.05)
        assert gates[f"gates/forget/{layer}/step2"] == pytest.approx(float(torch.sigmoid(opt.update.b_forget.detach())), abs=1e-3)
    # a layer's summary is over its coordinates (weight and bias) in every task
    theta = opt.flat_init().expand(3, -1)
    loss, grad = opt.support_gradients(theta, batch.support_x, batch.support_y)
    _, state = opt.update(theta.flatten(), loss.repeat_interleave(theta.shape[1]), grad.flatten(),
                          opt.update.initial_state(theta.numel(), theta), 0)
    head = sum(p.numel() for n, p in opt.learner.params().items() if n.startswith("head."))  # the last parameters
    i = state[2].detach().view(3, -1)[:, -head:]
    summary = opt.gate_summary(state, 3, 0)
    assert torch.allclose(summary["gates/input/head/step1"], i.mean())
    assert torch.allclose(summary["gates/input/head/step1_std"], i.std(correction=0))
    andrychowicz = LSTMOptimizer(MLP(MLPConfig(hidden=[8]), spec), Classification().loss, spec,
                                 LSTMOptimizerConfig(variant="andrychowicz", inner_steps=2))
    assert andrychowicz.meta_loss(batch).diagnostics == {}


@pytest.mark.parametrize("second_order", [False, True])
def test_ravi_with_constant_gates_is_maml_with_decay(second_order):
    """With the gates' weights at zero, i = sigmoid(b_I) and f = sigmoid(b_F) everywhere, and Ravi's update is
    theta_t = f theta_{t-1} - i grad_t: theta_0's meta-gradient equals that of this inner loop written with plain
    autograd, differentiating through the gradients (second_order) or treating them as constants (both papers)."""
    spec = {"task_type": "regression", "input_shape": (1,), "output_dim": 1}
    torch.manual_seed(0)
    loss_fn = get_objective("regression").loss
    opt = LSTMOptimizer(MLP(MLPConfig(hidden=[8]), spec), loss_fn, spec,
                        LSTMOptimizerConfig(inner_steps=3, second_order=second_order, input_bias_init=(-1.0, -1.0),
                                            forget_bias_init=(3.0, 3.0)))
    with torch.no_grad():
        opt.update.w_input.zero_(), opt.update.w_forget.zero_()
    x, qx = torch.randn(3, 5, 1), torch.randn(3, 6, 1)
    batch = EpisodeBatch(x, torch.sin(x), qx, torch.sin(qx))
    opt.meta_loss(batch).loss.backward()
    ours = torch.cat([p.grad.flatten() for p in opt.learner.parameters()])
    i, f = torch.sigmoid(torch.tensor(-1.0)), torch.sigmoid(torch.tensor(3.0))
    theta0 = opt.flat_init().detach().requires_grad_()
    losses = []
    for sx, sy, tx, ty in zip(*batch):
        phi = theta0
        for _ in range(3):
            (g,) = torch.autograd.grad(loss_fn(opt.learner.forward_with(opt.unflatten(phi), sx), sy), phi,
                                       create_graph=second_order)
            phi = f * phi - i * g
        losses.append(loss_fn(opt.learner.forward_with(opt.unflatten(phi), tx), ty))
    (reference,) = torch.autograd.grad(torch.stack(losses).mean(), theta0)
    assert torch.allclose(ours, reference, atol=1e-5, rtol=1e-4)


def test_lstm_optimizer_learns_its_rule_at_its_own_rate():
    """theta_0 moves at optim.meta_lr, the update rule at rule_lr_scale times it: after one Adam step each
    parameter has moved by about its group's rate (Adam's first step is lr * sign(grad))."""
    spec = {"task_type": "classification", "input_shape": (1, 4, 4), "output_dim": 5}
    torch.manual_seed(0)
    opt = LSTMOptimizer(MLP(MLPConfig(hidden=[8]), spec), Classification().loss, spec,
                        LSTMOptimizerConfig(inner_steps=2, rule_lr_scale=10.0))
    optimizer = opt.outer_optimizer(1e-3)
    before = {n: p.detach().clone() for n, p in opt.named_parameters()}
    opt.meta_loss(image_tasks().sample("train", 3, torch.Generator().manual_seed(0))).loss.backward()
    optimizer.step()
    moved = {"update.": 0.0, "learner.": 0.0}  # the largest change in each group (Adam's epsilon shrinks tiny ones)
    for name, p in opt.named_parameters():
        group = "update." if name.startswith("update.") else "learner."
        assert name.startswith(group)
        moved[group] = max(moved[group], (p.detach() - before[name]).abs().max().item())
    assert moved["update."] == pytest.approx(1e-2, rel=1e-3) and moved["learner."] == pytest.approx(1e-3, rel=1e-3)
    assert sum(len(g["params"]) for g in optimizer.param_groups) == len(before)


def test_lstm_optimizer_meta_test_in_task_groups_equals_one_batch(monkeypatch):
    spec = {"task_type": "classification", "input_shape": (1, 4, 4), "output_dim": 5}
    torch.manual_seed(0)
    opt = LSTMOptimizer(MLP(MLPConfig(hidden=[8]), spec), Classification().loss, spec, LSTMOptimizerConfig(test_inner_steps=3))
    batch = image_tasks().sample("test", 5, torch.Generator().manual_seed(0))
    whole = opt.predict(batch)
    monkeypatch.setattr(lstm_optimizer, "PREDICT_ROWS", 2 * opt.flat_init().numel())  # groups of 2, 2 and 1 tasks
    groups, optimize = [], opt.optimize
    monkeypatch.setattr(opt, "optimize", lambda x, y, steps: groups.append(len(y)) or optimize(x, y, steps))
    assert torch.allclose(opt.predict(batch), whole, atol=1e-6)
    assert groups == [2, 2, 1]


@pytest.mark.parametrize("input_size", [4, 20])
def test_fused_lstm_cell_matches_torchs_cell_in_values_and_gradients(input_size, monkeypatch):
    """Two steps of FusedLSTMCell (several row blocks, a ragged last one) and of nn.LSTMCell from the same
    weights: outputs and the gradients of x, h, c and every weight agree to 1e-5."""
    monkeypatch.setattr(fused_lstm, "BLOCK_ROWS", 64)
    torch.manual_seed(0)
    reference = torch.nn.LSTMCell(input_size, 20)
    fused = fused_lstm.FusedLSTMCell(input_size, 20)
    fused.load_state_dict(reference.state_dict())
    x, h, c = (torch.randn(150, n, requires_grad=True) for n in (input_size, 20, 20))
    results = []
    for cell in (reference, fused):
        h1, c1 = cell(x, (h, c))
        h2, c2 = cell(torch.tanh(x), (h1, c1))
        loss = (h2 * torch.linspace(-1, 1, 20)).sum() + (c2 ** 2).sum() + h1.pow(3).sum()
        results.append((h2, c2, *torch.autograd.grad(loss, [x, h, c, *cell.parameters()])))
    for ours, theirs in zip(*results):
        assert torch.allclose(ours, theirs, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("x_needs_grad", [False, True])
def test_fused_lstm_cell_from_the_zero_state_matches_torchs_cell(x_needs_grad, monkeypatch):
    """state=None is the zero state (nn.LSTMCell's hx=None): the same values and weight gradients, over two steps,
    whether or not x needs a gradient (the LSTM optimizers' inputs do not; that gradient is then skipped)."""
    monkeypatch.setattr(fused_lstm, "BLOCK_ROWS", 64)
    torch.manual_seed(0)
    reference = torch.nn.LSTMCell(4, 20)
    fused = fused_lstm.FusedLSTMCell(4, 20)
    fused.load_state_dict(reference.state_dict())
    x = torch.randn(150, 4, requires_grad=x_needs_grad)
    results = []
    for cell in (reference, fused):
        h1, c1 = cell(x)
        h2, c2 = cell(x.cos(), (h1, c1))
        loss = (h2 * torch.linspace(-1, 1, 20)).sum() + (c2 ** 2).sum() + (h1 * c1).sum()
        inputs = [x, *cell.parameters()] if x_needs_grad else list(cell.parameters())
        results.append((h1, c1, h2, c2, *torch.autograd.grad(loss, inputs)))
    for ours, theirs in zip(*results):
        assert torch.allclose(ours, theirs, atol=1e-5, rtol=1e-5)


def test_ravi_update_is_its_formula():
    """RaviUpdate's gates, computed row-wise from h_t, equal the paper's form sigmoid(W [h_t, theta, gate_prev] + b)
    on an LSTM cell over (loss, grad) features, step after step, with the same meta-gradient."""
    torch.manual_seed(0)
    rule = RaviUpdate(LSTMOptimizerConfig(forget_bias_init=(1.0, 2.0), input_bias_init=(-1.0, 0.0)))
    with torch.no_grad():
        rule.w_input.normal_(), rule.w_forget.normal_()
    reference_cell = torch.nn.LSTMCell(4, 20)
    reference_cell.load_state_dict(rule.input_lstm.state_dict())
    theta0 = torch.randn(300, requires_grad=True)
    loss, grads = torch.rand(300), [torch.randn(300) * 10.0 ** -k for k in range(3)]
    theta, state = theta0, rule.initial_state(300, theta0)
    ref_theta, (_, _, i, f) = theta0, rule.initial_state(300, theta0)
    h = c = torch.zeros(300, 20)
    for step, grad in enumerate(grads):
        theta, state = rule(theta, loss, grad, state, step)
        h, c = reference_cell(torch.cat([preprocess(loss, 10.0), preprocess(grad, 10.0)], -1), (h, c))
        i = torch.sigmoid(torch.cat([h, ref_theta[:, None], i[:, None]], -1) @ rule.w_input + rule.b_input)
        f = torch.sigmoid(torch.cat([h, ref_theta[:, None], f[:, None]], -1) @ rule.w_forget + rule.b_forget)
        ref_theta = f * ref_theta - i * grad
        assert torch.allclose(theta, ref_theta, atol=1e-6)
    ours = torch.autograd.grad(theta.pow(2).sum(), [theta0, rule.w_input, rule.w_forget, rule.input_lstm.weight_hh])
    theirs = torch.autograd.grad(ref_theta.pow(2).sum(), [theta0, rule.w_input, rule.w_forget, reference_cell.weight_hh])
    for a, b in zip(ours, theirs):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-5)


def test_reptile_outer_step_moves_theta_toward_the_adapted_weights():
    spec = {"task_type": "classification", "input_shape": (1, 4, 4), "output_dim": 5}
    torch.manual_seed(0)
    reptile = Reptile(MLP(MLPConfig(hidden=[8]), spec), Classification().loss, spec,
                      ReptileConfig(inner_steps=3, outer_lr=0.5, outer_lr_final=0.1))
    reptile.progress = 0.5  # eps = 0.5 + (0.1 - 0.5) * 0.5 = 0.3
    batch = image_tasks().sample("train", 3, torch.Generator().manual_seed(0))
    theta = {k: v.detach().clone() for k, v in reptile.learner.params().items()}
    torch.manual_seed(1)
    phi, _ = reptile.adapt(batch.support_x, batch.support_y, 3)
    torch.manual_seed(1)  # same minibatch order inside meta_loss
    optimizer = reptile.outer_optimizer(meta_lr=123.0)  # Reptile ignores optim.meta_lr
    optimizer.zero_grad()
    reptile.meta_loss(batch).loss.backward()
    optimizer.step()
    for k, p in reptile.learner.params().items():
        assert not torch.allclose(phi[k][0], theta[k])
        assert torch.allclose(p, theta[k] + 0.3 * (phi[k].mean(0) - theta[k]), atol=1e-6)


# A conv bias before BatchNorm has zero gradient up to rounding, which Adam's normalisation amplifies
# into noise: Adam is checked without BatchNorm, SGD with it (per-task batch statistics under vmap).
@pytest.mark.parametrize("inner_optimizer, norm", [("adam", "none"), ("sgd", "batch")])
def test_reptile_adapts_all_tasks_at_once_as_a_per_task_loop_would(inner_optimizer, norm):
    """The stacked (vmap) adaptation equals torch.optim on each task alone, same minibatches."""
    spec = {"task_type": "classification", "input_shape": (1, 8, 8), "output_dim": 5}
    torch.manual_seed(0)
    learner = Conv4(Conv4Config(filters=4, blocks=2, norm=norm), spec)
    cfg = ReptileConfig(inner_steps=4, inner_batch_size=3, inner_lr=0.01, inner_optimizer=inner_optimizer)
    reptile = Reptile(learner, Classification().loss, spec, cfg)
    x, y = torch.randn(3, 5, 1, 8, 8), torch.randint(0, 5, (3, 5))
    phi, _ = reptile.adapt(x, y, 4, torch.Generator().manual_seed(7))
    order = torch.rand(3, 5, generator=torch.Generator().manual_seed(7)).argsort(dim=1)
    for t in range(3):
        ref = {k: v.detach().clone().requires_grad_() for k, v in learner.params().items()}
        if inner_optimizer == "adam":
            opt = torch.optim.Adam(ref.values(), lr=0.01, betas=(0.0, 0.999))
        else:
            opt = torch.optim.SGD(ref.values(), lr=0.01)
        for step in range(4):
            idx = order[t, (torch.arange(3) + 3 * step) % 5]
            opt.zero_grad()
            Classification().loss(learner.forward_with(ref, x[t, idx]), y[t, idx]).backward()
            opt.step()
        for k, weight in ref.items():
            assert torch.allclose(phi[k][t], weight, atol=1e-5), k


def test_reptile_carries_adams_second_moment_across_tasks():
    """As the paper's code: a task's inner Adam continues from the running second moment of earlier tasks."""
    spec = {"task_type": "classification", "input_shape": (1, 4, 4), "output_dim": 5}
    torch.manual_seed(0)
    learner = MLP(MLPConfig(hidden=[8]), spec)
    reptile = Reptile(learner, Classification().loss, spec, ReptileConfig(inner_steps=3, inner_lr=0.01))
    first = image_tasks().sample("train", 3, torch.Generator().manual_seed(0))
    reptile.meta_loss(first)
    carried, t = reptile.carried_moments()
    assert t == 3 and all(v.abs().sum() > 0 for v in carried.values())
    carried = {k: v.clone() for k, v in carried.items()}
    reptile.predict(first)  # evaluation starts from the carried state and leaves it unchanged
    assert all(torch.equal(v, reptile.carried_moments()[0][k]) for k, v in carried.items())
    x, y = torch.randn(1, 5, 1, 4, 4), torch.randint(0, 5, (1, 5))
    phi, _ = reptile.adapt(x, y, 2, torch.Generator().manual_seed(7))
    order = torch.rand(1, 5, generator=torch.Generator().manual_seed(7)).argsort(dim=1)
    ref = {k: v.detach().clone().requires_grad_() for k, v in learner.params().items()}
    opt = torch.optim.Adam(ref.values(), lr=0.01, betas=(0.0, 0.999))
    for k, p in ref.items():
        opt.state[p] = {"step": torch.tensor(3.0), "exp_avg": torch.zeros_like(p), "exp_avg_sq": carried[k].clone()}
    for step in range(2):
        idx = order[0, (torch.arange(5) + 5 * step) % 5]
        opt.zero_grad()
        Classification().loss(learner.forward_with(ref, x[0, idx]), y[0, idx]).backward()
        opt.step()
    for k, weight in ref.items():
        assert torch.allclose(phi[k][0], weight, atol=1e-6), k
    fresh = Reptile(learner, Classification().loss, spec, ReptileConfig(inner_lr=0.01, carry_adam_state=False))
    fresh_phi, _ = fresh.adapt(x, y, 2, torch.Generator().manual_seed(7))
    assert not torch.allclose(fresh_phi["head.weight"], phi["head.weight"])


@pytest.mark.parametrize("norm", ["none", "batch"])
def test_protonet_classifies_by_distance_to_class_means(norm):
    """Without batch statistics the meta-batch is embedded in one pass, with them task by task: the same logits."""
    spec = {"task_type": "classification", "input_shape": (1, 4, 4), "output_dim": 5}
    torch.manual_seed(0)
    learner = Conv4(Conv4Config(filters=4, blocks=2, norm=norm), spec)
    proto = ProtoNet(learner, Classification().loss, spec, ProtoNetConfig())
    batch = image_tasks(shots=3).sample("test", 2, torch.Generator().manual_seed(0))
    logits = proto.all_logits(batch)
    for t, (sx, sy, qx, _) in enumerate(zip(*batch)):
        z = proto.learner.embed_with(proto.learner.params(), torch.cat([sx, qx]))
        means = torch.stack([z[: len(sx)][sy == k].mean(0) for k in range(5)])
        expected = -((z[len(sx):, None, :] - means[None]) ** 2).sum(-1)
        assert torch.allclose(logits[t], expected, atol=1e-4)


@pytest.mark.parametrize("labels", ["previous", "current"])
def test_memory_lstm_learns_in_context(labels):
    """Query accuracy rises with the number of support shots the LSTM has read (same weights)."""
    torch.manual_seed(0)
    sources = {k: image_tasks(shots=k) for k in range(1, 6)}
    spec = sources[1].spec
    memory = MemoryLSTM(MLP(MLPConfig(hidden=[32]), spec), Classification().loss, spec,
                        MemoryLSTMConfig(hidden=64, attention=True, labels=labels))
    optimizer = torch.optim.Adam(memory.parameters(), 3e-3)
    g = torch.Generator().manual_seed(1)
    for _ in range(400):
        shots = int(torch.randint(1, 6, (1,), generator=g))
        optimizer.zero_grad()
        memory.meta_loss(sources[shots].sample("train", 16, g)).loss.backward()
        optimizer.step()
    accuracy = {}
    for shots in (1, 5):
        batch = sources[shots].sample("test", 300, torch.Generator().manual_seed(2))
        accuracy[shots] = (memory.predict(batch).argmax(-1) == batch.query_y).float().mean().item() * 100
    assert accuracy[1] > 20 + 10, accuracy  # above chance (20%) from one example per class
    assert accuracy[5] > accuracy[1] + 5, accuracy  # and better with more examples in context


def test_pretrain_finetune_trains_without_inner_loop_and_fine_tunes_at_test():
    from metalstm.meta.pretrain_finetune import PretrainFinetune, PretrainFinetuneConfig
    from metalstm.objectives import Regression

    spec = {"task_type": "regression", "input_shape": (1,), "output_dim": 1}
    torch.manual_seed(0)
    baseline = PretrainFinetune(MLP(MLPConfig(hidden=[8]), spec), Regression().loss, spec, PretrainFinetuneConfig())
    x = torch.randn(2, 10, 1)
    batch = EpisodeBatch(x[:, :5], torch.sin(x[:, :5]), x[:, 5:], torch.sin(x[:, 5:]))
    out = baseline.meta_loss(batch)
    plain = torch.stack([baseline.learner(qx) for qx in batch.query_x])
    assert torch.allclose(out.query_outputs, plain)  # training: the network itself, no adaptation
    assert not torch.allclose(baseline.predict(batch), plain)  # test: fine-tuned on the support set


def test_reptile_non_transductive_test_scores_each_query_with_the_support_set_alone():
    """transductive=false (Nichol et al.): a query's output is that of the batch [support; query], so it does not
    depend on the other queries; transductive=true shares BatchNorm statistics between the queries."""
    spec = {"task_type": "classification", "input_shape": (1, 8, 8), "output_dim": 5}
    torch.manual_seed(0)
    learner = Conv4(Conv4Config(filters=4, blocks=2), spec)
    batch = EpisodeBatch(torch.randn(2, 5, 1, 8, 8), torch.arange(5).repeat(2, 1), torch.randn(2, 6, 1, 8, 8),
                         torch.arange(6).remainder(5).repeat(2, 1))
    changed = batch._replace(query_x=torch.cat([batch.query_x[:, :1], torch.randn(2, 5, 1, 8, 8)], 1))
    outputs = {}
    for transductive in (True, False):
        reptile = Reptile(learner, Classification().loss, spec, ReptileConfig(test_inner_steps=2, transductive=transductive))
        outputs[transductive] = reptile.predict(batch), reptile.predict(changed)
        assert outputs[transductive][0].shape == (2, 6, 5)
    one_by_one, other_queries = outputs[False]
    assert torch.allclose(one_by_one[:, 0], other_queries[:, 0], atol=1e-6)  # query 0 alone: the same
    assert not torch.allclose(outputs[True][0][:, 0], outputs[True][1][:, 0], atol=1e-4)  # shared statistics
    phi, _ = reptile.adapt(batch.support_x, batch.support_y, 2, torch.Generator().manual_seed(0))
    for q in range(6):  # each query's output is that of its own batch [support; query]
        group = torch.cat([batch.support_x[1], batch.query_x[1, q:q + 1]])
        alone = learner.forward_with({k: v[1] for k, v in phi.items()}, group)
        assert torch.allclose(one_by_one[1, q], alone[-1], atol=1e-5)
    assert reptile.bn_policy.startswith("non-transductive")


def test_running_batchnorm_gathers_statistics_in_training_and_scores_each_query_alone_at_test():
    """base_learner.norm=running (Snell et al.'s protocol): meta-training forwards update running statistics,
    meta-test normalises with them, so a query's output does not depend on the other queries."""
    spec = {"task_type": "classification", "input_shape": (1, 8, 8), "output_dim": 5}
    torch.manual_seed(0)
    learner = Conv4(Conv4Config(filters=4, blocks=2, downsample="maxpool", norm="running"), spec)
    proto = ProtoNet(learner, Classification().loss, spec, ProtoNetConfig())
    assert proto.bn_policy == "running"
    batch = EpisodeBatch(torch.randn(2, 5, 1, 8, 8) + 3, torch.arange(5).repeat(2, 1), torch.randn(2, 6, 1, 8, 8) + 3,
                         torch.arange(6).remainder(5).repeat(2, 1))
    changed = batch._replace(query_x=torch.cat([batch.query_x[:, :1], torch.randn(2, 5, 1, 8, 8)], 1))
    norm = learner.body[1]
    before = norm.running_mean.clone()
    proto.meta_loss(batch).loss.backward()
    assert not torch.allclose(norm.running_mean, before)  # training updated the statistics
    proto.eval()
    gathered = norm.running_mean.clone()
    first, second = proto.predict(batch), proto.predict(changed)
    assert torch.equal(norm.running_mean, gathered)  # meta-test leaves them alone
    assert torch.allclose(first[:, 0], second[:, 0], atol=1e-5)  # query 0 scored the same beside other queries
    proto.train()
    transductive = proto.predict(batch), proto.predict(changed)
    assert not torch.allclose(transductive[0][:, 0], transductive[1][:, 0], atol=1e-4)  # batch statistics: shared


def test_running_batchnorm_is_refused_by_meta_learners_that_vmap_the_base_learner():
    spec = {"task_type": "classification", "input_shape": (1, 8, 8), "output_dim": 5}
    learner = Conv4(Conv4Config(filters=4, blocks=2, norm="running"), spec)
    for name, entry in META_LEARNERS.items():
        component = META_LEARNERS.parse({"name": name})
        if refusal(entry.impl, name, spec) is not None:
            continue  # cannot learn image classification at all (memory_seq2seq)
        if entry.impl.running_norm:
            meta = build_meta_learner(component, learner, Classification().loss, spec)
            if isinstance(meta, MAML):  # adapts task by task, so BatchNorm can update its statistics
                assert meta.vectorize_mode(torch.zeros(1)) == "loop"
            continue
        with pytest.raises(ConfigError, match="base_learner.norm=running.*base_learner.norm=batch"):
            build_meta_learner(component, learner, Classification().loss, spec)
    assert {n for n, e in META_LEARNERS.items() if not e.impl.running_norm} >= {"reptile", "lstm_optimizer"}


# ------------------------------------------------------------------ Santoro et al.'s online episodes (stream)

def stream_tasks() -> ClassTasks:
    """image_tasks' classes as streams: 4 drawings of each of 5 classes per training stream, 3 at evaluation."""
    base = image_tasks()
    return ClassTasks(base.images, base.split_classes, ways=5, shots=1, query=4, eval_query=3, stream=True)


def test_a_stream_episode_has_no_support_set_and_each_class_in_random_order():
    tasks = stream_tasks()
    assert tasks.spec["task_type"] == tasks.task_type == "stream"
    batch = tasks.sample("train", 6, torch.Generator().manual_seed(0))
    assert batch.support_x.shape == (6, 0, 1, 4, 4) and batch.query_x.shape == (6, 20, 1, 4, 4)
    assert all(torch.equal(y.bincount(minlength=5), torch.full((5,), 4)) for y in batch.query_y)
    assert len({tuple(y.tolist()) for y in batch.query_y}) == 6  # each stream has its own order
    assert tasks.sample("test", 2, torch.Generator().manual_seed(0)).query_y.shape == (2, 15)
    # every drawing keeps its label through the shuffle: same draws without the stream form, sorted by label
    plain = ClassTasks(tasks.images, tasks.split_classes, ways=5, shots=0, query=4, eval_query=3)
    same = plain.sample("train", 6, torch.Generator().manual_seed(0))
    for t in range(6):
        order = batch.query_y[t].argsort(stable=True)
        assert torch.equal(batch.query_x[t, order].sort(0).values, same.query_x[t].sort(0).values)


def test_instances_count_each_class_presentations():
    from metalstm.objectives import Stream, instance_numbers

    y = torch.tensor([[2, 0, 2, 2, 0, 1]])
    assert instance_numbers(y).tolist() == [[1, 1, 2, 3, 2, 1]]
    answers = torch.tensor([[0, 0, 2, 1, 0, 1]])  # wrong, right, right, wrong, right, right
    metrics = Stream().task_metrics(torch.nn.functional.one_hot(answers, 3).float(), y)
    assert metrics["acc"].item() == pytest.approx(400 / 6)
    assert metrics["acc_1"].item() == pytest.approx(200 / 3) and metrics["acc_2"].item() == 100.0
    assert metrics["acc_3"].item() == 0.0 and metrics["acc_5"].isnan()  # no class shown 5 times


@pytest.mark.parametrize("attention,score", [(False, "dense"), (True, "dense"), (True, "cosine")])
def test_memory_lstm_answers_each_step_of_a_stream_before_its_label_is_shown(attention, score):
    """Changing the label of step t changes no answer up to step t, and (the label being read) later answers."""
    spec = stream_tasks().spec
    torch.manual_seed(0)
    memory = MemoryLSTM(MLP(MLPConfig(hidden=[8]), spec), Classification().loss, spec,
                        MemoryLSTMConfig(hidden=16, attention=attention, attention_score=score))
    batch = stream_tasks().sample("train", 2, torch.Generator().manual_seed(0))
    outputs = memory.predict(batch)
    assert outputs.shape == (2, 20, 5)
    t = 7
    relabelled = batch.query_y.clone()
    relabelled[:, t] = (relabelled[:, t] + 1) % 5
    changed = memory.predict(batch._replace(query_y=relabelled))
    assert torch.equal(changed[:, : t + 1], outputs[:, : t + 1])
    assert not torch.allclose(changed[:, t + 1], outputs[:, t + 1])
    memory.meta_loss(batch).loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in memory.parameters() if p.grad is not None)


def test_memory_lstm_cosine_attention_reads_the_earlier_drawing_most_like_the_query():
    """With attention_score=cosine a step's read weights follow the cosine similarity of raw embeddings (a linear
    base learner embeds by the input itself): a repeat of an earlier example reads that example's label most, and an
    example unlike every earlier one reads almost nothing (the weight goes to the novelty score)."""
    spec = stream_tasks().spec
    torch.manual_seed(0)
    memory = MemoryLSTM(MLP(MLPConfig(hidden=[]), spec), Classification().loss, spec,
                        MemoryLSTMConfig(hidden=16, attention=True, attention_score="cosine"))
    assert memory.learner.embed_dim == math.prod(spec["input_shape"])  # no hidden layer: the input is the embedding
    x = torch.randn(1, 6, *spec["input_shape"])
    x[0, 5] = x[0, 2]  # step 5 repeats step 2's example
    y = torch.tensor([[0, 1, 2, 3, 4, 0]])
    z = memory.embed(x)
    inputs = torch.cat([z, one_step_late(memory.label_slot(y))], -1)
    keys = torch.cat([z, memory.label_slot(y)], -1)
    unlabelled = torch.ones(6, 6, dtype=torch.bool).triu()
    read, weights = memory.attend(inputs, keys, unlabelled)  # the read's label part: the earlier steps' labels, weighted
    label_weights = read[0, 5, -5:]
    assert label_weights.argmax().item() == 2 and label_weights[2] > 0.9  # score 10 x cosine 1 against novelty's 7
    assert read[0, 4, -5:].sum() < 0.2  # a new example (small cosines) reads mostly "none of these": zeros
    assert torch.equal(read[0, 0], torch.zeros_like(read[0, 0]))  # nothing labelled before step 0
    # the readout sees the LSTM's output scaled by the weight on "none of these": all of it at step 0, little at step 5
    lstm_out = torch.randn(1, 6, 16)
    gated = memory.with_attention(lstm_out, inputs, keys, unlabelled)[..., -16:]
    assert torch.allclose(gated[0, 0], lstm_out[0, 0])
    assert torch.allclose(gated[0, 5], (1 - weights[0, 5].sum()) * lstm_out[0, 5]) and weights[0, 5].sum() > 0.9


def test_memory_lstm_forget_bias_shifts_only_the_forget_gate():
    spec = stream_tasks().spec
    biases = {}
    for forget_bias in (0.0, 3.0):
        torch.manual_seed(0)
        memory = MemoryLSTM(MLP(MLPConfig(hidden=[8]), spec), Classification().loss, spec,
                            MemoryLSTMConfig(hidden=16, forget_bias=forget_bias))
        biases[forget_bias] = memory.lstm.bias_ih_l0.detach() + memory.lstm.bias_hh_l0.detach()
    shift = biases[3.0] - biases[0.0]  # gates in PyTorch's order: input, forget, cell, output
    assert torch.allclose(shift[16:32], torch.full((16,), 3.0)) and torch.equal(shift[:16], torch.zeros(16))
    assert torch.equal(shift[32:], torch.zeros(32))


def test_stream_tasks_are_refused_where_they_cannot_apply():
    spec = stream_tasks().spec
    assert "stream" in refusal(MAML, "maml", spec) and refusal(MemoryLSTM, "memory_lstm", spec) is None
    with pytest.raises(ConfigError, match="meta_learner.labels=previous"):
        MemoryLSTM(MLP(MLPConfig(hidden=[8]), spec), Classification().loss, spec, MemoryLSTMConfig(labels="current"))


# ------------------------------------------------------------------ in-context sequence-to-sequence learning

@pytest.fixture
def seq_setup():
    from metalstm.data.seq_tasks import SeqTasks, SeqTasksConfig
    from metalstm.meta.memory_seq2seq import MemorySeq2Seq, MemorySeq2SeqConfig

    source = SeqTasks(SeqTasksConfig(shots=3, query=4, eval_query=4, max_length=5))
    learner = build_base_learner(BASE_LEARNERS.parse({"name": "lstm_seq2seq", "hidden": 8, "input_dim": 4}), source.spec)
    torch.manual_seed(0)
    memory = MemorySeq2Seq(learner, get_objective("seq2seq").loss, source.spec, MemorySeq2SeqConfig(hidden=16, embed=8))
    return memory, source.sample("train", 2, torch.Generator().manual_seed(0))


def test_memory_seq2seq_greedy_decoding_is_teacher_forcing_on_its_own_tokens(seq_setup):
    memory, batch = seq_setup
    greedy = memory.predict(batch)
    assert greedy.shape == (*batch.query_y.shape, memory.readout.out_features)
    assert torch.equal(memory.predict(batch._replace(query_y=torch.zeros_like(batch.query_y))), greedy)  # no peeking
    own_tokens = batch._replace(query_y=greedy.argmax(-1))
    assert torch.allclose(memory.forward_tasks(own_tokens, teacher=True), greedy, atol=1e-5)
    teacher = memory.forward_tasks(batch, teacher=True)
    assert not torch.allclose(teacher, greedy)  # the true tokens differ from an untrained model's


def test_memory_seq2seq_step_j_reads_targets_before_j_only(seq_setup):
    memory, batch = seq_setup
    outputs = memory.forward_tasks(batch, teacher=True)
    j = 2
    changed = batch.query_y.clone()
    changed[:, :, j] = changed[:, :, j] % 8 + 1
    again = memory.forward_tasks(batch._replace(query_y=changed), teacher=True)
    assert torch.equal(again[:, :, : j + 1], outputs[:, :, : j + 1])
    assert not torch.allclose(again[:, :, j + 1], outputs[:, :, j + 1])
    other_rule = torch.where(batch.support_y > 0, batch.support_y % 8 + 1, batch.support_y)
    assert not torch.allclose(memory.forward_tasks(batch._replace(support_y=other_rule), teacher=True), outputs)


def test_memory_seq2seq_cyclic_pointer_reads_each_shift_and_reflection_of_the_input():
    """pointer=cyclic: head d (d < max length) reads input place (t + d) mod L at step t, head max_length + d reads
    (L - 1 - t - d) mod L: the heads read a sequence rotated left by d, or reversed and then rotated by d."""
    from metalstm.data.seq_tasks import SeqTasks, SeqTasksConfig
    from metalstm.meta.memory_seq2seq import MemorySeq2Seq, MemorySeq2SeqConfig

    source = SeqTasks(SeqTasksConfig(max_length=6))
    learner = build_base_learner(BASE_LEARNERS.parse({"name": "lstm_seq2seq", "hidden": 8, "input_dim": 4}), source.spec)
    memory = MemorySeq2Seq(learner, get_objective("seq2seq").loss, source.spec, MemorySeq2SeqConfig(pointer="cyclic"))
    x = torch.tensor([[3, 1, 4, 5, 0, 0], [2, 7, 1, 8, 2, 8]])
    places = torch.arange(6).expand(2, -1)[..., None].float()  # a position's feature: its place
    reads = memory.point(torch.zeros(2, 6, 1), (places, x != PAD)).squeeze(-1).long()  # [2, T, 12]
    for row, length in ((0, 4), (1, 6)):
        for d in range(6):
            rotated = [(t + d) % length for t in range(length)]
            reflected = [(length - 1 - t - d) % length for t in range(length)]
            assert reads[row, :length, d].tolist() == rotated and reads[row, :length, 6 + d].tolist() == reflected


def test_memory_seq2seq_is_refused_on_tasks_without_sequence_targets():
    spec = {"task_type": "classification", "input_shape": (1, 28, 28), "output_dim": 5}
    reason = refusal(META_LEARNERS["memory_seq2seq"].impl, "memory_seq2seq", spec)
    assert "seq2seq" in reason and "forecast" in reason and "classification" in reason


@pytest.mark.parametrize("attention", [False, True])
def test_memory_seq2seq_forecasts_real_valued_sequences(attention):
    """Forecast tasks (sinusoid windows -> the next points): outputs of the target's shape; greedy decoding feeds
    back its own outputs (equal to teacher forcing on them); the support windows change the answers."""
    from metalstm.data.sinusoid import SinusoidSeqConfig, SinusoidSeqTasks
    from metalstm.meta.memory_seq2seq import MemorySeq2Seq, MemorySeq2SeqConfig

    source = SinusoidSeqTasks(SinusoidSeqConfig(shots=3, query=4, eval_query=4, window=4, horizon=6))
    learner = build_base_learner(BASE_LEARNERS.parse({"name": "lstm_seq2seq", "hidden": 8, "input_dim": 4}), source.spec)
    torch.manual_seed(0)
    memory = MemorySeq2Seq(learner, get_objective("forecast").loss, source.spec,
                           MemorySeq2SeqConfig(hidden=16, embed=8, attention=attention, heads=2))
    batch = source.sample("train", 2, torch.Generator().manual_seed(0))
    greedy = memory.predict(batch)
    assert greedy.shape == batch.query_y.shape
    assert torch.allclose(memory.forward_tasks(batch._replace(query_y=greedy), teacher=True), greedy, atol=1e-5)
    assert not torch.allclose(memory.predict(batch._replace(support_y=batch.support_y * 2)), greedy)
    memory.meta_loss(batch).loss.backward()
    own = [(name, p) for name, p in memory.named_parameters() if not name.startswith("learner.")]  # shapes only
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for _, p in own), [n for n, p in own if p.grad is None]


