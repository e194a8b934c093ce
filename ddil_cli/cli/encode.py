"""`ddil encode`."""

from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path
from typing import Optional

import typer
from rich.markup import escape

from ddil_cli.atomic import kept_if_interrupted, output_lock
from ddil_cli.cli.common import (HELP_CONFIG, HELP_DEVICE, HELP_QUIET, check_out_apart, console, distributed_context,
                                 progress, resolve_config, resolve_device)
from ddil_cli.models import MODEL_HELP, load_denoiser
from ddil_cli.stages.encode import EncodeConfig, run_encode
from ddil_cli.validate import BATCH

D = EncodeConfig()
RULES = {"batch_size": BATCH}

ENCODE_HELP = f"""Encode an image-caption webdataset once: the teacher's clean states (VAE latents times the
scaling factor; the images themselves for a pixel-space teacher) and prompt encodings, in shards.

`ddil distill --data OUT` and `ddil collect --data OUT` read the result as they read raw shards,
with no image decoding and no VAE in the training step. Images are resized and cropped as every
--data reader does (shorter side to the teacher's image size, centre square); undecodable images
and empty captions are skipped and counted. One encoded shard per input shard: run it again with
the same arguments to finish an interrupted encoding. Models: {MODEL_HELP}.

Several processes: `accelerate launch -m ddil_cli encode ...` or `torchrun --nproc_per_node N -m
ddil_cli encode ...`: rank r encodes input shards r, r + N, ... and the files are those one
process writes.

Examples:

  ddil encode --teacher runwayml/stable-diffusion-v1-5 --data "laion/{{00000..00099}}.tar" --out data/laion-sd15

  ddil encode --teacher embedded:digits --data data/digits --out data/digits-encoded
"""


def encode_command(
    ctx: typer.Context,
    teacher: str = typer.Option(..., help=f"Teacher whose VAE and text encoders encode the data: {MODEL_HELP}."),
    data: str = typer.Option(..., help="Image-caption webdataset shards: a .tar, a folder, a brace pattern or a "
                             "pipe: URL."),
    batch_size: int = typer.Option(D.batch_size, help="Images per encoder batch."),
    dtype: str = typer.Option(D.dtype, help="Stored dtype: float32, bfloat16 (half the disk) or float16."),
    device: str = typer.Option("auto", help=HELP_DEVICE),
    out: Path = typer.Option(Path(D.out), help="Output folder (created; an unfinished one is resumed)."),
    quiet: bool = typer.Option(False, help=HELP_QUIET),
    config: Optional[Path] = typer.Option(None, help=HELP_CONFIG),
):
    cfg = resolve_config(ctx, EncodeConfig, config, RULES)
    # the shards it reads (a pattern, or a folder) are never under, at or around what it writes
    check_out_apart(cfg.out, {"--data": cfg.data, "--teacher": cfg.teacher, "--config": config})
    rank, world_size, local_rank, _ = distributed_context()
    cfg.device = resolve_device(cfg.device)
    if cfg.device == "cuda" and world_size > 1:
        cfg.device = f"cuda:{local_rank}"
    model = load_denoiser(cfg.teacher, device=cfg.device)

    def kept() -> str:  # finished shards stay (each published whole) and a rerun skips them
        done = len(list(Path(cfg.out).glob("encoded-*.json")))  # a shard's record follows its shard
        return (f"{done} finished shard(s) in {cfg.out}; run the same command again to encode the rest" if done > 0
                else f"nothing: --out {cfg.out} holds no finished shard yet")

    # one writer, as every command; the ranks of one launch write disjoint shards of one --out
    with output_lock(cfg.out, "ddil encode") if world_size == 1 else nullcontext(), \
            progress(cfg.quiet or rank > 0) as bar, kept_if_interrupted(kept):
        summary = run_encode(cfg, model, rank=rank, world_size=world_size, progress=bar)
    if not cfg.quiet:
        skipped = sum(summary["skipped"].values())
        reasons = ", ".join(f"{n} {r.replace('_', ' ')}" for r, n in sorted(summary["skipped"].items()) if n)
        where = f" (rank {rank} of {world_size})" if world_size > 1 else ""
        console.print(f"[green]encoded[/]{where} {summary['samples']} samples in {summary['shards_written']} shard(s) "
                      f"({summary['shards_resumed']} already done), {summary['samples_per_second']:.1f} samples/s, "
                      f"to {escape(str(cfg.out))}" + (f"; {skipped} skipped ({reasons})" if skipped else "")
                      + f"; {summary['finished']} of {summary['total']} shards finished")


encode_command.__doc__ = ENCODE_HELP
