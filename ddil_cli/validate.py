"""Checking every option a command takes, flags and config-file values alike, before it runs.

Types come from the command's config dataclass (int, float, str, bool, list[str], optional);
ranges and choices from a small table of `Rule`s next to each command (cli/*.py). Numbers must
be finite: `nan` and `inf` parse as floats but are never a sensible setting. Every problem is a
`UserError` naming the flag (or the config key and file) and what would be accepted, raised
before anything is written.
"""

from __future__ import annotations

import math
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ddil_cli.errors import UserError

SEED_MAX = 2**31 - 1


@dataclass(frozen=True)
class Rule:
    """What a value must satisfy beyond its type. `low`/`high` are inclusive bounds, `above`/`below`
    exclusive ones; `choices` the only accepted values; `flag` the option's name when it is not
    --field-name; `hint` a fix appended to the message; `comma_list`: a text option holding a
    comma-separated list may be given as a list in a config file (betas = [0.5, 0])."""

    low: float | None = None
    high: float | None = None
    above: float | None = None
    below: float | None = None
    choices: tuple | None = None
    flag: str | None = None
    hint: str = ""
    comma_list: bool = False

    def describe(self) -> str:
        if self.choices is not None:
            return "one of " + ", ".join(str(c) for c in self.choices)
        low, high, above, below = (_shown(v) for v in (self.low, self.high, self.above, self.below))
        if low is not None and (high is not None or below is not None):
            return f"in [{low}, {high}]" if high is not None else f"in [{low}, {below})"
        lower = f">= {low}" if low is not None else f"> {above}" if above is not None else None
        upper = f"<= {high}" if high is not None else f"< {below}" if below is not None else None
        return " and ".join(p for p in (lower, upper) if p)

    def admits(self, value) -> bool:
        if self.choices is not None:
            return value in self.choices
        return not ((self.low is not None and value < self.low) or (self.high is not None and value > self.high)
                    or (self.above is not None and value <= self.above)
                    or (self.below is not None and value >= self.below))


def _shown(bound: float | None) -> str | None:
    """A bound as the user would type it: whole numbers in full (2147483647, not 2.14748e+09)."""
    if bound is None:
        return None
    return str(int(bound)) if float(bound).is_integer() and abs(bound) <= 2**53 else f"{bound:g}"


# common rules, shared by several commands
COUNT_MAX = 10**12  # counts beyond it are typos (and 20-digit ones overflow the int64s torch and numpy take)
POSITIVE = Rule(low=1, high=COUNT_MAX)
NON_NEGATIVE = Rule(low=0, high=COUNT_MAX)
PROBABILITY = Rule(low=0, high=1)
SEED = Rule(low=0, high=SEED_MAX)
BATCH = Rule(low=1, high=65536)
FROZEN_DTYPE = Rule(choices=("auto", "fp32", "bf16", "fp16"))
STEPS = Rule(low=1, high=1000)  # a diffusion grid has at most 1000 timesteps
GUIDANCE = Rule(low=0, high=100)


def _where(name: str, rule: Rule | None, from_file: dict[str, Any]) -> str:
    if name in from_file:
        return f"{name} in config file {from_file[name]}"
    return (rule.flag if rule is not None and rule.flag else "--" + name.replace("_", "-"))


def _split_optional(annotation) -> tuple[Any, bool]:
    """(the type inside Optional, whether None is allowed)."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        optional = len(args) < len(typing.get_args(annotation))
        return (args[0] if len(args) == 1 else annotation), optional
    return annotation, False


def _typed(value, annotation, where: str):
    """`value` checked (and, for harmless cases, converted) to `annotation`; UserError otherwise."""
    kind, optional = _split_optional(annotation)
    if value is None:
        if optional:
            return None
        raise UserError(f"{where} needs a value")
    if kind is bool:
        if not isinstance(value, bool):
            raise UserError(f"{where} must be true or false, got {value!r}")
        return value
    if kind is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise UserError(f"{where} must be a whole number, got {value!r}")
        return value
    if kind is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise UserError(f"{where} must be a number, got {value!r}")
        value = float(value)
        if not math.isfinite(value):
            raise UserError(f"{where} must be a finite number, got {value}")
        return value
    if kind is str:
        if isinstance(value, Path):
            return str(value)
        if not isinstance(value, str):
            raise UserError(f"{where} must be text, got {value!r}")
        return value
    if kind is dict or typing.get_origin(kind) is dict:
        if not isinstance(value, dict):
            raise UserError(f"{where} must be a table of settings (e.g. [options] in TOML), got {value!r}")
        return value
    if typing.get_origin(kind) is list and typing.get_args(kind) == (str,):
        if isinstance(value, str):
            return [value]
        if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
            raise UserError(f"{where} must be a list of text, got {value!r}")
        return list(value)
    return value  # a type without a rule here (e.g. a tuple parsed by the command itself)


def check_values(cls, values: dict[str, Any], rules: dict[str, Rule], *,
                 from_file: dict[str, Any] | None = None) -> dict[str, Any]:
    """Every value of `values` (field name -> value for dataclass `cls`) checked against its
    field's type and its rule; returns the values, numbers normalised (an int for a float field
    becomes a float). Raises UserError naming the first bad one."""
    from_file = from_file or {}
    hints = typing.get_type_hints(cls)
    unknown_rules = set(rules) - set(hints)
    if unknown_rules:  # a typo in a rule table is a bug, not a user error
        raise KeyError(f"rules for fields {cls.__name__} lacks: {sorted(unknown_rules)}")
    checked = {}
    for name, value in values.items():
        rule = rules.get(name)
        where = _where(name, rule, from_file)
        if rule is not None and rule.comma_list and isinstance(value, (list, tuple)):
            if not all(isinstance(v, (str, int, float)) and not isinstance(v, bool) for v in value):
                raise UserError(f"{where} must be a list of numbers or text, got {value!r}")
            value = ",".join(str(v) for v in value)
        value = _typed(value, hints.get(name, Any), where)
        if rule is not None and value is not None:
            if isinstance(value, list):
                bad = [v for v in value if not rule.admits(v)]
                if bad:
                    raise UserError(f"{where} must hold only {rule.describe()}, got {bad[0]!r}{rule.hint}")
            elif not rule.admits(value):
                shown = repr(value) if isinstance(value, str) else f"{value:g}" if isinstance(value, float) else value
                raise UserError(f"{where} must be {rule.describe()}, got {shown}{rule.hint}")
        checked[name] = value
    return checked


__all__ = ["BATCH", "GUIDANCE", "NON_NEGATIVE", "POSITIVE", "PROBABILITY", "Rule", "SEED", "STEPS", "check_values"]
