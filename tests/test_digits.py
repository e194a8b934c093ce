"""The embedded lab: tokenizer, shipped classifier, shipped teacher, and their loaders."""

import json

import numpy as np
import pytest
import torch

from ddil_cli.data.digits import DIGIT_WORDS, build_digits_shards, digit_from_prompt, digit_prompt, split_source
from ddil_cli.data.shards import load_image_captions
from ddil_cli.errors import UserError
from ddil_cli.models import digits as digits_model

MB = 1024 * 1024


@pytest.fixture(scope="module")
def heldout(tmp_path_factory):
    out = tmp_path_factory.mktemp("digits")
    build_digits_shards(out)
    data = load_image_captions(split_source(out, "heldout"), resolution=16, channels=1)
    return data.images, torch.tensor([m["label"] for m in data.metadata])


@pytest.mark.parametrize("prompt, digit", [
    ("a handwritten digit seven", 7), ("A HANDWRITTEN 3", 3), ("the digit zero, written by hand", 0),
    ("a hand-drawn number nine", 9), ("a cat", None), ("seven or eight", None), ("sevens", None),
    ("one 1", 1), ("", None),
])
def test_digit_from_prompt(prompt, digit):
    assert digit_from_prompt(prompt) == digit


def test_tokenizer_whole_words_fallback_and_reload(tmp_path):
    from transformers import AutoTokenizer, CLIPTokenizer

    captions = ["a handwritten digit seven", "the digit two, written by hand"]
    tok = digits_model.build_clip_tokenizer(captions, tmp_path / "tok", max_length=12)
    pieces = tok.convert_ids_to_tokens(tok("A handwritten digit SEVEN").input_ids)
    assert pieces == ["<|startoftext|>", "a</w>", "handwritten</w>", "digit</w>", "seven</w>", "<|endoftext|>"]
    # an unseen word falls back to byte symbols, so no text is ever unknown
    unseen = tok.convert_ids_to_tokens(tok("zebra").input_ids)[1:-1]
    assert "".join(unseen).replace("</w>", "") == "zebra" and len(unseen) == 5
    ids = digits_model.tokenize(tok, captions)
    assert ids.shape == (2, 12) and (ids[:, -1] == tok.pad_token_id).all()
    for loader in (CLIPTokenizer, AutoTokenizer):
        again = loader.from_pretrained(str(tmp_path / "tok"))
        assert again.model_max_length == 12 and torch.equal(digits_model.tokenize(again, captions), ids)


def test_shipped_classifier_size_accuracy_and_recorded_numbers(heldout):
    images, labels = heldout
    assert digits_model.CLASSIFIER_PATH.stat().st_size < 2 * MB
    model = digits_model.load_digits_classifier()
    accuracy = float((digits_model.classify(images, model) == labels).float().mean())
    recorded = json.loads(digits_model.CLASSIFIER_CONFIG_PATH.read_text())
    assert accuracy >= 0.97 and accuracy == pytest.approx(recorded["heldout_accuracy"], abs=1e-6)
    features = model.features(images[:5])
    assert features.shape == (5, model.config.feature_dim)
    # RGB renderings of the same grayscale states give the same features
    assert torch.allclose(model.features(images[:5].expand(-1, 3, -1, -1)), features, atol=1e-5)


def test_prompt_alignment_rewards_the_right_digit(heldout):
    images, labels = heldout
    right = [digit_prompt(int(d)) for d in labels]
    wrong = [f"a handwritten {DIGIT_WORDS[(int(d) + 1) % 10]}" for d in labels]
    assert digits_model.prompt_alignment(images, right) >= 0.97
    assert digits_model.prompt_alignment(images, wrong) <= 0.03
    with pytest.raises(UserError, match="names no single digit"):
        digits_model.prompt_alignment(images[:1], ["a cat"])


def test_missing_classifier_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="classifier not found"):
        digits_model.load_digits_classifier(tmp_path / "none.safetensors")


def test_decode_convention():
    """The adapter's pixel decode: [-1, 1] clipped, to uint8, grayscale repeated to RGB."""
    from ddil_cli.models import load_denoiser

    x = torch.tensor([-1.0, 0.0, 1.0, 2.0]).reshape(1, 1, 2, 2)
    rgb = load_denoiser("embedded:digits").decode(x)
    assert rgb.shape == (1, 2, 2, 3) and rgb.dtype == np.uint8
    assert rgb[0, :, :, 0].tolist() == [[0, 128], [255, 255]] and (rgb[..., 0] == rgb[..., 2]).all()


def test_shipped_teacher_folder_is_a_standard_diffusers_pipeline():
    folder = digits_model.TEACHER_PATH
    index = json.loads((folder / "model_index.json").read_text())
    assert index["unet"] == ["diffusers", "UNet2DConditionModel"] and index["vae"] == [None, None]
    assert index["text_encoder"] == ["transformers", "CLIPTextModel"]
    for sub in ("unet", "text_encoder", "tokenizer", "scheduler"):
        assert (folder / sub).is_dir()
    weights = list(folder.rglob("*.safetensors"))
    assert len(weights) == 2 and sum(w.stat().st_size for w in weights) < 10 * MB
    assert not list(folder.rglob("*.bin")) and not list(folder.rglob("*.pt"))
    scheduler = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler["clip_sample"] is False and scheduler["timestep_spacing"] == "trailing"


def test_shipped_teacher_draws_the_prompted_digits():
    """Through the models layer's adapter and the sample stage, the classifier reads the shipped
    teacher's samples as the prompted digits; its folder carries the measured sampling defaults."""
    from ddil_cli.data.shards import to_model_tensor
    from ddil_cli.diffusion.threshold import parse_threshold
    from ddil_cli.models import load_denoiser
    from ddil_cli.sample_folder import SampleConfig, generate, plan_sampling, sample_seed

    teacher = load_denoiser("embedded:digits")
    # the folder's ddil_defaults.json: the measured CFG scale and the ten canonical prompts
    assert teacher.default_guidance == 1.5 and teacher.default_prompts() == [digit_prompt(d) for d in range(10)]
    assert tuple(teacher.state_shape) == (1, 16, 16)
    prompts = [digit_prompt(d) for d in (0, 3, 7) for _ in range(8)]
    cfg = SampleConfig(teacher="embedded:digits", teacher_steps=16, guidance=3.0, prompt=sorted(set(prompts)))
    plan = plan_sampling(cfg, teacher, None)
    assert plan.sampler == "teacher" and plan.grid.num_transitions == 16
    result = generate(plan, teacher, [sample_seed(1, i) for i in range(len(prompts))], prompts,
                      parse_threshold("none"), "cpu")
    assert bool(result.teacher_mask.all())
    images = teacher.decode(result.final)
    assert images.shape == (len(prompts), 16, 16, 3) and images.dtype == np.uint8
    assert digits_model.prompt_alignment(to_model_tensor(images[..., :1]), prompts) >= 0.9


def test_measure_writes_grids_and_scores(tmp_path):
    from PIL import Image

    from ddil_cli.scripts.measure_digits import measure_teacher

    data = tmp_path / "digits"
    build_digits_shards(data)
    result = measure_teacher(digits_model.TEACHER_PATH, data, num_per_digit=2, steps=4, guidance=3.0, out=tmp_path / "m")
    assert result["samples"] == 20 and len(result["prompt_alignment_per_digit"]) == 10
    assert result["fd_train_vs_heldout_floor"] > 0 and result["fd_samples_vs_heldout"] > 0
    assert json.loads((tmp_path / "m" / "measure.json").read_text())["samples"] == 20
    # a row per digit, two samples each: 10 x 2 cells of 16 px + 1 px gaps, upscaled 4x
    assert Image.open(tmp_path / "m" / "grid.png").size == ((2 * 17 + 1) * 4, (10 * 17 + 1) * 4)
    assert all((tmp_path / "m" / f"grid-{d}.png").is_file() for d in range(10))
