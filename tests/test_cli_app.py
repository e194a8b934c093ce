"""The `ddil` entry point: every command takes --threads, and the default thread count."""

import os

import torch
import typer

from cli_runner import run_cli
from ddil_cli.cli import app as app_module
from ddil_cli.cli import common


def test_every_command_has_a_threads_option():
    group = typer.main.get_command(app_module.app)
    assert set(group.commands) >= {"collect", "distill", "sample", "evaluate", "covariate-shift", "teacher"}
    for name, command in group.commands.items():
        assert "threads" in {p.name for p in command.params}, name


def test_default_threads_follows_the_cores_and_leaves_an_explicit_environment(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    for cores, expected in ((1, 1), (2, 1), (3, 1), (4, 2), (16, 8), (64, 8)):
        monkeypatch.setattr(os, "sched_getaffinity", lambda pid, n=cores: set(range(n)))
        assert common.default_threads() == expected, cores
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert common.default_threads() is None


def test_threads_option_sets_torch_threads_and_rejects_zero(tmp_path, capsys):
    before = torch.get_num_threads()
    try:
        code, err = run_cli(["sample", "--teacher", "gmm:ring:8", "--teacher-steps", "8", "--num-per-prompt", "2",
                             "--quiet", "--threads", "2", "--out", str(tmp_path / "s")], capsys)
        assert code == 0, err
        assert torch.get_num_threads() == 2
        code, err = run_cli(["sample", "--teacher", "gmm:ring:8", "--threads", "0", "--out", str(tmp_path / "t")],
                            capsys)
        assert code == 2 and err.startswith("error: --threads must be in [1, 1024], got 0") and len(err.strip().splitlines()) == 1
        assert not (tmp_path / "t").exists()
    finally:
        torch.set_num_threads(before)


def test_help_lists_exactly_the_methods_distill_accepts(capsys):
    from ddil_cli.methods import METHODS

    code, out = run_cli(["--help"], capsys, with_stdout=True)
    assert code == 0
    listed = " ".join(out.split()).split("Methods (ddil distill --method): ")[1].split(".")[0]
    assert listed.split(", ") == list(METHODS)
