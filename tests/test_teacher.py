"""`ddil teacher`: training targets, exact resume, checkpoints, the saved pipeline, bad input."""

import io
import json

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image
from safetensors.torch import load_file

from ddil_cli.data.digits import DIGIT_WORDS
from ddil_cli.diffusion.schedule import NoiseSchedule
from ddil_cli.errors import UserError
from ddil_cli.models.digits import make_scheduler
from ddil_cli.stages.teacher import TeacherTrainConfig, train_teacher, training_target
from ddil_cli.train import list_checkpoints
from cli_runner import run_cli

TINY = dict(block_out_channels=(16, 32), layers_per_block=1, text_width=16, text_layers=1, max_length=8,
            batch_size=8, log_every=1, warmup_steps=2)


def png(array):
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """24 random 8x8 'digits' with captions, plus 3 broken samples that must be skipped."""
    folder = tmp_path_factory.mktemp("tiny")
    rng = np.random.default_rng(0)
    with wds.TarWriter(str(folder / "tiny-000000.tar")) as sink:
        for i in range(24):
            sink.write({"__key__": f"s{i:03d}", "png": png(rng.integers(0, 256, (8, 8), dtype=np.uint8)),
                        "txt": f"a handwritten digit {DIGIT_WORDS[i % 10]}"})
        sink.write({"__key__": "nocap", "png": png(np.zeros((8, 8), np.uint8))})
        sink.write({"__key__": "badimg", "png": b"junk", "txt": "a handwritten digit one"})
        sink.write({"__key__": "empty", "png": png(np.zeros((8, 8), np.uint8)), "txt": ""})
    return str(folder / "tiny-000000.tar")


def test_targets_match_diffusers_scheduler():
    for prediction in ("epsilon", "v_prediction"):
        scheduler = make_scheduler(prediction)
        schedule = NoiseSchedule.from_scheduler_config(scheduler.config)
        x0, noise = torch.randn(6, 1, 4, 4), torch.randn(6, 1, 4, 4)
        t = torch.tensor([0, 10, 250, 500, 900, 999])
        a, s = (v.reshape(-1, 1, 1, 1) for v in schedule.alpha_sigma(t))
        assert torch.allclose(a * x0 + s * noise, scheduler.add_noise(x0, noise, t), atol=1e-5)
        reference = noise if prediction == "epsilon" else scheduler.get_velocity(x0, noise, t)
        assert torch.allclose(training_target(x0, noise, a, s, prediction), reference, atol=1e-5)


def test_train_save_and_load_through_the_adapter(shards, tmp_path):
    from ddil_cli.models import load_denoiser

    cfg = TeacherTrainConfig(data=shards, steps=3, checkpoint_every=2, seed=0, **TINY)
    result = train_teacher(cfg, tmp_path / "out", tmp_path / "ckpt")
    assert result.data["used"] == 24 and result.data["skipped_total"] == 3
    assert [p.name for p in list_checkpoints(tmp_path / "ckpt")] == ["checkpoint-00000002", "checkpoint-00000003"]
    out = tmp_path / "out"
    assert {p.name for p in out.iterdir()} >= {"model_index.json", "unet", "text_encoder", "tokenizer", "scheduler"}
    teacher = load_denoiser(str(out))
    assert teacher.prediction_type == "v_prediction" and teacher.state_shape == (1, 16, 16)
    cond = teacher.encode(["a handwritten digit three", "a handwritten digit four"])
    x0 = teacher.predict_x0(torch.randn(2, 1, 16, 16), torch.tensor(500), cond, guidance=2.0)
    assert x0.shape == (2, 1, 16, 16) and torch.isfinite(x0).all()
    # the saved weights are the EMA of the last checkpoint (the loop's format), which the adapter
    # loaded; the UNet's parameters come first in the trained module
    state = load_file(str(tmp_path / "ckpt" / "checkpoint-00000003" / "state.safetensors"))
    shadow = [state[f"ema.shadow_params.{i}"] for i in range(len(list(teacher.unet.parameters())))]
    assert all(torch.equal(s, p) for s, p in zip(shadow, teacher.unet.parameters()))
    online = load_file(str(tmp_path / "ckpt" / "checkpoint-00000003" / "teacher.safetensors"))
    assert any(not torch.equal(online[f"unet.{k}"], v) for k, v in teacher.unet.state_dict().items())


def test_resume_continues_exactly(shards, tmp_path):
    cfg = TeacherTrainConfig(data=shards, steps=4, checkpoint_every=2, seed=3, **TINY)
    train_teacher(cfg, tmp_path / "full", tmp_path / "ckpt_full")

    class Crash(Exception):
        pass

    def crash_at_three(step, loss):
        if step == 3:
            raise Crash()

    with pytest.raises(Crash):
        train_teacher(cfg, tmp_path / "part", tmp_path / "ckpt_part", on_step=crash_at_three)
    result = train_teacher(cfg, tmp_path / "part", tmp_path / "ckpt_part", resume="latest")
    assert result.resumed_from.endswith("checkpoint-00000002")
    for sub in ("unet/diffusion_pytorch_model.safetensors", "text_encoder/model.safetensors"):
        full, part = load_file(str(tmp_path / "full" / sub)), load_file(str(tmp_path / "part" / sub))
        assert all(torch.equal(full[k], part[k]) for k in full)
    # and a different seed really gives different weights (the comparison can fail)
    other = TeacherTrainConfig(data=shards, steps=4, checkpoint_every=2, seed=4, **TINY)
    train_teacher(other, tmp_path / "other", tmp_path / "ckpt_other")
    a = load_file(str(tmp_path / "full/unet/diffusion_pytorch_model.safetensors"))
    b = load_file(str(tmp_path / "other/unet/diffusion_pytorch_model.safetensors"))
    assert any(not torch.equal(a[k], b[k]) for k in a)


def test_resume_with_another_architecture_is_refused(shards, tmp_path):
    cfg = TeacherTrainConfig(data=shards, steps=2, checkpoint_every=1, **TINY)
    train_teacher(cfg, tmp_path / "a", tmp_path / "ckpt")
    changed = TeacherTrainConfig(data=shards, steps=4, checkpoint_every=1, **{**TINY, "text_width": 32})
    with pytest.raises(UserError, match="different text_width"):
        train_teacher(changed, tmp_path / "b", tmp_path / "ckpt", resume="latest")


def test_bad_data_is_a_user_error(tmp_path):
    with wds.TarWriter(str(tmp_path / "bad.tar")) as sink:
        sink.write({"__key__": "x", "png": png(np.zeros((8, 8), np.uint8))})
    for data, message in ((str(tmp_path / "bad.tar"), "no usable image-caption samples"),
                          (str(tmp_path / "missing"), "does not exist")):
        with pytest.raises(UserError, match=message):
            train_teacher(TeacherTrainConfig(data=data, steps=1, **TINY), tmp_path / "o", tmp_path / "c")
    with pytest.raises(UserError, match="prediction type"):
        TeacherTrainConfig(data="x", prediction_type="sample").validate()


def test_cli_trains_resumes_and_writes_a_manifest(shards, tmp_path, capsys):
    tiny = ["--block-channels", "16,32", "--layers-per-block", "1", "--text-width", "16", "--text-layers", "1",
            "--max-length", "8", "--batch-size", "8", "--warmup-steps", "2", "--checkpoint-every", "2"]
    out = tmp_path / "teacher"
    (tmp_path / "prompts.txt").write_text("a handwritten digit one\n\na handwritten digit two\n")
    code, err = run_cli(["teacher", "--data", shards, "--steps", "2", "--out", str(out), "--quiet",
                         "--default-guidance", "2", "--default-prompts", str(tmp_path / "prompts.txt"), *tiny], capsys)
    assert code == 0, err
    assert json.loads((out / "ddil_defaults.json").read_text()) == {
        "guidance": 2.0, "prompts": ["a handwritten digit one", "a handwritten digit two"]}
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["stage"] == "teacher" and manifest["config"]["block_out_channels"] == [16, 32]
    assert manifest["summary"]["data"]["skipped_total"] == 3 and list(manifest["data_shards"]) == [shards]
    # extend the finished run by two steps from its checkpoint
    code, err = run_cli(["teacher", "--data", shards, "--steps", "4", "--out", str(out), "--resume", "--overwrite",
                         "--quiet", *tiny], capsys)
    assert code == 0, err
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["summary"]["resumed_from"].endswith("checkpoint-00000002") and manifest["summary"]["steps"] == 4


def test_cli_bad_default_prompts_fail_before_training(shards, tmp_path, capsys):
    code, err = run_cli(["teacher", "--data", shards, "--default-prompts", str(tmp_path / "none.txt"),
                         "--out", str(tmp_path / "o")], capsys)
    assert code == 2 and "prompts file" in err and not (tmp_path / "o").exists()


@pytest.mark.parametrize("data, message", [("", "no data path given"), ("MISSING", "does not exist"),
                                           ("EMPTY", "holds no .tar shards")])
def test_cli_bad_data_path_is_one_line_exit_2(tmp_path, capsys, data, message):
    (tmp_path / "empty").mkdir()
    data = {"MISSING": str(tmp_path / "missing"), "EMPTY": str(tmp_path / "empty")}.get(data, data)
    code, err = run_cli(["teacher", "--data", data, "--out", str(tmp_path / "o")], capsys)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()
