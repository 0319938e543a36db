"""Config dataclasses: the one place each setting's default and rule are written, and the registries
that turn a config group's dict into a checked dataclass (and give Hydra each group's defaults).

A setting is declared once, on its component's dataclass, with its rule::

    inner_lr: float = positive(0.01)        # a number > 0
    inner_steps: int = count(1, minimum=0)  # a whole number >= 0
    learned_lr: str = choice("none", LEARNED_LR)

Building the dataclass checks every field's type against its annotation and its rule, then the
class's own ``check`` (rules between fields): a word where a number belongs, a fraction where a count
belongs, zero or a negative number all get the same one-paragraph ConfigError naming the key.
"""
from __future__ import annotations

import logging
import math
import types
from collections.abc import Iterable
from dataclasses import MISSING, Field, dataclass, field, fields
from typing import Any, ClassVar, NamedTuple, TypeVar, Union, get_args, get_origin, get_type_hints

from hydra.core.config_store import ConfigStore

from metalstm.errors import ConfigError

log = logging.getLogger(__name__)
T = TypeVar("T")


# ------------------------------------------------------------------------------------------ rules


@dataclass(frozen=True)
class Rule:
    minimum: float | None = None
    exclusive: bool = False  # minimum itself is not allowed
    maximum: float | None = None
    choices: tuple[Any, ...] | None = None  # for a list: of each element


def setting(default: Any = MISSING, *, factory: Any = MISSING, **rule: Any) -> Any:
    """A dataclass field with a rule (``minimum``, ``exclusive``, ``maximum``, ``choices``)."""
    return field(default=default, default_factory=factory, metadata={"rule": Rule(**rule)})


def positive(default: Any = MISSING) -> Any:
    """A number > 0 (step sizes, scales)."""
    return setting(default, minimum=0, exclusive=True)


def count(default: Any = MISSING, minimum: int = 1) -> Any:
    """A whole number >= ``minimum`` (sizes, steps; seeds with minimum 0)."""
    return setting(default, minimum=minimum)


def fraction(default: Any = MISSING, exclusive: bool = False) -> Any:
    """A number in [0, 1] ((0, 1] with ``exclusive``)."""
    return setting(default, minimum=0, maximum=1, exclusive=exclusive)


def choice(default: Any, options: Iterable[Any]) -> Any:
    return setting(default, choices=tuple(options))


def rule_of(f: Field) -> Rule:
    return f.metadata.get("rule", Rule())


class Unfit(Exception):
    pass


def _optional(hint: Any) -> tuple[Any, bool]:
    if get_origin(hint) in (Union, types.UnionType):
        args = [a for a in get_args(hint) if a is not type(None)]
        return (args[0] if len(args) == 1 else Union[tuple(args)]), len(args) < len(get_args(hint))
    return hint, False


def number(value: float) -> str:
    return str(value) if isinstance(value, int) else f"{value:g}"


def describe(hint: Any, rule: Rule, plural: bool = False) -> str:
    """What a value of ``hint`` under ``rule`` must be, in words."""
    hint, optional = _optional(hint)
    origin = get_origin(hint)
    s = "s" if plural else ""
    if origin in (list, tuple):
        args = get_args(hint)
        n = f"{len(args)} " if origin is tuple and Ellipsis not in args else ""
        element = Rule(choices=rule.choices) if rule.choices else rule
        text = f"a list of {n}{describe(args[0], element, plural=True)}"
    elif rule.choices is not None:
        text = f"{'values' if plural else 'one'} of {list(rule.choices)}"
    elif hint is bool:
        text = "true or false"
    elif hint in (int, float):
        noun = {int: "whole number", float: "number"}[hint] + s
        if rule.minimum is not None and rule.maximum is not None:
            low = "(" if rule.exclusive else "["
            text = f"{noun} in {low}{number(rule.minimum)}, {number(rule.maximum)}]"
            text = text if plural else f"a {text}"
        elif rule.minimum == 0 and rule.exclusive:
            text = f"positive ({'numbers' if plural else 'a number'} > 0)"
        elif rule.minimum is not None:
            text = f"{'' if plural else 'a '}{noun} {'>' if rule.exclusive else '>='} {number(rule.minimum)}"
        else:
            text = f"{'' if plural else 'a '}{noun}"
    elif hint is str:
        text = "text" if not plural else "texts"
    else:
        text = f"a {getattr(hint, '__name__', hint)}"
    return f"{text} or null" if optional else text


def conform(value: Any, hint: Any, rule: Rule) -> Any:
    """``value`` as ``hint`` (an int is a float, a list a tuple), or Unfit if it is not one or breaks ``rule``."""
    hint, optional = _optional(hint)
    if value is None:
        if optional:
            return None
        raise Unfit
    origin = get_origin(hint)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise Unfit
        args = get_args(hint)
        if origin is tuple and Ellipsis not in args:
            if len(value) != len(args):
                raise Unfit
            return tuple(conform(v, a, Rule()) for v, a in zip(value, args))
        element = Rule(choices=rule.choices) if rule.choices else rule
        items = [conform(v, args[0], element) for v in value]
        return tuple(items) if origin is tuple else items
    if rule.choices is not None:
        if value not in rule.choices or isinstance(value, bool) != isinstance(rule.choices[0], bool):
            raise Unfit
        return value
    if hint is bool:
        if not isinstance(value, bool):
            raise Unfit
        return value
    if hint in (int, float):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or (hint is int and not isinstance(value, int)):
            raise Unfit
        value = float(value) if hint is float else value
        if not math.isfinite(value):
            raise Unfit
        low, high = rule.minimum, rule.maximum
        if low is not None and (value < low or (rule.exclusive and value == low)):
            raise Unfit
        if high is not None and value > high:
            raise Unfit
        return value
    if hint is str:
        if not isinstance(value, str):
            raise Unfit
        return value
    return value


def shown(value: Any) -> str:
    """A value as it would be written on the command line."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(shown(v) for v in value) + "]"
    return repr(value) if isinstance(value, str) else str(value)


@dataclass
class Config:
    """Base of every component's config: checks each field against its annotation and rule, then
    ``check`` (rules between fields). ``group`` names the config group in messages."""

    group: ClassVar[str] = ""

    def __post_init__(self) -> None:
        hints = get_type_hints(type(self))
        for f in fields(self):
            value = getattr(self, f.name)
            try:
                setattr(self, f.name, conform(value, hints[f.name], rule_of(f)))
            except Unfit:
                default = default_of(f)
                example = f" (default {shown(default)})" if default is not None and default is not MISSING else ""
                self.refuse(f"{self.key(f.name)}={shown(value)} must be {describe(hints[f.name], rule_of(f))}{example}. "
                            f"Correct it on the command line or in the experiment.")
        self.check()

    def check(self) -> None:
        """Rules between fields; raise with ``refuse``."""

    def key(self, name: str) -> str:
        return f"{self.group}.{name}" if self.group else name

    def refuse(self, message: str) -> None:
        raise ConfigError(message)

    def check_three_shares(self, name: str) -> None:
        """Field ``name`` (positive shares, by its rule) holds exactly three: train, validation, test."""
        if len(getattr(self, name)) != 3:
            self.refuse(f"{self.key(name)}={list(getattr(self, name))} must be three positive shares (train, val, test).")


STORED: list[tuple[str, str, dict[str, Any]]] = []  # every (group, option, defaults) given to Hydra, for the cache


def store(group: str, name: str, node: dict[str, Any]) -> None:
    """Give Hydra the option ``<group>/<name>`` (its settings' defaults), and remember it for the start-up cache."""
    ConfigStore.instance().store(group=group, name=name, node=node)
    STORED.append((group, name, node))


def default_of(f: Field) -> Any:
    return f.default_factory() if f.default_factory is not MISSING else f.default


def defaults_of(config_class: type) -> dict[str, Any]:
    """The dataclass's defaults as plain data (tuples as lists), as Hydra composes them; a setting without a
    default (data.root of your own images) is null."""

    def plain(value: Any) -> Any:
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        return None if value is MISSING else value

    return {f.name: plain(default_of(f)) for f in fields(config_class)}


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
    return config_class(**{k: v for k, v in values.items() if k in known})


# ------------------------------------------------------------------------------------------ registries


class Entry(NamedTuple):
    config: type  # the config dataclass
    impl: Any  # the class (or builder) it configures


class Component(NamedTuple):
    """A config group's choice after parsing: its name, checked config and implementation."""

    name: str
    config: Any
    impl: Any


class Registry(dict[str, Entry]):
    """The choices of one config group (name -> Entry). ``register`` also gives Hydra the choice's
    defaults, generated from the dataclass, as ``<group>/<name>``: ``meta_learner=maml`` composes them,
    and a YAML variant can start from them (``defaults: [maml]``)."""

    def __init__(self, group: str, noun: str):
        super().__init__()
        self.group, self.noun = group, noun

    def register(self, name: str, config_class: type, impl: Any) -> None:
        self[name] = Entry(config_class, impl)
        store(self.group, name, {"name": name, **defaults_of(config_class)})

    def parse(self, values: dict[str, Any]) -> Component:
        """The group's dict (``name`` and settings) -> its Component; an unknown name or key is a ConfigError."""
        rest = dict(values)
        name = rest.pop("name", None)
        if name not in self:
            raise ConfigError(f"{self.group}.name={name!r} is not a known {self.noun}; choose one of {sorted(self)}.")
        config_class, impl = self[name]
        config = from_dict(config_class, rest, self.group, siblings=(c for c, _ in self.values() if c is not config_class))
        return Component(name, config, impl)
