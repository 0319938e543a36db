"""Conv-4's body, a chain of [conv -> BatchNorm (the batch's own statistics) -> [max-pool 2] -> ReLU] blocks, as one
autograd Function that stores each block's output only (and, with pooling, each window's argmax as one byte) instead
of the four full-resolution tensors autograd keeps per block (convolution output, normalised output, pooling
indices, ReLU output).

Its backward runs the blocks last to first. Each recomputes its convolution, ``CHUNK_BYTES`` of output at a time, in
two passes over the images: BatchNorm's input gradient couples every image through two per-channel sums,
    dL/dy = gamma * invstd * (g - mean(g) - xhat * mean(g * xhat)),   g = dL/dz (z = gamma * xhat + beta),
so the first pass gathers sum(g) and sum(g * xhat) and the second applies them and runs the convolution's backward.
The forward gathers the batch statistics the same way. With one chunk (small batches) nothing is computed twice
within a pass. A block's input gradient, through the previous block's ReLU, is written over that block's stored
output chunk by chunk (a chunk's convolution backward reads only its own images): the backward allocates no
full-size gradient. So the body's backward runs once per forward (no ``retain_graph``), and first derivatives
only: MAML's query pass (``meta_learner.checkpoint_query``), whose gradient w.r.t. the adapted weights is taken once.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

# of convolution output recomputed at once (W2's block 1: 300 images, 57 MiB -> 15 chunks); W2 with 10 steps measured
# faster and 40 MiB smaller at 4 MiB than at 8 (0.88-0.96 against 0.81-0.87 tasks/s); 2 MiB was slower
CHUNK_BYTES = 4 * 2**20
Block = tuple[tuple[int, int], tuple[int, int], bool]  # a block's convolution stride and padding, and whether it pools


def image_chunks(n: int, bytes_per_image: int) -> list[slice]:
    size = max(1, CHUNK_BYTES // max(bytes_per_image, 1))
    return [slice(i, min(i + size, n)) for i in range(0, n, size)]


def conv_chunks(x: Tensor, weight: Tensor, stride: tuple[int, int], padding: tuple[int, int]) -> tuple[list[int], list[slice]]:
    """The convolution's output size [H', W'] for x [n, C_in, H, W], and its images in chunks of ``CHUNK_BYTES`` of
    output."""
    size = [(n + 2 * p - k) // s + 1 for n, p, k, s in zip(x.shape[-2:], padding, weight.shape[-2:], stride)]
    return size, image_chunks(x.shape[0], weight.shape[0] * size[0] * size[1] * x.element_size())


def window_argmax(flat: Tensor, width: int) -> Tensor:
    """max_pool2d's flat input index (h * W + w) -> the position in its 2x2 window (2 * (h % 2) + w % 2), uint8."""
    return (2 * ((flat // width) % 2) + (flat % width) % 2).to(torch.uint8)


def unpool(grad: Tensor, arg: Tensor, like: Tensor) -> Tensor:
    """grad [n, C, h, w] of a 2x2 max-pool's output, placed at each window's argmax ``arg`` -> zeros shaped and laid
    out as the pool's input ``like`` [n, C, H, W] (one window position at a time: no int64 index tensor, which would be
    twice the gradient's size)."""
    h, w = grad.shape[-2:]
    out = torch.zeros_like(like)
    for k in range(4):
        out[..., k // 2 : 2 * h : 2, k % 2 : 2 * w : 2] = torch.where(arg == k, grad, 0)
    return out


def block_forward(x: Tensor, weight: Tensor, bias: Tensor | None, gamma: Tensor, beta: Tensor, block: Block,
                  eps: float, layout: torch.memory_format) -> tuple[Tensor, Tensor | None, Tensor, Tensor]:
    """x [n, C_in, H, W] -> (relu([maxpool](batch_norm(conv2d(x)))) in ``layout``, the batch mean and inverse
    standard deviation [C], the pool's window argmax [uint8] or None)."""
    stride, padding, pool = block
    conv = lambda part: F.conv2d(part, weight, bias, stride, padding)  # noqa: E731
    size, chunks = conv_chunks(x, weight, stride, padding)
    if len(chunks) == 1:
        y = conv(x)
        var, mean = torch.var_mean(y, dim=(0, 2, 3), unbiased=False)
    else:  # each chunk's variance and mean, pooled in float64: var = sum n_i (var_i + (mean_i - mean)^2) / n
        parts = [torch.var_mean(conv(x[part]), dim=(0, 2, 3), unbiased=False) for part in chunks]
        weights = torch.tensor([part.stop - part.start for part in chunks], dtype=torch.float64,
                               device=x.device).div_(x.shape[0]).unsqueeze(1)
        part_var, part_mean = (torch.stack(values).double() for values in zip(*parts))
        mean64 = (weights * part_mean).sum(0)
        var64 = (weights * (part_var + (part_mean - mean64).square())).sum(0)
        var, mean = var64.to(x.dtype), mean64.to(x.dtype)
    invstd = torch.rsqrt(var + eps)
    scale, shift = gamma * invstd, beta - mean * gamma * invstd  # z = y * scale + shift
    out_size = (size[0] // 2, size[1] // 2) if pool else size
    out = torch.empty(x.shape[0], weight.shape[0], *out_size, dtype=x.dtype, device=x.device, memory_format=layout)
    arg = torch.empty_like(out, dtype=torch.uint8) if pool else None
    for part in chunks:
        z = (y if len(chunks) == 1 else conv(x[part])) * scale.view(-1, 1, 1) + shift.view(-1, 1, 1)
        if pool:
            z, flat = F.max_pool2d(z, 2, return_indices=True)
            arg[part] = window_argmax(flat, size[1])
        out[part] = z.clamp_min_(0)
    return out, mean, invstd, arg


def block_backward(grad_z_out: Tensor, x: Tensor, weight: Tensor, bias: Tensor | None, gamma: Tensor, mean: Tensor,
                   invstd: Tensor, arg: Tensor | None, block: Block, needs: tuple[bool, ...],
                   into_input: bool) -> tuple[Tensor | None, ...]:
    """A block's gradients, given ``grad_z_out``, dL/d(its pooled, normalised output) before the ReLU (the ReLU's mask
    already applied): (dL/dx, dL/dweight, dL/dbias, dL/dgamma, dL/dbeta), each None where ``needs`` says no.
    ``into_input``: x is the previous block's ReLU output, and dL/d(its input to the ReLU) is written over it, chunk by
    chunk (then the first entry is x itself, and ``needs[0]`` must be true)."""
    stride, padding, pool = block
    view = lambda t: t.view(-1, 1, 1)  # noqa: E731
    size, chunks = conv_chunks(x, weight, stride, padding)  # the forward's chunks

    def recompute(part: slice) -> tuple[Tensor, Tensor]:  # (xhat, dL/dz before pooling) of a chunk of images
        xhat = F.conv2d(x[part], weight, bias, stride, padding).sub_(view(mean)).mul_(view(invstd))
        return xhat, unpool(grad_z_out[part], arg[part], xhat) if pool else grad_z_out[part]

    sums = torch.zeros(2, weight.shape[0], dtype=x.dtype, device=x.device)  # sum(g), sum(g * xhat)
    single = len(chunks) == 1  # one chunk is kept for the second pass; more are recomputed there
    for part in chunks:
        xhat, grad_z = recompute(part)
        sums += torch.stack([grad_z.sum((0, 2, 3)), (grad_z * xhat).sum((0, 2, 3))])
        if not single:
            del xhat, grad_z  # before the next chunk's buffers
    count = x.shape[0] * size[0] * size[1]
    mean_g, mean_gx = sums[0] / count, sums[1] / count
    grad_x = x if into_input else torch.empty_like(x) if needs[0] else None
    grad_w = torch.zeros_like(weight) if needs[1] else None
    grad_b = torch.zeros_like(bias) if bias is not None and needs[2] else None
    for part in chunks:
        if not single:
            xhat, grad_z = recompute(part)
        # in place over xhat: two chunk-sized buffers alive (xhat, grad_z) instead of six
        grad_y = xhat.mul_(view(-mean_gx)).add_(grad_z).sub_(view(mean_g)).mul_(view(gamma * invstd))
        del xhat, grad_z
        gx, gw, gb = torch.ops.aten.convolution_backward(
            grad_y, x[part], weight, [weight.shape[0]] if bias is not None else None, list(stride), list(padding),
            [1, 1], False, [0, 0], 1, [needs[0], needs[1], grad_b is not None])
        if into_input:  # through the previous block's ReLU: its output x > 0 where its input was
            x[part] = gx.masked_fill_(x[part] <= 0, 0)
        elif grad_x is not None:
            grad_x[part] = gx
        if grad_w is not None:
            grad_w += gw
        if grad_b is not None:
            grad_b += gb
        del grad_y, gx, gw, gb  # before the next chunk's buffers
    return grad_x, grad_w, grad_b, sums[1] if needs[3] else None, sums[0] if needs[4] else None


class RecomputedBody(torch.autograd.Function):
    """x [n, C_in, H, W] -> the ``blocks`` in turn, each relu([maxpool](batch_norm(conv2d(h)))), handing each other
    ``between`` and returning the last output [n, C, H', W'] contiguous. ``weights``: each block's conv weight, conv
    bias (or None), BatchNorm weight and bias. See the module docstring."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, blocks: tuple[Block, ...], eps: float, between: torch.memory_format,
                *weights: Tensor | None) -> Tensor:
        h, outputs, stats = x, [], []
        for i, block in enumerate(blocks):
            weight, bias, gamma, beta = weights[4 * i : 4 * i + 4]
            layout = torch.contiguous_format if i == len(blocks) - 1 else between
            h, *block_stats = block_forward(h, weight, bias, gamma, beta, block, eps, layout)
            outputs.append(h)
            stats.append(block_stats)  # mean, invstd, arg
        ctx.blocks, ctx.stats, ctx.inner = blocks, stats, outputs[:-1]  # the inner outputs: overwritten in backward
        ctx.save_for_backward(x, h, *weights)
        return h

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, ...]:
        if torch.is_grad_enabled():
            raise RuntimeError("meta_learner.checkpoint_query recomputes Conv-4's blocks for first derivatives only; "
                               "a second derivative through the query pass is not supported.")
        if ctx.inner is None:
            raise RuntimeError("Conv-4's recomputed body (meta_learner.checkpoint_query) writes its gradients over its "
                               "stored activations, so its backward runs once per forward; run the forward again "
                               "instead of retain_graph=True.")
        x, out, *weights = ctx.saved_tensors
        inputs, stats, blocks = [x, *ctx.inner], ctx.stats, ctx.blocks
        ctx.inner = ctx.stats = None
        grads: list[Tensor | None] = [None] * len(weights)
        grad_z = torch.where(out > 0, grad_out, 0)  # through the last block's ReLU
        del out
        for i in reversed(range(len(blocks))):
            needs = (ctx.needs_input_grad[0] if i == 0 else True, *ctx.needs_input_grad[4 + 4 * i : 8 + 4 * i])
            grad_x, *grads[4 * i : 4 * i + 4] = block_backward(grad_z, inputs[i], *weights[4 * i : 4 * i + 3], *stats[i],
                                                                blocks[i], needs, into_input=i > 0)
            inputs[i], stats[i], grad_z = None, None, grad_x  # block i's input now holds the gradient below it
        return grad_z, None, None, None, *grads
