import json

import numpy as np
import pytest
import torch

from ddil_cli.evaluate.clip_score import clip_cosines, summarize_clip_scores
from ddil_cli.evaluate.features import ClipExtractor, ClipModel, ExtractorOptions, WeightsUnavailable

TINY_ARCH = "ddil-tiny-clip-test"
TINY_CONFIG = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 8},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


@pytest.fixture
def tiny_clip(monkeypatch, tmp_path):
    """A registered tiny OpenCLIP config and random weights saved to a file."""
    import open_clip

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    cfg_dir = tmp_path / "cfg"
    cfg_dir.mkdir()
    (cfg_dir / f"{TINY_ARCH}.json").write_text(json.dumps(TINY_CONFIG))
    open_clip.add_model_config(cfg_dir)
    torch.manual_seed(0)
    model = open_clip.create_model(TINY_ARCH)
    path = tmp_path / "tiny_clip.pt"
    torch.save(model.state_dict(), path)
    return path, model.eval()


def images(n, seed):
    return np.random.default_rng(seed).integers(0, 256, (n, 48, 48, 3), dtype=np.uint8)


def test_reloaded_by_path_scores_like_the_saved_model(tiny_clip):
    path, original = tiny_clip
    clip = ClipModel(ExtractorOptions(clip=str(path), clip_arch=TINY_ARCH))
    for a, b in zip(clip.model.state_dict().values(), original.state_dict().values()):
        torch.testing.assert_close(a, b)
    x, prompts = images(3, 0), ["a cat", "a dog on a skateboard", "an astronaut"]
    cos = clip_cosines(clip, [(x[:2], prompts[:2]), (x[2:], prompts[2:])])
    # reference: the saved model, its own transform and tokenizer, cosine by hand
    import open_clip
    from PIL import Image
    _, _, preprocess = open_clip.create_model_and_transforms(TINY_ARCH)
    with torch.no_grad():
        img = original.encode_image(torch.stack([preprocess(Image.fromarray(i)) for i in x]))
        txt = original.encode_text(open_clip.get_tokenizer(TINY_ARCH)(prompts))
    expected = torch.nn.functional.cosine_similarity(img, txt).numpy()
    np.testing.assert_allclose(cos, expected, rtol=1e-4, atol=1e-6)
    summary = summarize_clip_scores(cos)
    assert summary["clip_score_x100"] == pytest.approx(100 * expected.mean(), rel=1e-4)
    assert summary["num_samples"] == 3


def test_clip_feature_space_is_normalised(tiny_clip):
    path, _ = tiny_clip
    feats = ClipExtractor(ExtractorOptions(clip=str(path), clip_arch=TINY_ARCH)).features(images(4, 1))
    np.testing.assert_allclose(np.linalg.norm(feats, axis=1), 1.0, rtol=1e-5)


def test_missing_weights_are_unavailable_not_downloaded(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(WeightsUnavailable, match="--clip"):
        ClipModel(ExtractorOptions())  # default ViT-g-14, nothing in the HF cache
