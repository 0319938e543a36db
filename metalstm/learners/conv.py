"""A 2-D convolution whose second derivative is four convolution calls, for Conv-4's grouped support pass on a CPU.

Second-order MAML differentiates a convolution's backward. For y = conv(x, W) + b and the backward's outputs
    grad_x = A_W^T g,   grad_W = B(g, x),   grad_b = sum(g)      (g = dL/dy; A_W: x -> conv(x, W); B: its weight gradient)
the gradients of <u, grad_x> + <a, grad_W> + <c, grad_b> are, as A_W x and B(g, x) are bilinear,
    d/dg = conv(u, W) + conv(x, a) + c,    d/dW = B(g, u),    d/dx = A_a^T g.
torch's ``_convolution_double_backward`` computes the same terms but, for a grouped convolution, takes the weight
gradient group by group with a copy of each group's slices; here each term is one grouped call (W1's block 2:
12.9 -> 11.4 ms per double backward).
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd import Function

DILATION, OUTPUT_PADDING = [1, 1], [0, 0]


def conv2d(x: Tensor, weight: Tensor, bias: Tensor | None, stride: tuple[int, int], padding: tuple[int, int],
           groups: int) -> Tensor:
    """``F.conv2d(x, weight, bias, stride, padding, groups=groups)``, with the second derivative above. Under autocast
    it is ``F.conv2d`` itself: the backward's calls would meet the float32 inputs saved before autocast casts them."""
    if torch.is_autocast_enabled(x.device.type):
        return F.conv2d(x, weight, bias, stride, padding, groups=groups)
    return _Conv.apply(x, weight, bias, list(stride), list(padding), groups)


class _Conv(Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Tensor, bias: Tensor | None, stride: list[int], padding: list[int],
                groups: int) -> Tensor:
        ctx.save_for_backward(x, weight)
        ctx.args, ctx.has_bias = (stride, padding, groups), bias is not None
        return F.conv2d(x, weight, bias, stride, padding, groups=groups)

    @staticmethod
    def backward(ctx: Any, grad_y: Tensor) -> tuple[Tensor | None, ...]:
        x, weight = ctx.saved_tensors
        mask = [ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.has_bias and ctx.needs_input_grad[2]]
        grad_x, grad_w, grad_b = _ConvBackward.apply(grad_y, x, weight, ctx.args, mask)
        return grad_x, grad_w, grad_b, None, None, None


class _ConvBackward(Function):
    @staticmethod
    def forward(ctx: Any, grad_y: Tensor, x: Tensor, weight: Tensor, args: tuple, mask: list[bool]) -> tuple:
        stride, padding, groups = args
        # grad_y is read by d/dx (for a gradient w.r.t. grad_W) and by d/dW (for one w.r.t. grad_x) only: the first
        # block's (x an image, no grad_x) would be kept for nothing, a full-size map every inner step
        needs_grad_y = (ctx.needs_input_grad[1] and mask[1]) or (ctx.needs_input_grad[2] and mask[0])
        ctx.save_for_backward(grad_y if needs_grad_y else None, x, weight)
        ctx.grad_y_shape = grad_y.shape
        ctx.args = args
        return torch.ops.aten.convolution_backward(grad_y, x, weight, [weight.shape[0]] if mask[2] else None, stride,
                                                   padding, DILATION, False, OUTPUT_PADDING, groups, mask)

    @staticmethod
    def backward(ctx: Any, u: Tensor | None, a: Tensor | None, c: Tensor | None) -> tuple[Tensor | None, ...]:
        grad_y, x, weight = ctx.saved_tensors
        stride, padding, groups = ctx.args
        conv = lambda inp, w: F.conv2d(inp, w, None, stride, padding, groups=groups)  # noqa: E731
        bwd = lambda inp, w, m: torch.ops.aten.convolution_backward(  # noqa: E731
            grad_y, inp, w, None, stride, padding, DILATION, False, OUTPUT_PADDING, groups, m)
        d_grad_y = d_x = d_w = None
        if ctx.needs_input_grad[0]:
            terms = ([conv(u, weight)] if u is not None else []) + ([conv(x, a)] if a is not None else [])
            d_grad_y = sum(terms[1:], terms[0]) if terms else x.new_zeros(ctx.grad_y_shape)
            if c is not None:
                d_grad_y = d_grad_y + c.view(1, -1, 1, 1)
        if ctx.needs_input_grad[1] and a is not None:
            d_x = bwd(x, a, [True, False, False])[0]
        if ctx.needs_input_grad[2] and u is not None:
            d_w = bwd(u, weight, [False, True, False])[1]
        return d_grad_y, d_x, d_w, None, None
