"""`ddil distill`."""

from __future__ import annotations

import dataclasses
import inspect
import types
import typing
from pathlib import Path
from typing import Optional

import typer
from rich.markup import escape

from ddil_cli.cli.common import (HELP_CONFIG, HELP_DEVICE, HELP_QUIET, HELP_SEED, check_out_apart, console, progress,
                                 resolve_config, resolve_device)
from ddil_cli.methods import METHODS
from ddil_cli.methods.base import option_help
from ddil_cli.models import MODEL_HELP
from ddil_cli.stages.distill import DistillConfig, run_distill
from ddil_cli.stages.distill.plan import CONFIG_RULES, DEFAULT_PRIOR_SCHEDULE, DEFAULT_STUDENT_PROB

D = DistillConfig()

DISTILL_HELP = f"""Distil a teacher into a few-step student, with DDIL inputs and reflected thresholding.

Every batch mixes forward-diffused data, states on the current student's own (mixed) rollouts
and states on teacher rollouts, by --prior or --prior-schedule (default
{DEFAULT_PRIOR_SCHEDULE}); every --collect-every updates the loop rolls out the current
student (it takes each transition with probability --student-prob, default {DEFAULT_STUDENT_PROB})
into run/buffer/. `--prior data=1` is plain teacher-forced distillation. Models: {MODEL_HELP}.

PD halves the steps stage by stage (--teacher-steps 32 -> 16 -> 8 -> --steps 4), each stage's
teacher being the previous student; --max-updates is split over the stages. --pd-stages 32,4
jumps further: one stage whose student step matches 8 teacher steps. Under the default
schedule DDIL starts at the second halving stage (--ddil-from-stage); the first trains on data.

LCM (consistency distillation) trains one phase on the teacher's 50-step DDIM solver grid
(--solver-steps) against an EMA target network, w ~ U[--w-min, --w-max] through the guidance
embedding; the student samples on LCMScheduler's grid (4 steps: 999, 759, 499, 259) and DDIL rolls
it out with its own samplers of one step fewer, the same and one more (3, 4 and 5 for a 4-step
student; --unroll-steps).

Output: OUT/student/ (a diffusers folder, or an MLP folder for the lab), OUT/stages/*/,
OUT/checkpoints/, OUT/buffer/, OUT/metrics.jsonl, OUT/summary.json, OUT/manifest.json.

DMD2 trains a 4-step generator (--generator-timesteps) by distribution matching against the
teacher with CFG (--real-guidance) and a fake critic (--critic-lr, --critic-updates), optionally
with a GAN head (--gan-weight); its default prior is student=0.5,teacher=0.5 (backward
simulation and teacher states); --prior student=1 --student-prob 1 is DMD2's backward simulation.

Examples:

  ddil distill --method pd --teacher gmm:ring:8 --teacher-steps 16 --max-updates 3000 --batch-size 256 --lr 1e-3 --out runs/lab-ddil

  ddil distill --method pd --teacher gmm:ring:8 --teacher-steps 16 --max-updates 3000 --batch-size 256 --lr 1e-3 --prior data=1 --out runs/lab-pd

  ddil distill --method pd --teacher embedded:digits --data "data/digits/train-{{000000..000001}}.tar" --max-updates 360 --batch-size 32 --out runs/digits

  ddil distill --method lcm --teacher gmm:ring:8 --max-updates 2000 --batch-size 256 --lr 1e-3 --prior student=0.5,data=0.5 --student-prob 1 --out runs/lab-lcm-ddil

  ddil distill --method lcm --teacher stable-diffusion-v1-5/stable-diffusion-v1-5 --data "laion/{{00000..00099}}.tar" --prompts captions.txt --w-min 3 --w-max 15 --batch-size 12 --lr 1e-6 --mixed-precision bf16 --prior data=0.5,student=0.5 --student-prob 1 --out runs/sd15-lcm-ddil   (recipes/sd15-lcm.sh)
  ddil distill --method dmd2 --teacher gmm:ring:8 --max-updates 2000 --batch-size 256 --lr 1e-3 --critic-updates 10 --out runs/lab-dmd2

  ddil distill --out runs/digits --resume latest   (same flags as the interrupted run)
"""


def method_flags() -> list[inspect.Parameter]:
    """Each method's own flags, built from its Options fields (`methods.base.option`): one flag per
    field name, its help prefixed by the methods that take it, default None so that only the flags
    a user gives reach the method, which checks they are its own."""
    declared: dict[str, tuple[dataclasses.Field, type, list[str]]] = {}
    for name, method in METHODS.items():
        hints = typing.get_type_hints(method.Options)
        for f in dataclasses.fields(method.Options):
            declared.setdefault(f.name, (f, hints[f.name], []))[2].append(name.upper())
    flags = []
    for name, (f, kind, takers) in declared.items():
        kind = typing.get_args(kind)[0] if typing.get_origin(kind) in (typing.Union, types.UnionType) else kind
        prefix = "" if len(takers) == len(METHODS) else ", ".join(takers) + ": "
        flags.append(inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, annotation=Optional[kind],
                                       default=typer.Option(None, help=prefix + option_help(f))))
    return flags


def with_method_flags(command):
    """`command` taking every registered method's flags (gathered into the config's `options`)."""
    signature = inspect.signature(command)
    flags = method_flags()
    fixed = [p for p in signature.parameters.values() if p.kind != inspect.Parameter.VAR_KEYWORD]
    command.__signature__ = signature.replace(parameters=[*fixed, *flags])
    command.__annotations__ = {**command.__annotations__,
                               **{p.name: p.annotation for p in flags}}
    return command


def distill_command(
    ctx: typer.Context,
    method: str = typer.Option(D.method, help=f"The distillation method: {', '.join(METHODS)}."),
    teacher: str = typer.Option(D.teacher, help=f"Teacher: {MODEL_HELP}."),
    data: Optional[str] = typer.Option(None, help="Image-caption webdataset shards for the data source "
                                       "(the lab draws exact mixture samples)."),
    buffer: Optional[str] = typer.Option(None, help="An external buffer from `ddil collect`."),
    prompts: Optional[Path] = typer.Option(None, help="Prompts for rollouts, one per line (default: data "
                                           "captions, or the lab's classes)."),
    steps: int = typer.Option(D.steps, help="The student's final number of steps."),
    teacher_steps: int = typer.Option(D.teacher_steps, help="The teacher's steps (PD halves from here)."),
    max_updates: int = typer.Option(D.max_updates, help="Student updates in all, split over PD stages."),
    batch_size: int = typer.Option(D.batch_size, help="Examples per micro-batch (per process)."),
    lr: float = typer.Option(D.lr, help="AdamW learning rate."),
    warmup: int = typer.Option(D.warmup, help="Linear warmup updates (then linear decay to 0)."),
    weight_decay: float = typer.Option(D.weight_decay, help="AdamW weight decay."),
    max_grad_norm: float = typer.Option(D.max_grad_norm, help="Gradient clipping norm."),
    grad_accum: int = typer.Option(D.grad_accum, help="Micro-batches per update."),
    mixed_precision: str = typer.Option(D.mixed_precision, help="no, fp16 or bf16 (GPUs: bf16; fp16 runs a "
                                        "GradScaler whose skipped steps are counted apart)."),
    frozen_dtype: str = typer.Option(D.frozen_dtype, help="Networks not trained (teachers, text encoders): auto "
                                     "(bf16 on CUDA, fp32 on CPU), fp32, bf16 or fp16; the VAE stays fp32."),
    gradient_checkpointing: bool = typer.Option(False, help="Trade compute for memory (diffusers UNets)."),
    ema_decay: float = typer.Option(D.ema_decay, help="EMA of the student's weights (0: off); saved weights are the EMA."),
    optimizer: str = typer.Option(D.optimizer, help="adamw, or adamw8bit (bitsandbytes, pip install 'ddil-cli[lean]': "
                                  "8-bit moments, a quarter of AdamW's optimizer memory)."),
    lora_rank: int = typer.Option(D.lora_rank, help="> 0: train a LoRA of this rank on the teacher's frozen UNet "
                                  "(saved for diffusers' load_lora_weights; it takes no guidance embedding and samples "
                                  "at guidance 1); 0: full fine-tuning."),
    lora_alpha: Optional[float] = typer.Option(None, help="LoRA alpha (scale alpha / rank; default: the rank)."),
    lora_targets: Optional[str] = typer.Option(None, help="LoRA target layers, comma-separated (default: diffusers' "
                                               "LCM-LoRA script's attention, feed-forward, ResNet and time layers)."),
    merge_lora: bool = typer.Option(False, help="Save the LoRA student as a full diffusers folder, the adapter merged in."),
    prior: Optional[str] = typer.Option(None, help="A fixed prior, e.g. data=0.3,student=0.5,teacher=0.2."),
    prior_schedule: Optional[str] = typer.Option(None, help=f"Phases START:PRIOR;... (default {DEFAULT_PRIOR_SCHEDULE})."),
    collect_every: int = typer.Option(D.collect_every, help="DAgger: roll out the current student every K updates."),
    rollouts_per_collect: int = typer.Option(D.rollouts_per_collect, help="Trajectories per collection (per process)."),
    data_workers: int = typer.Option(D.data_workers, help="DataLoader worker processes per process reading --data "
                                     "shards (decoding, prefetching; 0 reads in the training process). 0, 1, 2, 4, 8 "
                                     "or 16: the batches are the same for every count."),
    rollout_batch_size: int = typer.Option(D.rollout_batch_size, help="Trajectories per forward batch in a "
                                           "collection (memory only: every draw is per trajectory)."),
    student_prob: Optional[str] = typer.Option(None, help="P or START:P;START:P: how often the student takes a "
                                               f"transition (default {DEFAULT_STUDENT_PROB}; LCM: 1)."),
    replay: str = typer.Option(D.replay, help="fifo or prioritised (by the last loss on each state)."),
    buffer_size: int = typer.Option(D.buffer_size, help="Most states kept in the replay buffer (FIFO bound)."),
    priority_alpha: float = typer.Option(D.priority_alpha, help="Prioritised replay exponent."),
    guidance: Optional[float] = typer.Option(None, help="Fixed CFG scale of the teacher's targets (default: the model's)."),
    guidance_range: Optional[str] = typer.Option(None, help="MIN,MAX: w ~ U[MIN, MAX] per example, student takes w as input."),
    threshold: Optional[str] = typer.Option(None, help="none, static:C or dynamic:P on the teacher's x0 "
                                            "(default static:1 for pixel and lab models)."),
    student_prediction: Optional[str] = typer.Option(None, help="Lab MLP student's output: epsilon, v_prediction, sample. Default: v_prediction."),
    checkpoint_every: int = typer.Option(D.checkpoint_every, help="Checkpoint every N updates (0: at stage ends)."),
    keep_checkpoints: int = typer.Option(D.keep_checkpoints, help="How many checkpoints to keep."),
    log_every: int = typer.Option(D.log_every, help="metrics.jsonl row every N updates."),
    max_nonfinite: int = typer.Option(D.max_nonfinite, help="Stop after this many non-finite updates in a row."),
    resume: Optional[str] = typer.Option(None, help="latest or a checkpoint folder: continue the run in --out."),
    tracker: str = typer.Option(D.tracker, help="none, tensorboard or wandb (through accelerate)."),
    seed: int = typer.Option(D.seed, help=HELP_SEED),
    device: str = typer.Option("auto", help=HELP_DEVICE),
    out: Path = typer.Option(Path(D.out), help="Run folder."),
    quiet: bool = typer.Option(False, help=HELP_QUIET),
    overwrite: bool = typer.Option(False, help="Start again in an existing run folder (replaced when the new run has its first checkpoint)."),
    config: Optional[Path] = typer.Option(None, help=HELP_CONFIG),
    **method_options,
):
    keys = tuple(p.name for p in method_flags())
    cfg = resolve_config(ctx, DistillConfig, config, CONFIG_RULES, options_keys=keys)
    cfg.device = resolve_device(cfg.device)
    check_out_apart(cfg.out, {"--teacher": cfg.teacher, "--data": cfg.data, "--buffer": cfg.buffer,
                              "--prompts": cfg.prompts, "--config": config})
    with progress(cfg.quiet) as bar:
        summary = run_distill(cfg, progress=bar)
    if not cfg.quiet:
        for phase in summary["phases"]:
            console.print(f"{phase['phase']}: {phase['updates']} updates, {phase['buffer_states']} buffered states, "
                          f"{phase['nonfinite_skipped']} non-finite skipped")
        console.print(f"[green]student[/] saved to {escape(str(summary['student']))} "
                      f"(collection took {100 * summary['collect_share']:.1f}% of training time)")


distill_command.__doc__ = DISTILL_HELP
distill_command = with_method_flags(distill_command)
