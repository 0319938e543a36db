"""MAML's meta-gradient: second order differs from first order and matches finite differences."""
from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from conftest import central_differences
from metalstm.core import EpisodeBatch
from metalstm.errors import ConfigError
from metalstm.learners.conv4 import Conv4, Conv4Config
from metalstm.learners.mlp import MLP, MLPConfig
from metalstm.meta.maml import MAML, MAMLConfig
from metalstm.objectives import Regression


def tiny_problem(first_order: bool, steps: int = 2) -> tuple[MAML, EpisodeBatch]:
    torch.manual_seed(0)
    spec = {"task_type": "regression", "input_shape": (1,), "output_dim": 1}
    learner = MLP(MLPConfig(hidden=[6]), spec).double()
    maml = MAML(learner, Regression().loss, spec, MAMLConfig(inner_lr=0.1, inner_steps=steps, first_order=first_order))
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 8, 1, generator=g, dtype=torch.float64)
    batch = EpisodeBatch(x[:, :4], torch.sin(3 * x[:, :4]), x[:, 4:], torch.sin(3 * x[:, 4:]))
    return maml, batch


def meta_gradient(maml: MAML, batch: EpisodeBatch) -> torch.Tensor:
    maml.zero_grad()
    maml.meta_loss(batch).loss.backward()
    return torch.cat([p.grad.flatten() for p in maml.parameters()])


@pytest.mark.parametrize("vectorize,task_chunk", [("vmap", 0), ("loop", 0), ("grouped", 0), ("grouped", 1)])
def test_second_order_matches_finite_differences(vectorize, task_chunk):
    """On every path: vmap (one graph), loop (auto: a task at a time, its meta-gradient taken in the forward),
    grouped (each query's gradient taken in the forward), grouped in chunks of one task."""
    maml, batch = tiny_problem(first_order=False)
    maml.cfg.vectorize, maml.cfg.task_chunk = vectorize, task_chunk
    analytic = meta_gradient(maml, batch)
    numeric = central_differences(lambda: maml.meta_loss(batch).loss, list(maml.parameters()))
    assert torch.allclose(analytic, numeric, rtol=1e-5, atol=1e-7), (analytic - numeric).abs().max()


def test_first_order_differs_from_second_order_and_equals_query_gradient_at_adapted_params():
    so = meta_gradient(*tiny_problem(first_order=False))
    maml, batch = tiny_problem(first_order=True)
    fo = meta_gradient(maml, batch)
    assert not torch.allclose(so, fo, rtol=1e-3)
    # FOMAML: the meta-gradient is the mean over tasks of grad L_query at phi (inner gradients held constant)
    expected = torch.zeros_like(fo)
    for sx, sy, qx, qy in zip(*batch):
        theta = {k: v.detach().requires_grad_() for k, v in maml.learner.params().items()}
        phi = {k: v.detach().requires_grad_() for k, v in maml.adapt(theta, sx, sy, 2, first_order=True)[0].items()}
        loss = maml.loss_fn(maml.learner.forward_with(phi, qx), qy)
        expected += torch.cat([g.flatten() for g in torch.autograd.grad(loss, list(phi.values()))]) / 2
    assert torch.allclose(fo, expected, rtol=1e-9, atol=1e-12)


def test_zero_inner_steps_is_plain_training_on_the_query_set():
    maml, batch = tiny_problem(first_order=False, steps=0)
    grad = meta_gradient(maml, batch)
    loss = sum(maml.loss_fn(maml.learner(qx), qy) for _, _, qx, qy in zip(*batch)) / 2
    expected = torch.autograd.grad(loss, list(maml.parameters()))
    assert torch.allclose(grad, torch.cat([g.flatten() for g in expected]))


def test_predict_adapts_without_touching_the_meta_parameters():
    maml, batch = tiny_problem(first_order=False)
    before = [p.detach().clone() for p in maml.parameters()]
    with torch.no_grad():  # as in Lightning's eval loop; predict must enable grad itself where needed
        unadapted = torch.stack([maml.learner(qx) for qx in batch.query_x])
    with torch.enable_grad():
        adapted = maml.predict(batch)
    assert adapted.shape == (2, 4, 1) and not adapted.requires_grad
    assert not torch.allclose(adapted, unadapted)
    assert all(torch.equal(a, b) for a, b in zip(before, maml.parameters()))
    assert all(p.grad is None for p in maml.parameters())


# ------------------------------------------------------------------ MAML++ options


def conv_problem(**options) -> tuple[MAML, EpisodeBatch]:
    from metalstm.learners.conv4 import Conv4, Conv4Config
    from metalstm.objectives import Classification

    torch.manual_seed(0)
    spec = {"task_type": "classification", "input_shape": (1, 8, 8), "output_dim": 3}
    learner = Conv4(Conv4Config(filters=4, blocks=2), spec)
    maml = MAML(learner, Classification().loss, spec, MAMLConfig(inner_lr=0.1, inner_steps=3, **options))
    g = torch.Generator().manual_seed(1)
    x = torch.rand(2, 9, 1, 8, 8, generator=g)
    y = torch.arange(3).repeat(3).expand(2, -1)
    return maml, EpisodeBatch(x[:, :3], y[:, :3], x[:, 3:], y[:, 3:])


def test_learned_rates_start_exactly_as_maml():
    """LSLR and Meta-SGD rates start at inner_lr: the first meta-loss is MAML's."""
    plain, batch = conv_problem()
    reference = plain.meta_loss(batch).loss
    for options in ({"learned_lr": "per_layer_per_step"}, {"learned_lr": "per_parameter"}):
        maml, _ = conv_problem(**options)
        assert torch.allclose(maml.meta_loss(batch).loss, reference, atol=1e-6), options


def test_per_step_norms_start_as_the_learners_and_are_not_adapted():
    maml, batch = conv_problem(per_step_bn=True)
    theta = maml.learner.params()
    x = batch.support_x[0]
    for step in range(4):
        assert torch.equal(maml.learner.forward_with(maml.with_step_norms(theta, step), x), maml.learner(x))
    assert maml.norm_names and not maml.norm_names & set(maml.adapted)


def test_learned_inner_rates_and_step_norms_are_meta_learned():
    maml, batch = conv_problem(learned_lr="per_layer_per_step", per_step_bn=True)
    maml.meta_loss(batch).loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in maml.inner_lrs.values())
    assert all(p.shape[0] == 3 for p in maml.inner_lrs.values())  # one rate per step
    assert all(p.grad is not None and p.shape[0] == 4 for p in maml.step_norms.values())  # S + 1 passes
    learner_bn = [p for n, p in maml.learner.named_parameters() if n in maml.norm_names]
    assert learner_bn and all(p.grad is None for p in learner_bn)  # replaced by the per-step copies


def test_multi_step_loss_weights_anneal_onto_the_last_step():
    maml, batch = conv_problem(multi_step_loss=True, msl_fraction=0.5)
    maml.progress = 0.0
    assert torch.allclose(maml.step_weights(3), torch.full((3,), 1 / 3))
    maml.progress = 0.25
    mid = maml.step_weights(3)
    assert mid[0] < 1 / 3 < mid[-1] and torch.isclose(mid.sum(), torch.tensor(1.0))
    maml.progress = 0.9
    assert torch.allclose(maml.step_weights(3), torch.tensor([0.01, 0.01, 0.98]))
    # at the end the multi-step loss is 0.98 x the last step's loss plus a little of the others
    msl = maml.meta_loss(batch).loss
    plain, _ = conv_problem()
    assert not torch.allclose(msl, plain.meta_loss(batch).loss)


def test_first_order_until_switches_to_second_order():
    fo_ref, batch = conv_problem(first_order=True)
    so_ref, _ = conv_problem()
    annealed, _ = conv_problem(first_order_until=0.5)

    def grad(m):
        m.zero_grad()
        m.meta_loss(batch).loss.backward()
        return torch.cat([p.grad.flatten() for p in m.learner.parameters() if p.grad is not None])

    annealed.progress = 0.2
    assert torch.allclose(grad(annealed), grad(fo_ref), atol=1e-6)
    annealed.progress = 0.7
    assert torch.allclose(grad(annealed), grad(so_ref), atol=1e-6)


# ------------------------------------------------------------------ vectorised inner loop


def vectorize_problem(base: str, vectorize: str, **options) -> tuple[MAML, EpisodeBatch]:
    """A tiny task of each base learner's kind: 3 tasks, 3 inner steps."""
    from metalstm.data.seq_tasks import SeqTasks, SeqTasksConfig
    from metalstm.learners import BASE_LEARNERS, build_base_learner
    from metalstm.objectives import get_objective

    g = torch.Generator().manual_seed(1)
    if base == "lstm_seq2seq":
        source = SeqTasks(SeqTasksConfig(shots=3, query=4, max_length=5))
        spec, batch = source.spec, source.sample("train", 3, g)
        cfg = {"name": base, "hidden": 6, "input_dim": 4}
    else:
        shapes = {"conv4": (1, 8, 8), "conv4-maxpool": (1, 8, 8), "mlp": (5,), "lstm_encoder": (4, 2), "conv1d": (7, 3)}
        spec = {"task_type": "classification", "input_shape": shapes[base], "output_dim": 3, "step_mask": base == "conv1d"}
        cfg = {"conv4": {"filters": 4, "blocks": 2}, "conv4-maxpool": {"filters": 4, "blocks": 2, "downsample": "maxpool"},
               "mlp": {"hidden": [8]}, "lstm_encoder": {"hidden": 6, "input_dim": 4},
               "conv1d": {"filters": 4, "blocks": 2, "kernel": 3, "input_dim": 4}}[base]
        cfg = {"name": base.split("-")[0], **cfg}
        x = torch.rand(3, 9, *shapes[base], generator=g)
        if base == "conv1d":  # series of 4 to 7 observed steps, then padding
            x[..., -1] = (torch.arange(7) < torch.randint(4, 8, (3, 9, 1), generator=g)).float()
            x[..., :-1] *= x[..., -1:]
        y = torch.arange(3).repeat(3).expand(3, -1)
        batch = EpisodeBatch(x[:, :3], y[:, :3], x[:, 3:], y[:, 3:])
    torch.manual_seed(0)
    learner = build_base_learner(BASE_LEARNERS.parse(cfg), spec)
    maml = MAML(learner, get_objective(spec["task_type"]).loss, spec,
                MAMLConfig(inner_lr=0.3, inner_steps=3, test_inner_steps=4, vectorize=vectorize, **options))
    return maml, batch


def meta_result(maml: MAML, batch: EpisodeBatch) -> tuple[Tensor, Tensor, list[Tensor | None]]:
    """A meta-loss, its query outputs and the meta-gradient of every parameter (None: no gradient)."""
    out = maml.meta_loss(batch)
    out.loss.backward()
    return out.loss.detach(), out.query_outputs, [p.grad for p in maml.parameters()]


def assert_same_meta_result(expected: tuple, got: tuple) -> None:
    (loss, outputs, grads), (g_loss, g_outputs, g_grads) = expected, got
    assert torch.allclose(loss, g_loss, atol=1e-6) and torch.allclose(outputs, g_outputs, atol=1e-5)
    assert [g is None for g in grads] == [g is None for g in g_grads] and any(g is not None for g in grads)
    assert all(a is None or torch.allclose(a, b, atol=1e-5, rtol=1e-4) for a, b in zip(grads, g_grads))


VECTORIZE_CASES = [("conv4", {}), ("conv4", {"first_order": True}),
                   ("conv4", {"learned_lr": "per_layer_per_step", "per_step_bn": True, "multi_step_loss": True}),
                   ("conv4-maxpool", {"adapt": "head"}),
                   ("mlp", {"learned_lr": "per_parameter"}), ("lstm_encoder", {}), ("lstm_seq2seq", {}),
                   ("conv1d", {"per_step_bn": True})]


@pytest.mark.parametrize("base,options", VECTORIZE_CASES, ids=[f"{b}-{'-'.join(o) or 'plain'}" for b, o in VECTORIZE_CASES])
@pytest.mark.parametrize("mode", ["vmap", "grouped"])
def test_tasks_adapted_together_give_the_per_task_loops_meta_gradient(base, options, mode):
    """vmap (whole tasks) and grouped (all support sets through forward_tasks, queries task by task) compute the
    loop's meta-loss, query outputs, meta-gradient of every parameter and meta-test predictions."""
    results = {}
    for vectorize in ("loop", mode):
        maml, batch = vectorize_problem(base, vectorize, **options)
        assert maml.vectorize_mode(batch.support_x) == vectorize
        out = maml.meta_loss(batch)
        out.loss.backward()
        results[vectorize] = (out.loss.detach(), out.query_outputs,
                              [p.grad.clone() for p in maml.parameters() if p.grad is not None], maml.predict(batch))
        assert not maml.vmap_failed  # really vectorised, no silent fallback
    (loss, outputs, grads, predictions), (v_loss, v_outputs, v_grads, v_predictions) = results["loop"], results[mode]
    assert torch.allclose(loss, v_loss, atol=1e-6) and torch.allclose(outputs, v_outputs, atol=1e-5)
    assert len(grads) == len(v_grads) and grads
    assert all(torch.allclose(a, b, atol=1e-5, rtol=1e-4) for a, b in zip(grads, v_grads))
    assert torch.allclose(predictions, v_predictions, atol=1e-5)


@pytest.mark.parametrize("base,options", VECTORIZE_CASES, ids=[f"{b}-{'-'.join(o) or 'plain'}" for b, o in VECTORIZE_CASES])
@pytest.mark.parametrize("mode", ["loop", "grouped"])
def test_meta_gradient_taken_chunk_by_chunk_is_the_whole_batchs(base, options, mode):
    """task_chunk=1 and 2 of 3 tasks (each chunk's graph freed once its gradient is taken) give vmap's one-graph
    meta-loss, query outputs and meta-gradient, and the same parameters receive a gradient; meta-test predictions,
    made chunk by chunk too, are the whole batch's."""
    results, predictions = {}, {}
    for vectorize, chunk in (("vmap", 0), (mode, 1), (mode, 2)):
        maml, batch = vectorize_problem(base, vectorize, task_chunk=chunk, **options)
        assert maml.task_chunk(batch) == (chunk or 3)
        assert [rows.num_tasks for rows in maml.chunks(batch)] == {0: [3], 1: [1, 1, 1], 2: [2, 1]}[chunk]
        results[chunk] = meta_result(maml, batch)
        predictions[chunk] = maml.predict(batch)
    assert_same_meta_result(results[0], results[1])
    assert_same_meta_result(results[0], results[2])
    assert predictions[0].shape == predictions[1].shape == predictions[2].shape
    assert torch.allclose(predictions[0], predictions[1], atol=1e-5)
    assert torch.allclose(predictions[0], predictions[2], atol=1e-5)


@pytest.mark.parametrize("base,options", VECTORIZE_CASES, ids=[f"{b}-{'-'.join(o) or 'plain'}" for b, o in VECTORIZE_CASES])
@pytest.mark.parametrize("mode,chunk", [("loop", 0), ("grouped", 0), ("grouped", 2), ("auto", 0)])
def test_checkpointed_inner_loop_gives_the_stored_graphs_meta_gradient(base, options, mode, chunk):
    """checkpoint_inner (each inner step recomputed in the meta-backward) gives the stored graph's meta-loss, query
    outputs and meta-gradient of every parameter (learned step sizes, per-step norms, frozen body included)."""
    stored = meta_result(*vectorize_problem(base, "vmap", task_chunk=chunk, **options))
    checkpointed = meta_result(*vectorize_problem(base, mode, task_chunk=chunk, checkpoint_inner=True, **options))
    assert_same_meta_result(stored, checkpointed)


def peak_saved_bytes(fn: Callable[[], None], per_storage: bool = False) -> int:
    """The most bytes autograd held saved at once while ``fn`` ran its forward and backward: every save counted, or
    with ``per_storage`` a storage saved by several nodes or as several views counted once (whole)."""
    import weakref

    class Saved:
        def __init__(self, t: Tensor):
            self.t = t

    held: dict[int, int] = {}  # storage address (per_storage) or save -> saves holding it
    live, peak = [0], [0]

    def release(key: int, size: int) -> None:
        held[key] -= 1
        if not held[key]:
            del held[key]
            live[0] -= size

    def pack(t: Tensor) -> Saved:
        holder, storage = Saved(t), t.untyped_storage()
        key, size = (storage.data_ptr(), storage.nbytes()) if per_storage else (id(holder), t.numel() * t.element_size())
        if key not in held:
            held[key] = 0
            live[0] += size
            peak[0] = max(peak[0], live[0])
        held[key] += 1
        weakref.finalize(holder, release, key, size)
        return holder

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda holder: holder.t):
        fn()
    return peak[0]


@pytest.mark.parametrize("vectorize", ["loop", "grouped"])
def test_checkpointed_inner_loop_matches_finite_differences_and_holds_one_steps_graph(vectorize):
    maml, batch = tiny_problem(first_order=False, steps=6)
    maml.cfg.vectorize = vectorize
    def step() -> None:
        maml.meta_loss(batch).loss.backward()

    stored = peak_saved_bytes(step)
    maml.cfg.checkpoint_inner = True
    assert peak_saved_bytes(step) < 0.6 * stored  # one step's graph at a time instead of six (and phi_s)
    analytic = meta_gradient(maml, batch)
    numeric = central_differences(lambda: maml.meta_loss(batch).loss, list(maml.parameters()))
    assert torch.allclose(analytic, numeric, rtol=1e-5, atol=1e-7), (analytic - numeric).abs().max()


QUERY_CASES = [("conv4", {}), ("conv4", {"learned_lr": "per_layer_per_step", "per_step_bn": True, "multi_step_loss": True}),
               ("conv4-maxpool", {}), ("conv4-maxpool", {"adapt": "head", "first_order": True})]


@pytest.mark.parametrize("base,options", QUERY_CASES, ids=[f"{b}-{'-'.join(o) or 'plain'}" for b, o in QUERY_CASES])
@pytest.mark.parametrize("mode,inner", [("loop", False), ("grouped", False), ("grouped", True)])
@pytest.mark.parametrize("chunk_bytes", [2**30, 1])
def test_recomputed_query_pass_gives_the_stored_graphs_meta_gradient(base, options, mode, inner, chunk_bytes, monkeypatch):
    """checkpoint_query (Conv-4's blocks recomputed in the query pass's backward, whole or an image at a time) gives
    the stored query pass's meta-loss, query outputs and meta-gradient, alone or with checkpoint_inner."""
    from metalstm.learners import recomputed_body

    monkeypatch.setattr(recomputed_body, "CHUNK_BYTES", chunk_bytes)
    stored = meta_result(*vectorize_problem(base, mode, checkpoint_inner=inner, **options))
    assert_same_meta_result(stored, meta_result(*vectorize_problem(base, mode, checkpoint_inner=inner,
                                                                   checkpoint_query=True, **options)))


@pytest.mark.parametrize("downsample", ["stride", "maxpool"])
def test_recomputed_query_pass_matches_finite_differences_and_saves_a_fraction(downsample):
    """Second-order MAML with checkpoint_query: the meta-gradient matches central differences (float64); and
    Conv-4's recomputed query forward saves its blocks' inputs and outputs only, a fraction of the stored one's."""
    from metalstm.learners.base import recomputed_activations

    torch.manual_seed(0)
    spec = {"task_type": "classification", "input_shape": (1, 8, 8), "output_dim": 2}
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 8, 1, 8, 8, generator=g, dtype=torch.float64)
    y = torch.arange(2).repeat(4).expand(2, -1)
    batch = EpisodeBatch(x[:, :2], y[:, :2], x[:, 2:], y[:, 2:])
    learner = Conv4(Conv4Config(filters=3, blocks=2, downsample=downsample), spec).double()
    maml = MAML(learner, F.cross_entropy, spec, MAMLConfig(inner_lr=0.3, inner_steps=1, vectorize="loop",
                                                           checkpoint_query=True))
    analytic = meta_gradient(maml, batch)
    numeric = central_differences(lambda: maml.meta_loss(batch).loss, list(maml.parameters()))
    assert torch.allclose(analytic, numeric, rtol=1e-5, atol=1e-7), (analytic - numeric).abs().max()

    learner = Conv4(Conv4Config(filters=8, blocks=2, downsample=downsample), spec)
    params, query_x, query_y = learner.params(), torch.randn(40, 1, 8, 8), torch.arange(2).repeat(20)

    def query_pass() -> None:
        F.cross_entropy(learner.forward_with(params, query_x), query_y).backward()

    stored = peak_saved_bytes(query_pass, per_storage=True)
    with recomputed_activations():
        assert peak_saved_bytes(query_pass, per_storage=True) < {"stride": 0.6, "maxpool": 0.4}[downsample] * stored


def test_recomputed_blocks_refuse_a_second_derivative():
    from metalstm.learners.base import recomputed_activations

    maml, batch = vectorize_problem("conv4", "loop")
    params = maml.learner.params()
    with recomputed_activations():
        loss = F.cross_entropy(maml.learner.forward_with(params, batch.query_x[0]), batch.query_y[0])
    with pytest.raises(RuntimeError, match="first derivatives only"):
        torch.autograd.grad(loss, params["body.0.weight"], create_graph=True, retain_graph=True)
    assert torch.autograd.grad(loss, params["body.0.weight"])[0].abs().sum() > 0  # the first derivative is taken


def test_checkpointed_inner_loop_runs_grouped_instead_of_vmap():
    maml, batch = vectorize_problem("mlp", "auto", checkpoint_inner=True)
    assert maml.vectorize_mode(batch.support_x) == "grouped"
    with pytest.raises(ConfigError, match="vectorize=grouped"):
        vectorize_problem("mlp", "vmap", checkpoint_inner=True)


def test_task_chunk_auto_holds_one_task_in_a_loop_four_grouped_all_under_vmap():
    for vectorize, expected in (("loop", 1), ("grouped", 3), ("vmap", 3)):
        maml, batch = vectorize_problem("conv4", vectorize)
        assert maml.task_chunk(batch) == expected
    maml, batch = vectorize_problem("conv4", "grouped")
    wide = EpisodeBatch(*(t.repeat(4, *[1] * (t.dim() - 1)) for t in batch))
    assert maml.task_chunk(wide) == 4


@pytest.mark.parametrize("downsample,norm", [("stride", "batch"), ("maxpool", "batch"), ("maxpool", "none")])
def test_conv4_forward_tasks_is_each_tasks_forward_with_its_own_weights(downsample, norm):
    """Conv-4's grouped forward over T tasks = forward_with per task, and so are its first and second derivatives
    (in float64, where the only difference, the order of the sums, is far below the tolerance)."""
    torch.manual_seed(0)
    spec = {"task_type": "classification", "input_shape": (2, 16, 16), "output_dim": 3}
    learner = Conv4(Conv4Config(filters=4, blocks=3, downsample=downsample, norm=norm), spec).double()
    params = {n: (p + 0.1 * torch.randn_like(p.expand(4, *p.shape))).detach().requires_grad_()
              for n, p in learner.params().items()}
    x = torch.randn(4, 5, 2, 16, 16, dtype=torch.float64)

    def derivatives(outputs: Tensor) -> list[Tensor]:
        first = torch.autograd.grad(outputs.square().sum(), list(params.values()), create_graph=True)
        return [*first, *torch.autograd.grad(sum(g.square().sum() for g in first), list(params.values()))]

    grouped = learner.forward_tasks(params, x)
    looped = torch.stack([learner.forward_with({n: p[t] for n, p in params.items()}, x[t]) for t in range(4)])
    assert grouped.shape == (4, 5, 3) and torch.allclose(grouped, looped, atol=1e-12)
    assert all(torch.allclose(a, b, atol=1e-9, rtol=1e-9) for a, b in zip(derivatives(grouped), derivatives(looped)))


def test_vectorize_auto_picks_the_measured_path_and_grouped_refuses_running_statistics():
    cpu = torch.zeros(1)
    assert vectorize_problem("conv4", "auto")[0].vectorize_mode(cpu) == "grouped"
    assert vectorize_problem("mlp", "auto")[0].vectorize_mode(cpu) == "vmap"
    spec = {"task_type": "classification", "input_shape": (1, 8, 8), "output_dim": 3}
    running = Conv4(Conv4Config(filters=4, blocks=2, norm="running"), spec)
    assert MAML(running, F.cross_entropy, spec, MAMLConfig()).vectorize_mode(cpu) == "loop"
    for mode in ("grouped", "vmap"):
        with pytest.raises(ConfigError, match=f"vectorize={mode}.*running statistics.*vectorize=loop"):
            MAML(running, F.cross_entropy, spec, MAMLConfig(vectorize=mode))


@pytest.mark.parametrize("base", ["conv4", "mlp", "lstm_encoder"])
@pytest.mark.parametrize("vectorize", ["loop", "vmap", "grouped"])
def test_bf16_autocast_keeps_the_second_order_meta_gradient_close(base, vectorize):
    """trainer.precision=bf16-mixed runs the step under autocast: the meta-gradient stays near the float32 one
    (direction and size), on either inner-loop path. Not exact (measured: cosine 0.988 for Conv-4 looped through
    3 second-order steps), so the default stays precision=32-true."""
    grads = {}
    for dtype in (None, torch.bfloat16):
        maml, batch = vectorize_problem(base, vectorize)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype is not None, cache_enabled=False):  # as Lightning
            loss = maml.meta_loss(batch).loss
        loss.backward()
        grads[dtype] = torch.cat([p.grad.flatten() for p in maml.parameters() if p.grad is not None])
    exact, mixed = grads[None], grads[torch.bfloat16]
    assert torch.isfinite(mixed).all() and mixed.dtype == torch.float32
    assert torch.nn.functional.cosine_similarity(exact, mixed, dim=0) > 0.98
    assert (mixed.norm() / exact.norm() - 1).abs() < 0.05


@pytest.mark.parametrize("vectorize", ["loop", "grouped"])
def test_meta_training_queries_of_a_decoder_are_teacher_forced(vectorize):
    """In meta-training the query targets reach the learner (an encoder-decoder reads them as its previous outputs),
    on every inner-loop path; at meta-test they do not."""
    maml, batch = vectorize_problem("lstm_seq2seq", vectorize)
    theta = maml.learner.params()
    forced, free = [], []
    for sx, sy, qx, qy in zip(*batch):
        phi, _ = maml.adapt(theta, sx, sy, maml.cfg.inner_steps, first_order=False)
        forced.append(maml.learner.forward_with(phi, qx, qy))
        free.append(maml.learner.forward_with(phi, qx))
    forced, free = torch.stack(forced).detach(), torch.stack(free).detach()
    assert not torch.allclose(forced, free, atol=1e-3)  # the targets change the outputs
    assert torch.allclose(maml.meta_loss(batch).query_outputs, forced, atol=1e-5)


def test_query_loss_weights_each_tasks_precomputed_gradient_by_its_own_upstream_gradient():
    """QueryLoss (stacked): any upstream weighting of the per-task losses reaches each task's rows alone."""
    from metalstm.meta.maml import QueryLoss

    torch.manual_seed(0)
    w, x, weights = torch.randn(3, 4, 2, requires_grad=True), torch.randn(3, 5, 4), torch.tensor([0.5, -2.0, 3.0])

    def task(t, values):
        out = x[t] @ values
        return out.square().mean(), out

    losses, outputs = QueryLoss.apply(lambda t, v: task(t, v), True, w)
    (weights * losses).sum().backward()
    expected = torch.autograd.grad((weights * torch.stack([task(t, w[t])[0] for t in range(3)])).sum(), w)[0]
    assert torch.allclose(w.grad, expected) and outputs.shape == (3, 5, 2) and not outputs.requires_grad
