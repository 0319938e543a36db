"""A temporal convolutional network for sequences: ``blocks`` x [conv1d(kernel) -> BatchNorm -> ReLU -> max-pool 2]
over the steps (a length of 1 stays 1), then the mean over the observed steps and a linear head: the fully
convolutional time-series classifier of Wang et al. (2017) in Conv-4's block structure.

Inputs as the LSTM encoder reads them (``SequenceInput``): tokens x [n, L] are embedded, real-valued steps x [n, L, d]
projected, to [n, L, input_dim]. Padded steps are zeroed before every convolution (as its own "same" padding is) and
left out of the mean, so without BatchNorm a sequence's features do not depend on how much padding follows it; with
it, the batch statistics count the padded steps too.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F
from torch import Tensor, nn

from metalstm.config import choice, count
from metalstm.learners.base import BaseLearner, BatchNorm, LearnerConfig, TaskSpec
from metalstm.learners.lstm import SequenceInput


@dataclass
class Conv1DConfig(LearnerConfig):
    """``blocks`` x [conv1d -> BatchNorm -> ReLU -> max-pool 2] over the steps; features: the mean over observed steps.
    ``norm=batch`` normalises every forward with its own batch (transductive, as Conv-4's default)."""

    filters: int = count(64)
    blocks: int = count(4)
    kernel: int = count(5)  # steps each convolution sees; zero-padded to keep the length ("same")
    input_dim: int = count(32)  # token embedding size, or the projection of real-valued steps
    norm: str = choice("batch", ("batch", "none"))


class Conv1D(BaseLearner):
    """x [n, L(, d)] -> outputs [n, output_dim]; the embedding is the mean of the last block over observed steps
    [n, filters]."""

    @classmethod
    def refusal(cls, cfg: Conv1DConfig, spec: TaskSpec) -> str | None:
        return SequenceInput.one_output_refusal(spec, "conv1d")

    def __init__(self, cfg: Conv1DConfig, spec: TaskSpec):
        super().__init__()
        self.check_spec(cfg, spec)
        self.input = SequenceInput(spec, cfg.input_dim)
        self.bn_policy = "transductive" if cfg.norm == "batch" else "none"
        blocks, channels = [], cfg.input_dim
        for _ in range(cfg.blocks):
            layers = [nn.Conv1d(channels, cfg.filters, cfg.kernel, padding="same")]
            if cfg.norm == "batch":
                layers.append(BatchNorm(cfg.filters))
            blocks.append(nn.Sequential(*layers))
            channels = cfg.filters
        self.body = nn.ModuleList(blocks)
        self.embed_dim = channels
        self.head = nn.Linear(channels, spec["output_dim"])

    def forward(self, x: Tensor, embed: bool = False, targets: Tensor | None = None) -> Tensor:
        h, mask = self.input(x)
        h = h.transpose(1, 2)  # [n, input_dim, L]
        observed = h.new_ones(h.shape[0], 1, h.shape[2]) if mask is None else mask[:, None].to(h.dtype)  # [n, 1, L]
        for block in self.body:
            # ceil_mode: an odd last step is pooled alone, and a length of 1 stays 1 (short sequences, many blocks)
            h = F.max_pool1d(F.relu(block(h * observed)), 2, ceil_mode=True)
            observed = F.max_pool1d(observed, 2, ceil_mode=True)  # observed if either of its two steps is
        features = (h * observed).sum(-1) / observed.sum(-1).clamp_min(1.0)
        return features if embed else self.head(features)
