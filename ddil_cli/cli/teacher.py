"""`ddil teacher`."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.markup import escape

from ddil_cli.cli.common import (HELP_CONFIG, HELP_DEVICE, HELP_OVERWRITE, HELP_QUIET, HELP_SEED, HELP_THREADS,
                                 check_out_apart, console, output_dir, progress, resolve_config, resolve_device)
from ddil_cli.errors import UserError
from ddil_cli.stages.teacher import TeacherCommandConfig, parse_channels, run_teacher
from ddil_cli.validate import BATCH, NON_NEGATIVE, POSITIVE, SEED, Rule

D = TeacherCommandConfig()

# what each option must satisfy beyond its type (validate.py), checked before anything is written
RULES = {"resolution": Rule(low=4, high=1024), "channels": Rule(choices=(1, 3)), "layers_per_block": Rule(low=1, high=16),
         "attention_heads": Rule(low=1, high=64), "text_width": Rule(low=1, high=4096), "text_layers": Rule(low=1, high=64),
         "max_length": Rule(low=2, high=1024), "steps": Rule(low=1, high=10**9), "batch_size": BATCH,
         "lr": Rule(above=0, high=10), "warmup_steps": NON_NEGATIVE, "weight_decay": Rule(low=0, high=10),
         "grad_clip": NON_NEGATIVE, "caption_dropout": Rule(low=0, below=1), "ema_decay": Rule(low=0, below=1),
         "checkpoint_every": POSITIVE, "keep_checkpoints": POSITIVE, "log_every": POSITIVE, "max_samples": POSITIVE,
         "default_guidance": Rule(low=1, high=100), "mixed_precision": Rule(choices=("no", "fp16", "bf16")),
         "threads": Rule(low=1, high=1024), "seed": SEED}

TEACHER_HELP = """Train a small pixel-space text-to-image diffusion teacher on image-caption shards.

The data (webdataset shards: image + .txt caption [+ .json] per sample; a file, folder, brace
pattern or pipe: URL) is read once into memory, so this is for small sets. The model: a diffusers
UNet2DConditionModel in pixel space (no VAE) with cross-attention at its lowest resolution only,
a CLIP text encoder trained with it, and a CLIP tokenizer built offline from the captions' words.
--out gets a diffusers pipeline folder (model_index.json, unet/, text_encoder/, tokenizer/,
scheduler/; EMA weights) that every --teacher option loads. Checkpoints go to --checkpoints
(default OUT-checkpoints) and survive a failed run; --resume continues from the newest one
exactly as the uninterrupted run would have (the lr schedule is constant after warmup, so a
longer --steps extends a finished run).

Examples:

  python -m ddil_cli.data.digits --out data/digits

  ddil teacher --data 'data/digits/train-{000000..000001}.tar' --steps 5000 --out runs/digits-teacher

  ddil teacher --data data/digits --steps 8000 --resume --out runs/digits-teacher --overwrite
"""


def teacher_command(
    ctx: typer.Context,
    data: str = typer.Option("", help="Image-caption shards: a .tar, a folder of them, a brace pattern or a pipe: URL."),
    resolution: int = typer.Option(D.resolution, help="Square image size the data is resized to (bilinear, centre crop)."),
    channels: int = typer.Option(D.channels, help="1 (grayscale) or 3 (RGB)."),
    block_out_channels: str = typer.Option(",".join(map(str, D.block_out_channels)), "--block-channels",
                                           help="UNet channels per resolution level, e.g. 32,64,64."),
    layers_per_block: int = typer.Option(D.layers_per_block, help="ResNet layers per UNet block."),
    text_width: int = typer.Option(D.text_width, help="Text encoder width (= the UNet's cross-attention width)."),
    text_layers: int = typer.Option(D.text_layers, help="Text encoder layers."),
    max_length: int = typer.Option(D.max_length, help="Tokens per caption (padded/truncated)."),
    prediction_type: str = typer.Option(D.prediction_type, help="epsilon or v_prediction."),
    beta_schedule: str = typer.Option(D.beta_schedule, help="diffusers beta schedule (squaredcos_cap_v2, linear, scaled_linear)."),
    steps: int = typer.Option(D.steps, help="Total optimiser steps."),
    batch_size: int = typer.Option(D.batch_size, help="Images per step."),
    lr: float = typer.Option(D.lr, help="AdamW learning rate."),
    lr_schedule: str = typer.Option(D.lr_schedule, help="constant or cosine (after linear warmup)."),
    warmup_steps: int = typer.Option(D.warmup_steps, help="Linear lr warmup steps."),
    caption_dropout: float = typer.Option(D.caption_dropout, help="Fraction of captions replaced by '' (the CFG null prompt)."),
    ema_decay: float = typer.Option(D.ema_decay, help="EMA decay of the saved weights (0: no EMA)."),
    checkpoint_every: int = typer.Option(D.checkpoint_every, help="Steps between checkpoints."),
    keep_checkpoints: int = typer.Option(D.keep_checkpoints, help="Newest checkpoints kept."),
    log_every: int = typer.Option(D.log_every, help="Steps between entries of train_log.jsonl."),
    checkpoints: Optional[Path] = typer.Option(None, help="Checkpoint folder (default: OUT-checkpoints)."),
    resume: bool = typer.Option(False, "--resume", help="Continue from the newest checkpoint (fresh start if none)."),
    resume_from: Optional[Path] = typer.Option(None, help="Continue from this checkpoint-NNNNNN folder."),
    max_samples: Optional[int] = typer.Option(None, help="Use at most this many samples."),
    default_guidance: float = typer.Option(D.default_guidance, help="CFG scale written to ddil_defaults.json: "
                                           "what commands use with this teacher unless given --guidance."),
    default_prompts: Optional[Path] = typer.Option(None, help="Text file (one prompt per line) written to "
                                                   "ddil_defaults.json: the prompts commands use when given none."),
    mixed_precision: str = typer.Option(D.mixed_precision, help="no, fp16 or bf16."),
    threads: Optional[int] = typer.Option(None, help=HELP_THREADS),
    seed: int = typer.Option(D.seed, help=HELP_SEED),
    device: str = typer.Option("auto", help=HELP_DEVICE),
    out: Path = typer.Option(Path(D.out), help="Output pipeline folder."),
    quiet: bool = typer.Option(False, help=HELP_QUIET),
    overwrite: bool = typer.Option(False, help=HELP_OVERWRITE),
    config: Optional[Path] = typer.Option(None, help=HELP_CONFIG),
):
    cfg = resolve_config(ctx, TeacherCommandConfig, config, RULES)
    cfg.block_out_channels = parse_channels(cfg.block_out_channels)
    cfg.device = "cpu" if resolve_device(cfg.device) == "cpu" else "auto"
    cfg.validate()
    if cfg.threads is not None and cfg.threads < 1:
        raise UserError(f"--threads must be >= 1, got {cfg.threads}")
    from ddil_cli.data.shards import resolve_shards

    resolve_shards(cfg.data)  # a missing or empty data path fails before any folder is made
    check_out_apart(cfg.out, {"--data": cfg.data, "--default-prompts": cfg.default_prompts,
                              "--resume-from": cfg.resume_from, "--checkpoints": cfg.checkpoints, "--config": config})
    with output_dir(cfg.out, overwrite=cfg.overwrite, what="ddil teacher") as work, progress(cfg.quiet) as bar:
        summary = run_teacher(cfg, work, progress=bar, console=None if cfg.quiet else console)
    if not cfg.quiet:
        data = summary["data"]
        skipped = f", {data['skipped_total']} skipped {data['skipped']}" if data["skipped_total"] else ""
        console.print(f"[green]wrote[/] teacher pipeline to {escape(str(cfg.out))} ({summary['steps']} steps, final loss "
                      f"{summary['final_loss']:.4f}, {data['used']} samples{skipped}); checkpoints in "
                      f"{escape(str(summary['checkpoints']))}")


teacher_command.__doc__ = TEACHER_HELP
