"""MAML's meta-gradient: second order differs from first order and matches finite differences."""
from __future__ import annotations

import torch

from metalstm.data.episodes import EpisodeBatch
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


def test_second_order_matches_finite_differences():
    maml, batch = tiny_problem(first_order=False)
    analytic = meta_gradient(maml, batch)
    params, eps = list(maml.parameters()), 1e-6
    # central differences of the meta-loss; meta_loss itself needs autograd for its inner steps
    numeric = []
    for p in params:
        for i in range(p.numel()):
            with torch.no_grad():
                p.view(-1)[i] += eps
            up = maml.meta_loss(batch).loss.item()
            with torch.no_grad():
                p.view(-1)[i] -= 2 * eps
            down = maml.meta_loss(batch).loss.item()
            with torch.no_grad():
                p.view(-1)[i] += eps
            numeric.append((up - down) / (2 * eps))
    numeric = torch.tensor(numeric, dtype=torch.float64)
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
        phi = {k: v.detach().requires_grad_() for k, v in maml.adapt(theta, sx, sy, 2, create_graph=False).items()}
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
