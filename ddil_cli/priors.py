"""DDIL sampling priors (docs/distill.md): where each student training input comes from.

A prior is a weight per source, non-negative and summing to 1:
    data     forward diffusion of real data at a student timestep
    student  states on the student's own (mixed) backward trajectories
    teacher  states on the teacher's backward trajectories
Written `data=0.3,student=0.5,teacher=0.2` (a source left out has weight 0). A schedule changes
the prior over training: `0:data=0.5,student=0.5;0.6:data=0.3,student=0.7` starts each phase at
a fraction of the updates (a number with a decimal point, in [0, 1)) or at an update count (an
integer); the first phase must start at 0.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ddil_cli.buffer.sources import SOURCES
from ddil_cli.errors import UserError

_SUM_TOLERANCE = 1e-6
EXAMPLE = "data=0.3,student=0.5,teacher=0.2"


def parse_prior(text: str, *, flag: str = "--prior") -> dict[str, float]:
    """'data=0.3,student=0.5,teacher=0.2' -> {'data': 0.3, 'student': 0.5, 'teacher': 0.2}."""
    prior = {name: 0.0 for name in SOURCES}
    seen = set()
    for part in filter(None, (p.strip() for p in str(text).split(","))):
        name, eq, value = part.partition("=")
        name = name.strip()
        if not eq or name not in SOURCES:
            raise UserError(f"bad {flag} entry {part!r}; write SOURCE=WEIGHT with SOURCE in "
                            f"{', '.join(SOURCES)}, e.g. {EXAMPLE}")
        if name in seen:
            raise UserError(f"{flag} names {name!r} twice; give each source once, e.g. {EXAMPLE}")
        seen.add(name)
        try:
            weight = float(value)
        except ValueError:
            weight = math.nan
        if not math.isfinite(weight) or weight < 0:
            raise UserError(f"{flag} weight {name}={value.strip()} must be a non-negative number")
        prior[name] = weight
    return validate_prior(prior, flag=flag)


def validate_prior(prior: dict[str, float], *, flag: str = "--prior") -> dict[str, float]:
    unknown = set(prior) - set(SOURCES)
    if unknown:
        raise UserError(f"{flag} has unknown source(s) {', '.join(sorted(unknown))}; use {', '.join(SOURCES)}")
    if any(not math.isfinite(w) or w < 0 for w in prior.values()):
        raise UserError(f"{flag} weights must be non-negative numbers, got {format_prior(prior)}")
    total = sum(prior.values())
    if abs(total - 1.0) > _SUM_TOLERANCE:
        raise UserError(f"{flag} weights sum to {total:g}, not 1; rescale them, e.g. {EXAMPLE}")
    return {name: float(prior.get(name, 0.0)) for name in SOURCES}


def format_prior(prior: dict[str, float]) -> str:
    return ",".join(f"{name}={prior[name]:g}" for name in SOURCES if name in prior)


def require_sources(prior: dict[str, float], available: dict[str, str | None], *, flag: str = "--prior") -> None:
    """A source with weight > 0 needs its input. `available` maps a source to None when it is
    present, or to the fix that would provide it (e.g. 'pass --student DIR')."""
    for name in SOURCES:
        fix = available.get(name)
        if prior.get(name, 0.0) > 0 and fix is not None:
            raise UserError(f"{flag} gives {name}={prior[name]:g} but there is no {name} source; {fix}, "
                            f"or set {name}=0")


@dataclass(frozen=True)
class PhaseSchedule:
    """A value that changes over training: phase i applies from its start to the next phase's.
    Written `START:VALUE;START:VALUE` (a lone VALUE is one phase from 0)."""

    starts: tuple[float | int, ...]  # float: fraction of all updates; int: an update count
    values: tuple

    @classmethod
    def parse(cls, text: str, parse_value, *, flag: str, example: str):
        starts, values = [], []
        for phase in filter(None, (p.strip() for p in str(text).split(";"))):
            start_text, colon, value_text = phase.partition(":")
            if not colon:
                start_text, value_text = "0", phase
            starts.append(_parse_start(start_text.strip(), flag))
            values.append(parse_value(value_text))
        if not starts:
            raise UserError(f"{flag} is empty; write START:VALUE;START:VALUE, e.g. {example}")
        if starts[0] != 0:
            raise UserError(f"{flag} must start its first phase at 0, not {starts[0]}")
        for a, b in zip(starts, starts[1:]):  # a fraction and an update count compare only at run time
            if (a == 0 or type(a) is type(b)) and not b > a:
                raise UserError(f"{flag} phases must start in increasing order, but {b} follows {a}; "
                                f"sort them, e.g. {example}")
        return cls(tuple(starts), tuple(values))

    def start_update(self, index: int, total_updates: int | None) -> int:
        start = self.starts[index]
        if isinstance(start, int):
            return start
        if total_updates is None:
            raise ValueError("a schedule with fractional starts needs total_updates")
        return int(round(start * total_updates))

    def index_at(self, update: int, total_updates: int | None = None) -> int:
        """The phase in force at `update` (0-based): the last one whose start it has reached."""
        return max(i for i in range(len(self.starts)) if i == 0 or update >= self.start_update(i, total_updates))

    def at(self, update: int, total_updates: int | None = None):
        """The value in force at `update` (0-based)."""
        return self.values[self.index_at(update, total_updates)]


@dataclass(frozen=True)
class PriorSchedule(PhaseSchedule):
    """Priors over training, e.g. `0:data=0.5,student=0.5;0.6:data=0.3,student=0.7`."""

    @classmethod
    def parse(cls, text: str, *, flag: str = "--prior-schedule") -> "PriorSchedule":
        return super().parse(text, lambda value: parse_prior(value, flag=flag), flag=flag,
                             example="0:data=0.5,student=0.5")

    @property
    def priors(self) -> tuple[dict[str, float], ...]:
        return self.values

    def at(self, update: int, total_updates: int | None = None) -> dict[str, float]:
        return dict(super().at(update, total_updates))

    def draws_later(self, source: str, update: int, total_updates: int | None = None) -> bool:
        """True when the prior in force at `update`, or a later phase's, gives `source` weight."""
        return any(prior.get(source, 0.0) > 0 for prior in self.priors[self.index_at(update, total_updates):])

    def describe(self) -> list[dict]:
        return [{"start": s, "prior": dict(p)} for s, p in zip(self.starts, self.priors)]


def _parse_start(text: str, flag: str) -> float | int:
    try:
        if "." in text or "e" in text.lower():
            value = float(text)
            if not 0 <= value < 1:
                raise ValueError
            return value
        value = int(text)
        if value < 0:
            raise ValueError
        return value
    except ValueError:
        raise UserError(f"bad phase start {text!r} in {flag}; use a fraction in [0, 1) such as 0.6 "
                        f"or an update count such as 5000") from None
