"""BatchNorm with the batch's own statistics, whose second derivative is a few fused passes.

Second-order MAML differentiates BatchNorm's backward. torch's derivative of that backward
(``batchnorm_double_backward``) is written for every case at once and runs about fifty elementwise passes over
the activations; on a CPU it was the largest cost of a Conv-4 support step (docs/performance.md). Here the
backward is a Function of its own whose backward is the closed form below: three reductions and two outputs.

Per channel, over its N values: x_hat = (x - mean) * r, r = 1 / sqrt(var + eps), y = weight * x_hat + bias.
The backward, given g = dL/dy:
    grad_bias = sum(g),  grad_weight = sum(g * x_hat),
    grad_x = weight * r * P(g),   P(v) = v - mean(v) - x_hat * mean(v * x_hat)   (P is symmetric).
Its backward, given u, a, b = the gradients w.r.t. grad_x, grad_weight, grad_bias:
    d/dg      = weight * r * P(u) + a * x_hat + b
    d/dweight = r * sum(u * P(g))
    d/dx      = r * P(G) - (R * r^2 / N) * x_hat,   with
        G = -weight * r * (mean(g x_hat) * u + mean(u x_hat) * g) + a * g     (d/dx_hat, r held fixed)
        R = weight * sum(u * P(g))                                            (d/dr)
using d x_hat / dx = r * P and d r / dx = -r^2 x_hat / N.
"""
from __future__ import annotations

import torch
from torch import Tensor
from torch.autograd import Function

from metalstm.learners.pool import gather, layout, pool_with_indices, unpool


def batch_norm(x: Tensor, weight: Tensor, bias: Tensor, eps: float) -> Tensor:
    """x [n, C, ...] normalised per channel with its own batch statistics, then weight [C] * . + bias [C]."""
    return _BatchNorm.apply(x, weight, bias, eps)


def batch_norm_max_pool(x: Tensor, weight: Tensor, bias: Tensor, eps: float) -> Tensor:
    """``F.max_pool2d(batch_norm(x, weight, bias, eps), 2)`` for x [n, C, H, W] on a CPU, returned in the layout of x:
    normalised and pooled through channels_last, where torch's kernels for both are vectorised over channels (W1's
    block 1, NCHW: 4.3 -> 2.3 ms with the layout copies); keeps x, the statistics and the pool's indices, never the
    normalised map nor, in the backward, its full-size gradient (recomputed from the pooled one when the second
    derivative needs it). A query pass (channels_last, differentiated once) thus holds one full-size map a block less
    than BatchNorm then ``F.max_pool2d``, which keeps its input."""
    return _BatchNormPool.apply(x, weight, bias, eps)


def _channel_view(t: Tensor, x: Tensor) -> Tensor:
    return t.view((1, -1) + (1,) * (x.dim() - 2))


def _channel_sum(t: Tensor) -> Tensor:
    return t.sum([d for d in range(t.dim()) if d != 1])


class _BatchNorm(Function):
    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor, eps: float) -> Tensor:
        y, mean, invstd = torch.native_batch_norm(x, weight, bias, None, None, True, 0.0, eps)
        ctx.save_for_backward(x, weight, mean, invstd)
        ctx.eps = eps
        return y

    @staticmethod
    def backward(ctx, grad_y: Tensor):
        x, weight, mean, invstd = ctx.saved_tensors
        grad_x, grad_weight, grad_bias = _BatchNormBackward.apply(grad_y, x, weight, mean, invstd, ctx.eps)
        return grad_x, grad_weight, grad_bias, None


class _BatchNormPool(Function):
    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor, eps: float) -> Tensor:
        y, mean, invstd = torch.native_batch_norm(x.contiguous(memory_format=torch.channels_last), weight, bias,
                                                  None, None, True, 0.0, eps)
        out, indices = pool_with_indices(y, layout(x))
        ctx.save_for_backward(x, weight, mean, invstd, indices)
        ctx.eps = eps
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        x, weight, mean, invstd, indices = ctx.saved_tensors
        grads = _BatchNormPoolBackward.apply(grad_out, x, weight, mean, invstd, indices, ctx.eps)
        return *grads, None


class _BatchNormPoolBackward(Function):
    @staticmethod
    def forward(ctx, grad_out: Tensor, x: Tensor, weight: Tensor, mean: Tensor, invstd: Tensor, indices: Tensor,
                eps: float):
        # BatchNorm's backward of the unpooled gradient g, written over g: its sums first (torch's kernel, without
        # grad_x), then grad_x = weight r (g - mean(g) - x_hat mean(g x_hat)) = weight r g + c x + d in place. The
        # backward thus holds one full-size gradient, not two (W1's query pass: 15 MB less at its peak; its block 1
        # 2.4 against 2.1 ms)
        n = x.numel() // x.shape[1]
        grad_x = unpool(grad_out, indices, x)
        _, grad_weight, grad_bias = torch.ops.aten.native_batch_norm_backward(
            grad_x, x, weight, None, None, mean, invstd, True, eps, [False, True, True])
        wr = weight * invstd
        c = -wr * invstd * grad_weight / n
        d = -wr * grad_bias / n - c * mean
        grad_x.mul_(_channel_view(wr, x)).addcmul_(x, _channel_view(c, x)).add_(_channel_view(d, x))
        ctx.save_for_backward(grad_out, x, weight, mean, invstd, indices, grad_weight, grad_bias)
        return grad_x, grad_weight, grad_bias

    @staticmethod
    def backward(ctx, u: Tensor | None, a: Tensor | None, b: Tensor | None):
        grad_out, x, weight, mean, invstd, indices, sum_gx, sum_g = ctx.saved_tensors
        grad_g, grad_x, grad_weight = second_derivative(unpool(grad_out, indices, x), x, weight, mean, invstd,
                                                        sum_gx, sum_g, u, a, b, ctx.needs_input_grad[:3])
        grad_out_grad = None if grad_g is None else gather(grad_g, indices)
        return grad_out_grad, grad_x, grad_weight, None, None, None, None


class _BatchNormBackward(Function):
    @staticmethod
    def forward(ctx, grad_y: Tensor, x: Tensor, weight: Tensor, mean: Tensor, invstd: Tensor, eps: float):
        grad_x, grad_weight, grad_bias = torch.ops.aten.native_batch_norm_backward(
            grad_y, x, weight, None, None, mean, invstd, True, eps, [True, True, True])
        ctx.save_for_backward(grad_y, x, weight, mean, invstd, grad_weight, grad_bias)
        return grad_x, grad_weight, grad_bias

    @staticmethod
    def backward(ctx, u: Tensor | None, a: Tensor | None, b: Tensor | None):
        return *second_derivative(*ctx.saved_tensors, u, a, b, ctx.needs_input_grad[:3]), None, None, None


def second_derivative(g: Tensor, x: Tensor, weight: Tensor, mean: Tensor, invstd: Tensor, sum_gx: Tensor,
                      sum_g: Tensor, u: Tensor | None, a: Tensor | None, b: Tensor | None,
                      needs: tuple[bool, ...]) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """The gradients w.r.t. (g, x, weight) of <u, grad_x> + <a, grad_weight> + <b, grad_bias>, where grad_x,
    grad_weight = sum_gx, grad_bias = sum_g are BatchNorm's backward of g at x (the closed form in the module
    docstring); ``needs``: which of the three are wanted."""
    if torch.is_grad_enabled():  # its formulas treat the batch statistics as constants
        raise RuntimeError("metalstm's batch_norm has first and second derivatives only (no third); run the "
                           "learner under torch.func, or use torch.nn.functional.batch_norm, for higher orders")
    n = x.numel() // x.shape[1]
    r = invstd
    x_hat = torch.addcmul(_channel_view(-mean * r, x), x, _channel_view(r, x))
    m_g, m_gx = sum_g / n, sum_gx / n
    zero = torch.zeros_like(r)
    a = zero if a is None else a
    b = zero if b is None else b
    if u is None:
        m_u = m_ux = m_ug = zero
    else:
        m_u = _channel_sum(u) / n
        m_ux = _channel_sum(u * x_hat) / n
        m_ug = _channel_sum(u * g) / n
    wr = weight * r
    u_pg = n * (m_ug - m_u * m_g - m_ux * m_gx)  # sum(u * P(g))
    c_u, c_g = -wr * m_gx, a - wr * m_ux  # G = c_u * u + c_g * g
    mean_G, mean_Gx = c_u * m_u + c_g * m_g, c_u * m_ux + c_g * m_gx
    grad_r = weight * u_pg

    grad_g = grad_x = grad_weight = None
    if needs[0]:  # weight * r * P(u) + a * x_hat + b
        grad_g = torch.addcmul(_channel_view(b - wr * m_u, x), x_hat, _channel_view(a - wr * m_ux, x))
        if u is not None:
            grad_g.addcmul_(u, _channel_view(wr, x))
    if needs[1]:  # r * (G - mean(G) - x_hat * mean(G x_hat)) - R r^2 / N * x_hat
        grad_x = torch.addcmul(_channel_view(-r * mean_G, x), x_hat,
                               _channel_view(-r * mean_Gx - grad_r * r * r / n, x))
        grad_x.addcmul_(g, _channel_view(r * c_g, x))
        if u is not None:
            grad_x.addcmul_(u, _channel_view(r * c_u, x))
    if needs[2]:
        grad_weight = r * u_pg
    return grad_g, grad_x, grad_weight
