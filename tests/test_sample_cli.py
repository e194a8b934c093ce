"""`ddil sample` end to end through the real entry point: files, determinism, config, bad input."""

import json
import subprocess
import sys

import numpy as np
import pytest

from ddil_cli.models.gmm import GMMDenoiser
from ddil_cli.models.mlp import mlp_student_for
from cli_runner import run_cli as run


@pytest.fixture
def student_dir(tmp_path):
    student = mlp_student_for(GMMDenoiser("gmm:ring:8"), hidden=32, layers=2)
    student.save_pretrained(tmp_path / "student", timesteps=[999, 749, 499, 249])
    return tmp_path / "student"


def test_teacher_samples_files_and_determinism(tmp_path, capsys):
    args = ["sample", "--teacher", "gmm:ring:8", "--teacher-steps", "32", "--num-per-prompt", "5", "--quiet"]
    assert run(args + ["--out", str(tmp_path / "a")], capsys)[0] == 0
    assert run(args + ["--out", str(tmp_path / "b"), "--batch-size", "3"], capsys)[0] == 0
    a, b = np.load(tmp_path / "a/states.npy"), np.load(tmp_path / "b/states.npy")
    assert a.shape == (20, 2) and np.array_equal(a, b)  # same seed, any batch size: same samples
    rows = [json.loads(line) for line in open(tmp_path / "a/samples.jsonl")]
    assert [r["prompt"] for r in rows[::5]] == ["class 0", "class 1", "class 2", "class 3"]
    manifest = json.loads((tmp_path / "a/manifest.json").read_text())
    assert manifest["config"]["teacher_steps"] == 32 and "torch" in manifest["versions"]
    assert manifest["inputs"]["teacher"]["fingerprint"].startswith("text-sha256:")
    assert (tmp_path / "a/grid.png").stat().st_size > 0


def test_mixed_extremes_equal_pure_models(tmp_path, capsys, student_dir):
    base = ["sample", "--teacher", "gmm:ring:8", "--teacher-steps", "32", "--steps", "4", "--quiet",
            "--num-per-prompt", "3", "--guidance", "2"]
    assert run(base + ["--out", str(tmp_path / "t")], capsys)[0] == 0
    assert run(base + ["--student", str(student_dir), "--teacher-prob", "1", "--out", str(tmp_path / "m1")], capsys)[0] == 0
    assert run(base + ["--student", str(student_dir), "--out", str(tmp_path / "s")], capsys)[0] == 0
    assert run(base + ["--student", str(student_dir), "--teacher-prob", "0", "--out", str(tmp_path / "m0")], capsys)[0] == 0
    load = lambda name: np.load(tmp_path / name / "states.npy")
    assert np.array_equal(load("t"), load("m1"))
    assert np.array_equal(load("s"), load("m0"))
    assert not np.array_equal(load("t"), load("s"))


def test_config_file_and_flag_override(tmp_path, capsys):
    (tmp_path / "c.toml").write_text('teacher = "gmm:grid:9"\nteacher_steps = 8\nnum_per_prompt = 2\n')
    assert run(["sample", "--config", str(tmp_path / "c.toml"), "--num-per-prompt", "4", "--quiet",
                "--out", str(tmp_path / "o")], capsys)[0] == 0
    cfg = json.loads((tmp_path / "o/manifest.json").read_text())["config"]
    assert (cfg["teacher"], cfg["teacher_steps"], cfg["num_per_prompt"]) == ("gmm:grid:9", 8, 4)
    (tmp_path / "c.yaml").write_text("teacher_stepz: 8\n")
    code, err = run(["sample", "--config", str(tmp_path / "c.yaml"), "--out", str(tmp_path / "p")], capsys)
    assert code == 2 and "teacher_stepz" in err


@pytest.mark.parametrize("extra,needle", [
    (["--teacher", "gmm:blob:3"], "gmm:blob:3"),
    (["--teacher", "/no/such/model"], "not found"),
    (["--teacher", "some-org/some-model"], "offline"),
    (["--steps", "3", "--student", "STUDENT"], "multiple"),
    (["--teacher-prob", "1.5", "--student", "STUDENT"], "in [0, 1], got 1.5"),
    (["--teacher-prob", "0.5"], "need a --student"),
    (["--switch", "x2y:500", "--student", "STUDENT"], "--switch"),
    (["--threshold", "dynamic:7"], "threshold"),
    (["--prompts", "EMPTY"], "no prompts"),
    (["--prompt", "class 11"], "class 11"),
    (["--teacher-steps", "notanint"], "--teacher-steps"),
])
def test_bad_input_is_one_line_exit_2(tmp_path, capsys, student_dir, extra, needle):
    (tmp_path / "empty.txt").write_text("\n\n")
    extra = [str(student_dir) if e == "STUDENT" else str(tmp_path / "empty.txt") if e == "EMPTY" else e
             for e in extra]
    out = tmp_path / "out"
    code, err = run(["sample", "--quiet", "--out", str(out), *extra], capsys)
    assert code == 2, err
    assert needle in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1, err
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


def test_existing_output_is_kept(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "precious.txt").write_text("keep")
    code, err = run(["sample", "--quiet", "--out", str(out)], capsys)
    assert code == 2 and "--overwrite" in err
    assert (out / "precious.txt").read_text() == "keep"
    assert run(["sample", "--quiet", "--overwrite", "--out", str(out)], capsys)[0] == 0
    assert not (out / "precious.txt").exists() and (out / "samples.jsonl").exists()


def test_console_script_help_lists_stages():
    proc = subprocess.run([sys.executable, "-m", "ddil_cli", "--help"], capture_output=True, text=True)
    assert proc.returncode == 0
    for stage in ("collect", "distill", "sample", "evaluate", "covariate-shift"):
        assert stage in proc.stdout
    proc = subprocess.run([sys.executable, "-m", "ddil_cli", "sample", "--help"], capture_output=True, text=True)
    assert "Examples" in proc.stdout
