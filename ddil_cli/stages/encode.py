"""`ddil encode`: an image-caption webdataset in, the teacher's clean states and prompt encodings out.

Each input shard becomes one encoded shard (format: ddil_cli/data/encoded.py), so a launch of N
processes splits the work by shard (rank r takes shards r, r + N, ...) and writes the same files
as one process. A shard is published whole (temporary name, then rename) and its record after it:
re-running the same command skips the finished shards, so an interrupted encoding resumes where
it stopped. Undecodable images and empty captions are skipped and counted (as every --data
reader does); a damaged tar stops the command with its name, the finished shards kept.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ddil_cli.atomic import atomic_file, save_tensors_atomic, write_json_atomic
from ddil_cli.buffer.sources import is_mixture_teacher
from ddil_cli.data.encoded import (DTYPES, MANIFEST_NAME, UNCOND_NAME, encoding_header, pack_sample, read_manifest,
                                   shard_name, shard_record_name)
from ddil_cli.data.shards import ImageCaptionShards, resolve_shards
from ddil_cli.errors import UserError
from ddil_cli.models.base import Denoiser


@dataclass
class EncodeConfig:
    teacher: str = ""
    data: str = ""
    batch_size: int = 16
    dtype: str = "float32"
    device: str = "cpu"
    out: str = "encoded"
    quiet: bool = False


def _check_out(out: Path, header: dict[str, Any]) -> None:
    """A new or empty --out, or an encoding of the same data by the same encoder (a resume)."""
    if not out.exists():
        return
    if not out.is_dir():
        raise UserError(f"--out {out} is a file; give a folder path")
    if not (out / MANIFEST_NAME).is_file():
        if any(p for p in out.iterdir() if not p.name.startswith(".")):
            raise UserError(f"--out {out} exists and holds no encoding; choose a new or empty folder")
        return
    existing = read_manifest(out)
    for key in header:
        if key != "teacher" and existing.get(key) != header[key]:
            raise UserError(f"--out {out} holds another encoding (its {key} differ: {str(existing.get(key))[:80]}); "
                            "re-run with the arguments that made it, or choose another --out")


def _encode_batch(teacher: Denoiser, samples: list, dtype: torch.dtype) -> list[tuple[str, bytes, str]]:
    latents = teacher.encode_images(torch.stack([s.image for s in samples])).cpu()
    cond = {k: v.detach().cpu() for k, v in teacher.encode([s.caption for s in samples]).cond.items()}
    return [(s.key, pack_sample(latents[i], {k: v[i] for k, v in cond.items()}, dtype), s.caption)
            for i, s in enumerate(samples)]


def encode_shard(teacher: Denoiser, url: str, index: int, out: Path, batch_size: int, dtype: torch.dtype) -> dict:
    """Encode one input shard into `out/encoded-INDEX.tar` (published whole), then its record."""
    import webdataset as wds

    height, _ = teacher.image_hw
    reader = ImageCaptionShards([url], resolution=height, channels=teacher.image_channels, output="tensor")
    with atomic_file(out / shard_name(index)) as tmp, open(tmp, "wb") as stream:
        # mtime fixed: the same data and teacher give byte-identical shards, however many processes
        sink = wds.TarWriter(stream, mtime=0)
        pending = []
        for sample in reader:
            pending.append(sample)
            if len(pending) == batch_size:
                for key, packed, caption in _encode_batch(teacher, pending, dtype):
                    sink.write({"__key__": key, "safetensors": packed, "txt": caption})
                pending = []
        if pending:
            for key, packed, caption in _encode_batch(teacher, pending, dtype):
                sink.write({"__key__": key, "safetensors": packed, "txt": caption})
        sink.close()
    stats = reader.stats.as_dict()
    stats.pop("shards")
    record = {"input": url, **stats}
    write_json_atomic(out / shard_record_name(index), record)
    return record


def run_encode(cfg: EncodeConfig, teacher: Denoiser, *, rank: int = 0, world_size: int = 1, progress=None) -> dict:
    """Encode this process's share of the input shards into `cfg.out`. Returns a summary."""
    if is_mixture_teacher(teacher) or not hasattr(teacher, "image_hw"):
        raise UserError("--teacher must be an image model (a diffusers pipeline or embedded:digits); the "
                        "Gaussian-mixture lab draws its own data")
    if cfg.dtype not in DTYPES:
        raise UserError(f"--dtype {cfg.dtype!r}: use one of {', '.join(DTYPES)}")
    height, width = teacher.image_hw
    if height != width:
        raise UserError(f"the teacher's images are {height}x{width}; ddil encode needs a square image size")
    urls = resolve_shards(cfg.data)
    out = Path(cfg.out)
    header = encoding_header(teacher, cfg.teacher, urls, cfg.dtype)
    _check_out(out, header)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"cannot create {out} ({exc.strerror}); choose a writable --out") from None
    write_json_atomic(out / MANIFEST_NAME, header)  # every rank writes the same header
    if not (out / UNCOND_NAME).is_file():
        uncond = teacher.encode([""]).uncond or {}
        save_tensors_atomic({k: v[0].detach().cpu().to(DTYPES[cfg.dtype]).contiguous() for k, v in uncond.items()},
                            out / UNCOND_NAME)
    mine = list(range(len(urls)))[rank::world_size]
    todo = [i for i in mine if not (out / shard_record_name(i)).is_file()]
    task = progress.add_task("encoding shards", total=len(mine), completed=len(mine) - len(todo)) \
        if progress is not None else None
    start = time.perf_counter()
    written = []
    for index in todo:
        written.append(encode_shard(teacher, urls[index], index, out, cfg.batch_size, DTYPES[cfg.dtype]))
        if task is not None:
            progress.advance(task, 1)
    seconds = time.perf_counter() - start
    used = sum(r["used"] for r in written)
    skipped: dict[str, int] = {}
    for record in written:
        for reason, n in record["skipped"].items():
            skipped[reason] = skipped.get(reason, 0) + n
    finished = sum((out / shard_record_name(i)).is_file() for i in range(len(urls)))
    return {"rank": rank, "shards_written": len(written), "shards_resumed": len(mine) - len(todo),
            "samples": used, "skipped": skipped, "seconds": round(seconds, 3),
            "samples_per_second": round(used / max(seconds, 1e-9), 2), "finished": finished, "total": len(urls)}
