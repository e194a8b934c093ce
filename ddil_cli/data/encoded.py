"""Encoded shards: image-caption data already in a teacher's state space (`ddil encode`'s output).

A folder of webdataset shards, one per input shard (`encoded-NNNNNN.tar`, the input's index in
the resolved --data list, so the split across processes is the raw data's), each with a side
file `encoded-NNNNNN.json` (the input shard and its counts; written after the tar, so its
presence says the shard is complete). A sample is `KEY.safetensors` (tensor `latent`: the clean
state, the VAE latent mean times the scaling factor, minus the shift, or the image itself for a
pixel-space teacher; tensors `cond.NAME`: the prompt's encodings, one row) and `KEY.txt` (the
caption). `uncond.safetensors` holds the empty prompt's encodings once; `encoded.json` names the
teacher, its encoder's fingerprint, the resolution, crop, dtype and the input shards.

A reader (`EncodedShards`) refuses a folder whose encoder is not the teacher's (another VAE or
text encoder), or whose encoding is unfinished, in one line.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch

from ddil_cli.errors import UserError

FORMAT = "ddil-encoded/1"
MANIFEST_NAME = "encoded.json"
UNCOND_NAME = "uncond.safetensors"
CROP = "shorter side resized to the resolution (PIL bilinear, antialiased), centre square kept"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def shard_name(index: int) -> str:
    return f"encoded-{index:06d}.tar"


def shard_record_name(index: int) -> str:
    return f"encoded-{index:06d}.json"


def is_encoded(data) -> bool:
    """True when --data names a folder written by `ddil encode`."""
    return isinstance(data, (str, Path)) and (Path(str(data)).expanduser() / MANIFEST_NAME).is_file()


def _encoder_modules(teacher) -> list[tuple[str, torch.nn.Module]]:
    modules = [(name, enc) for name, enc in sorted(getattr(teacher, "text_encoders", {}).items())]
    if getattr(teacher, "vae", None) is not None:
        modules.append(("vae", teacher.vae))
    return modules


def encoder_fingerprint(teacher) -> str:
    """sha256 of the teacher's VAE and text encoders (weights rounded to bfloat16, so the same
    networks loaded in float32 or bfloat16 agree) and the VAE's scaling: what makes an encoding.
    Memoised on the teacher: hashing an SD VAE and text encoder takes about a second."""
    cached = getattr(teacher, "_encoder_fingerprint", None)
    if cached is not None:
        return cached
    h = hashlib.sha256()
    vae = getattr(teacher, "vae", None)
    if vae is not None:
        h.update(json.dumps({"scaling_factor": vae.config.scaling_factor,
                             "shift_factor": getattr(vae.config, "shift_factor", None)}).encode())
    for name, module in _encoder_modules(teacher):
        for key, tensor in sorted(module.state_dict().items()):
            h.update(f"{name}.{key}:{tuple(tensor.shape)}".encode())
            h.update(tensor.detach().to("cpu", torch.bfloat16).contiguous().view(torch.int16).numpy().tobytes())
    digest = "sha256:" + h.hexdigest()
    teacher._encoder_fingerprint = digest
    return digest


def encoding_header(teacher, teacher_source: str, inputs: list[str], dtype: str) -> dict[str, Any]:
    """What `encoded.json` says about an encoding; equal headers mean interchangeable encodings."""
    height, width = teacher.image_hw
    return {"format": FORMAT, "teacher": teacher_source, "encoder_fingerprint": encoder_fingerprint(teacher),
            "resolution": [int(height), int(width)], "channels": int(teacher.image_channels), "crop": CROP,
            "state_shape": list(teacher.state_shape), "dtype": dtype, "inputs": list(inputs),
            "shards": len(inputs)}


def read_manifest(folder: Path) -> dict[str, Any]:
    path = Path(folder) / MANIFEST_NAME
    try:
        manifest = json.loads(path.read_text())
        if manifest.get("format") != FORMAT:
            raise ValueError(f"format {manifest.get('format')!r}, not {FORMAT}")
        return manifest
    except (OSError, ValueError, AttributeError) as exc:
        raise UserError(f"{path} is unreadable ({' '.join(str(exc).split())[:120]}); re-run ddil encode "
                        "into a new --out") from None


def pack_sample(latent: torch.Tensor, cond: dict[str, torch.Tensor], dtype: torch.dtype) -> bytes:
    from safetensors.torch import save

    tensors = {"latent": latent.to(dtype).contiguous()}
    tensors.update({f"cond.{k}": v.to(dtype).contiguous() for k, v in cond.items()})
    return save(tensors)


def unpack_sample(data: bytes) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    from safetensors.torch import load

    tensors = load(data)
    return tensors.pop("latent"), {k[5:]: v for k, v in tensors.items() if k.startswith("cond.")}


@dataclass
class EncodedSample:
    key: str
    latent: torch.Tensor  # the clean state (C, H, W) in the stored dtype
    cond: dict[str, torch.Tensor]
    caption: str


def decode_encoded(raw: dict[str, Any]) -> EncodedSample:
    """An encoded shard's record (the files of one key) as an EncodedSample."""
    latent, cond = unpack_sample(raw["safetensors"])
    return EncodedSample(raw["__key__"], latent, cond, raw["txt"].decode("utf-8"))


def check_encoding(manifest: dict[str, Any], teacher, folder: Path) -> None:
    """UserError unless `teacher` encodes data as this folder's encoder did."""
    if list(manifest.get("state_shape", [])) != list(teacher.state_shape):
        raise UserError(f"encoded data {folder} holds states {tuple(manifest.get('state_shape', []))}, the teacher's "
                        f"are {tuple(teacher.state_shape)}; encode the data with this teacher (ddil encode --teacher)")
    if manifest.get("encoder_fingerprint") != encoder_fingerprint(teacher):
        raise UserError(f"encoded data {folder} was made by another encoder ({manifest.get('teacher')}'s VAE or text "
                        "encoder, not this teacher's); encode the data with this teacher (ddil encode --teacher)")


class EncodedShards:
    """Iterate the samples of an encoded folder (this process's part of its shards, in order)."""

    def __init__(self, folder, teacher, *, part: int = 0, parts: int = 1):
        self.folder = Path(str(folder)).expanduser()
        self.manifest = read_manifest(self.folder)
        check_encoding(self.manifest, teacher, self.folder)
        total = int(self.manifest["shards"])
        done = [i for i in range(total) if (self.folder / shard_record_name(i)).is_file()]
        if len(done) < total:
            raise UserError(f"encoded data {self.folder} is unfinished ({len(done)} of {total} shards); re-run the "
                            "same ddil encode command to finish it")
        indices = list(range(total))
        self.urls = [str(self.folder / shard_name(i)) for i in (indices[part::parts] if total >= parts else indices)]
        self.used = 0

    def __iter__(self) -> Iterator[EncodedSample]:
        from ddil_cli.data.shards import read_records

        self.used = 0
        for raw in read_records(self.urls):
            self.used += 1
            yield decode_encoded(raw)
