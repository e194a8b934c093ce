import numpy as np
import pytest
import torch
import torchvision

from ddil_cli.evaluate.features import ExtractorOptions, WeightsUnavailable
from ddil_cli.evaluate.lpips_div import ALEXNET_FILENAME, LpipsModel, lpips_diversity


@pytest.fixture
def torch_home(monkeypatch, tmp_path):
    """A random AlexNet trunk where torchvision's download would put it, in a temp TORCH_HOME."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    ckpt = tmp_path / "torch" / "hub" / "checkpoints"
    ckpt.mkdir(parents=True)
    torch.manual_seed(0)
    torch.save(torchvision.models.alexnet(weights=None).state_dict(), ckpt / ALEXNET_FILENAME)
    return ckpt / ALEXNET_FILENAME


def images(n, seed, size=64):
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def test_lpips_of_identical_images_is_zero(torch_home):
    model = LpipsModel(ExtractorOptions())
    x = images(3, 0)
    np.testing.assert_allclose(model.distance(x, x), 0.0, atol=1e-7)
    assert (model.distance(x, images(3, 1)) > 0).all()


def test_matches_lpips_package_loading_the_same_trunk(torch_home):
    import lpips

    # the package's own path: torchvision finds the file in TORCH_HOME and does not download
    reference = lpips.LPIPS(net="alex", verbose=False).eval()
    ours = LpipsModel(ExtractorOptions(lpips_backbone=str(torch_home)))
    a, b = images(4, 2), images(4, 3)
    with torch.no_grad():
        expected = reference(torch.from_numpy(a).permute(0, 3, 1, 2).float() / 127.5 - 1,
                             torch.from_numpy(b).permute(0, 3, 1, 2).float() / 127.5 - 1).flatten().numpy()
    np.testing.assert_allclose(ours.distance(a, b), expected, rtol=1e-5)


def test_identical_seeds_give_zero_diversity(torch_home):
    model = LpipsModel(ExtractorOptions())
    same = np.repeat(images(1, 4), 4, axis=0)
    pool = {0: same, 1: images(4, 5)}
    load = lambda idx: np.stack([pool[i // 4][i % 4] for i in idx])
    out = lpips_diversity(model, {"a": [0, 1, 2, 3]}, load)
    assert out["lpips_diversity"] == pytest.approx(0.0, abs=1e-7)
    out = lpips_diversity(model, {"a": [0, 1, 2, 3], "b": [4, 5, 6, 7], "single": [0]}, load, batch_size=4)
    assert out["num_prompts"] == 2 and out["num_pairs"] == 12
    # mean over prompts of per-prompt means: (0 + d_b) / 2, std = d_b / 2
    assert out["std_over_prompts"] == pytest.approx(out["lpips_diversity"], rel=1e-9)
    assert out["lpips_diversity"] > 0


def test_no_groups_is_reported_not_crashed(torch_home):
    out = lpips_diversity(LpipsModel(ExtractorOptions()), {"a": [0]}, lambda idx: images(1, 0))
    assert out["available"] is False


def test_missing_trunk_names_the_flag(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty"))
    with pytest.raises(WeightsUnavailable, match="--lpips-backbone"):
        LpipsModel(ExtractorOptions())
