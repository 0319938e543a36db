"""metalstm: few-shot meta-learning experiments from Hydra configs."""

__version__ = "0.1.0"
