"""Classify new images with a trained run: ``python predict.py run_dir=... support=DIR query=DIR``."""
import hydra
from omegaconf import DictConfig

from metalstm.cli import launch, run_cli


@hydra.main(version_base="1.3", config_path="configs", config_name="predict")
def main(cfg: DictConfig) -> None:
    run_cli("metalstm.inference:predict_cli", cfg)


if __name__ == "__main__":
    launch(main)
