"""Turning config-group dicts into the dataclasses that sit beside each component."""
from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import fields
from pathlib import Path
from typing import Any, TypeVar

from omegaconf import OmegaConf

from metalstm.errors import ConfigError

log = logging.getLogger(__name__)
T = TypeVar("T")


def choose(registry: dict[str, tuple[type, Any]], cfg: dict[str, Any], group: str, noun: str) -> tuple[str, tuple[type, Any], dict[str, Any]]:
    """Look up ``cfg["name"]`` in a registry: the name, its (config class, implementation) and the other keys."""
    rest = dict(cfg)
    name = rest.pop("name", None)
    if name not in registry:
        raise ConfigError(f"{group}.name={name!r} is not a known {noun}; choose one of {sorted(registry)}.")
    return name, registry[name], rest


def from_dict(config_class: type[T], values: dict[str, Any], group: str, siblings: Iterable[type] = (),
              warn: bool = True) -> T:
    """Build ``config_class`` from ``values``.

    A key of a sibling config (another algorithm of the same group) is dropped with a warning, so
    ``+experiment=omniglot_5way meta_learner=protonet`` keeps what applies; any other unknown key is a
    ConfigError naming it (a typo).
    """
    known = {f.name for f in fields(config_class)}
    sibling_keys = {f.name for s in siblings for f in fields(s)} - known
    dropped = sorted(set(values) & sibling_keys)
    if dropped and warn:
        log.warning("%s: %s do(es) not apply to %s; ignored", group, ", ".join(dropped), config_class.__name__)
    unknown = sorted(set(values) - known - sibling_keys)
    if unknown:
        raise ConfigError(
            f"{group}.{unknown[0]} is not a setting of {config_class.__name__}; "
            f"known keys: {', '.join(sorted(known))}. Check the spelling of the override."
        )
    converted = {k: tuple(v) if isinstance(v, list) and isinstance(getattr(config_class, k, None), tuple) else v
                 for k, v in values.items() if k in known}
    return config_class(**converted)


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


def hydra_subdir(run_dir: str, stamp: str) -> str:
    """Where Hydra writes its config files: ``.hydra``, or ``.hydra/<stamp>`` when the run folder has them already
    (a resumed run, or a folder named by hand): the first ones are never written over."""
    return f".hydra/{stamp}" if (Path(run_dir) / ".hydra" / "config.yaml").is_file() else ".hydra"


# train.yaml: a resumed run writes into its own folder, its Hydra files beside the first ones
OmegaConf.register_new_resolver(
    "metalstm.run_dir", lambda resume, fresh: str(resumable_run(resume) or fresh), replace=True)
OmegaConf.register_new_resolver("metalstm.hydra_subdir", hydra_subdir, replace=True)


def sqlite_url(path: str) -> str:
    """``sqlite:///<absolute path>`` for a study file, its folder created (SQLite creates no folders)."""
    file = Path(path).expanduser().resolve()
    file.parent.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{file}"


OmegaConf.register_new_resolver("metalstm.sqlite", sqlite_url, replace=True)
