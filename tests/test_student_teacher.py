"""A diffusers student records the fingerprints of the teachers it was distilled from, and a
command given a teacher beside a student refuses a student of another teacher in one line (two
tiny SD pipelines of the same shapes: without the record, the wrong pair samples without a word)."""

from __future__ import annotations

import json
import shutil

import pytest

from cli_runner import run_cli
from ddil_cli.stages.distill import DistillConfig, run_distill


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from tiny_models import build_tiny_sd

    root = tmp_path_factory.mktemp("teachers")
    build_tiny_sd(root / "teacher")
    build_tiny_sd(root / "other", seed=1)  # the same shapes, other weights
    (root / "prompts.txt").write_text("a cat\na dog\n")
    return root


def _distill(tiny, out, **extra):
    cfg = DistillConfig(**{**dict(method="pd", teacher=str(tiny / "teacher"), prompts=str(tiny / "prompts.txt"),
                                  prior="teacher=1", steps=2, teacher_steps=8, max_updates=2, batch_size=2,
                                  collect_every=2, rollouts_per_collect=2, quiet=True, out=str(out)), **extra})
    run_distill(cfg)
    return out


@pytest.fixture(scope="module")
def full_run(tiny, tmp_path_factory):
    return _distill(tiny, tmp_path_factory.mktemp("full") / "run")


def _sample(capsys, teacher, student, out):
    return run_cli(["sample", "--quiet", "--teacher", str(teacher), "--student", str(student), "--steps", "2",
                    "--prompt", "a cat", "--num-per-prompt", "1", "--out", str(out)], capsys)


def test_a_student_records_its_teachers_and_samples_with_them_or_a_copy(tiny, full_run, tmp_path, capsys):
    record = json.loads((full_run / "student/ddil_student.json").read_text())
    # PD: the run's teacher, then the first stage that taught the second
    assert len(record["teacher_fingerprints"]) == 2
    shutil.copytree(tiny / "teacher", tmp_path / "copy")
    (tmp_path / "copy" / "ddil_defaults.json").write_text(json.dumps({"guidance": 2.0}))  # not the teacher's UNet
    for i, teacher in enumerate([tiny / "teacher", tmp_path / "copy", full_run / "stages/pd-4"]):
        code, err = _sample(capsys, teacher, full_run / "student", tmp_path / f"s{i}")
        assert code == 0, err


@pytest.mark.parametrize("command", ["sample", "collect"])
def test_a_student_of_another_teacher_is_refused_in_one_line(tiny, full_run, tmp_path, capsys, command):
    if command == "sample":
        code, err = _sample(capsys, tiny / "other", full_run / "student", tmp_path / "s")
    else:
        code, err = run_cli(["collect", "--quiet", "--teacher", str(tiny / "other"), "--student",
                             str(full_run / "student"), "--steps", "2", "--prompts", str(tiny / "prompts.txt"),
                             "--rollouts", "2", "--prior", "student=1", "--out", str(tmp_path / "s")], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "was not distilled from --teacher" in err and str(tiny / "other") in err, err
    assert not (tmp_path / "s").exists()


def test_a_lora_student_whose_base_was_replaced_is_refused(tiny, tmp_path, capsys):
    shutil.copytree(tiny / "teacher", tmp_path / "base")
    tiny_copy = tmp_path
    shutil.copy(tiny / "prompts.txt", tiny_copy / "prompts.txt")
    (tiny_copy / "teacher").symlink_to(tmp_path / "base")
    run = _distill(tiny_copy, tmp_path / "run", method="lcm", lora_rank=2,
                   options={"unroll_steps": "2", "solver_steps": 10})
    shutil.rmtree(tmp_path / "base")
    shutil.copytree(tiny / "other", tmp_path / "base")  # another model where the student's base was
    code, err = _sample(capsys, tiny / "teacher", run / "student", tmp_path / "s")
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "distilled on another base" in err, err


def test_a_resume_whose_teacher_files_changed_is_refused(tiny, tmp_path, capsys):
    shutil.copytree(tiny / "teacher", tmp_path / "teacher")
    shutil.copy(tiny / "prompts.txt", tmp_path / "prompts.txt")
    run = _distill(tmp_path, tmp_path / "run")
    shutil.rmtree(tmp_path / "teacher")
    shutil.copytree(tiny / "other", tmp_path / "teacher")
    before = (run / "manifest.json").read_bytes()
    code, err = run_cli(["distill", "--quiet", "--method", "pd", "--teacher", str(tmp_path / "teacher"),
                         "--prompts", str(tmp_path / "prompts.txt"), "--prior", "teacher=1", "--steps", "2",
                         "--teacher-steps", "8", "--max-updates", "2", "--batch-size", "2", "--collect-every", "2",
                         "--rollouts-per-collect", "2", "--resume", "latest", "--out", str(run)], capsys)
    assert code == 2 and "changed since the run" in err and len(err.strip().splitlines()) == 1, err
    assert (run / "manifest.json").read_bytes() == before
