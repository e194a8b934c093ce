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


# ---- at scale: processes, streaming, resume -----------------------------------------------------
def _folder_bytes(folder):
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != "manifest.json"}


@pytest.fixture(scope="module")
def tiny_sd(tmp_path_factory):
    from tiny_models import build_tiny_sd

    return build_tiny_sd(tmp_path_factory.mktemp("sd") / "teacher")


def _sd_config(teacher, out, **kw):
    from ddil_cli.sample_folder import SampleConfig

    return SampleConfig(teacher=str(teacher), teacher_steps=2, prompt=["a cat", "a dog", "a boat"], num_per_prompt=5,
                        batch_size=4, quiet=True, out=str(out), **kw)


def test_two_processes_write_the_files_one_process_writes(tmp_path, tiny_sd):
    from ddil_cli.stages.sample import sample_to_folder

    one = sample_to_folder(_sd_config(tiny_sd, tmp_path / "one"))
    assert one["published"] and one["samples"] == 15
    # rank 1 first: it cannot publish (rank 0's batches are missing); rank 0 then finishes and publishes
    ranks = [sample_to_folder(_sd_config(tiny_sd, tmp_path / "two"), rank=r, world_size=2, launch_key="L")
             for r in (1, 0)]
    assert [r["published"] for r in ranks] == [False, True] and [r["written"] for r in ranks] == [7, 8]
    assert _folder_bytes(tmp_path / "one") == _folder_bytes(tmp_path / "two")
    assert len(list((tmp_path / "one/images").iterdir())) == 15 and not list(tmp_path.glob(".*"))


def test_resume_finishes_an_interrupted_run_without_redoing_written_samples(tmp_path, tiny_sd, monkeypatch, capsys):
    import ddil_cli.sample_folder as sample_folder
    from ddil_cli.stages.sample import sample_to_folder

    sample_to_folder(_sd_config(tiny_sd, tmp_path / "whole"))
    real, calls = sample_folder.generate, []

    def interrupted(plan, teacher, seeds, *args):
        calls.append(len(seeds))
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(plan, teacher, seeds, *args)

    monkeypatch.setattr(sample_folder, "generate", interrupted)
    with pytest.raises(KeyboardInterrupt):
        sample_to_folder(_sd_config(tiny_sd, tmp_path / "cut"))
    assert not (tmp_path / "cut").exists() and (tmp_path / ".cut.sampling").is_dir()
    # without --resume the leftover is named; a resume with other settings is refused
    argv = ["sample", "--quiet", "--teacher", str(tiny_sd), "--teacher-steps", "2", "--prompt", "a cat", "--prompt",
            "a dog", "--prompt", "a boat", "--num-per-prompt", "5", "--batch-size", "4", "--out", str(tmp_path / "cut")]
    code, err = run(argv, capsys)
    assert code == 2 and "--resume" in err and err.count("error:") == 1 and "Traceback" not in err, err
    code, err = run([*argv[:-2], "--seed", "3", "--out", str(tmp_path / "cut"), "--resume"], capsys)
    assert code == 2 and "seed" in err, err
    calls.clear()
    monkeypatch.setattr(sample_folder, "generate", lambda *a: calls.append(len(a[2])) or real(*a))
    assert run([*argv, "--resume"], capsys)[0] == 0
    assert calls == [4, 3]  # the two batches not written before the interruption (8 of 15 were)
    assert _folder_bytes(tmp_path / "whole") == _folder_bytes(tmp_path / "cut")
    assert not (tmp_path / ".cut.sampling").exists()


def test_memory_does_not_hold_every_image(tmp_path, tiny_sd, monkeypatch):
    """The grid is drawn from the first images, read back: no decoded image outlives its batch."""
    import gc

    import ddil_cli.sample_folder as sample_folder
    from ddil_cli.stages.sample import sample_to_folder

    alive, real = [], sample_folder.SampleWriter.put

    def put(self, files, rows):
        import weakref

        alive.extend(weakref.ref(v) for _, v in files if isinstance(v, np.ndarray))
        return real(self, files, rows)

    monkeypatch.setattr(sample_folder.SampleWriter, "put", put)
    sample_to_folder(_sd_config(tiny_sd, tmp_path / "s"))
    gc.collect()
    assert len(alive) == 15 and sum(ref() is not None for ref in alive) == 0
