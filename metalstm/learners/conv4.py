"""Conv-4 (Vinyals et al. 2016; Finn et al. 2017): four [conv3x3 -> BN -> ReLU -> downsample] blocks."""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from metalstm.config import choice, count
from metalstm.learners.base import BaseLearner, BatchNorm, LearnerConfig, TaskSpec


@dataclass
class Conv4Config(LearnerConfig):
    """Four [conv3x3 -> BatchNorm -> ReLU -> downsample] blocks and a linear head. ``norm=batch``: every forward
    normalises with its own batch (transductive at meta-test, as in MAML); ``norm=running``: meta-test
    normalises with running statistics gathered in meta-training (as ProtoNet's code)."""

    filters: int = count(64)
    blocks: int = count(4)
    norm: str = choice("batch", ("batch", "running", "none"))  # batch (transductive) | running statistics | none
    downsample: str = choice("stride", ("stride", "maxpool"))  # stride (MAML's 2x2-strided convs) | maxpool (ProtoNet/Vinyals)


class Conv4(BaseLearner):
    """x [n, C, H, W] -> outputs [n, spec output_dim]; channels and size come from the task spec."""

    vmap_on_cpu = False  # vmapped convolutions become grouped ones, slow on CPU: W1 2.8 vs 5.0 tasks/s looped

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
            layers.append(nn.ReLU())
            if cfg.downsample == "maxpool":
                layers.append(nn.MaxPool2d(2))
                size //= 2
            else:
                size = (size + 1) // 2
            channels = cfg.filters
        self.body = nn.Sequential(*layers, nn.Flatten())
        self.embed_dim = channels * size * size
        self.head = nn.Linear(self.embed_dim, spec["output_dim"])
