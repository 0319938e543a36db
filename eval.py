"""Evaluate a trained run on its fixed test tasks: ``python eval.py run_dir=outputs/<date>/<time>``."""
from metalstm.startup import stop_quietly_on_ctrl_c

stop_quietly_on_ctrl_c()  # before the slow imports

import hydra  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from metalstm.cli import launch, run_cli  # noqa: E402


@hydra.main(version_base="1.3", config_path="configs", config_name="eval")
def main(cfg: DictConfig) -> None:
    run_cli("metalstm.jobs:evaluate", cfg)


if __name__ == "__main__":
    launch(main)
