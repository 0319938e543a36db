"""Conv-4 (Vinyals et al. 2016; Finn et al. 2017): four [conv3x3 -> BN -> ReLU -> downsample] blocks."""
from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor, nn

from metalstm.errors import ConfigError
from metalstm.learners.base import BaseLearner


@dataclass
class Conv4Config:
    in_channels: int = 1
    image_size: int = 28
    out_features: int = 5
    filters: int = 64
    blocks: int = 4
    norm: str = "batch"  # batch (transductive batch statistics) | none
    downsample: str = "stride"  # stride (MAML's 2x2-strided convs) | maxpool (ProtoNet/Vinyals)


class Conv4(BaseLearner):
    """x [n, C, H, W] -> logits [n, out_features]."""

    def __init__(self, cfg: Conv4Config):
        super().__init__()
        if cfg.norm not in ("batch", "none"):
            raise ConfigError(f"base_learner.norm={cfg.norm!r}; choose batch or none.")
        if cfg.downsample not in ("stride", "maxpool"):
            raise ConfigError(f"base_learner.downsample={cfg.downsample!r}; choose stride or maxpool.")
        if cfg.image_size < 2**cfg.blocks:
            raise ConfigError(
                f"base_learner.image_size={cfg.image_size} is too small for {cfg.blocks} downsampling blocks; "
                f"use at least {2**cfg.blocks} or fewer blocks."
            )
        self.bn_policy = "transductive" if cfg.norm == "batch" else "none"
        layers: list[nn.Module] = []
        channels, size = cfg.in_channels, cfg.image_size
        for _ in range(cfg.blocks):
            stride = 2 if cfg.downsample == "stride" else 1
            layers.append(nn.Conv2d(channels, cfg.filters, 3, stride=stride, padding=1))
            if cfg.norm == "batch":
                layers.append(nn.BatchNorm2d(cfg.filters, track_running_stats=False))
            layers.append(nn.ReLU())
            if cfg.downsample == "maxpool":
                layers.append(nn.MaxPool2d(2))
                size //= 2
            else:
                size = (size + 1) // 2
            channels = cfg.filters
        self.features = nn.Sequential(*layers, nn.Flatten())
        self.head = nn.Linear(channels * size * size, cfg.out_features)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))
