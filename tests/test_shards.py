"""The image-caption shard reader and the digits shards, against independent references."""

import hashlib
import io
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import webdataset as wds
from PIL import Image

from ddil_cli.data.digits import (CAPTION_TEMPLATES, build_digits_shards, digit_from_prompt, split_source)
from ddil_cli.data.shards import ImageCaptionShards, load_image_captions, resolve_shards
from ddil_cli.errors import UserError


def png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def write_tar(path, samples):
    with wds.TarWriter(str(path)) as sink:
        for sample in samples:
            sink.write(sample)
    return path


@pytest.fixture(scope="module")
def digits_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("digits")
    build_digits_shards(out)
    return out


def test_digits_split_counts_disjoint_stratified_and_true_to_sklearn(digits_dir):
    from sklearn.datasets import load_digits

    bunch = load_digits()
    info = json.loads((digits_dir / "digits.json").read_text())
    train = load_image_captions(split_source(digits_dir, "train"), resolution=8, channels=1, output="uint8")
    held = load_image_captions(split_source(digits_dir, "heldout"), resolution=8, channels=1, output="uint8")
    assert (len(train), len(held)) == (1500, 297) == (info["splits"]["train"]["count"], info["splits"]["heldout"]["count"])
    src_train = [m["source_index"] for m in train.metadata]
    src_held = [m["source_index"] for m in held.metadata]
    assert not set(src_train) & set(src_held) and len(set(src_train) | set(src_held)) == 1797
    # stratified: every class keeps (almost exactly) its share of the held-out split
    held_counts = np.bincount([m["label"] for m in held.metadata], minlength=10)
    expected = np.bincount(bunch.target, minlength=10) * 297 / 1797
    assert np.abs(held_counts - expected).max() <= 1
    # native-resolution pixels are the sklearn values scaled from 0..16 to 0..255
    for data, src in ((train, src_train), (held, src_held)):
        reference = np.rint(bunch.images[src] * 255 / 16).astype(np.uint8)
        assert np.array_equal(data.images[..., 0], reference)
        labels = [m["label"] for m in data.metadata]
        assert labels == bunch.target[src].tolist()
        assert [digit_from_prompt(c) for c in data.captions] == labels
    prompts = (digits_dir / "prompts.txt").read_text().splitlines()
    assert [digit_from_prompt(p) for p in prompts] == list(range(10))
    used = {m["caption_template"] for m in train.metadata}
    assert used == set(range(len(CAPTION_TEMPLATES)))  # every phrasing occurs


def test_digits_shards_are_byte_identical_when_rebuilt(digits_dir, tmp_path):
    info = json.loads((digits_dir / "digits.json").read_text())
    build_digits_shards(tmp_path)
    for split in info["splits"].values():
        for name, digest in split["sha256"].items():
            assert hashlib.sha256((tmp_path / name).read_bytes()).hexdigest() == digest


def test_upsampling_is_bilinear_half_pixel(digits_dir):
    """8 -> 16 through the reader equals torch's bilinear (align_corners=False) within rounding."""
    native = load_image_captions(split_source(digits_dir, "heldout"), resolution=8, channels=1, output="uint8")
    up = load_image_captions(split_source(digits_dir, "heldout"), resolution=16, channels=1, output="tensor")
    reference = F.interpolate(torch.from_numpy(native.images).float().permute(0, 3, 1, 2), size=16,
                              mode="bilinear", align_corners=False)
    ours = (up.images + 1) * 127.5
    assert up.images.shape == (297, 1, 16, 16) and up.images.min() >= -1 and up.images.max() <= 1
    assert (ours - reference).abs().max() <= 1.01


def test_rgb_center_crop_and_sources(tmp_path):
    wide = np.zeros((10, 30, 3), dtype=np.uint8)
    wide[:, 10:20] = (200, 100, 50)
    wide[:, :10] = 255
    shard = write_tar(tmp_path / "a-000000.tar", [{"__key__": "k0", "png": png(wide), "txt": "a wide image"}])
    write_tar(tmp_path / "a-000001.tar", [{"__key__": "k1", "png": png(wide), "txt": "another"}])
    (sample,) = list(ImageCaptionShards(str(shard), resolution=10, channels=3))
    assert np.array_equal(sample.image, wide[:, 10:20]) and sample.caption == "a wide image"
    gray = next(iter(ImageCaptionShards(str(shard), resolution=10, channels=1, output="tensor"))).image
    assert gray.shape == (1, 10, 10)
    # brace pattern, folder, glob and pipe: all reach the same two samples
    for source in (str(tmp_path / "a-{000000..000001}.tar"), str(tmp_path), str(tmp_path / "a-*.tar"),
                   [f"pipe:cat {tmp_path / 'a-000000.tar'}", f"pipe:cat {tmp_path / 'a-000001.tar'}"]):
        assert [s.key for s in ImageCaptionShards(source, resolution=10)] == ["k0", "k1"]


def test_broken_samples_are_skipped_and_counted(tmp_path):
    good = png(np.full((8, 8), 128, dtype=np.uint8))
    write_tar(tmp_path / "mixed.tar", [
        {"__key__": "ok1", "png": good, "txt": "fine", "json": json.dumps({"label": 1})},
        {"__key__": "nocap", "png": good},
        {"__key__": "emptycap", "png": good, "txt": "   "},
        {"__key__": "badimg", "png": b"not a png at all", "txt": "broken"},
        {"__key__": "noimg", "txt": "caption only"},
        {"__key__": "badjson", "png": good, "txt": "x", "json": "{oops"},
        {"__key__": "ok2", "jpg": good, "txt": "a png under .jpg still decodes"},
    ])
    data = load_image_captions(str(tmp_path / "mixed.tar"), resolution=8, channels=1)
    assert data.keys == ["ok1", "ok2"] and data.metadata[0] == {"label": 1}
    assert data.stats.read == 7 and data.stats.used == 2
    assert dict(data.stats.skipped) == {"missing_caption": 2, "bad_image": 1, "missing_image": 1, "bad_metadata": 1}
    assert "5 skipped" in data.stats.summary()


def test_nothing_usable_and_bad_paths_are_user_errors(tmp_path):
    write_tar(tmp_path / "bad.tar", [{"__key__": "x", "txt": "no image"}, {"__key__": "y", "png": b"junk"}])
    with pytest.raises(UserError, match="no usable image-caption samples.*1 missing image"):
        load_image_captions(str(tmp_path / "bad.tar"), resolution=8)
    with pytest.raises(UserError, match="does not exist"):
        resolve_shards(str(tmp_path / "nowhere"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="holds no .tar shards"):
        resolve_shards(str(tmp_path / "empty"))
    with pytest.raises(UserError, match="no data path"):
        resolve_shards("")
    with pytest.raises(UserError, match="matches no files"):
        resolve_shards(str(tmp_path / "x-*.tar"))
