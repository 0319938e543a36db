"""Classify new images with a trained run: ``python predict.py run_dir=... support=DIR query=DIR``."""
from metalstm.startup import stop_quietly_on_ctrl_c

stop_quietly_on_ctrl_c()  # before the slow imports

import hydra  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from metalstm.cli import launch, run_cli  # noqa: E402


@hydra.main(version_base="1.3", config_path="configs", config_name="predict")
def main(cfg: DictConfig) -> None:
    run_cli("metalstm.inference:predict_cli", cfg)


if __name__ == "__main__":
    launch(main)
