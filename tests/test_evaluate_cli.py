"""`ddil evaluate` end to end: a lab run through `ddil sample`, and an image run with tiny
random-weight extractors in the real file formats."""

import dataclasses
import json

import numpy as np
import pytest
import torch
import torchvision
import typer
from PIL import Image

from ddil_cli.cli import app as app_module
from ddil_cli.cli.evaluate import evaluate_command
from ddil_cli.evaluate import features as F
from ddil_cli.evaluate.lpips_div import ALEXNET_FILENAME
from test_features import TINY_DINO, save_tiny_dinov2, save_tiny_inception
from cli_runner import run_cli


@pytest.fixture(autouse=True)
def evaluate_registered(monkeypatch):
    """Run through the real entry point; register `evaluate` if the app does not yet."""
    commands = {c.name: c.callback for c in app_module.app.registered_commands}
    if commands.get("evaluate") is not evaluate_command:
        app = typer.Typer(pretty_exceptions_enable=False, add_completion=False)
        app.command("sample")(commands["sample"])
        app.command("evaluate")(evaluate_command)
        monkeypatch.setattr(app_module, "app", app)


def run(argv, capsys):
    return run_cli(argv, capsys, with_stdout=True)


def test_lab_teacher_samples_cover_every_mode(tmp_path, capsys):
    samples = tmp_path / "s"
    code, _ = run(["sample", "--teacher", "gmm:ring:8", "--teacher-steps", "32", "--num-per-prompt", "100",
                   "--quiet", "--out", str(samples)], capsys)
    assert code == 0
    code, err = run(["evaluate", "--samples", str(samples), "--reference", "gmm:ring:8", "--out", str(tmp_path / "e")],
                    capsys)
    assert code == 0, err
    result = json.loads((tmp_path / "e/metrics.json").read_text())
    m = result["metrics"]
    assert set(m) == {"mode-coverage", "quality", "class-recall", "swd"}
    assert m["mode-coverage"]["value"] == 1.0 and m["class-recall"]["value"] == 1.0
    assert m["quality"]["value"] > 0.95
    assert m["mode-coverage"]["num_samples"] == 400
    assert "mode-coverage" in err and (tmp_path / "e/manifest.json").is_file()

    # a collapsed copy of the samples: every state moved onto mode 0
    collapsed = tmp_path / "c"
    collapsed.mkdir()
    (collapsed / "samples.jsonl").write_text((samples / "samples.jsonl").read_text())
    states = np.load(samples / "states.npy")
    np.save(collapsed / "states.npy", (states - states.mean(0)) * 0.05 / states.std() + np.array([0.8, 0.0]))
    code, err = run(["evaluate", "--samples", str(collapsed), "--reference", "gmm:ring:8", "--quiet",
                     "--out", str(tmp_path / "e2"), "--compare", str(tmp_path / "e")], capsys)
    assert code == 0, err
    result = json.loads((tmp_path / "e2/metrics.json").read_text())
    assert result["metrics"]["mode-coverage"]["value"] == pytest.approx(1 / 8)
    deltas = {d["metric"]: d for d in result["compare"]["deltas"]}
    assert deltas["mode-coverage"]["delta"] == pytest.approx(1 / 8 - 1) and deltas["mode-coverage"]["better"] is False


def test_lab_errors_are_one_line(tmp_path, capsys):
    code, err = run(["evaluate", "--samples", str(tmp_path / "nothing"), "--reference", "gmm:ring:8",
                     "--out", str(tmp_path / "e")], capsys)
    assert code == 2 and "samples.jsonl" in err and "Traceback" not in err
    code, err = run(["sample", "--teacher", "gmm:ring:8", "--teacher-steps", "8", "--num-per-prompt", "4",
                     "--quiet", "--out", str(tmp_path / "s")], capsys)
    code, err = run(["evaluate", "--samples", str(tmp_path / "s"), "--reference", "gmm:bogus:3",
                     "--out", str(tmp_path / "e")], capsys)
    assert code == 2 and "gmm:" in err
    code, err = run(["evaluate", "--samples", str(tmp_path / "s"), "--reference", "gmm:ring:8", "--metrics", "fid",
                     "--strict", "--out", str(tmp_path / "e")], capsys)
    assert code == 2 and "--strict" in err and not (tmp_path / "e").exists()


def _image_samples(folder, images, prompts):
    (folder / "images").mkdir(parents=True)
    with open(folder / "samples.jsonl", "w") as f:
        for i, (img, prompt) in enumerate(zip(images, prompts)):
            Image.fromarray(img).save(folder / f"images/{i:06d}.png")
            f.write(json.dumps({"index": i, "prompt": prompt, "prompt_index": prompts.index(prompt), "seed": i,
                                "file": f"images/{i:06d}.png"}) + "\n")


@pytest.fixture
def weights(tmp_path, monkeypatch):
    """Tiny random weights in every real format, plus the tiny-DINOv2 dims for the timm route."""
    import open_clip

    from tests.test_clip_score import TINY_ARCH, TINY_CONFIG

    w = tmp_path / "weights"
    save_tiny_inception(w)
    save_tiny_dinov2(w / "dino.pth")
    (w / "cfg").mkdir()
    (w / "cfg" / f"{TINY_ARCH}.json").write_text(json.dumps(TINY_CONFIG))
    open_clip.add_model_config(w / "cfg")
    torch.manual_seed(0)
    torch.save(open_clip.create_model(TINY_ARCH).state_dict(), w / "clip.pt")
    torch.save(torchvision.models.alexnet(weights=None).state_dict(), w / ALEXNET_FILENAME)
    monkeypatch.setitem(F._FEATURE_SPACES, "dinov2", lambda o: F.Dinov2Extractor(
        dataclasses.replace(o, dinov2_model_kwargs=TINY_DINO)))
    return ["--inception", str(w), "--dinov2", str(w / "dino.pth"), "--clip", str(w / "clip.pt"),
            "--clip-arch", TINY_ARCH, "--lpips-backbone", str(w / ALEXNET_FILENAME)]


def test_images_all_metrics_with_tiny_weights(tmp_path, capsys, weights):
    rng = np.random.default_rng(0)
    base = rng.integers(0, 256, (24, 48, 48, 3), dtype=np.uint8)
    prompts = [f"prompt {i // 4}" for i in range(24)]
    _image_samples(tmp_path / "s", base, prompts)
    (tmp_path / "ref").mkdir()
    for i, img in enumerate(base):  # the reference is the very same images
        Image.fromarray(img).save(tmp_path / "ref" / f"{i}.png")
    args = ["evaluate", "--samples", str(tmp_path / "s"), "--reference", str(tmp_path / "ref"),
            "--eval-res", "32", "--cache-dir", str(tmp_path / "cache"), *weights]
    code, err = run(args + ["--out", str(tmp_path / "e")], capsys)
    assert code == 0, err
    result = json.loads((tmp_path / "e/metrics.json").read_text())
    m = result["metrics"]
    assert all(m[k]["available"] for k in ("fid", "pr", "dc", "clip", "lpips-div")), result["unavailable"]
    assert m["fid"]["value"] == pytest.approx(0.0, abs=1e-6)
    assert m["pr"]["precision"] == 1.0 and m["pr"]["recall"] == 1.0 and m["dc"]["coverage"] == 1.0
    assert m["fid"]["feature_space"] == "inception" and m["pr"]["feature_space"] == "dinov2"
    assert m["fid"]["eval_res"] == 32 and len(m["fid"]["weights_sha256"]) == 64
    assert m["clip"]["clip_score_x100"] == pytest.approx(100 * m["clip"]["value"])
    assert m["lpips-div"]["num_prompts"] == 6 and m["lpips-div"]["value"] > 0
    assert result["image_prep"]["resize"] == "PIL.LANCZOS"
    assert m["fid"]["reference_stats"]["cache_hit"] is False
    cached = m["fid"]["reference_stats"]["cache"]

    # second run: reference statistics come from the cache; and the cache file is itself a reference
    code, err = run(args + ["--out", str(tmp_path / "e2"), "--quiet"], capsys)
    again = json.loads((tmp_path / "e2/metrics.json").read_text())["metrics"]
    assert again["fid"]["reference_stats"]["cache_hit"] is True and again["fid"]["value"] == m["fid"]["value"]
    code, err = run(["evaluate", "--samples", str(tmp_path / "s"), "--reference", cached, "--metrics", "fid",
                     "--eval-res", "32", *weights, "--out", str(tmp_path / "e3"), "--quiet"], capsys)
    assert code == 0, err
    assert json.loads((tmp_path / "e3/metrics.json").read_text())["metrics"]["fid"]["value"] == pytest.approx(0, abs=1e-6)
    code, err = run(["evaluate", "--samples", str(tmp_path / "s"), "--reference", cached, "--metrics", "fid",
                     "--eval-res", "64", *weights, "--out", str(tmp_path / "e4"), "--quiet"], capsys)
    assert code == 2 and "eval-res" in err


def test_missing_weights_are_reported_not_fatal(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(F, "default_inception_path", lambda: tmp_path / "none" / F.INCEPTION_FILENAME)
    images = np.random.default_rng(1).integers(0, 256, (6, 32, 32, 3), dtype=np.uint8)
    _image_samples(tmp_path / "s", images, ["a cat"] * 6)
    (tmp_path / "ref").mkdir()
    Image.fromarray(images[0]).save(tmp_path / "ref" / "0.png")
    args = ["evaluate", "--samples", str(tmp_path / "s"), "--reference", str(tmp_path / "ref"), "--eval-res", "32"]
    code, err = run(args + ["--out", str(tmp_path / "e")], capsys)
    assert code == 0, err
    result = json.loads((tmp_path / "e/metrics.json").read_text())
    assert set(result["unavailable"]) == {"fid", "pr", "dc", "clip", "lpips-div"}
    assert "--inception" in result["unavailable"]["fid"] and "--dinov2" in result["unavailable"]["pr"]
    assert "--lpips-backbone" in result["unavailable"]["lpips-div"] and "--clip" in result["unavailable"]["clip"]
    code, err = run(args + ["--out", str(tmp_path / "e2"), "--strict"], capsys)
    assert code == 2 and "--inception" in err


def test_embedded_digits_space_is_available_or_explained(tmp_path, capsys):
    images = np.random.default_rng(2).integers(0, 256, (6, 16, 16, 3), dtype=np.uint8)
    _image_samples(tmp_path / "s", images, ["a handwritten digit three"] * 6)
    (tmp_path / "ref").mkdir()
    for i in range(6):
        Image.fromarray(images[i]).save(tmp_path / "ref" / f"{i}.png")
    code, err = run(["evaluate", "--samples", str(tmp_path / "s"), "--reference", str(tmp_path / "ref"),
                     "--features", "embedded:digits", "--metrics", "fid,clip", "--out", str(tmp_path / "e")], capsys)
    assert code == 0, err
    m = json.loads((tmp_path / "e/metrics.json").read_text())["metrics"]
    for name in ("fid", "clip"):
        if m[name]["available"]:
            assert m[name]["feature_space"] == "embedded:digits"
        else:
            assert "digits" in m[name]["reason"]
    if m["fid"]["available"]:
        assert m["fid"]["value"] == pytest.approx(0.0, abs=1e-6) and m["fid"]["eval_res"] == 16
        assert 0.0 <= m["clip"]["value"] <= 1.0


def test_shard_reference_by_relative_path_and_brace_pattern(tmp_path, monkeypatch):
    from ddil_cli.data.digits import build_digits_shards
    from ddil_cli.errors import UserError
    from ddil_cli.evaluate.inputs import resolve_reference

    build_digits_shards(tmp_path / "digits")
    monkeypatch.chdir(tmp_path)
    plain = resolve_reference("digits/heldout-000000.tar", None)
    braced = resolve_reference("digits/heldout-{000000..000000}.tar", None)
    assert plain.source.manifest_hash() == braced.source.manifest_hash()
    assert len(plain.source) == 297
    with pytest.raises(UserError, match="does not exist"):
        resolve_reference("digits/heldout-{000001..000002}.tar", None)


def test_one_pass_opens_every_image_once_and_scores_as_separate_runs(tmp_path, capsys, weights, monkeypatch):
    rng = np.random.default_rng(3)
    images = rng.integers(0, 256, (12, 40, 40, 3), dtype=np.uint8)
    _image_samples(tmp_path / "s", images, [f"prompt {i // 3}" for i in range(12)])
    (tmp_path / "ref").mkdir()
    for i, img in enumerate(rng.integers(0, 256, (10, 40, 40, 3), dtype=np.uint8)):
        Image.fromarray(img).save(tmp_path / "ref" / f"{i}.png")
    args = ["evaluate", "--samples", str(tmp_path / "s"), "--reference", str(tmp_path / "ref"), "--eval-res", "32",
            "--batch-size", "5", "--no-cache", "--quiet", *weights]
    opened, real_open = [], Image.open
    monkeypatch.setattr(Image, "open", lambda fp, *a, **k: opened.append(str(fp)) or real_open(fp, *a, **k))
    assert run([*args, "--metrics", "fid,pr,clip", "--out", str(tmp_path / "all")], capsys)[0] == 0
    assert sorted(opened) == sorted(str(p) for p in [*(tmp_path / "s/images").iterdir(), *(tmp_path / "ref").iterdir()])
    together = json.loads((tmp_path / "all/metrics.json").read_text())["metrics"]
    assert all(together[k]["available"] for k in ("fid", "pr", "clip"))
    alone = {}
    for name in ("fid", "pr", "clip"):
        assert run([*args, "--metrics", name, "--out", str(tmp_path / name)], capsys)[0] == 0
        alone[name] = json.loads((tmp_path / name / "metrics.json").read_text())["metrics"][name]
    assert together["fid"]["value"] == pytest.approx(alone["fid"]["value"], rel=1e-6)
    assert together["pr"]["precision"] == alone["pr"]["precision"] and together["pr"]["recall"] == alone["pr"]["recall"]
    assert together["clip"]["value"] == pytest.approx(alone["clip"]["value"], rel=1e-6)
    # decoding in DataLoader worker processes gives the same numbers
    assert run([*args, "--metrics", "fid,pr,clip", "--workers", "2", "--out", str(tmp_path / "w")], capsys)[0] == 0
    workers = json.loads((tmp_path / "w/metrics.json").read_text())["metrics"]
    assert workers["fid"]["value"] == pytest.approx(together["fid"]["value"], rel=1e-6)
    assert workers["clip"]["value"] == pytest.approx(together["clip"]["value"], rel=1e-6)
