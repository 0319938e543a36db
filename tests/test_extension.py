"""Adding a meta-learner from outside the package: a config dataclass, a MetaLearner subclass and one
register line, all in this file. It composes as ``meta_learner=<name>``, trains, and is covered by the same
registry loop as the built-in ones."""
from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from hydra.core.config_store import ConfigStore
from torch import Tensor

from metalstm.config import positive
from metalstm.core import EpisodeBatch
from metalstm.errors import ConfigError
from metalstm.meta import META_LEARNERS, MetaConfig, MetaLearner, MetaOutput
from test_meta_learners import compose_meta_name, group_options, tiny_config, trains_two_steps_or_is_refused


@dataclass
class ScaledHeadConfig(MetaConfig):
    scale: float = positive(2.0)  # the query outputs are the base learner's, times a meta-learned factor of this start


class ScaledHead(MetaLearner):
    """No adaptation at all: the base learner's outputs, scaled by a meta-learned factor (a toy)."""

    def __init__(self, learner, loss_fn, spec, cfg: ScaledHeadConfig):
        super().__init__(learner, loss_fn)
        self.scale = torch.nn.Parameter(torch.tensor(cfg.scale))

    def outputs(self, batch: EpisodeBatch) -> Tensor:
        return torch.stack([self.learner(x) * self.scale for x in batch.query_x])

    def meta_loss(self, batch: EpisodeBatch) -> MetaOutput:
        outputs = self.outputs(batch)
        loss = torch.stack([self.loss_fn(o, y) for o, y in zip(outputs, batch.query_y)]).mean()
        return MetaOutput(loss, outputs.detach())

    def predict(self, batch: EpisodeBatch) -> Tensor:
        with torch.no_grad():
            return self.outputs(batch)


@pytest.fixture
def registered():
    META_LEARNERS.register("scaled_head", ScaledHeadConfig, ScaledHead)
    yield "scaled_head"
    del META_LEARNERS["scaled_head"]  # leave the registry as other tests expect it
    ConfigStore.instance().repo["meta_learner"].pop("scaled_head.yaml")


def test_a_meta_learner_added_in_a_test_file_composes_trains_and_is_in_the_registry_loop(
        registered, tmp_path, omniglot_fixture, cache_dir):
    assert registered in group_options("meta_learner")  # what the registry loop parametrizes over
    assert compose_meta_name(registered) == registered
    config = tiny_config(registered, None, "mlp", "sinusoid", omniglot_fixture, cache_dir, tmp_path)
    assert config["meta_learner"] == {"name": "scaled_head", "scale": 2.0}  # the defaults, from the dataclass
    for data in ("sinusoid", "seq_tasks"):  # trains where it can; refused (mlp on tokens) where it cannot
        trains_two_steps_or_is_refused(registered, None, "mlp", data, tmp_path / data, omniglot_fixture, cache_dir)
    with pytest.raises(ConfigError, match=r"meta_learner.scale=-1.0 must be positive"):
        META_LEARNERS.parse({"name": registered, "scale": -1.0})
