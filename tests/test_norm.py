"""BatchNorm with its closed-form second derivative (metalstm/learners/norm.py), alone and fused with the max-pool after
it, against torch's; the index-only max-pool
(metalstm/learners/pool.py) and the convolution with one call per second-derivative term (metalstm/learners/conv.py)
against torch's; Conv-4's recomputed body (metalstm/learners/recomputed_body.py) against the
stored ops."""
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from metalstm.learners.conv import conv2d
from metalstm.learners.norm import batch_norm, batch_norm_max_pool
from metalstm.learners.pool import max_pool


def inputs(shape, dtype=torch.float64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=gen, dtype=dtype).requires_grad_()
    weight = (torch.rand(shape[1], generator=gen, dtype=dtype) + 0.5).requires_grad_()
    bias = torch.randn(shape[1], generator=gen, dtype=dtype).requires_grad_()
    return x, weight, bias


@pytest.mark.parametrize("shape", [(4, 3, 5, 5), (6, 3), (3, 2, 7)])
def test_first_and_second_derivatives_match_finite_differences(shape):
    args = inputs(shape)
    assert torch.autograd.gradcheck(lambda x, w, b: batch_norm(x, w, b, 1e-5), args)
    assert torch.autograd.gradgradcheck(lambda x, w, b: batch_norm(x, w, b, 1e-5), args)


def second_order(norm, x, weight, bias, seed=1):
    """A MAML-like composite: grads of a non-linear loss (create_graph), then grads of a function of them."""
    y = norm(x, weight, bias)
    target = torch.randn(y.shape, generator=torch.Generator().manual_seed(seed), dtype=y.dtype)
    gx, gw, gb = torch.autograd.grad((y * target).sum() + (y ** 3).sum(), (x, weight, bias), create_graph=True)
    return torch.autograd.grad((gx ** 2).sum() + gw.sin().sum() + (gb * target.mean()).sum(), (x, weight, bias))


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_second_derivatives_equal_torch_batch_norm(memory_format):
    x, weight, bias = inputs((5, 8, 6, 6))
    x = x.detach().contiguous(memory_format=memory_format).requires_grad_()
    ours = second_order(lambda x, w, b: batch_norm(x, w, b, 1e-5), x, weight, bias)
    torch_bn = second_order(lambda x, w, b: F.batch_norm(x, None, None, w, b, training=True, eps=1e-5), x, weight, bias)
    for a, b in zip(ours, torch_bn):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)


def test_gradients_of_grad_x_alone():
    """A loss of grad_x only (no grad_weight, grad_bias terms): the closed form gets None for those two."""
    results = []
    for norm in (lambda x, w, b: batch_norm(x, w, b, 1e-5),
                 lambda x, w, b: F.batch_norm(x, None, None, w, b, training=True, eps=1e-5)):
        x, weight, bias = inputs((4, 3, 5))
        (gx,) = torch.autograd.grad((norm(x, weight, bias) ** 3).sum(), (x,), create_graph=True)
        results.append(torch.autograd.grad((gx ** 2).sum(), (x, weight)))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)


def test_third_derivatives_are_refused():
    x, weight, bias = inputs((4, 3))
    y = batch_norm(x, weight, bias, 1e-5)
    (gx,) = torch.autograd.grad((y ** 3).sum(), (x,), create_graph=True)
    torch.autograd.grad((gx ** 2).sum(), (x,), retain_graph=True)  # second order: fine
    with pytest.raises(RuntimeError, match="no third"):
        torch.autograd.grad((gx ** 2).sum(), (x,), create_graph=True)


def test_bf16_autocast_follows_torch_batch_norm():
    """Under autocast the activations are bf16 and the weights float32, as in trainer.precision=bf16-mixed."""
    x, weight, bias = inputs((5, 4, 6, 6), dtype=torch.float32)
    mix = torch.randn(4, 4, 1, 1, generator=torch.Generator().manual_seed(2))
    results = []
    for norm in (lambda h, w, b: batch_norm(h, w, b, 1e-5),
                 lambda h, w, b: F.batch_norm(h, None, None, w, b, training=True, eps=1e-5)):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            results.append(second_order(lambda x, w, b: norm(F.conv2d(x, mix), w, b), x, weight, bias))
    for a, b in zip(*results):
        assert a.dtype == b.dtype == torch.float32
        assert F.cosine_similarity(a.flatten(), b.flatten(), dim=0) > 0.99


def stored_block(x: Tensor, weight: Tensor, bias: Tensor | None, gamma: Tensor, beta: Tensor, stride: int,
                 pool: bool) -> Tensor:
    z = F.batch_norm(F.conv2d(x, weight, bias, stride, 1), None, None, gamma, beta, training=True, eps=1e-5)
    return (F.max_pool2d(z, 2) if pool else z).relu()


@pytest.mark.parametrize("pool,stride,size", [(True, 1, 7), (True, 1, 8), (False, 2, 9)])
@pytest.mark.parametrize("blocks", [1, 3])
@pytest.mark.parametrize("chunk_bytes", [2**30, 500])
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_recomputed_body_is_conv_batch_norm_pool_relu_blocks_and_their_first_derivatives(pool, stride, size, blocks,
                                                                                         chunk_bytes, layout,
                                                                                         monkeypatch):
    """RecomputedBody (whole batch, or a few images at a time; NCHW or channels_last between blocks) gives the stored
    ops' output and the gradients of its input and of every block's convolution weight and bias and BatchNorm weight
    and bias (float64); odd sizes pool floored; a block without a convolution bias."""
    from metalstm.learners import recomputed_body

    monkeypatch.setattr(recomputed_body, "CHUNK_BYTES", chunk_bytes)
    torch.manual_seed(0)
    x = torch.randn(7, 3, size, size, dtype=torch.float64, requires_grad=True)
    weights = []
    for i in range(blocks):
        weights += [torch.randn(4, 3 if i == 0 else 4, 3, 3), None if i == 1 else torch.randn(4), torch.rand(4) + 0.5,
                    torch.randn(4)]
    weights = [None if w is None else w.double().requires_grad_() for w in weights]
    shapes, stored, h = [], None, x
    for i in range(blocks):
        block_pool = pool and h.shape[-1] >= 2
        shapes.append(((stride, stride), (1, 1), block_pool))
        h = stored_block(h, *weights[4 * i : 4 * i + 4], stride, block_pool)
    stored = h
    recomputed = recomputed_body.RecomputedBody.apply(x.contiguous(memory_format=layout), tuple(shapes), 1e-5, layout,
                                                      *weights)
    assert recomputed.shape == stored.shape and torch.allclose(recomputed, stored, atol=1e-12)
    assert recomputed.is_contiguous()
    upstream = torch.randn_like(stored)
    wanted = [x] + [w for w in weights if w is not None]
    for a, b in zip(torch.autograd.grad(stored, wanted, upstream), torch.autograd.grad(recomputed, wanted, upstream)):
        assert torch.allclose(a, b, atol=1e-10)


def test_recomputed_body_runs_its_backward_once():
    """Its backward writes gradients over the stored activations: a second backward of the same forward is refused
    with a message, not answered wrongly."""
    from metalstm.learners.recomputed_body import RecomputedBody

    torch.manual_seed(0)
    x = torch.randn(6, 1, 8, 8)
    weights = [t.requires_grad_() for t in (torch.randn(4, 1, 3, 3), torch.randn(4), torch.rand(4) + 0.5, torch.randn(4),
                                            torch.randn(4, 4, 3, 3), torch.randn(4), torch.rand(4) + 0.5, torch.randn(4))]
    out = RecomputedBody.apply(x, (((1, 1), (1, 1), True),) * 2, 1e-5, torch.contiguous_format, *weights).sum()
    first = torch.autograd.grad(out, weights, retain_graph=True)
    assert all(g.abs().sum() > 0 for g in first)
    with pytest.raises(RuntimeError, match="runs once per forward"):
        torch.autograd.grad(out, weights)


@pytest.mark.parametrize("shape", [(3, 4, 6, 6), (2, 3, 7, 7), (2, 5, 3, 5)])
def test_max_pool_derivatives_match_finite_differences(shape):
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64).requires_grad_()
    assert torch.autograd.gradcheck(max_pool, (x,))
    assert torch.autograd.gradgradcheck(max_pool, (x,))


@pytest.mark.parametrize("shape", [(3, 4, 6, 6), (2, 3, 7, 7), (2, 5, 3, 5)])
@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_max_pool_equals_torch_max_pool_with_ties(shape, memory_format):
    """Ties (constant image regions) pick the same input as torch's kernel, in the value, the first and the second
    derivative; the output and the input's gradient in the input's layout."""
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(*shape, generator=gen, dtype=torch.float64)
    x[:, :, :2] = 0.5
    x = x.contiguous(memory_format=memory_format).requires_grad_()
    assert max_pool(x).is_contiguous(memory_format=memory_format)
    g = torch.randn(F.max_pool2d(x, 2).shape, generator=gen, dtype=torch.float64).requires_grad_()
    v = torch.randn(shape, generator=gen, dtype=torch.float64)
    results = []
    for pool in (max_pool, lambda t: F.max_pool2d(t, 2)):
        out = pool(x)
        (grad_x,) = torch.autograd.grad(out, x, g, create_graph=True)
        results.append((out, grad_x, *torch.autograd.grad((grad_x * v).sum() + (out ** 2).sum(), (g, x))))
    for ours, theirs in zip(*results):
        assert torch.equal(ours, theirs)


def test_max_pool_keeps_its_indices_not_its_input():
    x = torch.randn(2, 8, 16, 16, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        max_pool(x)
    assert [t.shape for t in saved] == [torch.Size([2, 8, 8, 8])] and saved[0].dtype == torch.int64


CONV_CASES = [(1, 1, True, 6), (3, 1, True, 5), (2, 2, True, 7), (2, 1, False, 6), (3, 2, False, 6)]


def conv_inputs(groups, bias, size):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, groups * 2, size, size, generator=gen, dtype=torch.float64).requires_grad_()
    weight = torch.randn(groups * 3, 2, 3, 3, generator=gen, dtype=torch.float64).requires_grad_()
    return (x, weight) + ((torch.randn(groups * 3, generator=gen, dtype=torch.float64).requires_grad_(),) if bias else ())


@pytest.mark.parametrize("groups, stride, bias, size", CONV_CASES)
def test_conv_derivatives_match_finite_differences(groups, stride, bias, size):
    ours = lambda x, w, *b: conv2d(x, w, b[0] if b else None, (stride, stride), (1, 1), groups=groups)  # noqa: E731
    args = conv_inputs(groups, bias, size)
    assert torch.autograd.gradcheck(ours, args)
    assert torch.autograd.gradgradcheck(ours, args)


@pytest.mark.parametrize("groups, stride, bias, size", CONV_CASES)
@pytest.mark.parametrize("data_input", [False, True])
def test_conv_second_derivatives_equal_torch_conv(groups, stride, bias, size, data_input):
    """A MAML-like composite (gradients with create_graph, then gradients of a function of them), also with an input
    that needs no gradient (the images of block 1)."""
    args = list(conv_inputs(groups, bias, size))
    if data_input:
        args[0] = args[0].detach()
    wanted = [a for a in args if a.requires_grad]
    results = []
    for conv in (conv2d, F.conv2d):
        y = conv(args[0], args[1], args[2] if bias else None, (stride, stride), (1, 1), groups=groups)
        target = torch.randn(y.shape, generator=torch.Generator().manual_seed(1), dtype=y.dtype)
        grads = torch.autograd.grad((y * target).sum() + (y ** 3).sum(), wanted, create_graph=True)
        results.append(torch.autograd.grad(sum((g ** 2).sum() for g in grads) + grads[-1].sin().sum(), wanted))
    for ours, theirs in zip(*results):
        torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=1e-8)


def test_conv_keeps_the_output_gradient_only_where_its_second_derivative_reads_it():
    """With images that need no gradient (block 1) there is no grad_x, so no term of the second derivative reads the
    gradient of the output: the backward's graph keeps the images and weights, not that full-size gradient."""
    x, weight, bias = conv_inputs(2, True, 6)
    for images, kept in ((x.detach(), False), (x, True)):
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
            y = conv2d(images, weight, bias, (1, 1), (1, 1), groups=2)
            grad_y = torch.full_like(y, 0.5)
            torch.autograd.grad(y, weight, grad_y, create_graph=True)
        assert any(t.data_ptr() == grad_y.data_ptr() for t in saved) == kept


def norm_pool_inputs(shape, seed=0):
    """x with tied values (a constant band, as in an image's background) and a channel of negative weight."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=gen, dtype=torch.float64)
    x[:, :, :2] = 0.3
    weight = torch.rand(shape[1], generator=gen, dtype=torch.float64) + 0.5
    weight[0] = -0.8
    return x.requires_grad_(), weight.requires_grad_(), torch.randn(shape[1], generator=gen, dtype=torch.float64).requires_grad_()


@pytest.mark.parametrize("shape", [(4, 6, 8, 8), (3, 5, 7, 7), (2, 4, 3, 5)])
@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_batch_norm_max_pool_equals_torch_batch_norm_then_max_pool(shape, memory_format):
    """Values, first and second derivatives of a MAML-like composite, ties and odd sizes included; NCHW (the grouped
    support pass) and channels_last (Conv-4's forward on a CPU) inputs, the output in the input's layout."""
    x, weight, bias = norm_pool_inputs(shape)
    x = x.detach().contiguous(memory_format=memory_format).requires_grad_()
    assert batch_norm_max_pool(x, weight, bias, 1e-5).is_contiguous(memory_format=memory_format)
    results = []
    for fn in (lambda x, w, b: batch_norm_max_pool(x, w, b, 1e-5),
               lambda x, w, b: F.max_pool2d(F.batch_norm(x, None, None, w, b, training=True, eps=1e-5), 2)):
        y = fn(x, weight, bias)
        target = torch.randn(y.shape, generator=torch.Generator().manual_seed(1), dtype=y.dtype)
        grads = torch.autograd.grad((y * target).sum() + (y ** 3).sum(), (x, weight, bias), create_graph=True)
        second = torch.autograd.grad((grads[0] ** 2).sum() + grads[1].sin().sum() + (grads[2] * 0.3).sum()
                                     + (grads[0] * x).sum(), (x, weight, bias))
        results.append((y, *grads, *second))
    for ours, theirs in zip(*results):
        torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=1e-10)


def test_batch_norm_max_pool_derivatives_match_finite_differences():
    gen = torch.Generator().manual_seed(2)  # no ties: finite differences need a differentiable point
    args = (torch.randn(3, 4, 6, 6, generator=gen, dtype=torch.float64).requires_grad_(),
            (torch.rand(4, generator=gen, dtype=torch.float64) + 0.5).requires_grad_(),
            torch.randn(4, generator=gen, dtype=torch.float64).requires_grad_())
    fn = lambda x, w, b: batch_norm_max_pool(x, w, b, 1e-5)  # noqa: E731
    assert torch.autograd.gradcheck(fn, args)
    assert torch.autograd.gradgradcheck(fn, args)


def test_batch_norm_max_pool_keeps_neither_the_normalised_map_nor_its_gradient():
    """Of the full-size tensors, the forward keeps its input only and the backward (for the second derivative) the
    same input again: the normalised map and the unpooled gradient are recomputed, not kept."""
    x, weight, bias = norm_pool_inputs((2, 8, 16, 16))
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = batch_norm_max_pool(x, weight, bias, 1e-5)
        torch.autograd.grad(y.sum(), x, create_graph=True)
    full = [t for t in saved if t.shape == x.shape]
    assert full and all(t.data_ptr() == x.data_ptr() for t in full)


def test_conv4_forward_runs_batch_norm_and_max_pool_as_one_and_equals_its_layers():
    """Conv-4's forward on a CPU (query passes; the support sets of ``vectorize=loop``) runs each BatchNorm and the
    max-pool after it as ``batch_norm_max_pool``: the same values, first and second derivatives as its layers one
    after another, and the BatchNorm's output is not kept for the backward."""
    from metalstm.learners.conv4 import Conv4, Conv4Config, channels_last

    torch.manual_seed(0)
    spec = {"task_type": "classification", "input_shape": (1, 12, 12), "output_dim": 3}
    learner = Conv4(Conv4Config(filters=4, blocks=2, downsample="maxpool"), spec).double()
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(6, 1, 12, 12, generator=gen, dtype=torch.float64)
    x[:, :, :3] = 0.2  # ties in the pooling windows
    params = {n: p.detach().clone().requires_grad_() for n, p in learner.params().items()}
    results = []
    for body in (learner.run_body, learner.body):
        with torch.nn.utils.stateless._reparametrize_module(learner, params):
            out = learner.head(body(channels_last(x)))
        grads = torch.autograd.grad((out ** 2).sum(), list(params.values()), create_graph=True)
        second = torch.autograd.grad(sum((g ** 2).sum() for g in grads), list(params.values()))
        results.append((out, *grads, *second))
    for ours, theirs in zip(*results):  # atol: the convolutions' biases before a BatchNorm have zero derivatives
        torch.testing.assert_close(ours, theirs, rtol=1e-9, atol=1e-9)

    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        learner.forward_with(params, x)
    # of the 12 x 12 maps: the convolution's output (BatchNorm's input) only, not BatchNorm's output
    assert len({t.data_ptr() for t in saved if t.shape == (6, 4, 12, 12) and t.dtype == torch.float64}) == 1


def test_batch_norm_max_pool_backward_allocates_one_full_size_gradient():
    """The backward writes grad_x over the unpooled gradient: one full-size tensor, where the unpooling then torch's
    BatchNorm backward allocate two."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class FullSize(TorchDispatchMode):
        def __init__(self, shape):
            super().__init__()
            self.shape, self.storages = shape, set()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else [out]:
                if isinstance(t, Tensor) and t.shape == self.shape:
                    self.storages.add(t.untyped_storage().data_ptr())
            return out

    for memory_format in (torch.contiguous_format, torch.channels_last):
        x, weight, bias = norm_pool_inputs((3, 4, 8, 8))
        x = x.detach().contiguous(memory_format=memory_format).requires_grad_()
        y = batch_norm_max_pool(x, weight, bias, 1e-5)
        mode = FullSize(x.shape)
        with mode:
            torch.autograd.grad(y.sum(), x)
        assert len(mode.storages) == 1
