"""`ddil distill`."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Optional

import typer
from rich.markup import escape

from ddil_cli.cli.common import (HELP_CONFIG, HELP_DEVICE, HELP_QUIET, HELP_SEED, check_out_apart, console, progress,
                                 resolve_config, resolve_device)
from ddil_cli.data.loader import LANES, WORKER_COUNTS
from ddil_cli.methods import METHODS
from ddil_cli.models import MODEL_HELP
from ddil_cli.stages.distill import DistillConfig, run_distill
from ddil_cli.stages.distill.plan import DEFAULT_PRIOR_SCHEDULE, DEFAULT_STUDENT_PROB
from ddil_cli.validate import BATCH, FROZEN_DTYPE, GUIDANCE, NON_NEGATIVE, POSITIVE, SEED, STEPS, Rule

D = DistillConfig()

# what each option must satisfy beyond its type (validate.py), checked before the run folder is
# touched (so --overwrite clears nothing for a bad flag)
RULES = {"steps": STEPS, "teacher_steps": STEPS, "max_updates": Rule(low=1, high=10**9),
         "guided_updates": Rule(low=0, high=10**9), "batch_size": BATCH,
         "lr": Rule(above=0, high=10, hint="; try 1e-4 (diffusers) or 1e-3 (the lab)"), "warmup": NON_NEGATIVE,
         "weight_decay": Rule(low=0, high=10), "max_grad_norm": Rule(above=0), "grad_accum": Rule(low=1, high=4096),
         "mixed_precision": Rule(choices=("no", "fp16", "bf16")), "ema_decay": Rule(low=0, below=1),
         "frozen_dtype": FROZEN_DTYPE, "rollout_batch_size": BATCH,
         "collect_every": NON_NEGATIVE, "rollouts_per_collect": Rule(low=1, high=65536),
         "replay": Rule(choices=("fifo", "prioritised")), "buffer_size": POSITIVE,
         "priority_alpha": Rule(low=0, high=10),
         "guidance": GUIDANCE, "student_prediction": Rule(choices=("epsilon", "v_prediction", "sample")),
         "checkpoint_every": NON_NEGATIVE, "keep_checkpoints": POSITIVE, "log_every": POSITIVE,
         "max_nonfinite": POSITIVE, "tracker": Rule(choices=("none", "tensorboard", "wandb")), "seed": SEED,
         "stage_updates": Rule(comma_list=True), "optimizer": Rule(choices=("adamw", "adamw8bit")),
         "data_workers": Rule(choices=WORKER_COUNTS, hint=f"; the data are read in {LANES} lanes, each worker a "
                              "share of them"),
         "lora_rank": NON_NEGATIVE, "lora_alpha": Rule(above=0), "lora_targets": Rule(comma_list=True)}

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


# Each method's own flags (its Options fields) are declared below with default None, so that only
# the flags a user gives reach the method, which checks they are its own.
METHOD_OPTION_KEYS: tuple[str, ...] = tuple(sorted({f.name for m in METHODS.values()
                                                    for f in dataclasses.fields(m.Options)}))


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
    stage_updates: Optional[str] = typer.Option(None, help="Updates per PD stage: N or N1,N2,... (overrides)."),
    guided_updates: int = typer.Option(D.guided_updates, help="Updates of the guided stage (CFG into a "
                                       "w-conditioned student at the teacher's steps); 0 skips it."),
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
    generator_timesteps: Optional[str] = typer.Option(None, help="DMD2: the generator's timesteps, e.g. "
                                                      "999,749,499,249 (default: trailing spacing of --steps)."),
    real_guidance: Optional[float] = typer.Option(None, help="DMD2: CFG of the real score (default: --guidance "
                                                  "or the teacher's)."),
    critic_lr: Optional[float] = typer.Option(None, help="DMD2: the critic's (and GAN head's) learning rate "
                                              "(default: --lr)."),
    critic_updates: Optional[int] = typer.Option(None, help="DMD2: critic steps per generator update (10)."),
    gan_weight: Optional[float] = typer.Option(None, help="DMD2: weight of the generator's GAN term (0: no GAN "
                                               "head; DMD2 used 1e-3 SD1.5, 5e-3 SDXL)."),
    critic_gan_weight: Optional[float] = typer.Option(None, help="DMD2: weight of the critic-side GAN term (1e-2)."),
    tau_min: Optional[float] = typer.Option(None, help="DMD2: the DM timestep tau ~ U[MIN T, MAX T], MIN (0.02)."),
    tau_max: Optional[float] = typer.Option(None, help="DMD2: ... MAX (0.98)."),
    critic_lora_rank: Optional[int] = typer.Option(None, help="DMD2: > 0 makes the fake critic a LoRA of this rank "
                                                   "on the teacher's own frozen UNet (one base for generator, critic "
                                                   "and teacher); 0: a full copy (default)."),
    lab_init_steps: Optional[int] = typer.Option(None, help="Lab teachers: steps fitting the first student MLP "
                                                 "(DMD2: and its critic) to the analytic teacher first, as real "
                                                 "students start from their teacher's weights (e.g. 2000; default "
                                                 "0: a fresh MLP)."),
    checkpoint_every: int = typer.Option(D.checkpoint_every, help="Checkpoint every N updates (0: at stage ends)."),
    keep_checkpoints: int = typer.Option(D.keep_checkpoints, help="How many checkpoints to keep."),
    log_every: int = typer.Option(D.log_every, help="metrics.jsonl row every N updates."),
    max_nonfinite: int = typer.Option(D.max_nonfinite, help="Stop after this many non-finite updates in a row."),
    resume: Optional[str] = typer.Option(None, help="latest or a checkpoint folder: continue the run in --out."),
    tracker: str = typer.Option(D.tracker, help="none, tensorboard or wandb (through accelerate)."),
    # --method lcm (LCMOptions)
    solver_steps: Optional[int] = typer.Option(None, help="LCM: DDIM solver grid the teacher steps on, skip "
                                               "k = T / N (default 50)."),
    w_min: Optional[float] = typer.Option(None, help="LCM: lowest CFG scale w ~ U[w-min, w-max] (default: 0.4 x "
                                          "the teacher's default guidance, at least 1; 3 for SD's 7.5)."),
    w_max: Optional[float] = typer.Option(None, help="LCM: highest CFG scale (default: 2 x the teacher's default "
                                          "guidance, at least w-min; 15 for SD's 7.5)."),
    timestep_scaling: Optional[float] = typer.Option(None, help="LCM and DMD2 (consistency students): g in the "
                                                     "boundary scalings c_skip, c_out (default 10, as diffusers' "
                                                     "LCMScheduler)."),
    target_ema: Optional[float] = typer.Option(None, help="LCM: decay of the EMA target network (default 0.95)."),
    loss: Optional[str] = typer.Option(None, help="LCM: huber (pseudo-Huber, default) or l2."),
    huber_c: Optional[float] = typer.Option(None, help="LCM: pseudo-Huber c (default 0.001)."),
    unroll_steps: Optional[str] = typer.Option(None, help="LCM + DDIL: the student's LCM samplers rolled out, "
                                               "one per collection in turn (default: --steps - 1, --steps, --steps + 1, "
                                               "i.e. 3,4,5 for 4 steps)."),
    ddil_mix: Optional[str] = typer.Option(None, help="LCM + DDIL: matched (default: each input's solver "
                                           "timestep first, a buffer state only where the buffer holds one "
                                           "at it) or batch (the prior splits every batch, the paper's wording)."),
    # --method pd (PDOptions)
    ddil_from_stage: Optional[int] = typer.Option(None, help="PD + DDIL: the first halving stage trained on the "
                                                  "prior; earlier stages train on data alone (default 2 under the "
                                                  "default schedule, 1 with --prior / --prior-schedule; at most the "
                                                  "last stage)."),
    pd_stages: Optional[str] = typer.Option(None, help="PD: the stages as step counts from --teacher-steps to "
                                            "--steps, each a multiple of the next: 32,4 is one stage whose "
                                            "student step spans 8 teacher steps; 32,8,4 two (default: halving, "
                                            "32,16,8,4)."),
    seed: int = typer.Option(D.seed, help=HELP_SEED),
    device: str = typer.Option("auto", help=HELP_DEVICE),
    out: Path = typer.Option(Path(D.out), help="Run folder."),
    quiet: bool = typer.Option(False, help=HELP_QUIET),
    overwrite: bool = typer.Option(False, help="Start again in an existing run folder (replaced when the new run has its first checkpoint)."),
    config: Optional[Path] = typer.Option(None, help=HELP_CONFIG),
):
    cfg = resolve_config(ctx, DistillConfig, config, RULES, options_keys=METHOD_OPTION_KEYS)
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
