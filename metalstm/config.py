"""Turning config-group dicts into the dataclasses that sit beside each component."""
from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import fields
from typing import Any, TypeVar

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


def from_dict(config_class: type[T], values: dict[str, Any], group: str, siblings: Iterable[type] = ()) -> T:
    """Build ``config_class`` from ``values``.

    A key of a sibling config (another algorithm of the same group) is dropped with a warning, so
    ``+experiment=omniglot_5way meta_learner=protonet`` keeps what applies; any other unknown key is a
    ConfigError naming it (a typo).
    """
    known = {f.name for f in fields(config_class)}
    sibling_keys = {f.name for s in siblings for f in fields(s)} - known
    dropped = sorted(set(values) & sibling_keys)
    if dropped:
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
