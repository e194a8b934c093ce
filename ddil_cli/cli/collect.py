"""`ddil collect`."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.markup import escape

from ddil_cli.atomic import kept_if_interrupted, output_lock
from ddil_cli.cli.common import (HELP_CONFIG, HELP_DEVICE, HELP_FROZEN_DTYPE, HELP_QUIET, HELP_SEED, check_out_apart,
                                 console, distributed_context, progress, resolve_config, resolve_device)
from ddil_cli.models import MODEL_HELP
from ddil_cli.stages.collect import CollectConfig, load_models, run_collect
from ddil_cli.validate import BATCH, FROZEN_DTYPE, GUIDANCE, NON_NEGATIVE, POSITIVE, PROBABILITY, SEED, STEPS, Rule

D = CollectConfig()

# what each option must satisfy beyond its type (validate.py), checked before anything is written
RULES = {"rollouts": Rule(low=1, high=10**9), "steps": STEPS, "teacher_steps": STEPS, "teacher_prob": PROBABILITY,
         "guidance": GUIDANCE, "student_version": NON_NEGATIVE, "batch_size": BATCH, "frozen_dtype": FROZEN_DTYPE,
         "shard_samples": Rule(low=1, high=10**7), "shard_mb": Rule(above=0, high=1 << 20),
         "max_samples": POSITIVE, "seed": SEED}

COLLECT_HELP = f"""Write the student's training inputs into a replay buffer (webdataset shards + manifest).

Sources, mixed by --prior (non-negative weights summing to 1): data (real data forward-diffused to a
student timestep; the lab draws exact mixture samples, diffusers teachers read --data shards),
student (rollouts where the student takes each transition with probability 1 - --teacher-prob)
and teacher (pure teacher rollouts). --rollouts N trajectories on the --steps grid are split
between student and teacher by their weights; data adds N * steps * data / (student + teacher)
states. Targets are never stored. Re-running into the same --out appends (new shards, numbering
continued); --max-samples keeps only the newest states (FIFO, whole shards). Models: {MODEL_HELP}.

Several processes: `torchrun --nproc_per_node N -m ddil_cli collect ...` or
`accelerate launch -m ddil_cli collect ...`: each rank writes its own shards of one collect run.

Examples:

  ddil collect --teacher gmm:ring:8 --prior data=0.5,teacher=0.5 --rollouts 256 --out buffers/lab

  ddil collect --teacher gmm:ring:8 --student runs/pd/student --prior data=0.3,student=0.5,teacher=0.2 \\
      --teacher-prob 0.5 --student-version 2000 --max-samples 100000 --out buffers/lab

  ddil collect --teacher embedded:digits --data data/digits --prior data=0.5,teacher=0.5 --out buffers/digits
"""


def collect_command(
    ctx: typer.Context,
    teacher: str = typer.Option(D.teacher, help=f"Teacher: {MODEL_HELP}."),
    student: Optional[str] = typer.Option(None, help="Student folder (a `ddil distill` output's student/)."),
    data: Optional[str] = typer.Option(None, help="Image-caption webdataset shards for the data source: a .tar, "
                                       "a folder, a brace pattern or a pipe: URL."),
    prompts: Optional[Path] = typer.Option(None, help="Text file, one prompt per line (default: the data's "
                                           "captions, or the lab's classes)."),
    prior: str = typer.Option(D.prior, help="Source weights, e.g. data=0.3,student=0.5,teacher=0.2 (sum 1)."),
    rollouts: int = typer.Option(D.rollouts, help="Trajectories to roll out (student + teacher)."),
    steps: int = typer.Option(D.steps, help="Student steps: the grid whose states are stored."),
    teacher_steps: int = typer.Option(D.teacher_steps, help="Teacher DDIM steps (a multiple of --steps)."),
    teacher_prob: float = typer.Option(D.teacher_prob, help="In student rollouts, the probability the teacher "
                                       "takes a transition."),
    guidance: Optional[float] = typer.Option(None, help="CFG scale w for the rollouts; default: the model's."),
    threshold: str = typer.Option(D.threshold, help="none, static:C or dynamic:P on every x0 estimate."),
    student_version: Optional[int] = typer.Option(None, help="The student's checkpoint step, stored with its "
                                                  "states (default 0 with a student)."),
    batch_size: int = typer.Option(D.batch_size, help="Rollouts (or data states) per forward batch."),
    shard_samples: int = typer.Option(D.shard_samples, help="Samples per shard at most."),
    shard_mb: float = typer.Option(D.shard_mb, help="Shard size in MiB at most."),
    max_samples: Optional[int] = typer.Option(None, help="Bound on the buffer: drop the oldest shards beyond it."),
    cache_prompts: bool = typer.Option(False, help="Also store the teacher's prompt encodings, once per prompt "
                                       "(prompt_cache/)."),
    seed: int = typer.Option(D.seed, help=HELP_SEED),
    device: str = typer.Option("auto", help=HELP_DEVICE),
    frozen_dtype: str = typer.Option(D.frozen_dtype, help=HELP_FROZEN_DTYPE),
    out: Path = typer.Option(Path(D.out), help="Buffer folder: created, or appended to when it exists."),
    quiet: bool = typer.Option(False, help=HELP_QUIET),
    config: Optional[Path] = typer.Option(None, help=HELP_CONFIG),
):
    cfg = resolve_config(ctx, CollectConfig, config, RULES)
    check_out_apart(cfg.out, {"--teacher": cfg.teacher, "--student": cfg.student, "--data": cfg.data,
                              "--prompts": cfg.prompts, "--config": config})
    rank, world_size, local_rank, launch_key = distributed_context()
    cfg.device = resolve_device(cfg.device)
    if cfg.device == "cuda" and world_size > 1:
        cfg.device = f"cuda:{local_rank}"
    models = load_models(cfg, cfg.device)  # load (and fail) before the buffer is touched
    # the output lock, shared: collect runs append to one buffer concurrently by design (own run
    # numbers, shard names that never clash, manifest updates under the buffer's own lock;
    # docs/buffer.md), while any other command writing that folder is kept out, and they out of it
    kept = f"the shards already committed to {cfg.out} (run collect again to add more)"
    with output_lock(cfg.out, "ddil collect", shared=True), progress(cfg.quiet or rank > 0) as bar, \
            kept_if_interrupted(kept):
        summary = run_collect(cfg, models=models, progress=bar, rank=rank, world_size=world_size,
                              launch_key=launch_key)
    if not cfg.quiet:
        sources = ", ".join(f"{n} {s}" for s, n in summary["by_source"].items())
        dropped = f", {summary['dropped_samples']} dropped by --max-samples so far" if summary["dropped_samples"] else ""
        where = f" (rank {rank} of {world_size})" if world_size > 1 else ""
        console.print(f"[green]collect run {summary['run']}{where}[/]: wrote {summary['states']} states in "
                      f"{summary['shards']} shard(s), {summary['states_per_second']:.1f} states/s, to {escape(str(cfg.out))}; "
                      f"buffer holds {summary['buffer_total']} ({sources}){dropped}")


collect_command.__doc__ = COLLECT_HELP
