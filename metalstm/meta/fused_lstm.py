"""An LSTM cell for very many rows (one per parameter coordinate of every task), with its backward written out.

torch's ``lstm_cell`` on the CPU runs as separate matmuls and a dozen elementwise kernels, each a pass over
[rows, 4 * hidden] that autograd then replays in reverse. Here one matmul gives all four gates,
    G = [x, h] W^T + b,     i, f, o = sigmoid(G_i, G_f, G_o),  g = tanh(G_g),
    c' = f * c + i * g,     h' = o * tanh(c'),
and the backward is the closed form:
    dc~ = dc' + dh' * o * (1 - tanh(c')^2)
    dG_i = dc~ * g * i (1 - i),    dG_f = dc~ * c * f (1 - f),    dG_g = dc~ * i * (1 - g^2),
    dG_o = dh' * tanh(c') * o (1 - o),    dc = dc~ * f,    d[x, h] = dG W,    dW = dG^T [x, h],    db = sum dG.
Rows go through in blocks that stay in cache between the matmul and the elementwise steps, and every tanh is
2 sigmoid(2z) - 1 (torch's CPU sigmoid is vectorised, its tanh several times slower). The same code runs on
any device; only first derivatives exist (the LSTM optimizers need no more).
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

BLOCK_ROWS = 4096  # [4096, 80] gates: 1.3 MB, in cache on a CPU core (2.1x faster than whole tensors, W4)
sigmoid_backward = torch.ops.aten.sigmoid_backward.grad_input  # (grad, sigmoid out, grad_input=) grad * s (1 - s)
tanh_backward = torch.ops.aten.tanh_backward.grad_input  # (grad, tanh out, grad_input=) grad * (1 - t^2)


def blocks(rows: int, device: torch.device) -> list[slice]:
    """Row blocks: cache-sized on the CPU, one block on an accelerator (its kernels want the whole tensor)."""
    size = BLOCK_ROWS if device.type == "cpu" else max(rows, 1)
    return [slice(s, min(s + size, rows)) for s in range(0, rows, size)]


class _FusedCell(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, h: Tensor | None, c: Tensor | None, weight: Tensor, bias: Tensor) -> tuple[Tensor, Tensor]:
        # h = c = None: the zero state, whose products and gradients are skipped (weight holds x's columns only)
        hidden = weight.shape[0] // 4
        xh = x if h is None else torch.cat([x, h], 1)  # [rows, in (+ hidden)]
        weight_t = weight.t().contiguous()  # a contiguous [in + hidden, 4 * hidden] right factor: 3x faster mm
        gates = xh.new_empty(len(xh), 4 * hidden)  # i, f, g, o as torch orders them, after their activations
        c_next, tanh_c, h_next = (xh.new_empty(len(xh), hidden) for _ in range(3))
        for rows in blocks(len(xh), xh.device):
            # one sigmoid for all four gates: g's weight rows come doubled, so 2 sigmoid(2 G_g) - 1 = tanh(G_g)
            block = torch.addmm(bias, xh[rows], weight_t, out=gates[rows]).sigmoid_()
            block[:, 2 * hidden : 3 * hidden].mul_(2).sub_(1)
            i, f, g, o = block.chunk(4, 1)
            cell = torch.mul(i, g, out=c_next[rows]) if c is None else torch.mul(f, c[rows], out=c_next[rows]).addcmul_(i, g)
            tanh = torch.mul(cell, 2, out=tanh_c[rows]).sigmoid_().mul_(2).sub_(1)
            torch.mul(o, tanh, out=h_next[rows])
        ctx.save_for_backward(xh, gates, c, tanh_c, weight)
        ctx.input_size = x.shape[1]
        return h_next, c_next

    @staticmethod
    def backward(ctx, grad_h: Tensor, grad_c: Tensor):
        xh, gates, c, tanh_c, weight = ctx.saved_tensors
        k, (need_x, need_h, need_c) = ctx.input_size, ctx.needs_input_grad[:3]
        # d[x, h] = dG W, for the columns that need it only (the LSTM optimizers' inputs are constants)
        first = 0 if need_x else k
        last = len(xh[0]) if need_h else k
        grad_xh = xh.new_empty(len(xh), last - first) if first < last else None
        weight_in = weight[:, first:last].contiguous()
        grad_c_prev = torch.empty_like(c) if need_c else None
        # dW^T = [x, h]^T dG: MKL's [in + hidden, rows] x [rows, 4 hidden] is up to 4x faster than dG^T [x, h]
        grad_weight_t, grad_bias = weight.new_zeros(weight.shape[1], len(weight)), weight.new_zeros(len(weight))
        for rows in blocks(len(xh), xh.device):
            i, f, g, o = gates[rows].chunk(4, 1)
            dh, tanh = grad_h[rows], tanh_c[rows]
            # dc~: the gradient reaching c' through h' and directly
            total_c = tanh_backward(dh * o, tanh, grad_input=torch.empty_like(tanh)).add_(grad_c[rows])
            grad_gates = torch.empty_like(gates[rows])
            d_i, d_f, d_g, d_o = grad_gates.chunk(4, 1)
            sigmoid_backward(total_c * g, i, grad_input=d_i)
            if c is None:
                d_f.zero_()
            else:
                sigmoid_backward(total_c * c[rows], f, grad_input=d_f)
            tanh_backward(total_c * i, g, grad_input=d_g).mul_(0.5)  # the pre-activation computed was 2 G_g
            sigmoid_backward(dh * tanh, o, grad_input=d_o)
            if grad_c_prev is not None:
                torch.mul(total_c, f, out=grad_c_prev[rows])
            if grad_xh is not None:
                torch.mm(grad_gates, weight_in, out=grad_xh[rows])
            grad_weight_t.addmm_(xh[rows].t(), grad_gates)
            grad_bias.add_(grad_gates.sum(0))
        grad_x = grad_xh[:, : k - first] if need_x else None
        grad_h_prev = grad_xh[:, k - first :] if need_h else None
        return grad_x, grad_h_prev, grad_c_prev, grad_weight_t.t(), grad_bias


class _RowProduct(torch.autograd.Function):
    """x [rows, k] @ weight [k, m] for few columns m; the backward in row blocks (MKL's x^T @ dy over half a
    million rows with m = 2 is 3x slower than the same sum block by block, dy @ weight^T 4x)."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor) -> Tensor:
        ctx.save_for_backward(x, weight)
        return x @ weight

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        x, weight = ctx.saved_tensors
        grad_x, grad_weight = torch.empty_like(x), torch.zeros_like(weight)
        weight_t = weight.t().contiguous()
        for rows in blocks(len(x), x.device):
            torch.mm(grad_out[rows], weight_t, out=grad_x[rows])
            grad_weight.addmm_(x[rows].t(), grad_out[rows])
        return grad_x, grad_weight


def row_product(x: Tensor, weight: Tensor) -> Tensor:
    """x [rows, k] @ weight [k, m], differentiable, for many rows and few columns."""
    return _RowProduct.apply(x, weight)


class FusedLSTMCell(nn.LSTMCell):
    """``nn.LSTMCell`` (same parameters, same state dict, same results) computed by ``_FusedCell``:
    x [rows, input_size], (h, c) [rows, hidden] or None (the zero state) -> (h', c')."""

    def forward(self, x: Tensor, state: tuple[Tensor, Tensor] | None = None) -> tuple[Tensor, Tensor]:
        scale = torch.ones(4, 1, dtype=x.dtype, device=x.device)
        scale[2] = 2  # the g gate's pre-activation doubled: tanh(z) = 2 sigmoid(2z) - 1
        scale = scale.repeat_interleave(self.hidden_size, 0)  # [4 * hidden, 1]
        bias = (self.bias_ih + self.bias_hh) * scale.squeeze(1)
        if state is None:  # h = c = 0: no h columns in the product, no gradient to the state
            return _FusedCell.apply(x, None, None, self.weight_ih * scale, bias)
        weight = torch.cat([self.weight_ih, self.weight_hh], 1) * scale  # [4 * hidden, input_size + hidden]
        return _FusedCell.apply(x, *state, weight, bias)
