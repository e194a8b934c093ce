"""Ctrl-C and SIGTERM end a command with 130 / 143 and one line saying what was kept; two runs
to one output: the second refuses in one line naming the first; partial folders of a dead
process are cleaned by the next run; a failed or interrupted `distill --overwrite` leaves the
old run whole. Real processes and real signals where the property is about them."""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cli_runner import run_cli

ROOT = Path(__file__).resolve().parent.parent
LONG_SAMPLE = ["sample", "--quiet", "--teacher", "gmm:ring:8", "--teacher-steps", "1000", "--num-per-prompt", "100000",
               "--batch-size", "64"]
LAB_RUN = ["distill", "--teacher", "gmm:ring:8", "--teacher-steps", "8", "--steps", "4", "--batch-size", "16",
           "--collect-every", "5", "--rollouts-per-collect", "4", "--checkpoint-every", "5", "--quiet"]


def _start(argv: list[str]) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    return subprocess.Popen([sys.executable, "-m", "ddil_cli", *argv], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _wait_for(condition, proc: subprocess.Popen, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if proc.poll() is not None:
            pytest.fail(f"the command ended before the signal: {proc.communicate()}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail("the command never reached the point to interrupt")
        time.sleep(0.05)


def _snapshot(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("signum,code,name", [(signal.SIGINT, 130, "Ctrl-C"), (signal.SIGTERM, 143, "SIGTERM")])
def test_a_signal_during_sample_exits_with_its_code_and_keeps_what_resume_finishes(tmp_path, signum, code, name):
    """Interrupted, `ddil sample` says in one line what it kept: the samples written so far, in
    its hidden work folder, which --resume finishes; --out itself never appears half-written."""
    out = tmp_path / "s"
    proc = _start([*LONG_SAMPLE, "--out", str(out)])
    _wait_for(lambda: list((tmp_path / ".s.sampling").glob("parts/*")), proc)
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == code, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: interrupted ({name}); kept: the "), err
    assert "--resume" in lines[0]
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == [".s.sampling"], list(tmp_path.iterdir())


def test_ctrl_c_during_distill_reports_the_checkpoint_kept_and_resumes(tmp_path):
    run = tmp_path / "run"
    proc = _start([*LAB_RUN, "--max-updates", "100000", "--out", str(run)])
    _wait_for(lambda: list((run / "checkpoints").glob("checkpoint-*/state.json")), proc)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "kept: the checkpoint" in lines[0] and "--resume latest" in lines[0], err
    assert (run / "manifest.json").is_file() and not list(tmp_path.glob(".run.*"))


def test_a_second_run_to_the_same_output_refuses_naming_the_first(tmp_path, capsys):
    out = tmp_path / "s"
    first = _start([*LONG_SAMPLE, "--out", str(out)])
    try:
        _wait_for(lambda: (tmp_path / ".s.lock").is_file() and (tmp_path / ".s.lock").read_text(), first)
        code, err = run_cli(["sample", "--quiet", "--teacher", "gmm:ring:8", "--teacher-steps", "8",
                             "--num-per-prompt", "2", "--overwrite", "--out", str(out)], capsys)
        assert code == 2 and len(err.splitlines()) == 1, err
        assert f"pid {first.pid}" in err and "ddil sample" in err, err
        code, err = run_cli([*LAB_RUN, "--max-updates", "10", "--out", str(out)], capsys)
        assert code == 2 and f"pid {first.pid}" in err, err
    finally:
        first.send_signal(signal.SIGTERM)
        first.communicate(timeout=120)
    # the first run's samples stay in its hidden work folder for --resume; --out never appeared
    assert first.returncode == 143 and not out.exists()
    assert [p.name for p in tmp_path.iterdir()] in ([], [".s.sampling"])


def test_two_distill_runs_to_one_folder_never_interleave(tmp_path, capsys):
    run = tmp_path / "run"
    first = _start([*LAB_RUN, "--max-updates", "100000", "--out", str(run)])
    try:
        _wait_for(lambda: (run / "manifest.json").is_file(), first)
        before = (run / "manifest.json").read_bytes()
        code, err = run_cli([*LAB_RUN, "--max-updates", "10", "--overwrite", "--out", str(run)], capsys)
        assert code == 2 and "being written by another ddil run" in err and f"pid {first.pid}" in err, err
        code, err = run_cli([*LAB_RUN, "--max-updates", "100000", "--resume", "latest", "--out", str(run)], capsys)
        assert code == 2 and f"pid {first.pid}" in err, err
        assert (run / "manifest.json").read_bytes() == before
    finally:
        first.send_signal(signal.SIGINT)
        first.communicate(timeout=120)


def test_the_next_run_cleans_partial_folders_a_killed_run_left(tmp_path, capsys):
    stale = tmp_path / ".s.partial-999999-deadbeef"
    stale.mkdir()
    (stale / "states.npy").write_bytes(b"half")
    code, err = run_cli(["sample", "--quiet", "--teacher", "gmm:ring:8", "--teacher-steps", "8", "--num-per-prompt",
                         "2", "--out", str(tmp_path / "s")], capsys)
    assert code == 0, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s"]


# ---- distill publishes like the other stages ----------------------------------------------------
@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("distill") / "run"
    code, err = run_cli([*LAB_RUN, "--max-updates", "10", "--out", str(run)])
    assert code == 0, err
    return run


def _interrupt_training(monkeypatch, after_checkpoint: bool) -> None:
    from ddil_cli import train

    def run(self):
        if after_checkpoint:
            self.save_checkpoint()
        raise KeyboardInterrupt

    monkeypatch.setattr(train.Trainer, "run", run)


def test_an_interrupted_overwrite_before_its_first_checkpoint_leaves_the_old_run(finished_run, tmp_path, capsys,
                                                                                  monkeypatch):
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    before = _snapshot(run)
    _interrupt_training(monkeypatch, after_checkpoint=False)
    code, err = run_cli([*LAB_RUN, "--max-updates", "10", "--seed", "3", "--overwrite", "--out", str(run)], capsys)
    assert code == 130 and len(err.splitlines()) == 1 and "as it was before" in err, err
    assert _snapshot(run) == before and sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_an_interrupted_overwrite_after_its_first_checkpoint_keeps_the_new_run(finished_run, tmp_path, capsys,
                                                                               monkeypatch):
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    _interrupt_training(monkeypatch, after_checkpoint=True)
    code, err = run_cli([*LAB_RUN, "--max-updates", "10", "--seed", "3", "--overwrite", "--out", str(run)], capsys)
    assert code == 130 and "--resume latest" in err, err
    assert not (run / "student").exists() and [p.name for p in (run / "checkpoints").iterdir()] == \
        ["checkpoint-00000000"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]  # the old run is gone


def test_a_failed_new_run_leaves_no_folder(tmp_path, capsys, monkeypatch):
    _interrupt_training(monkeypatch, after_checkpoint=False)
    code, err = run_cli([*LAB_RUN, "--max-updates", "10", "--out", str(tmp_path / "run")], capsys)
    assert code == 130, err
    assert list(tmp_path.iterdir()) == []


def test_what_a_killed_build_left_is_cleaned_or_put_back_by_the_next_run(finished_run, tmp_path, capsys):
    """SIGKILL gives no chance to clean up: the next run to that --out (holding its lock, so the
    builder is dead) removes an unpublished `.run.building` and puts back an old run that a publish
    killed between its two renames had set aside."""
    run = tmp_path / "run"
    shutil.copytree(finished_run, tmp_path / ".run.replaced-999999")  # killed between the renames
    before = _snapshot(tmp_path / ".run.replaced-999999")
    (tmp_path / ".run.building" / "checkpoints").mkdir(parents=True)  # the new run that never got in
    with pytest.warns(UserWarning, match="restored"):
        code, err = run_cli([*LAB_RUN, "--max-updates", "10", "--resume", "latest", "--out", str(run)], capsys)
    # the restored run was finished: resuming it changes nothing of its stages
    assert code == 0, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]
    assert {k: v for k, v in _snapshot(run).items() if k.startswith("stages")} == \
        {k: v for k, v in before.items() if k.startswith("stages")}


def test_a_new_run_appears_at_out_only_at_its_first_checkpoint(tmp_path):
    """While a fresh run trains towards its first checkpoint it lives in `.run.building`; --out
    appears whole (manifest and checkpoint together) and the link is gone when the run ends."""
    run = tmp_path / "run"
    proc = _start([*LAB_RUN, "--max-updates", "100000", "--checkpoint-every", "300", "--out", str(run)])
    try:
        _wait_for(lambda: (tmp_path / ".run.building" / "manifest.json").is_file(), proc)
        assert not run.exists()
        _wait_for(lambda: run.is_dir(), proc)
        assert (run / "manifest.json").is_file() and list((run / "checkpoints").glob("checkpoint-*/state.json"))
        assert (tmp_path / ".run.building").is_symlink()
    finally:
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "kept: the checkpoint" in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]