"""Prototypical Networks (Snell et al. 2017).

Each class's prototype is the mean embedding of its support examples,
    c_k = mean_{i: y_i = k} f(x_i),
and a query is classified by a softmax over negative squared Euclidean distances, -||f(x) - c_k||^2.
Adaptation needs no gradient: the support set only places the prototypes.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from metalstm.core import EpisodeBatch
from metalstm.meta.base import MetaConfig, MetaLearner, MetaOutput


@dataclass
class ProtoNetConfig(MetaConfig):
    """No settings: the base learner's embedding and the support set define the classifier."""


class ProtoNet(MetaLearner):
    task_types = ("classification",)
    any_ways = True  # one prototype per class of the task: Snell et al. meta-train 60-way and test 5- and 20-way
    running_norm = True

    def __init__(self, learner, loss_fn, spec, cfg: ProtoNetConfig):
        super().__init__(learner, loss_fn)

    def logits(self, support_x: Tensor, support_y: Tensor, query_x: Tensor, ways: int) -> Tensor:
        """One task: support [n_s, ...], labels [n_s] in 0..ways-1, query [n_q, ...] -> logits [n_q, ways]."""
        # support and query go through the network as one batch, as in the paper's code
        z = self.learner.embed_with(self.learner.params(), torch.cat([support_x, query_x]))
        z_support, z_query = z[: len(support_x)], z[len(support_x) :]
        one_hot = F.one_hot(support_y, ways).to(z.dtype)  # [n_s, ways]
        prototypes = (one_hot.T @ z_support) / one_hot.sum(0).clamp(min=1).unsqueeze(1)
        return -torch.cdist(z_query, prototypes).pow(2)

    def all_logits(self, batch: EpisodeBatch) -> Tensor:
        ways = int(batch.support_y.max()) + 1  # the tasks' own class count (labels are 0..ways-1 in every task)
        return torch.stack([self.logits(sx, sy, qx, ways) for sx, sy, qx, _ in zip(*batch)])

    def meta_loss(self, batch: EpisodeBatch) -> MetaOutput:
        outputs = self.all_logits(batch)
        loss = F.cross_entropy(outputs.flatten(0, 1), batch.query_y.flatten())
        return MetaOutput(loss, outputs.detach())

    def predict(self, batch: EpisodeBatch) -> Tensor:
        with torch.no_grad():
            return self.all_logits(batch)
