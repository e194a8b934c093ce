"""`ddil encode`: the encoded shards hold what the teacher's own encoders give; 1 and 2 processes
write the same files; a re-run finishes an interrupted encoding; distill and collect read encoded
shards to the same inputs as raw ones; bad input ends in one line."""

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image
from safetensors.torch import load_file

from ddil_cli.data.encoded import EncodedShards
from ddil_cli.data.shards import ImageCaptionShards
from ddil_cli.models import load_denoiser
from ddil_cli.stages.encode import EncodeConfig, run_encode
from cli_runner import run_cli as cli
from tiny_models import build_tiny_sd

CAPTIONS = ("a red square", "a blue circle", "two cats", "a small boat", "the sea at night")


def write_image_shards(folder: Path, shards: int = 3, per_shard: int = 5, seed: int = 0) -> Path:
    """Random RGB images of assorted sizes with captions; in shard 0 one image is not an image and
    one caption is empty (both skipped and counted)."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for s in range(shards):
        with wds.TarWriter(str(folder / f"data-{s:06d}.tar"), mtime=0) as sink:
            for k in range(per_shard):
                h, w = (int(v) for v in rng.integers(12, 40, size=2))
                buf = io.BytesIO()
                Image.fromarray(rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)).save(buf, format="PNG")
                image, caption = buf.getvalue(), CAPTIONS[(s * per_shard + k) % len(CAPTIONS)]
                if s == 0 and k == 1:
                    image = b"not an image"
                if s == 0 and k == 2:
                    caption = " "
                sink.write({"__key__": f"s{s}_{k:03d}", "png": image, "txt": caption})
    return folder


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("encode")
    teacher = build_tiny_sd(root / "teacher")
    data = write_image_shards(root / "data")
    return root, teacher, data


def _encode(teacher_dir, data, out, **kwargs):
    teacher = load_denoiser(str(teacher_dir))
    return run_encode(EncodeConfig(teacher=str(teacher_dir), data=str(data), out=str(out), batch_size=2,
                                   quiet=True), teacher, **kwargs)


def _files(folder: Path) -> dict:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_encoded_samples_are_the_teachers_own_encodings(setup, tmp_path):
    root, teacher_dir, data = setup
    summary = _encode(teacher_dir, data, tmp_path / "enc")
    assert summary["samples"] == 13 and summary["skipped"] == {"bad_image": 1, "missing_caption": 1}
    teacher = load_denoiser(str(teacher_dir))
    raw = list(ImageCaptionShards(str(data), resolution=16, channels=3, output="tensor"))
    encoded = list(EncodedShards(tmp_path / "enc", teacher))
    assert [s.key for s in encoded] == [s.key for s in raw] and [s.caption for s in encoded] == [s.caption for s in raw]
    expected = teacher.encode_images(torch.stack([s.image for s in raw]))  # one batch, not the encoder's 2
    torch.testing.assert_close(torch.stack([s.latent for s in encoded]), expected, atol=1e-5, rtol=1e-5)
    cond = teacher.encode([s.caption for s in raw]).cond["encoder_hidden_states"]
    torch.testing.assert_close(torch.stack([s.cond["encoder_hidden_states"] for s in encoded]), cond)
    uncond = load_file(str(tmp_path / "enc/uncond.safetensors"))["encoder_hidden_states"]
    torch.testing.assert_close(uncond, teacher.encode(["x"]).uncond["encoder_hidden_states"][0])
    manifest = json.loads((tmp_path / "enc/encoded.json").read_text())
    assert manifest["resolution"] == [16, 16] and manifest["state_shape"] == [4, 8, 8] and manifest["shards"] == 3


def test_two_processes_write_the_files_one_does_and_a_rerun_finishes_the_rest(setup, tmp_path):
    root, teacher_dir, data = setup
    _encode(teacher_dir, data, tmp_path / "one")
    for rank in (1, 0):
        _encode(teacher_dir, data, tmp_path / "two", rank=rank, world_size=2)
    assert _files(tmp_path / "one") == _files(tmp_path / "two")
    # an interruption after the first shard: the re-run encodes only what is missing
    (tmp_path / "two/encoded-000001.json").unlink()
    (tmp_path / "two/encoded-000002.tar").unlink()
    (tmp_path / "two/encoded-000002.json").unlink()
    summary = _encode(teacher_dir, data, tmp_path / "two")
    assert summary["shards_written"] == 2 and summary["shards_resumed"] == 1
    assert _files(tmp_path / "one") == _files(tmp_path / "two")


def _student(run: Path) -> dict:
    return load_file(str(run / "student/unet/diffusion_pytorch_model.safetensors"))


def test_distill_and_collect_read_encoded_shards_as_raw_ones(setup, tmp_path, capsys):
    root, teacher_dir, data = setup
    _encode(teacher_dir, data, tmp_path / "enc")
    runs = {}
    for name, source in (("raw", data), ("encoded", tmp_path / "enc")):
        args = ["distill", "--quiet", "--method", "pd", "--teacher", str(teacher_dir), "--data", str(source),
                "--steps", "2", "--teacher-steps", "4", "--stage-updates", "3", "--batch-size", "4",
                "--prior", "data=1", "--out", str(tmp_path / name)]
        assert cli(args, capsys)[0] == 0
        runs[name] = _student(tmp_path / name)
        assert cli(["collect", "--quiet", "--teacher", str(teacher_dir), "--data", str(source), "--prior", "data=1",
                    "--rollouts", "3", "--steps", "2", "--teacher-steps", "4", "--batch-size", "4",
                    "--out", str(tmp_path / f"buffer-{name}")], capsys)[0] == 0
    assert runs["raw"].keys() == runs["encoded"].keys()
    for key in runs["raw"]:
        torch.testing.assert_close(runs["encoded"][key], runs["raw"][key], atol=1e-5, rtol=1e-4)
    from ddil_cli.buffer.reader import BufferReader

    states = {name: sorted((s.key, s.prompt, s.state) for s in BufferReader(str(tmp_path / f"buffer-{name}"), shuffle=0))
              for name in runs}
    assert [k[:2] for k in states["raw"]] == [k[:2] for k in states["encoded"]] and states["raw"]
    for (_, _, a), (_, _, b) in zip(states["raw"], states["encoded"]):
        torch.testing.assert_close(torch.as_tensor(b), torch.as_tensor(a), atol=1e-5, rtol=1e-4)


def test_bad_input_is_one_line(setup, tmp_path, capsys):
    root, teacher_dir, data = setup
    # a damaged shard stops the command with its name; the shards before it are kept
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "a-000000.tar").write_bytes((data / "data-000001.tar").read_bytes())
    (bad / "a-000001.tar").write_bytes(b"this is not a tar file" * 40)
    code, err = cli(["encode", "--quiet", "--teacher", str(teacher_dir), "--data", str(bad),
                     "--out", str(tmp_path / "enc-bad")], capsys)
    assert code == 2 and "a-000001.tar" in err and len(err.strip().splitlines()) == 1, err
    assert (tmp_path / "enc-bad/encoded-000000.json").is_file()
    assert not (tmp_path / "enc-bad/encoded-000001.tar").exists()
    assert not [p for p in (tmp_path / "enc-bad").iterdir() if p.name.startswith(".")]
    # an unfinished encoding is refused by its readers
    code, err = cli(["distill", "--quiet", "--teacher", str(teacher_dir), "--data", str(tmp_path / "enc-bad"),
                     "--prior", "data=1", "--out", str(tmp_path / "run")], capsys)
    assert code == 2 and "unfinished (1 of 2" in err and not (tmp_path / "run").exists(), err
    # another teacher's encoder
    _encode(teacher_dir, data, tmp_path / "enc")
    other = build_tiny_sd(tmp_path / "other", seed=1)
    for command in (["distill", "--stage-updates", "2", "--prior", "data=1"],
                    ["collect", "--prior", "data=1", "--rollouts", "1"]):
        code, err = cli([*command, "--quiet", "--teacher", str(other), "--steps", "2", "--teacher-steps", "4",
                         "--data", str(tmp_path / "enc"), "--out", str(tmp_path / "run")], capsys)
        assert code == 2 and "another encoder" in err and len(err.strip().splitlines()) == 1, err
        assert not (tmp_path / "run").exists()
    # re-encoding into a folder made from other data is refused, the folder untouched
    before = _files(tmp_path / "enc")
    code, err = cli(["encode", "--quiet", "--teacher", str(teacher_dir), "--data", str(bad / "a-000000.tar"),
                     "--out", str(tmp_path / "enc")], capsys)
    assert code == 2 and "its inputs differ" in err and _files(tmp_path / "enc") == before, err
    code, err = cli(["encode", "--quiet", "--teacher", "gmm:ring:8", "--data", str(data),
                     "--out", str(tmp_path / "lab")], capsys)
    assert code == 2 and "image model" in err and not (tmp_path / "lab").exists()
    # an --out inside (or at) the shards it reads is refused before anything is written
    before = _files(data)
    for out in (data, data / "encoded"):
        code, err = cli(["encode", "--quiet", "--teacher", str(teacher_dir), "--data", str(data),
                         "--out", str(out)], capsys)
        assert code == 2 and "--data" in err and len(err.strip().splitlines()) == 1, err
    assert _files(data) == before and not (data / "encoded").exists()


def test_ctrl_c_names_the_finished_shards_and_the_same_command_finishes(setup, tmp_path, capsys, monkeypatch):
    """An interrupted encode keeps its finished shards (each published whole) and says so; it
    said "nothing was written" before. The same command again encodes only the rest."""
    from ddil_cli.stages import encode as stage

    root, teacher_dir, data = setup
    original, calls = stage.encode_shard, []

    def interrupted_after_one(*args, **kwargs):
        calls.append(1)
        if len(calls) > 1:
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    monkeypatch.setattr(stage, "encode_shard", interrupted_after_one)
    argv = ["encode", "--quiet", "--teacher", str(teacher_dir), "--data", str(data), "--batch-size", "2",
            "--out", str(tmp_path / "enc")]
    code, err = cli(argv, capsys)
    assert code == 130 and len(err.strip().splitlines()) == 1, err
    assert "1 finished shard(s)" in err and "run the same command again" in err, err
    monkeypatch.setattr(stage, "encode_shard", original)
    code, err = cli(argv, capsys)
    assert code == 0, err
    assert sorted(p.name for p in (tmp_path / "enc").glob("encoded-*.json")) == \
        [f"encoded-{i:06d}.json" for i in range(3)]
