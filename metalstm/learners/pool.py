"""2x2 max-pooling that keeps its indices only, for Conv-4's second-order (grouped) support pass on a CPU, and the
pooling, scattering and gathering that ``norm.batch_norm_max_pool`` (the pool after a BatchNorm) is made of.

torch's ``max_pool2d`` keeps its whole input for the backward, which reads only its shape; in a second-order inner
loop that input ([5 images, 8 x 64 channels, 28, 28] in W1's block 1) stays alive for every inner step.
Here the backward scatters the gradient to the stored indices and its derivative gathers at them (the two are each
other's adjoints), so any order of derivative is exact. An NCHW input is pooled through channels_last, where torch's
kernel is vectorised over channels (W1's block 1: 4.6 -> 2.4 ms with the two layout copies); a channels_last input
(Conv-4's forward on a CPU) is pooled as it is, and its results are channels_last too.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.autograd import Function

KERNEL, STRIDE, PADDING, DILATION = [2, 2], [2, 2], [0, 0], [1, 1]


def max_pool(x: Tensor) -> Tensor:
    """x [n, C, H, W] (NCHW) -> [n, C, H // 2, W // 2]: ``F.max_pool2d(x, 2)``, the same values, indices and
    derivatives."""
    return _MaxPool.apply(x)


class _MaxPool(Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor) -> Tensor:
        out, indices = pool_with_indices(x)
        ctx.save_for_backward(indices)
        ctx.shape, ctx.layout = x.shape, layout(x)
        return out

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> Tensor:
        (indices,) = ctx.saved_tensors
        # the kernel reads the input's shape and layout only: an expanded scalar (no memory) reads as NCHW; for
        # channels_last an untouched tensor of the shape
        like = (grad_out.new_empty(()).expand(ctx.shape) if ctx.layout == torch.contiguous_format
                else torch.empty(ctx.shape, dtype=grad_out.dtype, device=grad_out.device, memory_format=ctx.layout))
        return _Unpool.apply(grad_out, indices, like)


class _Unpool(Function):
    """grad [n, C, h, w] placed at ``indices`` (positions in each H x W plane) of zeros shaped and laid out like
    ``like``."""

    @staticmethod
    def forward(ctx: Any, grad: Tensor, indices: Tensor, like: Tensor) -> Tensor:
        ctx.save_for_backward(indices)
        return unpool(grad, indices, like)

    @staticmethod
    def backward(ctx: Any, grad_grad: Tensor) -> tuple[Tensor, None, None]:
        (indices,) = ctx.saved_tensors
        return gather(grad_grad, indices), None, None


def layout(x: Tensor) -> torch.memory_format:
    """channels_last where x [n, C, H, W] is laid out so (and not also NCHW-contiguous), else NCHW."""
    cl = x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    return torch.channels_last if cl else torch.contiguous_format


def pool_with_indices(x: Tensor, memory_format: torch.memory_format | None = None) -> tuple[Tensor, Tensor]:
    """2x2 max-pool of x [n, C, H, W], run in channels_last: the pooled values and their indices in each H x W plane,
    both in ``memory_format`` (None: the layout of x)."""
    memory_format = memory_format or layout(x)
    out, indices = torch.ops.aten.max_pool2d_with_indices(x.contiguous(memory_format=torch.channels_last), KERNEL,
                                                          STRIDE, PADDING, DILATION, False)
    return out.contiguous(memory_format=memory_format), indices.contiguous(memory_format=memory_format)


def unpool(grad: Tensor, indices: Tensor, like: Tensor) -> Tensor:
    """grad [n, C, h, w] placed at ``indices`` of zeros shaped and laid out like ``like`` (the pool's input, whose
    values are not read): the max-pool's backward. torch's kernel runs in that layout (channels_last: vectorised over
    channels; W1's query, 75 images of 64 x 28 x 28: 0.5 against 3.9 ms in NCHW)."""
    memory_format = layout(like)
    return torch.ops.aten.max_pool2d_with_indices_backward(
        grad.contiguous(memory_format=memory_format), like, KERNEL, STRIDE, PADDING, DILATION, False,
        indices.contiguous(memory_format=memory_format))


def gather(grad: Tensor, indices: Tensor) -> Tensor:
    """grad [n, C, H, W] read at ``indices`` [n, C, h, w], in the indices' layout: the adjoint of ``unpool``."""
    memory_format = layout(indices)
    grad = grad.contiguous(memory_format=memory_format)
    if memory_format == torch.contiguous_format:
        return grad.flatten(2).gather(2, indices.flatten(2)).view(indices.shape)
    # channels_last: gathered along the positions of [n, H * W, C] (the memory's order; along a strided dim torch's
    # kernel is 10x slower: W1's query, 2.5 ms)
    n, c, h, w = indices.shape
    flat = lambda t: t.permute(0, 2, 3, 1).reshape(n, -1, c)  # noqa: E731  (a view)
    return flat(grad).gather(1, flat(indices)).view(n, h, w, c).permute(0, 3, 1, 2)
