"""Meta-train and meta-test: ``python train.py +experiment=omniglot_5way`` (see README)."""
import hydra
from omegaconf import DictConfig

from metalstm.cli import run_cli
from metalstm.jobs import train


@hydra.main(version_base="1.3", config_path="configs", config_name="train")
def main(cfg: DictConfig) -> float | None:
    return run_cli(train, cfg)


if __name__ == "__main__":
    main()
