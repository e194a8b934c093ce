import io
import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from ddil_cli.buffer import BufferReader, load_manifest
from ddil_cli.models import load_denoiser, make_student
from ddil_cli.rollout import seeded_noise
from ddil_cli.stages.collect import CollectConfig, derived_seed, run_collect
from cli_runner import run_cli

ROOT = Path(__file__).resolve().parent.parent
LAB = ["--teacher", "gmm:ring:8", "--steps", "2", "--teacher-steps", "4", "--quiet"]


def snapshot(folder: Path) -> dict:
    return {p.name: p.read_bytes() for p in folder.iterdir()} if folder.exists() else {}


def lab_cfg(out, **overrides) -> CollectConfig:
    base = dict(teacher="gmm:ring:8", prior="data=0.5,teacher=0.5", rollouts=6, steps=2, teacher_steps=4,
                batch_size=4, shard_samples=5, out=str(out), quiet=True)
    return CollectConfig(**{**base, **overrides})


def states_by_identity(root: Path) -> dict:
    """Stored states keyed by what they are, not by which process wrote them."""
    found = {}
    for s in BufferReader(root, shuffle=0):
        ident = (s.source, s.meta["rollout_id"], s.t_index, s.prompt, s.state.numpy().tobytes())
        found[ident] = found.get(ident, 0) + 1
    return found


def test_lab_collect_writes_the_planned_mix(tmp_path, capsys):
    out = tmp_path / "buf"
    code, err = run_cli(["collect", *LAB, "--prior", "data=0.25,teacher=0.75", "--rollouts", "6",
                         "--out", str(out)], capsys)
    assert code == 0, err
    manifest = load_manifest(out)
    # 6 teacher rollouts x 2 grid points; data adds 12 * 0.25 / 0.75 = 4 states
    assert manifest["counts"]["by_source"] == {"data": 4, "teacher": 12}
    assert manifest["header"]["grid"]["timesteps"] == [999, 499]
    samples = list(BufferReader(out, shuffle=0))
    assert {s.prompt for s in samples} <= {f"class {c}" for c in range(4)}
    assert all(s.state.shape == (2,) and s.meta["student_version"] is None for s in samples)
    teacher_at_999 = [s for s in samples if s.source == "teacher" and s.t == 999]
    assert len(teacher_at_999) == 6 and all(s.t_index == 0 for s in teacher_at_999)


@pytest.mark.parametrize("args, words", [
    (["--prior", "data=-0.5,teacher=1.5"], "non-negative"),
    (["--prior", "data=0.5,teacher=0.4"], "sum to 0.9"),
    (["--prior", "data=0.5,student=0.5"], "no student source; pass --student"),
    (["--prior", "teacher=1", "--data", "x.tar"], "drop --data"),
    (["--prior", "teacher=1", "--steps", "3"], "multiple of student steps"),
    (["--prior", "teacher=1", "--max-samples", "0"], "max-samples"),
    (["--prior", "teacher=1", "--teacher-prob", "1.5"], "in [0, 1]"),
])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(tmp_path, capsys, args, words):
    out = tmp_path / "buf"
    code, err = run_cli(["collect", *LAB, *args, "--out", str(out)], capsys)
    assert code == 2
    assert words in err and err.count("\n") == 1 and "Traceback" not in err
    assert not out.exists()


def test_unwritable_out_is_refused(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    code, err = run_cli(["collect", *LAB, "--prior", "teacher=1", "--out", str(blocker / "buf")], capsys)
    assert code == 2 and "cannot write" in err
    code, err = run_cli(["collect", *LAB, "--prior", "teacher=1", "--out", str(blocker)], capsys)
    assert code == 2 and "is a file" in err


def test_incompatible_buffer_is_refused_and_left_untouched(tmp_path, capsys):
    out = tmp_path / "buf"
    run_collect(lab_cfg(out))
    before = snapshot(out)
    code, err = run_cli(["collect", "--teacher", "gmm:ring:8:d3", "--steps", "2", "--teacher-steps", "4",
                         "--prior", "teacher=1", "--quiet", "--out", str(out)], capsys)
    assert code == 2 and "shape (2,)" in err and err.count("\n") == 1
    code, err = run_cli(["collect", *LAB[:2], "--steps", "4", "--teacher-steps", "4", "--prior", "teacher=1",
                         "--quiet", "--out", str(out)], capsys)
    assert code == 2 and "--steps 2" in err
    assert snapshot(out) == before


def test_same_seed_gives_identical_shards_and_ranks_split_the_same_states(tmp_path):
    one = run_collect(lab_cfg(tmp_path / "a"))
    run_collect(lab_cfg(tmp_path / "b"))
    sha = lambda p: [s["sha256"] for s in load_manifest(p)["shards"]]
    assert sha(tmp_path / "a") == sha(tmp_path / "b") and one["states"] == 24
    # two ranks of one launch: one collect run, disjoint shard names, the same states as one process
    for rank in range(2):
        summary = run_collect(lab_cfg(tmp_path / "c"), rank=rank, world_size=2, launch_key="launch-1")
        assert summary["run"] == 0
    manifest = load_manifest(tmp_path / "c")
    assert sorted(manifest["runs"][0]["ranks"]) == ["0", "1"] and manifest["launches"] == {}
    assert {s["rank"] for s in manifest["shards"]} == {0, 1}
    assert states_by_identity(tmp_path / "c") == states_by_identity(tmp_path / "a")
    assert run_collect(lab_cfg(tmp_path / "c"), rank=0, world_size=2, launch_key="launch-1")["run"] == 1


def test_mixed_student_rollouts_are_labelled_by_who_drove_them(tmp_path):
    teacher = load_denoiser("gmm:ring:8")
    student = make_student(teacher, hidden=16, layers=2)
    cfg = lab_cfg(tmp_path / "buf", prior="student=0.75,teacher=0.25", rollouts=32, steps=4, teacher_steps=8,
                  teacher_prob=0.5, batch_size=16, shard_samples=1000)
    run_collect(cfg, models=(teacher, student), student_version=7)
    samples = list(BufferReader(tmp_path / "buf", shuffle=0))
    manifest = load_manifest(tmp_path / "buf")
    assert manifest["runs"][0]["student_version"] == 7
    labels = {}
    for s in samples:
        labels.setdefault(s.meta["rollout_id"], set()).add(s.source)
        assert s.meta["student_version"] == (7 if s.source == "student" else None)
    assert all(len(v) == 1 for v in labels.values()) and len(labels) == 32
    for rid in range(24):  # the student rollouts: the teacher alone drove those whose draws were all < 0.5
        _, uniforms = seeded_noise([derived_seed(0, 0, "rollout", rid)], (2,), 4)
        assert labels[rid] == ({"teacher"} if bool((uniforms < 0.5).all()) else {"student"})
    assert all(labels[rid] == {"teacher"} for rid in range(24, 32))
    assert Counter(s.t_index for s in samples) == {i: 32 for i in range(4)}


def _collect_process(out, extra_env=None, *args):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", **(extra_env or {})}
    cmd = [sys.executable, "-m", "ddil_cli", "collect", *LAB, "--prior", "data=0.5,teacher=0.5", "--rollouts", "40",
           "--batch-size", "8", "--shard-samples", "8", "--out", str(out), *args]
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stderr=subprocess.PIPE, text=True)


def test_two_processes_writing_one_buffer_get_disjoint_shards(tmp_path):
    out = tmp_path / "buf"
    procs = [_collect_process(out), _collect_process(out, {"WORLD_SIZE": "1"}, "--seed", "1")]
    for proc in procs:
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
    manifest = load_manifest(out)
    names = [s["name"] for s in manifest["shards"]]
    assert len(names) == len(set(names)) == 2 * 20  # 160 states each in shards of 8
    assert sorted(r["run"] for r in manifest["runs"]) == [0, 1]
    assert {s["run"] for s in manifest["shards"]} == {0, 1}
    assert sorted(p.name for p in out.glob("shard-*.tar")) == sorted(names)
    assert manifest["counts"]["total"] == 320
    assert len(list(BufferReader(out, shuffle=0))) == 320


def _caption_shard(path: Path, n: int) -> list[str]:
    import webdataset as wds
    from PIL import Image

    captions = [f"a handwritten digit {w}" for w in ("zero", "one", "two", "three", "four")][:n]
    rng = np.random.default_rng(0)
    with wds.TarWriter(str(path)) as sink:
        for i, caption in enumerate(captions):
            png = io.BytesIO()
            Image.fromarray(rng.integers(0, 255, (8, 8), dtype=np.uint8)).save(png, format="PNG")
            sink.write({"__key__": f"d{i:03d}", "png": png.getvalue(), "txt": caption})
    return captions


def test_pixel_diffusers_teacher_collects_real_data_and_caches_prompts_once(tmp_path, capsys):
    from safetensors.torch import load_file
    from tiny_models import build_tiny_pixel

    teacher_dir = build_tiny_pixel(tmp_path / "teacher")
    captions = _caption_shard(tmp_path / "data.tar", 3)
    out = tmp_path / "buf"
    code, err = run_cli(["collect", "--teacher", str(teacher_dir), "--data", str(tmp_path / "data.tar"),
                         "--prior", "data=0.5,teacher=0.5", "--rollouts", "2", "--steps", "2", "--teacher-steps", "2",
                         "--cache-prompts", "--quiet", "--out", str(out)], capsys)
    assert code == 0, err
    samples = list(BufferReader(out, shuffle=0))
    assert Counter(s.source for s in samples) == {"data": 4, "teacher": 4}
    assert all(s.state.shape == (1, 16, 16) for s in samples)
    assert {s.prompt for s in samples} <= set(captions)  # rollouts use the data's captions
    data_states = torch.stack([s.state for s in samples if s.source == "data"])
    assert data_states.abs().max() < 10 and data_states.std() > 0.1
    cache = load_file(str(next((out / "prompt_cache").glob("*.safetensors"))))
    cached_ids = {k.split("/")[0] for k in cache}
    assert cached_ids == {s.prompt_id for s in samples}
    assert all(k.split("/")[1] in ("cond", "uncond") for k in cache)
    assert json.loads((out / "prompts.json").read_text()).keys() == cached_ids
