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

    def logits(self, z_support: Tensor, support_y: Tensor, z_query: Tensor, ways: int) -> Tensor:
        """Embeddings of support [(T,) n_s, d] with labels [(T,) n_s] in 0..ways-1 and query [(T,) n_q, d] ->
        logits [(T,) n_q, ways]."""
        one_hot = F.one_hot(support_y, ways).to(z_support.dtype)  # [(T,) n_s, ways]
        prototypes = (one_hot.transpose(-1, -2) @ z_support) / one_hot.sum(-2).clamp(min=1).unsqueeze(-1)
        return -torch.cdist(z_query, prototypes).pow(2)

    def all_logits(self, batch: EpisodeBatch) -> Tensor:
        ways = int(batch.support_y.max()) + 1  # the tasks' own class count (labels are 0..ways-1 in every task)
        n_support, params = batch.support_x.shape[1], self.learner.params()
        x = torch.cat([batch.support_x, batch.query_x], 1)  # support and query as one batch, as in the paper's code
        if self.learner.bn_policy == "none":  # no batch statistics: the whole meta-batch through the network at once
            z = self.learner.embed_with(params, x.flatten(0, 1)).unflatten(0, x.shape[:2])
        else:  # BatchNorm normalises over one task's examples
            z = torch.stack([self.learner.embed_with(params, task) for task in x])
        return self.logits(z[:, :n_support], batch.support_y, z[:, n_support:], ways)

    def meta_loss(self, batch: EpisodeBatch) -> MetaOutput:
        outputs = self.all_logits(batch)
        loss = F.cross_entropy(outputs.flatten(0, 1), batch.query_y.flatten())
        return MetaOutput(loss, outputs.detach())

    def predict(self, batch: EpisodeBatch) -> Tensor:
        with torch.no_grad():
            return self.all_logits(batch)
