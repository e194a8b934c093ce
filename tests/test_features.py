import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ddil_cli.evaluate import features as F
from ddil_cli.evaluate.images import ImageFolderSource, prepare_image

TINY_DINO = dict(embed_dim=32, depth=2, num_heads=2)


@pytest.fixture(autouse=True)
def offline(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("DDIL_CACHE", str(tmp_path / "ddil-cache"))


class _TinyInceptionLayers(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.shrink = torch.nn.AvgPool2d(16)  # keeps the 2048-channel conv cheap on a CPU
        self.conv = torch.nn.Conv2d(3, 2048, 3)
        self.pool = torch.nn.AdaptiveAvgPool2d(1)

    def forward(self, x):
        return self.pool(torch.tanh(self.conv(self.shrink(x))))


class _TinyInception(torch.nn.Module):
    """Stands in for clean-fid's TorchScript Inception: same file name, `.layers`, output shape."""

    def __init__(self):
        super().__init__()
        self.layers = _TinyInceptionLayers()

    def forward(self, x, return_features: bool = False):
        return self.layers((x - 128) / 128)


def save_tiny_inception(folder: Path) -> Path:
    torch.manual_seed(0)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / F.INCEPTION_FILENAME
    torch.jit.script(_TinyInception()).save(str(path))
    return path


def save_tiny_dinov2(path: Path, seed: int = 0) -> Path:
    """Random tiny DINOv2 weights in the original checkpoint format (with mask_token)."""
    import timm

    torch.manual_seed(seed)
    model = timm.create_model(F.DINOV2_TIMM_NAME, pretrained=False, num_classes=0, **TINY_DINO)
    state = {k: v + 0.02 * torch.randn_like(v) for k, v in model.state_dict().items()}
    state["mask_token"] = torch.zeros(1, TINY_DINO["embed_dim"])
    torch.save(state, path)
    return path


def random_images(n, size=64, seed=0):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def test_prepare_image_crops_centre_and_resizes():
    img = np.zeros((40, 100, 3), np.uint8)
    img[:, 30:70] = 255  # the central 40 columns survive the crop
    out = prepare_image(Image.fromarray(img), 20)
    assert out.shape == (20, 20, 3) and out.dtype == np.uint8
    assert out.min() == 255


def test_inception_matches_clean_fid_folder_pipeline(tmp_path):
    from cleanfid.fid import get_folder_features

    save_tiny_inception(tmp_path / "w")
    extractor = F.build_feature_extractor("inception", F.ExtractorOptions(inception=str(tmp_path / "w")))
    images = random_images(5)
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i, img in enumerate(images):
        Image.fromarray(img).save(folder / f"{i}.png")
    ours = extractor.features_of(ImageFolderSource(folder).batches(64, 2))
    # clean-fid reads the same PNGs, resizes them its clean way and runs the same network
    theirs = get_folder_features(str(folder), model=extractor.model, num_workers=0, batch_size=5,
                                 device=torch.device("cpu"), mode="clean", verbose=False)
    np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-6)
    assert ours.shape == (5, 2048)
    assert extractor.describe()["weights_sha256"] == __import__("hashlib").sha256(
        (tmp_path / "w" / F.INCEPTION_FILENAME).read_bytes()).hexdigest()


def test_inception_renamed_file_loads(tmp_path):
    path = save_tiny_inception(tmp_path / "w")
    renamed = path.rename(tmp_path / "my-inception.pt")
    extractor = F.build_feature_extractor("inception", F.ExtractorOptions(inception=str(renamed)))
    assert extractor.features(random_images(2)).shape == (2, 2048)


def test_missing_weights_name_the_flag(tmp_path):
    opts = F.ExtractorOptions(inception=str(tmp_path / "nope.pt"), dinov2=str(tmp_path / "nope.pth"),
                              clip=str(tmp_path / "nope.bin"))
    for name, flag in [("inception", "--inception"), ("dinov2", "--dinov2"), ("clip", "--clip")]:
        with pytest.raises(F.WeightsUnavailable, match=flag):
            F.build_feature_extractor(name, opts)


def test_dinov2_timm_route_loads_file_and_interpolates_dinov2_style(tmp_path):
    path = save_tiny_dinov2(tmp_path / "dino.pth")
    opts = F.ExtractorOptions(dinov2=str(path), dinov2_model_kwargs=TINY_DINO)
    extractor = F.build_feature_extractor("dinov2", opts)
    images = random_images(3, size=96)
    feats = extractor.features(images)
    assert feats.shape == (3, TINY_DINO["embed_dim"]) and np.isfinite(feats).all()
    # the file's weights were loaded (not timm's random init) and its 37x37 grid became 16x16
    state = torch.load(path, weights_only=True)
    torch.testing.assert_close(extractor.model.blocks[0].attn.qkv.weight, state["blocks.0.attn.qkv.weight"])
    expected_pos = F.dinov2_interpolate_pos_embed(state["pos_embed"], 16)
    torch.testing.assert_close(extractor.model.pos_embed.data, expected_pos)
    assert expected_pos.shape[1] == 1 + 16 * 16
    # timm's own resampling (antialiased, output-size form) gives different positions
    from timm.layers import resample_abs_pos_embed
    assert not torch.allclose(resample_abs_pos_embed(state["pos_embed"], [16, 16]), expected_pos, atol=1e-4)


def test_dinov2_interpolation_is_identity_on_native_grid():
    pos = torch.randn(1, 1 + 16 * 16, 8)
    assert F.dinov2_interpolate_pos_embed(pos, 16) is pos


@pytest.mark.skipif(not os.environ.get("DDIL_DINOV2_REPO"),
                    reason="set DDIL_DINOV2_REPO to a local facebookresearch/dinov2 checkout")
def test_dinov2_timm_route_equals_reference_implementation(tmp_path, monkeypatch):
    # DINOv2's own ViT (what torch.hub builds), tiny, with the same weights as our timm route
    repo = os.environ["DDIL_DINOV2_REPO"]
    monkeypatch.syspath_prepend(repo)
    from dinov2.models.vision_transformer import vit_large  # noqa: F401  (import check)
    from dinov2.models.vision_transformer import DinoVisionTransformer

    path = save_tiny_dinov2(tmp_path / "dino.pth")
    ref = DinoVisionTransformer(img_size=518, patch_size=14, embed_dim=32, depth=2, num_heads=2,
                                init_values=1.0, block_chunks=0, interpolate_offset=0.1,
                                interpolate_antialias=False).eval()
    ref.load_state_dict(torch.load(path, weights_only=True))
    ours = F.build_feature_extractor("dinov2", F.ExtractorOptions(dinov2=str(path), dinov2_model_kwargs=TINY_DINO))
    images = random_images(3, size=96)
    with torch.no_grad():
        expected = ref(F.dinov2_preprocess(images)).numpy()
    np.testing.assert_allclose(ours.features(images), expected, rtol=1e-4, atol=1e-5)


def test_embedded_feature_space_hook(tmp_path):
    name = "embedded:digits"
    try:
        extractor = F.build_feature_extractor(name, F.ExtractorOptions())
    except F.WeightsUnavailable as exc:
        # unavailable is reported as such, naming how to make it available
        assert "register_feature_space" in str(exc) or "weights" in str(exc).lower()
    else:
        assert extractor.name == name or name in str(extractor.describe())


def test_registry_accepts_a_new_space():
    class Mean(F.FeatureExtractor):
        name = "test:mean"
        description = "channel means"

        def features(self, batch):
            return batch.reshape(len(batch), -1, 3).mean(1).astype(np.float32)

    F.register_feature_space("test:mean", lambda opts: Mean(None, opts), replace=True)
    assert "test:mean" in F.feature_space_names()
    out = F.build_feature_extractor("test:mean", F.ExtractorOptions()).features(random_images(2))
    assert out.shape == (2, 3)
    with pytest.raises(Exception, match="unknown feature space"):
        F.build_feature_extractor("nonsense", F.ExtractorOptions())


def test_webdataset_shards_reference(tmp_path):
    import io
    import tarfile

    from ddil_cli.evaluate.images import ShardSource

    imgs = random_images(3, size=40)
    with tarfile.open(tmp_path / "shard-000.tar", "w") as tar:
        for i, img in enumerate(imgs):
            for ext, data in (("png", None), ("txt", f"caption {i}".encode())):
                if data is None:
                    buf = io.BytesIO()
                    Image.fromarray(img).save(buf, format="PNG")
                    data = buf.getvalue()
                info = tarfile.TarInfo(f"{i:04d}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    source = ShardSource.from_arg(str(tmp_path))
    assert len(source) == 3
    batches = list(source.batches(40, 2))
    assert [len(b) for b in batches] == [2, 1]
    np.testing.assert_array_equal(np.concatenate(batches), imgs)  # PNG is lossless, 40 -> 40 is no resize
    assert len(ShardSource.from_arg(str(tmp_path / "*.tar"), limit=2)) == 2
    assert source.manifest_hash() == ShardSource.from_arg(str(tmp_path / "shard-000.tar")).manifest_hash()
