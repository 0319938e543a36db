"""Evaluate a trained run on its fixed test tasks: ``python eval.py run_dir=outputs/<date>/<time>``."""
import hydra
from omegaconf import DictConfig

from metalstm.cli import launch, run_cli


@hydra.main(version_base="1.3", config_path="configs", config_name="eval")
def main(cfg: DictConfig) -> None:
    from metalstm.jobs import evaluate  # torch and Lightning load once the config has composed

    run_cli(evaluate, cfg)


if __name__ == "__main__":
    launch(main)
