"""`ddil covariate-shift`: the mixed-rollout settings reduce to the pure models at their extremes,
the direct measure vanishes for a student that is the teacher, results are reused by hash."""

import csv
import json

import numpy as np
import pytest
import torch

from ddil_cli.models.gmm import GMMDenoiser
from ddil_cli.models.mlp import mlp_student_for
from ddil_cli.covariate_shift import Setting, build_settings, select, shift_features
from cli_runner import run_cli as run

LAB = ["--teacher", "gmm:ring:8", "--teacher-steps", "32", "--steps", "4", "--quiet"]


@pytest.fixture(scope="module")
def students(tmp_path_factory):
    root = tmp_path_factory.mktemp("students")
    teacher = GMMDenoiser("gmm:ring:8")
    for name, seed in (("a", 0), ("b", 1)):
        mlp_student_for(teacher, hidden=32, layers=2, seed=seed).save_pretrained(
            root / name / "student", timesteps=[999, 749, 499, 249])
    return root


def states(folder, name):
    return np.load(folder / "settings" / name / "states.npy")


def test_extremes_reproduce_pure_teacher_and_student(tmp_path, capsys, students):
    student = str(students / "a" / "student")
    common = LAB + ["--num-per-prompt", "3", "--guidance", "2"]
    shift = common + ["--student", student, "--betas", "0.5,0", "--switch-at", "999,0", "--metrics", "swd",
                      "--settings", "beta-*,t2s-*,s2t-*", "--out", str(tmp_path / "shift")]
    assert run(["covariate-shift"] + shift, capsys)[0] == 0
    assert run(["sample"] + common + ["--out", str(tmp_path / "teacher")], capsys)[0] == 0
    assert run(["sample"] + common + ["--student", student, "--out", str(tmp_path / "student")], capsys)[0] == 0
    out = tmp_path / "shift"
    teacher, pure_student = np.load(tmp_path / "teacher/states.npy"), np.load(tmp_path / "student/states.npy")
    assert not np.array_equal(teacher, pure_student)
    assert np.array_equal(states(out, "beta-1"), teacher)
    assert np.array_equal(states(out, "beta-0"), pure_student)
    # t* = 999: no transition starts above it; t* = 0: every one does
    for name, expected in (("t2s-999", pure_student), ("s2t-999", teacher), ("t2s-0", teacher),
                           ("s2t-0", pure_student)):
        assert np.array_equal(states(out, name), expected), name
    mixed = states(out, "beta-0.5")
    assert not np.array_equal(mixed, teacher) and not np.array_equal(mixed, pure_student)
    rows = {r["setting"]: r for r in csv.DictReader(open(out / "table.csv"))}
    assert set(rows) == {"beta-1", "beta-0.5", "beta-0", "t2s-999", "t2s-0", "s2t-999", "s2t-0"}
    assert float(rows["beta-1"]["teacher_share"]) == 1 and float(rows["s2t-0"]["teacher_share"]) == 0
    assert float(rows["beta-0"]["nfe_per_sample"]) == 8  # 4 steps, CFG: two passes each
    record = json.loads((out / "settings/beta-0/setting.json").read_text())
    metrics = json.loads((out / "settings/beta-0/metrics.json").read_text())
    assert record["metrics"]["swd"] == metrics["metrics"]["swd"]["value"] == float(rows["beta-0"]["swd"])
    assert (out / "plots/beta.png").stat().st_size > 0 and (out / "plots/switch.png").stat().st_size > 0
    assert "| beta-0.5 |" in (out / "table.md").read_text()


def _direct(out):
    return {(r["student"], int(r["timestep"])): r for r in csv.DictReader(open(out / "direct.csv"))}


def test_direct_measure_vanishes_when_the_student_is_the_teacher(tmp_path, capsys, students):
    # equal grids: the "student" rollout is the teacher's own, from the same noise as the reference
    args = ["--teacher", "gmm:ring:8", "--teacher-steps", "4", "--steps", "4", "--quiet", "--student",
            "gmm:ring:8", "--student-label", "teacher", "--compare-student", f"random={students / 'a' / 'student'}",
            "--settings", "direct-*", "--shift-samples", "400", "--shift-reference", "teacher"]
    assert run(["covariate-shift"] + args + ["--out", str(tmp_path / "s")], capsys)[0] == 0
    rows = _direct(tmp_path / "s")
    for t in (999, 749, 499, 249, -1):
        same, other = rows[("teacher", t)], rows[("random", t)]
        assert float(same["fd"]) < 1e-9, (t, same)
        assert float(same["fd_floor"]) > 0  # independent seeds: the floor is not zero
        if t >= 0:
            assert float(same["err_own"]) == 0 and float(same["err_ref"]) == 0
            assert float(other["err_own"]) > 0 and float(other["err_ref"]) > 0
        if t < 999:
            assert float(other["fd"]) > 0
    assert float(rows[("random", -1)]["fd"]) > 5 * float(rows[("random", -1)]["fd_floor"])
    assert (tmp_path / "s/plots/direct.png").stat().st_size > 0
    assert not (tmp_path / "s/settings").exists()  # --settings direct-* computed no mixed rollouts


def test_run_shift_returns_what_its_tables_hold(tmp_path, students):
    """A caller (the bench) reads the settings and the direct measure from run_shift's return."""
    from ddil_cli.stages.shift import ShiftConfig, run_shift

    out = tmp_path / "s"
    summary = run_shift(ShiftConfig(teacher="gmm:ring:8", teacher_steps=32, steps=4, student_label="a",
                                    student=str(students / "a" / "student"), settings=["beta-0", "direct-*"],
                                    num_per_prompt=3, shift_samples=50, metrics="swd", quiet=True, out=str(out)))
    table = {r["setting"]: r for r in csv.DictReader(open(out / "table.csv"))}
    assert set(summary["results"]) == set(table) and "beta-0" in table
    for name, row in table.items():
        result = summary["results"][name]
        assert float(row["teacher_share"]) == result["teacher_share"]
        assert float(row["swd"]) == result["metrics"]["swd"]
    direct = [(r["student"], int(r["timestep"]), r["err_own"]) for r in csv.DictReader(open(out / "direct.csv"))]
    assert direct == [("a", r["timestep"], "" if r["err_own"] is None else str(r["err_own"]))
                      for r in summary["measures"]["a"]]
    manifest = json.loads((out / "manifest.json").read_text())
    assert "results" not in manifest["summary"]  # the manifest keeps the short summary


def test_direct_measure_against_data_for_a_fine_grid_teacher(tmp_path, capsys):
    # the exact teacher on a 32-step grid tracks the forward-diffused data marginal closely
    args = ["--teacher", "gmm:ring:8", "--teacher-steps", "32", "--steps", "32", "--quiet", "--student",
            "gmm:ring:8", "--settings", "direct-*", "--shift-samples", "400"]
    assert run(["covariate-shift"] + args + ["--out", str(tmp_path / "s")], capsys)[0] == 0
    rows = list(csv.DictReader(open(tmp_path / "s/direct.csv")))
    assert len(rows) == 33 and rows[-1]["timestep"] == "-1"
    floors = [float(r["fd_floor"]) for r in rows]
    assert max(float(r["fd"]) for r in rows) < 4 * max(floors)
    manifest = json.loads((tmp_path / "s/manifest.json").read_text())
    assert manifest["reference_states"] == "data"


def test_settings_are_reused_by_config_hash(tmp_path, capsys, students):
    out = tmp_path / "s"
    base = ["covariate-shift"] + LAB + ["--student", str(students / "a" / "student"), "--num-per-prompt", "2",
                                        "--metrics", "swd", "--betas", "0", "--switch-at", "500",
                                        "--shift-samples", "32", "--out", str(out)]
    assert run(base + ["--settings", "beta-*"], capsys)[0] == 0
    summary = lambda: json.loads((out / "manifest.json").read_text())["summary"]
    assert summary()["computed"] == ["beta-1", "beta-0"]
    before = (out / "settings/beta-0/states.npy").stat().st_mtime_ns
    assert run(base, capsys)[0] == 0
    assert summary()["reused"] == ["beta-1", "beta-0"]
    assert summary()["computed"] == ["t2s-500", "s2t-500", "direct-a"]
    assert (out / "settings/beta-0/states.npy").stat().st_mtime_ns == before
    # another seed changes every hash: recomputed, and the table holds only the current results
    assert run(base + ["--seed", "1", "--settings", "beta-0"], capsys)[0] == 0
    assert summary()["computed"] == ["beta-0"] and summary()["settings_in_table"] == ["beta-0"]
    assert [r["setting"] for r in csv.DictReader(open(out / "table.csv"))] == ["beta-0"]
    assert not list(out.glob("settings/.*")), "no partial folders left behind"


def test_user_errors_are_one_line(tmp_path, capsys, students):
    student = str(students / "a" / "student")
    cases = [
        ([], "--student is required"),
        (["--student", student, "--settings", "nope-*"], "matches nothing"),
        (["--student", student, "--betas", "0.5,x"], "bad --betas"),
        (["--student", student, "--betas", "1.5"], "outside [0, 1]"),
        (["--student", student, "--switch-at", "1000"], "not a timestep"),
        (["--student", student, "--metrics", "fid,bogus"], "unknown --metrics"),
        (["--student", student, "--compare-student", f"a={students / 'b' / 'student'}"], "labelled 'a'"),
        (["--student", student, "--shift-reference", "both"], "--shift-reference"),
    ]
    for extra, message in cases:
        code, err = run(["covariate-shift"] + LAB + extra + ["--out", str(tmp_path / "never")], capsys)
        assert code == 2 and message in err and err.count("\n") == 1, (extra, err)
    assert not (tmp_path / "never").exists()
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    code, err = run(["covariate-shift"] + LAB + ["--student", student, "--out", str(tmp_path / "other")], capsys)
    assert code == 2 and "other than a covariate-shift output" in err


def test_settings_names_and_selection():
    settings = build_settings([0.8, 0.0], [749, 250])
    names = [s.name for s in settings]
    assert names == ["beta-1", "beta-0.8", "beta-0", "t2s-749", "t2s-250", "s2t-749", "s2t-250"]
    assert Setting("t2s", 500).switch == "t2s:500" and Setting("beta", 0.4).teacher_prob == 0.4
    assert select(names, ["t2s-*", "beta-0"]) == ["beta-0", "t2s-749", "t2s-250"]


def test_shift_features_pool_images_and_project_flat_states():
    images = torch.randn(5, 1, 16, 16)
    pooled = shift_features(images, 64)
    assert pooled.shape == (5, 64)
    assert np.allclose(pooled[:, 0], images[:, 0, :2, :2].mean((1, 2)).double().numpy(), atol=1e-6)
    latents = torch.randn(3, 4, 8, 8)
    assert shift_features(latents, 64).shape == (3, 64)
    small = torch.randn(4, 2)
    assert np.array_equal(shift_features(small, 64), small.double().numpy())
    flat = torch.randn(6, 100)
    projected = shift_features(flat, 64)
    assert projected.shape == (6, 64) and np.allclose(projected, shift_features(flat, 64))


def test_image_teacher_end_to_end_with_digits_features_and_data(tmp_path, capsys):
    # the embedded digits layout (1x16x16 pixel states) with the shipped digits classifier as
    # feature space and the real digits as both evaluation reference and direct-measure data
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    from tiny_models import build_tiny_pixel

    from ddil_cli.data.digits import build_digits_shards, split_source

    teacher = str(build_tiny_pixel(tmp_path / "pixel"))
    build_digits_shards(tmp_path / "digits")
    args = ["covariate-shift", "--teacher", teacher, "--student", teacher, "--student-label", "same",
            "--teacher-steps", "4", "--steps", "2", "--prompt", "a handwritten digit three", "--num-per-prompt", "6",
            "--betas", "0", "--settings", "beta-*,direct-*", "--features", "embedded:digits", "--metrics", "fid,pr",
            "--reference", str(tmp_path / "digits" / "heldout-000000.tar"),
            "--data", split_source(tmp_path / "digits", "train"), "--shift-samples", "16", "--quiet",
            "--out", str(tmp_path / "s")]
    assert run(args, capsys)[0] == 0
    out = tmp_path / "s"
    rows = {r["setting"]: r for r in csv.DictReader(open(out / "table.csv"))}
    assert set(rows) == {"beta-1", "beta-0"} and all(float(r["fid"]) > 0 for r in rows.values())
    # a metric with several numbers (pr) gets a column per number, equal to its metrics.json
    scored = json.loads((out / "settings/beta-0/metrics.json").read_text())["metrics"]["pr"]
    assert float(rows["beta-0"]["pr.precision"]) == scored["precision"]
    assert float(rows["beta-0"]["pr.recall"]) == scored["recall"]
    assert len(list((out / "settings/beta-0/images").glob("*.png"))) == 6
    direct = list(csv.DictReader(open(out / "direct.csv")))
    assert [int(r["timestep"]) for r in direct] == [999, 499, -1]
    assert all(float(r["fd"]) > 0 and float(r["fd_floor"]) > 0 for r in direct)
    assert all(float(r["err_own"]) > 0 for r in direct[:2])  # one step vs two teacher steps differ
    assert json.loads((out / "manifest.json").read_text())["reference_states"] == "data"


def test_config_file_lists_and_strings(tmp_path, capsys, students):
    (tmp_path / "c.toml").write_text(f'student = "{students / "a" / "student"}"\nbetas = [0.5]\nswitch_at = ""\n'
                                     'settings = "beta-*"\nnum_per_prompt = 2\nmetrics = "swd"\n')
    code, err = run(["covariate-shift", "--config", str(tmp_path / "c.toml"), "--quiet", "--out",
                     str(tmp_path / "s")], capsys)
    assert code == 0, err
    assert [r["setting"] for r in csv.DictReader(open(tmp_path / "s/table.csv"))] == ["beta-1", "beta-0.5"]
    metrics = json.loads((tmp_path / "s/settings/beta-0.5/metrics.json").read_text())
    assert metrics["samples"]["path"] == str(tmp_path / "s/settings/beta-0.5")
