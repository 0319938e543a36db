"""``train.py resume=<run>``: which checkpoint continues which run, with which config; and never writing
a new run over an old one."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from metalstm.errors import CheckpointError, ConfigError

RESUMABLE = ("trainer.", "data.root", "data.cache_dir")  # what a resumed run may change


def resume_target(resume: Any) -> tuple[Path, Path] | None:
    """(run folder, checkpoint) that ``resume=`` names: a run folder with ``checkpoints/last.ckpt``, or a
    checkpoint file in a run's ``checkpoints/``; None if it names neither."""
    if not resume:
        return None
    path = Path(str(resume)).expanduser()
    if path.is_file():
        return (path.parent.parent, path) if path.parent.name == "checkpoints" else None
    last = path / "checkpoints" / "last.ckpt"
    return (path, last) if last.is_file() else None


def resumable_run(resume: Any) -> Path | None:
    target = resume_target(resume)
    return target[0] if target else None


def refuse_existing_run(output_dir: Path) -> None:
    """A new run never writes over another one's checkpoints and results."""
    earlier = [p for p in (output_dir / "results.json", *sorted(output_dir.glob("checkpoints/*.ckpt"))) if p.exists()]
    if earlier:
        raise ConfigError(
            f"{output_dir} holds a run already ({', '.join(str(p.relative_to(output_dir)) for p in earlier[:3])}); a "
            f"new run never writes over one. Continue it with resume={output_dir}, or leave hydra.run.dir unset so "
            f"train.py makes a new folder."
        )


def resumed_config(cfg: DictConfig, overrides: list[str] | None = None) -> tuple[dict, Path, int]:
    """``resume=<run folder or checkpoint>``: the run's own config (from its checkpoint), the checkpoint and
    its step. Command-line overrides may change only the keys in RESUMABLE (e.g. a larger trainer.max_steps)."""
    target = resume_target(cfg.resume)
    if target is None:
        given = Path(str(cfg.resume)).expanduser()
        if (given / "checkpoints").is_dir():
            raise CheckpointError(
                f"{given} has no checkpoints/last.ckpt to resume from: the run stopped before its first checkpoint "
                f"(written every callbacks.last_checkpoint.every_n_steps steps). Start it again instead."
            )
        raise CheckpointError(
            f"resume={cfg.resume} is not a run folder (one with checkpoints/last.ckpt, e.g. outputs/<date>/<time>) "
            f"or a checkpoint in a run's checkpoints/ folder. Check the path; train.py prints the run folder when it ends."
        )
    from metalstm.checkpointing import load_checkpoint, upgrades_rule_weights  # torch: only once a run is resumed

    _, path = target
    checkpoint = load_checkpoint(path)
    if upgrades_rule_weights(checkpoint):
        raise CheckpointError(
            f"{path} is an LSTM-optimizer checkpoint of an older metalstm (format 1): eval.py and load_learner read "
            f"its weights, but its optimizer state does not fit today's parameter order, so training cannot resume "
            f"from it. Start a new run."
        )
    config = checkpoint["metalstm"]["config"]
    old_dir, new_dir = config["paths"]["output_dir"], str(Path(cfg.paths.output_dir))
    config = relocate(config, old_dir, new_dir)  # the folder may have moved since
    if overrides is None:  # the command line's
        overrides = list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []
    for override in overrides:
        key = override.split("=", 1)[0].lstrip("+~")
        if key == "resume":
            continue
        if not key.startswith(RESUMABLE):
            raise ConfigError(
                f"resume= continues a run with the config stored in its checkpoint, so {override!r} cannot apply; "
                f"only {', '.join(k + ('*' if k.endswith('.') else '') for k in RESUMABLE)} may change (e.g. "
                f"trainer.max_steps=20000). To change anything else, start a new run."
            )
        parent, _, leaf = key.rpartition(".")
        node = config
        for part in parent.split("."):
            node = node.setdefault(part, {})
        value = OmegaConf.select(cfg, key)
        node[leaf] = OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value
    return config, path, int(checkpoint["global_step"])


def relocate(value: Any, old: str, new: str) -> Any:
    """``value`` with every string path under ``old`` moved under ``new``."""
    if isinstance(value, dict):
        return {k: relocate(v, old, new) for k, v in value.items()}
    if isinstance(value, list):
        return [relocate(v, old, new) for v in value]
    if isinstance(value, str) and (value == old or value.startswith(old + os.sep)):
        return new + value[len(old):]
    return value
