"""Meta-train and meta-test: ``python train.py +experiment=omniglot_5way`` (see README)."""
from metalstm.startup import stop_quietly_on_ctrl_c

stop_quietly_on_ctrl_c()  # before the slow imports

import hydra  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from metalstm.cli import launch, run_cli  # noqa: E402


@hydra.main(version_base="1.3", config_path="configs", config_name="train")
def main(cfg: DictConfig) -> float | None:
    return run_cli("metalstm.jobs:train", cfg)


if __name__ == "__main__":
    launch(main)
