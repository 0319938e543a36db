"""Conv-4 (Vinyals et al. 2016; Finn et al. 2017): four [conv3x3 -> BN -> ReLU -> downsample] blocks."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from metalstm.config import choice, count
from metalstm.learners.base import (
    BaseLearner,
    BatchNorm,
    LearnerConfig,
    Params,
    TaskSpec,
    closed_form_norm,
    outside_functorch,
    recomputing,
)
from metalstm.learners.conv import conv2d
from metalstm.learners.norm import batch_norm, batch_norm_max_pool
from metalstm.learners.pool import max_pool
from metalstm.learners.recomputed_body import RecomputedBody


@dataclass
class Conv4Config(LearnerConfig):
    """Four [conv3x3 -> BatchNorm -> ReLU -> downsample] blocks and a linear head. ``norm=batch``: every forward
    normalises with its own batch (transductive at meta-test, as in MAML); ``norm=running``: meta-test
    normalises with running statistics gathered in meta-training (as ProtoNet's code)."""

    filters: int = count(64)
    blocks: int = count(4)
    norm: str = choice("batch", ("batch", "running", "none"))  # batch (transductive) | running statistics | none
    downsample: str = choice("stride", ("stride", "maxpool"))  # stride (MAML's 2x2-strided convs) | maxpool (ProtoNet/Vinyals)


def pool_follows(layers: list[nn.Module], i: int) -> bool:
    """Whether layer i of a body's ``layers`` is followed by a max-pool: a BatchNorm's, run with it as
    ``batch_norm_max_pool`` where the closed form runs."""
    return i + 1 < len(layers) and isinstance(layers[i + 1], nn.MaxPool2d)


def channels_last(x: Tensor) -> Tensor:
    """x [n, C, H, W] in channels_last. A one-channel image is stored the same in both layouts, but torch reads its
    default strides as NCHW, so it is given channels_last strides over the same memory."""
    x = x.contiguous(memory_format=torch.channels_last)
    if x.shape[1] == 1 and x.stride(1) != 1:
        x = x.as_strided(x.shape, (x.stride(0), 1, x.stride(2), x.stride(3)))
    return x


class Conv4(BaseLearner):
    """x [n, C, H, W] -> outputs [n, spec output_dim]; channels and size come from the task spec."""

    cpu_vectorize = "grouped"  # support sets through forward_tasks, queries one task at a time (docs/performance.md)

    @classmethod
    def refusal(cls, cfg: Conv4Config, spec: TaskSpec) -> str | None:
        if len(spec["input_shape"]) != 3:
            return (f"base_learner=conv4 needs image inputs [channels, height, width], but this data set's examples "
                    f"have shape {list(spec['input_shape'])}; use base_learner=mlp (or an LSTM for sequences).")
        _, image_size, width = spec["input_shape"]
        if image_size != width:
            return f"base_learner=conv4 needs square images, got {image_size}x{width}."
        if cfg.downsample == "maxpool" and image_size < 2**cfg.blocks:
            return (f"{image_size}x{image_size} images are too small for {cfg.blocks} max-pooling blocks; "
                    f"use fewer base_learner.blocks or larger data.image_size.")
        return None

    def __init__(self, cfg: Conv4Config, spec: TaskSpec):
        super().__init__()
        self.check_spec(cfg, spec)
        in_channels, image_size, _ = spec["input_shape"]
        self.bn_policy = {"batch": "transductive", "running": "running", "none": "none"}[cfg.norm]
        layers: list[nn.Module] = []
        channels, size = in_channels, image_size
        for _ in range(cfg.blocks):
            stride = 2 if cfg.downsample == "stride" else 1
            layers.append(nn.Conv2d(channels, cfg.filters, 3, stride=stride, padding=1))
            if cfg.norm != "none":
                layers.append(BatchNorm(cfg.filters, running=cfg.norm == "running"))
            if cfg.downsample == "maxpool":  # pooled before the ReLU: the same function (max commutes with a
                layers.append(nn.MaxPool2d(2))  # monotone map), on a quarter of the values
                size //= 2
            else:
                size = (size + 1) // 2
            layers.append(nn.ReLU())
            channels = cfg.filters
        self.body = nn.Sequential(*layers, nn.Flatten())
        self.embed_dim = channels * size * size
        self.head = nn.Linear(self.embed_dim, spec["output_dim"])

    def forward(self, x: Tensor, embed: bool = False, targets: Tensor | None = None) -> Tensor:
        if self.recomputes() and recomputing() and outside_functorch() and not torch.is_autocast_enabled(x.device.type):
            features = self.recomputed_body(x)
            return features if embed else self.head(features)
        if x.device.type == "cpu" and outside_functorch():
            # channels_last throughout: on a CPU, BatchNorm, max-pool and the convolutions' backward run faster in it
            # (W1's query pass, 75 images: block 1 and conv 2 forward and backward 41 -> 30 ms), and the first
            # convolution writes it straight from a channels_last input (its forward and weight gradient 8.3 -> 3.2 ms;
            # mini-ImageNet's 75 images 41 -> 21 ms), where converting its output afterwards copied it
            x = channels_last(x)
        features = self.run_body(x)
        return features if embed else self.head(features)

    def run_body(self, x: Tensor) -> Tensor:
        """The body on x [n, C, H, W]; a BatchNorm with the batch's statistics and the max-pool after it run as one
        ``batch_norm_max_pool`` where the closed form runs (a CPU, outside torch.func), which keeps the BatchNorm's
        input but not its output (a query pass: one full-size map a block less)."""
        layers = list(self.body)
        pooled = False  # the max-pool already run with the BatchNorm before it
        for i, layer in enumerate(layers):
            if pooled:
                pooled = False
            elif (isinstance(layer, BatchNorm) and not layer.track_running_stats and pool_follows(layers, i)
                  and closed_form_norm(x)):
                x, pooled = batch_norm_max_pool(x, layer.weight, layer.bias, layer.eps), True
            else:
                x = layer(x)
        return x

    def recomputes(self) -> bool:
        return self.bn_policy == "transductive"  # RecomputedBody normalises with the batch's statistics

    def recomputed_body(self, x: Tensor) -> Tensor:
        """The body as one ``RecomputedBody``, which stores each block's output only (first derivatives; float32: under
        autocast the stored path runs). On a CPU the blocks hand each other channels_last: oneDNN runs a 64-channel
        convolution in it as it is, but copies NCHW in and out of its blocked layout (W2's block 2, 80 images: forward
        11.6 -> 4.1 MiB of memory touched, 8.4 -> 6.7 ms; backward 15.6 -> 4.4 MiB, 15 -> 12 ms)."""
        layers = list(self.body)
        blocks, weights = [], []
        for i, conv in enumerate(layers):
            if isinstance(conv, nn.Conv2d):
                norm = layers[i + 1]
                blocks.append((conv.stride, conv.padding, pool_follows(layers, i + 1)))
                weights += [conv.weight, conv.bias, norm.weight, norm.bias]
        between = torch.channels_last if x.device.type == "cpu" else torch.contiguous_format
        return RecomputedBody.apply(x, tuple(blocks), layers[1].eps, between, *weights).flatten(1)

    def forward_tasks(self, params: Params, x: Tensor, targets: Tensor | None = None) -> Tensor:
        """T tasks as one network T times as wide: x [T, n, C, H, W] -> [T, n, output_dim]. Task t's images are
        channel group t; each convolution is a grouped one (group t has task t's filters), each BatchNorm runs over
        the T*C channels (task t's own statistics), and the head is a batched product. The same function as
        ``forward_with`` per task, in a few large kernels instead of T small ones."""
        tasks, n = x.shape[:2]
        closed_form = closed_form_norm(x)
        h = x.transpose(0, 1).flatten(1, 2)  # [n, T*C, H, W]
        conv = conv2d if closed_form else F.conv2d
        layers = list(self.body)
        pooled = False  # the max-pool already run with the BatchNorm before it
        for i, (name, layer) in enumerate(self.body.named_children()):
            weight, bias = params.get(f"body.{name}.weight"), params.get(f"body.{name}.bias")
            if isinstance(layer, nn.Conv2d):
                h = conv(h, weight.flatten(0, 1), bias.flatten(), layer.stride, layer.padding, groups=tasks)
            elif isinstance(layer, BatchNorm) and closed_form:
                pooled = pool_follows(layers, i)
                norm = batch_norm_max_pool if pooled else batch_norm
                h = norm(h, weight.flatten(), bias.flatten(), layer.eps)
            elif isinstance(layer, BatchNorm):
                h = F.batch_norm(h, None, None, weight.flatten(), bias.flatten(), training=True, eps=layer.eps)
            elif isinstance(layer, nn.MaxPool2d) and pooled:
                pooled = False
            elif isinstance(layer, nn.MaxPool2d) and closed_form:
                h = max_pool(h)
            elif isinstance(layer, nn.Flatten):
                h = h.unflatten(1, (tasks, -1)).flatten(2).transpose(0, 1)  # [T, n, features]
            else:
                h = layer(h)  # ReLU, max-pool: channel by channel
        return torch.baddbmm(params["head.bias"].unsqueeze(1), h, params["head.weight"].transpose(1, 2))
