"""A fully connected network; 1-40-40-1 is MAML's sinusoid regressor."""
from __future__ import annotations

from dataclasses import dataclass, field

from torch import Tensor, nn

from metalstm.errors import ConfigError
from metalstm.learners.base import BaseLearner


@dataclass
class MLPConfig:
    in_features: int = 1
    out_features: int = 1
    hidden: list[int] = field(default_factory=lambda: [40, 40])


class MLP(BaseLearner):
    """x [n, *in] (flattened to in_features) -> [n, out_features]."""

    def __init__(self, cfg: MLPConfig):
        super().__init__()
        if any(h < 1 for h in cfg.hidden):
            raise ConfigError(f"base_learner.hidden={list(cfg.hidden)} must hold positive layer widths.")
        layers: list[nn.Module] = [nn.Flatten()]
        width = cfg.in_features
        for h in cfg.hidden:
            layers += [nn.Linear(width, h), nn.ReLU()]
            width = h
        layers.append(nn.Linear(width, cfg.out_features))
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)
