"""The distill run's configuration and its plan: every flag resolved and checked, before anything is written."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from ddil_cli.buffer.sources import is_mixture_teacher
from ddil_cli.data.loader import LANES, WORKER_COUNTS
from ddil_cli.diffusion.threshold import Threshold, parse_threshold
from ddil_cli.errors import UserError
from ddil_cli.methods import METHODS, DistillMethod, MethodOptions, Phase, PlanRequest
from ddil_cli.models.base import Denoiser
from ddil_cli.models.lora import LoraSpec
from ddil_cli.priors import PhaseSchedule, PriorSchedule
from ddil_cli.specs import read_prompts
from ddil_cli.train import check_optimizer
from ddil_cli.validate import (BATCH, FROZEN_DTYPE, GUIDANCE, NON_NEGATIVE, POSITIVE, SEED, STEPS, Rule,
                               check_values)


# The default DDIL schedule, chosen by the lab map (docs/distill.md, "Priors"; docs/results.md):
# data only for the first 20% of each stage, then data 0.5 / student states 0.5 (the student
# taking a transition with probability 0.5) until 60%, data only after. The paper-protocol
# schedule, more student states late ("0:data=0.5,student=0.5;0.6:data=0.3,student=0.7"), was
# significantly worse than PD in 5 of 7 lab regimes.
DEFAULT_PRIOR_SCHEDULE = "0:data=1;0.2:data=0.5,student=0.5;0.6:data=1"
DEFAULT_STUDENT_PROB = "0:0.5;0.6:0.8"


@dataclass
class DistillConfig:
    method: str = "pd"
    teacher: str = "gmm:ring:8"
    data: str | None = None
    buffer: str | None = None
    prompts: str | None = None
    steps: int = 4
    teacher_steps: int = 32
    max_updates: int = 600
    batch_size: int = 64
    lr: float = 1e-4
    warmup: int = 0
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    grad_accum: int = 1
    mixed_precision: str = "no"
    # every network not trained (teachers, text encoders): auto = bf16 on CUDA, fp32 elsewhere
    frozen_dtype: str = "auto"
    gradient_checkpointing: bool = False
    ema_decay: float = 0.0
    optimizer: str = "adamw"  # adamw | adamw8bit (bitsandbytes)
    data_workers: int = 2  # DataLoader workers per process for --data shards (0: read in the training process)
    lora_rank: int = 0  # > 0: a LoRA student of this rank on the teacher's frozen UNet; 0: full fine-tuning
    lora_alpha: float | None = None  # None: the rank
    lora_targets: str | None = None  # None: diffusers' LCM-LoRA script's layers (models/lora.py)
    merge_lora: bool = False  # save a LoRA student as a full diffusers folder, the adapter merged in
    prior: str | None = None
    prior_schedule: str | None = None
    collect_every: int = 50
    rollouts_per_collect: int = 64
    rollout_batch_size: int = 64  # rollouts per forward batch in a collection (memory, not results)
    student_prob: str | None = None  # None: the method's default, else DEFAULT_STUDENT_PROB
    replay: str = "fifo"
    buffer_size: int = 20000
    priority_alpha: float = 0.6
    guidance: float | None = None
    guidance_range: str | None = None
    threshold: str | None = None
    student_prediction: str | None = None
    checkpoint_every: int = 0
    keep_checkpoints: int = 2
    log_every: int = 10
    max_nonfinite: int = 5
    resume: str | None = None
    tracker: str = "none"
    options: dict = field(default_factory=dict)  # the method's own settings (its Options fields)
    seed: int = 0
    device: str = "cpu"
    out: str = "runs/distill"
    quiet: bool = False
    overwrite: bool = False


# what each setting must satisfy beyond its type (validate.py), for flags, config files and the
# Python API alike, checked before the run folder is touched (so --overwrite clears nothing for a bad flag)
CONFIG_RULES = {
    "steps": STEPS, "teacher_steps": STEPS, "max_updates": Rule(low=1, high=10**9), "batch_size": BATCH,
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
    "optimizer": Rule(choices=("adamw", "adamw8bit")),
    "data_workers": Rule(choices=WORKER_COUNTS, hint=f"; the data are read in {LANES} lanes, each worker a share of them"),
    "lora_rank": NON_NEGATIVE, "lora_alpha": Rule(above=0), "lora_targets": Rule(comma_list=True)}


# ---- resolving the plan (all validation happens here, before anything is written) ------------
@dataclass
class Plan:
    method: type[DistillMethod]
    options: MethodOptions
    phases: list[Phase]
    schedule: PriorSchedule
    student_prob: PhaseSchedule  # how often the student takes a transition in DAgger rollouts
    guidance_range: tuple[float, float]
    guidance_embedding: bool
    threshold: Threshold
    prompts: list[str] | None
    lora: LoraSpec | None = None  # a LoRA student (--lora-rank), None: full fine-tuning
    # the w a distilled student samples at by default (written into its folder): the distilled w,
    # or the teacher's default kept inside a trained range
    sampling_guidance: float = 1.0


def _parse_student_prob(text: str) -> PhaseSchedule:
    """'0:0.5;0.6:0.8' (phase starts as fractions or update counts) or a single '0.7'."""
    def probability(value: str) -> float:
        try:
            prob = float(value)
        except ValueError:
            raise UserError(f"bad --student-prob {text!r}; write P or START:P;START:P, "
                            f"e.g. {DEFAULT_STUDENT_PROB}") from None
        if not 0 <= prob <= 1:
            raise UserError(f"--student-prob {prob} is outside [0, 1]")
        return prob
    return PhaseSchedule.parse(text, probability, flag="--student-prob", example=DEFAULT_STUDENT_PROB)


def method_class(name: str) -> type[DistillMethod]:
    if name not in METHODS:
        raise UserError(f"unknown --method {name!r}; use one of {', '.join(METHODS)}")
    return METHODS[name]


def make_plan(cfg: DistillConfig, teacher: Denoiser) -> Plan:
    method = method_class(cfg.method)
    # the same checks as the CLI's and a config file's, for a config built in Python
    check_values(DistillConfig, {name: getattr(cfg, name) for name in CONFIG_RULES}, CONFIG_RULES)
    if cfg.tracker != "none":
        import importlib.util

        if importlib.util.find_spec(cfg.tracker) is None:
            raise UserError(f"--tracker {cfg.tracker} needs the {cfg.tracker} package; pip install {cfg.tracker}, "
                            "or use --tracker none")
    options = method.Options.from_dict(cfg.method, dict(cfg.options or {}))
    lora = _lean_settings(cfg, teacher, options)
    if options.lab_init_steps and not is_mixture_teacher(teacher):
        raise UserError(f"--lab-init-steps fits a lab MLP to an analytic lab teacher; {cfg.teacher} is not one "
                        "(its student starts from its weights): drop the flag")
    options.resolve(teacher)
    phases = method.plan(PlanRequest(steps=cfg.steps, teacher_steps=cfg.teacher_steps, max_updates=cfg.max_updates,
                                     options=dict(cfg.options or {}),
                                     explicit_prior=bool(cfg.prior or cfg.prior_schedule)), teacher, options)
    default_schedule = method.default_prior_schedule or DEFAULT_PRIOR_SCHEDULE
    schedule = PriorSchedule.parse(cfg.prior if cfg.prior else (cfg.prior_schedule or default_schedule),
                                   flag="--prior" if cfg.prior else "--prior-schedule")
    if cfg.prior and cfg.prior_schedule:
        raise UserError("give --prior or --prior-schedule, not both")
    uses = {s for p in schedule.priors for s, w in p.items() if w > 0}
    if "data" in uses and not is_mixture_teacher(teacher) and not cfg.data:
        raise UserError("the prior gives weight to data but this teacher has no built-in data; pass "
                        "--data SHARDS (image-caption webdataset) or set data=0")
    if not all(p.ddil for p in phases) and not is_mixture_teacher(teacher) and not cfg.data:
        first = next(p.name for p in phases if not p.ddil)
        raise UserError(f"stage {first} comes before --ddil-from-stage, so it trains on data alone, and this "
                        "teacher has no built-in data; pass --data SHARDS or --ddil-from-stage 1")
    if method.needs_data(options) and not is_mixture_teacher(teacher) and not cfg.data:
        raise UserError(f"--method {cfg.method} with these options draws real data in its loss but this teacher "
                        "has no built-in data; pass --data SHARDS (image-caption webdataset)")
    if cfg.data and is_mixture_teacher(teacher):
        raise UserError("the Gaussian-mixture lab draws exact samples of its mixture as data; drop --data")
    if uses & {"student", "teacher"} and cfg.collect_every < 1 and not cfg.buffer:
        raise UserError("the prior draws buffer states but --collect-every is 0 and no --buffer is given; "
                        "collect during training (--collect-every K) or pass --buffer DIR")
    student_prob = _parse_student_prob(cfg.student_prob or method.default_student_prob or DEFAULT_STUDENT_PROB)
    default_w = cfg.guidance if cfg.guidance is not None else getattr(teacher, "default_guidance", 1.0)
    guidance_range = _guidance_range(cfg.guidance_range, method.guidance_range(options), default_w)
    # a student cannot fold CFG (two passes) into one pass unless it takes w as an input
    # (a LoRA cannot add the layer: it folds the guided teacher into one pass instead, LCM-LoRA's way)
    guidance_embedding = (guidance_range != (1.0, 1.0) or method.needs_guidance_embedding) and lora is None
    try:
        default_threshold = "static:1" if is_mixture_teacher(teacher) or getattr(teacher, "vae", 1) is None else "none"
        threshold = parse_threshold(cfg.threshold or default_threshold)
    except ValueError as exc:
        raise UserError(f"--threshold: {exc}") from None
    prompts = read_prompts([], cfg.prompts, getattr(teacher, "default_prompts", lambda: None)()) \
        if (cfg.prompts or not cfg.data) else None
    if prompts and is_mixture_teacher(teacher):
        teacher.encode(prompts)  # a prompt that is no class of the mixture fails now, not at the first batch
    # a student that folded the guidance in samples in one pass: guidance 1 (diffusers' guidance_scale=1)
    sampling_guidance = 1.0 if lora is not None and not teacher.guidance_conditioned else \
        min(max(float(default_w), guidance_range[0]), guidance_range[1])
    return Plan(method, options, phases, schedule, student_prob, guidance_range, guidance_embedding, threshold,
                prompts, lora, sampling_guidance)


def _guidance_range(given: str | None, method_range: tuple[float, float] | None,
                    default_w: float) -> tuple[float, float]:
    """w ~ U[MIN, MAX] per example: --guidance-range, else the method's range, else the fixed w."""
    if given:
        try:
            low, high = (float(v) for v in given.split(","))
        except ValueError:
            raise UserError(f"bad --guidance-range {given!r}; write MIN,MAX such as 2,8") from None
        if not 1 <= low <= high <= GUIDANCE.high:  # nan fails every comparison
            raise UserError(f"--guidance-range {given}: need 1 <= MIN <= MAX <= {GUIDANCE.high:g} "
                            "(finite CFG scales), e.g. 2,8")
        return low, high
    if method_range is not None:
        return method_range
    return float(default_w), float(default_w)


def _lean_settings(cfg: DistillConfig, teacher: Denoiser, options: MethodOptions) -> LoraSpec | None:
    """--optimizer, and --lora-rank/--lora-alpha/--lora-targets (and DMD2's --critic-lora-rank)
    checked against the teacher: the student's LoRA, None for full fine-tuning."""
    check_optimizer(cfg.optimizer, cfg.device)
    lora = LoraSpec.parse(cfg.lora_rank, cfg.lora_alpha, cfg.lora_targets)
    adapters = lora is not None or getattr(options, "critic_lora_rank", 0) > 0
    if adapters and getattr(teacher, "kind", "") != "diffusers":
        raise UserError(f"LoRA adapters (--lora-rank, --critic-lora-rank) go on a diffusers UNet; {cfg.teacher} is "
                        "not one: drop them (the lab trains its small MLPs fully)")
    if cfg.merge_lora and lora is None:
        raise UserError("--merge-lora saves a LoRA student as a full folder; add --lora-rank R, or drop it")
    if getattr(options, "critic_lora_rank", 0) > 0 and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # two groups train adapters of one UNet: one DDP wrapper per group would each expect every gradient
        raise UserError("--critic-lora-rank runs in one process for now; use a full critic (--critic-lora-rank 0) "
                        "under accelerate launch")
    return lora

