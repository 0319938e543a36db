"""A fully connected network; 1-40-40-1 is MAML's sinusoid regressor."""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from torch import nn

from metalstm.errors import ConfigError
from metalstm.learners.base import BaseLearner, TaskSpec


@dataclass
class MLPConfig:
    hidden: list[int] = field(default_factory=lambda: [40, 40])


class MLP(BaseLearner):
    """x [n, *input_shape] (flattened) -> [n, spec output_dim]; embedding = last hidden layer."""

    def __init__(self, cfg: MLPConfig, spec: TaskSpec):
        super().__init__()
        if not cfg.hidden or any(h < 1 for h in cfg.hidden):
            raise ConfigError(f"base_learner.hidden={list(cfg.hidden)} must hold one or more positive layer widths.")
        if spec.get("vocab") is not None or spec.get("output_length"):
            raise ConfigError("base_learner=mlp maps a real-valued input to one output, but this data set's examples are "
                              "sequences; use base_learner=lstm_seq2seq or lstm_encoder.")
        layers: list[nn.Module] = [nn.Flatten()]
        width = math.prod(spec["input_shape"])
        for h in cfg.hidden:
            layers += [nn.Linear(width, h), nn.ReLU()]
            width = h
        self.body = nn.Sequential(*layers)
        self.embed_dim = width
        self.head = nn.Linear(width, spec["output_dim"])
