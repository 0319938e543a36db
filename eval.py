"""Evaluate a trained run on its fixed test tasks: ``python eval.py run_dir=outputs/<date>/<time>``."""
import hydra
from omegaconf import DictConfig

from metalstm.cli import launch, run_cli


@hydra.main(version_base="1.3", config_path="configs", config_name="eval")
def main(cfg: DictConfig) -> None:
    run_cli("metalstm.jobs:evaluate", cfg)


if __name__ == "__main__":
    launch(main)
