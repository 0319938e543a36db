"""Evaluate a trained run on its fixed test tasks: ``python eval.py run_dir=outputs/<date>/<time>``."""
import hydra
from omegaconf import DictConfig

from metalstm.cli import run_cli
from metalstm.jobs import evaluate


@hydra.main(version_base="1.3", config_path="configs", config_name="eval")
def main(cfg: DictConfig) -> None:
    run_cli(evaluate, cfg)


if __name__ == "__main__":
    main()
