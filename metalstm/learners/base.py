"""The functional interface every base learner offers to every meta-learner."""
from __future__ import annotations

from torch import Tensor, nn
from torch.func import functional_call

Params = dict[str, Tensor]


class BaseLearner(nn.Module):
    """A network whose parameters live in a dict and whose forward runs on any such dict.

    Meta-learners read the meta-learned initialisation with ``params()`` and run adapted
    copies with ``forward_with(params, x)``; nothing in a meta-learner depends on the layers.
    BatchNorm layers keep no running statistics: each forward normalises with the statistics
    of its own batch (``bn_policy`` below), so adapted copies never share hidden state.
    """

    bn_policy = "none"  # "transductive": each forward's own batch statistics, at train and test alike

    def params(self) -> Params:
        """The meta-learned parameters (leaves), keyed by name."""
        return dict(self.named_parameters())

    def forward_with(self, params: Params, x: Tensor) -> Tensor:
        return functional_call(self, params, (x,))
