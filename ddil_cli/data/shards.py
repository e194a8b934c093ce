"""The image-caption webdataset reader every piece of real data in the project goes through.

A shard is a tar of samples grouped by key, the layout of LAION / COCO / img2dataset shards:
`KEY.png` (or .jpg/.jpeg/.webp), `KEY.txt` (the caption) and optionally `KEY.json` (metadata).
Sources: a local .tar file, a directory of .tar files, a glob, a brace pattern
(`train-{000000..000009}.tar`), a `pipe:COMMAND` or an http(s) URL, or a list of them.

Samples whose caption is missing or empty, or whose image is missing or cannot be decoded, are
skipped and counted (`ShardStats`), never fatal: a crawl always has a few broken ones. Nothing
usable at all is a `UserError`.

Resolution change (documented, deterministic): the image is converted to the requested mode
('L' for 1 channel, 'RGB' for 3), its shorter side is resized to `resolution` with PIL's
bilinear filter (antialiased when shrinking) and the centre `resolution x resolution` square is
kept. Tensors are `x = uint8 / 127.5 - 1` in [-1, 1], channels first.
"""

from __future__ import annotations

import glob
import io
import json
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from ddil_cli.errors import UserError

IMAGE_EXTENSIONS = ("png", "jpg", "jpeg", "webp")
CAPTION_EXTENSIONS = ("txt", "caption")
SKIP_REASONS = ("missing_image", "bad_image", "missing_caption", "bad_metadata")


@dataclass
class ShardStats:
    """How many samples were read, kept, and skipped (by reason)."""

    shards: int = 0
    read: int = 0
    used: int = 0
    skipped: Counter = field(default_factory=Counter)

    @property
    def skipped_total(self) -> int:
        return sum(self.skipped.values())

    def summary(self) -> str:
        reasons = ", ".join(f"{n} {r.replace('_', ' ')}" for r, n in sorted(self.skipped.items()) if n)
        text = f"{self.used} samples used from {self.shards} shard(s)"
        return text + (f"; {self.skipped_total} skipped ({reasons})" if self.skipped_total else "")

    def as_dict(self) -> dict[str, Any]:
        return {"shards": self.shards, "read": self.read, "used": self.used,
                "skipped": dict(self.skipped), "skipped_total": self.skipped_total}


@dataclass
class Sample:
    key: str
    image: np.ndarray | torch.Tensor  # uint8 (H, W, C) or float32 (C, H, W) in [-1, 1]
    caption: str
    metadata: dict[str, Any]
    url: str


def _is_remote(url: str) -> bool:
    return url.startswith("pipe:") or "://" in url


def resolve_shards(source: str | os.PathLike | Sequence[str | os.PathLike]) -> list[str]:
    """Expand a source into shard URLs; local ones must exist (UserError otherwise)."""
    import braceexpand

    sources = [source] if isinstance(source, (str, os.PathLike)) else list(source)
    if not sources or all(not str(s).strip() for s in sources):
        raise UserError("no data path given; pass --data with a shard file, directory, brace pattern or pipe: URL")
    urls: list[str] = []
    for item in sources:
        text = str(item).strip()
        if _is_remote(text):
            urls.extend(braceexpand.braceexpand(text) if not text.startswith("pipe:") else [text])
            continue
        for expanded in braceexpand.braceexpand(text):
            path = Path(expanded).expanduser()
            if path.is_dir():
                found = sorted(str(p) for p in path.glob("*.tar"))
                if not found:
                    raise UserError(f"data directory {path} holds no .tar shards; point --data at a folder "
                                    f"of webdataset shards (make the digits ones with `python -m ddil_cli.data.digits`)")
                urls.extend(found)
            elif path.is_file():
                urls.append(str(path))
            elif glob.has_magic(expanded):
                found = sorted(glob.glob(str(path)))
                if not found:
                    raise UserError(f"data pattern {expanded!r} matches no files; check the path")
                urls.extend(found)
            else:
                raise UserError(f"data path {path} does not exist; check the path or make the shards first")
    return urls


def _all_shards(urls):
    """A webdataset node splitter that keeps every shard it is given."""
    return urls


def tar_problem(exc: BaseException) -> str:
    """What is wrong with a shard, in a few words, from the exception reading it raised."""
    text = " ".join(str(exc).split())
    if "could not be opened successfully" in text or "invalid header" in text or "bad checksum" in text:
        return "not a tar archive, or its header is corrupt"
    if "unexpected end of data" in text or isinstance(exc, EOFError):
        return "truncated: it ends in the middle of a file"
    return f"{type(exc).__name__}: {text[:120]}"


def _refuse_damaged_shard(exn: BaseException) -> bool:
    """webdataset's error handler for --data shards: a shard that cannot be read stops the command
    with its name (a half-read data set would change the run without saying so)."""
    url = next((a for a in reversed(getattr(exn, "args", ())) if isinstance(a, str) and a), None)
    where = f"data shard {url}" if url else "a data shard"
    raise UserError(f"{where} cannot be read ({tar_problem(exn)}); replace it or leave it out of --data") from None


def _first(sample: dict[str, Any], extensions: Sequence[str]) -> tuple[str, bytes] | None:
    for ext in extensions:
        value = sample.get(ext)
        if value is not None:
            return ext, value
    return None


def _resize_center(img: Image.Image, resolution: int) -> Image.Image:
    w, h = img.size
    scale = resolution / min(w, h)
    new_w, new_h = max(resolution, round(w * scale)), max(resolution, round(h * scale))
    if (new_w, new_h) != (w, h):
        img = img.resize((new_w, new_h), Image.BILINEAR, reducing_gap=None)
    left, top = (new_w - resolution) // 2, (new_h - resolution) // 2
    return img.crop((left, top, left + resolution, top + resolution))


def image_to_array(data: bytes, *, channels: int = 3, resolution: int | None = None) -> np.ndarray:
    """Encoded image bytes -> uint8 (H, W, C) after the documented mode change and resize."""
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels}")
    with Image.open(io.BytesIO(data)) as img:
        img.load()
        img = img.convert("L" if channels == 1 else "RGB")
    if resolution is not None:
        img = _resize_center(img, resolution)
    array = np.array(img, dtype=np.uint8)  # a writable copy (PIL buffers are read-only)
    return array[:, :, None] if array.ndim == 2 else array


def to_model_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 (..., H, W, C) -> float32 (..., C, H, W) in [-1, 1]."""
    x = torch.from_numpy(np.ascontiguousarray(images)).float() / 127.5 - 1.0
    return x.movedim(-1, -3)


def decode_sample(raw: dict[str, Any], *, resolution: int | None, channels: int = 3,
                  output: str = "uint8") -> Sample | str:
    """A webdataset record (a dict of the files of one key) as a Sample, or the reason it is skipped."""
    image = _first(raw, IMAGE_EXTENSIONS)
    if image is None:
        return "missing_image"
    caption = _first(raw, CAPTION_EXTENSIONS)
    text = caption[1].decode("utf-8", errors="replace").strip() if caption else ""
    if not text:
        return "missing_caption"
    try:
        array = image_to_array(image[1], channels=channels, resolution=resolution)
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError):
        return "bad_image"
    metadata: dict[str, Any] = {}
    if raw.get("json") is not None:
        try:
            metadata = json.loads(raw["json"])
        except (ValueError, UnicodeDecodeError):
            return "bad_metadata"
    out = to_model_tensor(array) if output == "tensor" else array
    return Sample(raw["__key__"], out, text, metadata, raw.get("__url__", ""))


def read_records(urls: Sequence[str], shuffle: bool | int = False):
    """The raw records (one dict per key) of `urls`, in order (or webdataset's shard shuffle), all
    of them whatever launcher rank or DataLoader worker reads them: the caller picked the shards
    (without a nodesplitter webdataset refuses to run under torchrun at all). A damaged shard stops
    with a UserError naming it."""
    import webdataset as wds

    # empty_check=False: a shard list smaller than the worker count is legal here
    return wds.WebDataset(list(urls), shardshuffle=shuffle, empty_check=False, nodesplitter=_all_shards,
                          workersplitter=_all_shards, handler=_refuse_damaged_shard)


class ImageCaptionShards:
    """Iterate the usable (image, caption, metadata) samples of image-caption shards.

    `output='uint8'` yields (H, W, C) uint8 arrays; `'tensor'` yields (C, H, W) float32 in [-1, 1].
    `stats` is filled while iterating (a fresh count per pass).
    """

    def __init__(self, source, *, resolution: int | None = None, channels: int = 3,
                 output: str = "uint8", shuffle_shards: bool | int = False):
        if output not in ("uint8", "tensor"):
            raise ValueError(f"output must be 'uint8' or 'tensor', got {output!r}")
        self.urls = resolve_shards(source)
        self.resolution, self.channels, self.output = resolution, channels, output
        self.shuffle_shards = shuffle_shards
        self.stats = ShardStats(shards=len(self.urls))

    def _decode(self, raw: dict[str, Any]) -> Sample | str:
        return decode_sample(raw, resolution=self.resolution, channels=self.channels, output=self.output)

    def __iter__(self) -> Iterator[Sample]:
        self.stats = ShardStats(shards=len(self.urls))
        for raw in read_records(self.urls, self.shuffle_shards):
            self.stats.read += 1
            decoded = self._decode(raw)
            if isinstance(decoded, str):
                self.stats.skipped[decoded] += 1
                continue
            self.stats.used += 1
            yield decoded


@dataclass
class ImageCaptionSet:
    """A whole (small) image-caption set in memory."""

    images: torch.Tensor | np.ndarray  # float32 (N, C, H, W) in [-1, 1] or uint8 (N, H, W, C)
    captions: list[str]
    metadata: list[dict[str, Any]]
    keys: list[str]
    stats: ShardStats

    def __len__(self) -> int:
        return len(self.captions)


def load_image_captions(source, *, resolution: int, channels: int = 3, output: str = "tensor",
                        limit: int | None = None) -> ImageCaptionSet:
    """Read every usable sample (up to `limit`) into memory; UserError if none is usable."""
    reader = ImageCaptionShards(source, resolution=resolution, channels=channels, output=output)
    images, captions, metadata, keys = [], [], [], []
    for sample in reader:
        images.append(sample.image)
        captions.append(sample.caption)
        metadata.append(sample.metadata)
        keys.append(sample.key)
        if limit is not None and len(captions) >= limit:
            break
    if not captions:
        raise UserError(f"no usable image-caption samples in {', '.join(reader.urls[:3])}"
                        f"{' ...' if len(reader.urls) > 3 else ''} ({reader.stats.summary()}); each sample "
                        f"needs an image (.png/.jpg/.webp) and a non-empty .txt caption")
    stacked = torch.stack(images) if output == "tensor" else np.stack(images)
    return ImageCaptionSet(stacked, captions, metadata, keys, reader.stats)
