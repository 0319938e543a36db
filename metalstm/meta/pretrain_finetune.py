"""The "pretrained, then fine-tuned" baseline.

Meta-training is ordinary training of one network on every task's query set (no inner loop: MAML
with zero inner steps); at test the network is fine-tuned on each support set by plain SGD, exactly
as MAML adapts. Against it, a meta-learner shows what learning to adapt adds.
"""
from __future__ import annotations

from dataclasses import dataclass

from metalstm.config import count, positive
from metalstm.meta.base import MetaConfig
from metalstm.meta.maml import MAML, MAMLConfig


@dataclass
class PretrainFinetuneConfig(MetaConfig):
    inner_lr: float = positive(0.01)  # fine-tuning step size at test
    test_inner_steps: int = count(10, minimum=0)


class PretrainFinetune(MAML):
    def __init__(self, learner, loss_fn, spec, cfg: PretrainFinetuneConfig):
        super().__init__(learner, loss_fn, spec,
                         MAMLConfig(inner_lr=cfg.inner_lr, inner_steps=0, test_inner_steps=cfg.test_inner_steps))
