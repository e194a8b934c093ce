"""`ddil sample`."""

from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path
from typing import Optional

import typer
from rich.markup import escape

from ddil_cli.atomic import output_lock, remove_stale_partials
from ddil_cli.cli.common import (HELP_CONFIG, HELP_DEVICE, HELP_FROZEN_DTYPE, HELP_OVERWRITE, HELP_QUIET, HELP_SEED,
                                 check_out_apart, console, distributed_context, progress, resolve_config,
                                 resolve_device)
from ddil_cli.models import MODEL_HELP
from ddil_cli.sample_folder import SampleConfig, load_models
from ddil_cli.stages.sample import sample_to_folder
from ddil_cli.validate import BATCH, FROZEN_DTYPE, GUIDANCE, PROBABILITY, SEED, STEPS, Rule

D = SampleConfig()

# what each option must satisfy beyond its type (validate.py), checked before anything is written
RULES = {"steps": STEPS, "teacher_steps": STEPS, "teacher_prob": PROBABILITY, "guidance": GUIDANCE,
         "num_per_prompt": Rule(low=1, high=2**20), "batch_size": BATCH, "frozen_dtype": FROZEN_DTYPE, "seed": SEED}

SAMPLE_HELP = f"""Generate with the teacher, the student, or both mixed on one trajectory.

The student's --steps grid (trailing spacing: 4 steps = 999, 749, 499, 249) nests in the
teacher's --teacher-steps grid; each student transition is taken by the student in one step or
by the teacher in teacher-steps/steps steps. Models: {MODEL_HELP}.

Each sample's seed comes from its index (prompt by prompt, --num-per-prompt each), and images are
written as they come. Several processes: `accelerate launch -m ddil_cli sample ...` or `torchrun
--nproc_per_node N -m ddil_cli sample ...` deal whole batches to the processes and write the files
one process writes. --out appears when every sample is written; an interrupted run is finished by
the same command with --resume.

Examples:

  ddil sample --teacher gmm:ring:8 --teacher-steps 32 --out samples/teacher

  ddil sample --teacher embedded:digits --teacher-steps 32 --prompt "a handwritten digit three" --out s/

  ddil sample --teacher gmm:ring:8 --student runs/pd/student --steps 4 --teacher-prob 0.4 --out s/mixed

  ddil sample --teacher runwayml/stable-diffusion-v1-5 --student runs/sd/student --switch t2s:500 --prompts prompts.txt --out s/switch
"""


def sample_command(
    ctx: typer.Context,
    teacher: str = typer.Option(D.teacher, help=f"Teacher: {MODEL_HELP}."),
    student: Optional[str] = typer.Option(None, help="Student folder (a `ddil distill` output's student/)."),
    steps: int = typer.Option(D.steps, help="Student steps (its grid must nest in the teacher's)."),
    teacher_steps: int = typer.Option(D.teacher_steps, help="Teacher DDIM steps."),
    teacher_prob: Optional[float] = typer.Option(None, help="Per-transition probability the teacher takes it "
                                                 "(default 0 with a student, 1 without)."),
    switch: Optional[str] = typer.Option(None, help="t2s:T (teacher above timestep T, then student) or s2t:T."),
    guidance: Optional[float] = typer.Option(None, help="CFG scale w (1 = conditional only); default: the "
                                                   "w the student was distilled at, else the teacher's."),
    prompt: Optional[list[str]] = typer.Option(None, help="A prompt (repeatable). Lab prompts: 'class 0', ..."),
    prompts: Optional[Path] = typer.Option(None, help="Text file, one prompt per line."),
    num_per_prompt: int = typer.Option(D.num_per_prompt, help="Samples per prompt (seeds)."),
    batch_size: int = typer.Option(D.batch_size, help="Samples per forward batch."),
    threshold: str = typer.Option(D.threshold, help="none, static:C or dynamic:P on every x0 estimate."),
    seed: int = typer.Option(D.seed, help=HELP_SEED),
    device: str = typer.Option("auto", help=HELP_DEVICE),
    frozen_dtype: str = typer.Option(D.frozen_dtype, help=HELP_FROZEN_DTYPE),
    out: Path = typer.Option(Path(D.out), help="Output folder."),
    quiet: bool = typer.Option(False, help=HELP_QUIET),
    overwrite: bool = typer.Option(False, help=HELP_OVERWRITE),
    resume: bool = typer.Option(False, help="Finish an interrupted run into --out (same settings), generating only "
                                "the samples not yet written."),
    config: Optional[Path] = typer.Option(None, help=HELP_CONFIG),
):
    cfg = resolve_config(ctx, SampleConfig, config, RULES)
    rank, world_size, local_rank, launch_key = distributed_context()
    cfg.device = resolve_device(cfg.device)
    if cfg.device == "cuda" and world_size > 1:
        cfg.device = f"cuda:{local_rank}"
    cfg.prompt = cfg.prompt or []
    check_out_apart(cfg.out, {"--teacher": cfg.teacher, "--student": cfg.student, "--prompts": cfg.prompts,
                              "--config": config})
    models = load_models(cfg, cfg.device)  # load (and fail) before any folder is made
    # one process: one writer per output, as every command; the ranks of one launch share it
    with (output_lock(cfg.out, "ddil sample") if world_size == 1 else nullcontext()), \
            progress(cfg.quiet or rank > 0) as bar:
        if world_size == 1:
            remove_stale_partials(cfg.out)  # a killed earlier run's (the lock says no one else writes)
        summary = sample_to_folder(cfg, models=models, progress=bar, rank=rank, world_size=world_size,
                                   launch_key=launch_key)
    if cfg.quiet:
        return
    if summary["published"]:
        console.print(f"[green]wrote[/] {summary['samples']} samples ({summary['sampler']}, "
                      f"{summary['seconds_per_sample']:.4f} s/sample, {summary['nfe_per_sample']:g} NFE) to {escape(str(cfg.out))}")
    else:
        console.print(f"rank {rank} of {world_size}: wrote {summary['written']} samples; the last process to finish "
                      f"publishes {escape(str(cfg.out))}")


sample_command.__doc__ = SAMPLE_HELP
