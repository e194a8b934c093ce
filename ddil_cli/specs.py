"""Parsers for the small option languages shared by several commands (--switch, --prompts)."""

from __future__ import annotations

from pathlib import Path

from ddil_cli.errors import UserError
from ddil_cli.rollout import SWITCH_KINDS


def parse_switch(text: str | None) -> tuple[str, int] | None:
    """'t2s:500' (teacher until t*, then student) or 's2t:500'."""
    if not text:
        return None
    kind, _, value = text.partition(":")
    try:
        t_star = int(value)
    except ValueError:
        t_star = -2
    if kind not in SWITCH_KINDS or not -1 <= t_star <= 999:
        raise UserError(f"bad --switch {text!r}; use t2s:T or s2t:T with T a timestep in [-1, 999], e.g. t2s:500")
    return kind, t_star


def read_prompts(prompt: list[str] | None, prompts_file: str | None, default: list[str] | None) -> list[str]:
    """--prompt (repeatable) and/or --prompts FILE (one per line); else the model's own prompts."""
    found = list(prompt or [])
    if prompts_file:
        path = Path(prompts_file)
        if path.is_dir():
            raise UserError(f"prompts file {path} is a folder; give a text file with one prompt per line")
        if not path.is_file():
            what = "is not a regular file" if path.exists() else "not found"
            raise UserError(f"prompts file {path} {what}; give a text file with one prompt per line")
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise UserError(f"prompts file {path} cannot be read as UTF-8 text ({exc}); give a text file "
                            "with one prompt per line") from None
        lines = [line.strip() for line in text.splitlines()]
        lines = [line for line in lines if line]
        if not lines:
            raise UserError(f"prompts file {path} has no prompts; write one prompt per line")
        found += lines
    if not found:
        if not default:
            raise UserError("no prompts: pass --prompt TEXT or --prompts FILE")
        found = list(default)
    return found
