"""Turning config-group dicts into the dataclasses that sit beside each component."""
from __future__ import annotations

from dataclasses import fields
from typing import Any, TypeVar

from metalstm.errors import ConfigError

T = TypeVar("T")


def from_dict(config_class: type[T], values: dict[str, Any], group: str) -> T:
    """Build ``config_class`` from ``values``; an unknown key is a ConfigError naming it."""
    known = {f.name for f in fields(config_class)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(
            f"{group}.{unknown[0]} is not a setting of {config_class.__name__}; "
            f"known keys: {', '.join(sorted(known))}. Check the spelling of the override."
        )
    converted = {k: tuple(v) if isinstance(v, list) and isinstance(getattr(config_class, k, None), tuple) else v
                 for k, v in values.items()}
    return config_class(**converted)
