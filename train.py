"""Meta-train and meta-test: ``python train.py +experiment=omniglot_5way`` (see README)."""
import hydra
from omegaconf import DictConfig

from metalstm.cli import launch, run_cli


@hydra.main(version_base="1.3", config_path="configs", config_name="train")
def main(cfg: DictConfig) -> float | None:
    return run_cli("metalstm.jobs:train", cfg)


if __name__ == "__main__":
    launch(main)
