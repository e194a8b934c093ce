"""docs/cli.md is the CLI's own --help: regenerated here and compared (tools/cli_reference.py)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import typer

ROOT = Path(__file__).resolve().parents[1]


def _tool():
    spec = importlib.util.spec_from_file_location("cli_reference", ROOT / "tools" / "cli_reference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cli_reference_is_current():
    tool = _tool()
    assert tool.REFERENCE.read_text() == tool.render(), (
        f"docs/cli.md is out of date with the CLI's --help: run `{tool.REGENERATE}` and commit docs/cli.md")


def test_cli_reference_shows_every_option_of_every_command():
    """Each command's section holds every option the command parses (read from click, not the help)."""
    from ddil_cli.cli.app import app

    tool = _tool()
    text = tool.render()
    group = typer.main.get_command(app)
    for name, command in group.commands.items():
        section = text.split(f"\n## ddil {name}\n", 1)[1].split("\n## ddil ", 1)[0]
        assert f"Usage: ddil {name} [OPTIONS]" in section
        for param in command.params:
            for flag in param.opts:
                assert flag in section, f"ddil {name}: {flag} is missing from its reference section"
