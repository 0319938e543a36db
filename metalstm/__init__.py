"""metalstm: few-shot meta-learning experiments from Hydra configs."""
from __future__ import annotations

from typing import Any

__version__ = "0.1.0"
__all__ = ["load_learner"]


def __getattr__(name: str) -> Any:  # load_learner pulls in Lightning: import it only when asked for
    if name == "load_learner":
        from metalstm.inference import load_learner

        return load_learner
    raise AttributeError(f"module 'metalstm' has no attribute {name!r}")
