"""A fully connected network; 1-40-40-1 is MAML's sinusoid regressor. With no hidden layers it is a linear model
whose embedding is the flattened input itself (Santoro et al.'s LSTM reads raw pixels)."""
from __future__ import annotations

import math
from dataclasses import dataclass

from torch import nn

from metalstm.config import setting
from metalstm.learners.base import BaseLearner, LearnerConfig, TaskSpec


@dataclass
class MLPConfig(LearnerConfig):
    hidden: list[int] = setting(factory=lambda: [40, 40], minimum=1)  # widths of the hidden layers; [] = linear


class MLP(BaseLearner):
    """x [n, *input_shape] (flattened) -> [n, spec output_dim]; embedding = last hidden layer (the input if none)."""

    @classmethod
    def refusal(cls, cfg: MLPConfig, spec: TaskSpec) -> str | None:
        if spec.get("vocab") is not None or spec.get("output_length"):
            return ("base_learner=mlp maps a real-valued input to one output, but this data set's examples are "
                    "sequences; use base_learner=lstm_seq2seq or lstm_encoder.")
        return None

    def __init__(self, cfg: MLPConfig, spec: TaskSpec):
        super().__init__()
        self.check_spec(cfg, spec)
        layers: list[nn.Module] = [nn.Flatten()]
        width = math.prod(spec["input_shape"])
        for h in cfg.hidden:
            layers += [nn.Linear(width, h), nn.ReLU()]
            width = h
        self.body = nn.Sequential(*layers)
        self.embed_dim = width
        self.head = nn.Linear(width, spec["output_dim"])
