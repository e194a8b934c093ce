"""`ddil distill`: one accelerate training loop, DDIL input priors, the DAgger collection loop.

The method (from the METHODS registry; this stage knows none by name) plans the run as phases
(PD: optional guided stage, then one stage per halving; LCM, DMD2: one phase); each phase trains
a student against that phase's teacher with the Trainer. Every batch is assembled by the priors
from three sources: `data` (forward-diffused real data), `student` (states on mixed
teacher/student rollouts of the *current* student) and `teacher` (states on pure teacher
rollouts); the latter two come from the replay buffer that the DAgger hook fills every
--collect-every updates, on the grids the method's phase names.
"""

from __future__ import annotations

import json
import os
import shutil
import time
import warnings
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from ddil_cli.buffer.pool import ReplayPool
from ddil_cli.buffer.replay import FIFOPolicy, PrioritizedPolicy, shard_of_key
from ddil_cli.buffer.manifest import buffer_header, check_collected_with
from ddil_cli.buffer.sources import (DataStates, forward_diffuse, is_lab, rollout_records, sources_for_batch,
                                     record_spans, without_vae_on_device)
from ddil_cli.buffer.writer import BufferWriter, prompt_id
from ddil_cli.diffusion.threshold import Threshold, parse_threshold
from ddil_cli.errors import UserError
from ddil_cli.atomic import (atomic_folder, build_beside, kept_if_interrupted, output_lock, recover_beside, to_json,
                             unreadable_file, writable_parent, write_bytes_atomic, write_json_atomic)
from ddil_cli.manifest import build_manifest, fingerprint
from ddil_cli.methods import METHODS, PLANNED, Batch, DistillMethod, MethodOptions, Phase, PlanRequest
from ddil_cli.models import load_denoiser
from ddil_cli.models.precision import enable_tf32, frozen_dtype
from ddil_cli.models.base import Denoiser
from ddil_cli.models.lora import LoraSpec
from ddil_cli.priors import PhaseSchedule, PriorSchedule
from ddil_cli.rollout import Grid
from ddil_cli.specs import read_prompts
from ddil_cli.train import CheckpointError, MetricsLog, TrainConfig, Trainer, check_optimizer, latest_checkpoint
from ddil_cli.validate import GUIDANCE

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
    stage_updates: str | None = None
    guided_updates: int = 0
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
        if name in PLANNED:
            raise UserError(f"--method {name} is not implemented yet; use one of {', '.join(METHODS)}")
        raise UserError(f"unknown --method {name!r}; use one of {', '.join([*METHODS, *PLANNED])}")
    return METHODS[name]


def _refuse_stage_flags(cfg: DistillConfig, method: type[DistillMethod]) -> None:
    """Every one-phase method refuses the stage flags alike (DMD2 used to ignore them)."""
    if (cfg.stage_updates or cfg.guided_updates) and not method.plans_stages:
        given = [f for f, v in (("--stage-updates", cfg.stage_updates), ("--guided-updates", cfg.guided_updates)) if v]
        raise UserError(f"{' and '.join(given)}: --method {cfg.method} trains one phase of --max-updates updates; "
                        "only --method pd plans stages: drop the flag")


def make_plan(cfg: DistillConfig, teacher: Denoiser) -> Plan:
    method = method_class(cfg.method)
    for flag, value in (("--batch-size", cfg.batch_size), ("--max-updates", cfg.max_updates),
                        ("--grad-accum", cfg.grad_accum), ("--log-every", cfg.log_every),
                        ("--max-nonfinite", cfg.max_nonfinite)):
        if value < 1:
            raise UserError(f"{flag} must be >= 1, got {value}")
    if cfg.mixed_precision not in ("no", "fp16", "bf16"):
        raise UserError(f"--mixed-precision {cfg.mixed_precision!r}: use no, fp16 or bf16")
    if cfg.replay not in ("fifo", "prioritised"):
        raise UserError(f"--replay {cfg.replay!r}: use fifo or prioritised")
    if cfg.tracker not in ("none", "tensorboard", "wandb"):
        raise UserError(f"--tracker {cfg.tracker!r}: use none, tensorboard or wandb")
    if cfg.tracker != "none":
        import importlib.util

        module = {"tensorboard": "tensorboard", "wandb": "wandb"}[cfg.tracker]
        if importlib.util.find_spec(module) is None:
            raise UserError(f"--tracker {cfg.tracker} needs the {module} package; pip install {module}, "
                            "or use --tracker none")
    _refuse_stage_flags(cfg, method)
    options = method.Options.from_dict(cfg.method, dict(cfg.options or {}))
    lora = _lean_settings(cfg, teacher, options)
    if options.lab_init_steps and not is_lab(teacher):
        raise UserError(f"--lab-init-steps fits a lab MLP to an analytic lab teacher; {cfg.teacher} is not one "
                        "(its student starts from its weights): drop the flag")
    options.resolve(teacher)
    phases = method.plan(PlanRequest(steps=cfg.steps, teacher_steps=cfg.teacher_steps, max_updates=cfg.max_updates,
                                     stage_updates=cfg.stage_updates, guided_updates=cfg.guided_updates,
                                     options=dict(cfg.options or {}),
                                     explicit_prior=bool(cfg.prior or cfg.prior_schedule)), teacher, options)
    default_schedule = method.default_prior_schedule or DEFAULT_PRIOR_SCHEDULE
    schedule = PriorSchedule.parse(cfg.prior if cfg.prior else (cfg.prior_schedule or default_schedule),
                                   flag="--prior" if cfg.prior else "--prior-schedule")
    if cfg.prior and cfg.prior_schedule:
        raise UserError("give --prior or --prior-schedule, not both")
    uses = {s for p in schedule.priors for s, w in p.items() if w > 0}
    if "data" in uses and not is_lab(teacher) and not cfg.data:
        raise UserError("the prior gives weight to data but this teacher has no built-in data; pass "
                        "--data SHARDS (image-caption webdataset) or set data=0")
    if not all(p.ddil for p in phases) and not is_lab(teacher) and not cfg.data:
        first = next(p.name for p in phases if not p.ddil)
        raise UserError(f"stage {first} comes before --ddil-from-stage, so it trains on data alone, and this "
                        "teacher has no built-in data; pass --data SHARDS or --ddil-from-stage 1")
    if method.needs_data(options) and not is_lab(teacher) and not cfg.data:
        raise UserError(f"--method {cfg.method} with these options draws real data in its loss but this teacher "
                        "has no built-in data; pass --data SHARDS (image-caption webdataset)")
    if cfg.data and is_lab(teacher):
        raise UserError("the Gaussian-mixture lab draws exact samples of its mixture as data; drop --data")
    if uses & {"student", "teacher"} and cfg.collect_every < 1 and not cfg.buffer:
        raise UserError("the prior draws buffer states but --collect-every is 0 and no --buffer is given; "
                        "collect during training (--collect-every K) or pass --buffer DIR")
    student_prob = _parse_student_prob(cfg.student_prob or method.default_student_prob or DEFAULT_STUDENT_PROB)
    default_w = cfg.guidance if cfg.guidance is not None else getattr(teacher, "default_guidance", 1.0)
    method_range = method.guidance_range(options)
    if cfg.guidance_range:
        try:
            low, high = (float(v) for v in cfg.guidance_range.split(","))
        except ValueError:
            raise UserError(f"bad --guidance-range {cfg.guidance_range!r}; write MIN,MAX such as 2,8") from None
        if not 1 <= low <= high <= GUIDANCE.high:  # nan fails every comparison
            raise UserError(f"--guidance-range {cfg.guidance_range}: need 1 <= MIN <= MAX <= {GUIDANCE.high:g} "
                            "(finite CFG scales), e.g. 2,8")
        guidance_range = (low, high)
    elif method_range is not None:
        guidance_range = method_range
    else:
        guidance_range = (float(default_w), float(default_w))
    # a student cannot fold CFG (two passes) into one pass unless it takes w as an input
    # (a LoRA cannot add the layer: it folds the guided teacher into one pass instead, LCM-LoRA's way)
    guidance_embedding = (guidance_range != (1.0, 1.0) or method.needs_guidance_embedding) and lora is None
    try:
        default_threshold = "static:1" if (is_lab(teacher) or getattr(teacher, "vae", 1) is None) else "none"
        threshold = parse_threshold(cfg.threshold or default_threshold)
    except ValueError as exc:
        raise UserError(f"--threshold: {exc}") from None
    if cfg.student_prediction not in (None, "epsilon", "v_prediction", "sample"):
        raise UserError(f"--student-prediction {cfg.student_prediction!r}: use epsilon, v_prediction or sample")
    prompts = read_prompts([], cfg.prompts, getattr(teacher, "default_prompts", lambda: None)()) \
        if (cfg.prompts or not cfg.data) else None
    if prompts and is_lab(teacher):
        teacher.encode(prompts)  # a prompt that is no class of the mixture fails now, not at the first batch
    # a student that folded the guidance in samples in one pass: guidance 1 (diffusers' guidance_scale=1)
    sampling_guidance = 1.0 if lora is not None and not teacher.guidance_conditioned else \
        min(max(float(default_w), guidance_range[0]), guidance_range[1])
    return Plan(method, options, phases, schedule, student_prob, guidance_range, guidance_embedding, threshold,
                prompts, lora, sampling_guidance)


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


# ---- batches ----------------------------------------------------------------------------------
class InputAssembler:
    """Builds each training batch from data / student / teacher sources by the prior in force."""

    def __init__(self, *, teacher: Denoiser, student: Denoiser, timesteps: list[int], plan: Plan, pool: ReplayPool,
                 data: DataStates | None, batch_size: int, total_updates: int, generator: torch.Generator,
                 device: str):
        # timesteps: where data inputs are forward-diffused (the phase's training grid)
        self.teacher, self.student, self.timesteps, self.plan = teacher, student, list(timesteps), plan
        # per-timestep metrics: each grid position, or 8 equal bins of a long grid (LCM's 50 points)
        bins = len(self.timesteps) if len(self.timesteps) <= 16 else 8
        self._position = {t: i * bins // len(self.timesteps) for i, t in enumerate(self.timesteps)}
        self.pool, self.data, self.batch_size = pool, data, batch_size
        self.total_updates, self.generator, self.device = total_updates, generator, device
        self.data_index = 0
        self.matched = getattr(plan.options, "ddil_mix", "batch") == "matched"

    def prior(self, update: int) -> dict[str, float]:
        return self.plan.schedule.at(update, self.total_updates)

    def guidance(self, n: int) -> torch.Tensor:
        low, high = self.plan.guidance_range
        return low + (high - low) * torch.rand(n, generator=self.generator)

    def _matched(self, sources: list[str]) -> tuple[list[str], torch.Tensor]:
        """`--ddil-mix matched`: each example's timestep first, uniform on the training grid as
        without DDIL; a buffer source keeps an example only where the pool holds its states at
        that timestep, else the example is forward-diffused data. DDIL then changes where inputs
        come from, never how much each timestep trains (LCM's rollouts visit 10 of its 50 solver
        points: replacing data there cost the low timesteps half their weight; docs/distill.md)."""
        t = torch.tensor(self.timesteps, dtype=torch.long)[
            torch.randint(len(self.timesteps), (len(sources),), generator=self.generator)]
        held = {s: self.pool.timesteps_of(s) for s in set(sources) if s != "data"}
        return [s if s == "data" or v in held[s] else "data" for s, v in zip(sources, t.tolist())], t

    def __call__(self, update: int) -> Batch:
        prior = self.prior(update)
        sources = sources_for_batch(self.batch_size, prior, self.generator)
        timesteps = None
        if self.matched and prior.get("data", 0.0) > 0:
            sources, timesteps = self._matched(sources)
        parts = []  # (x_t, t, guidance, prompts, sources, keys)
        n_data = sources.count("data")
        if n_data:
            x0, prompts = self.data.batch(n_data, self.generator, self.data_index)
            self.data_index += n_data
            at = None if timesteps is None else timesteps[[s == "data" for s in sources]]
            x_t, t, _t_index = forward_diffuse(x0, self.teacher.schedule, self.timesteps, self.generator, t=at)
            parts.append((x_t, t, self.guidance(n_data), prompts, ["data"] * n_data, [None] * n_data))
        for source in ("student", "teacher"):
            n = sources.count(source)
            if n:
                rows = (self.pool.draw(n, source, self.generator) if timesteps is None else
                        self.pool.draw_at(timesteps[[s == source for s in sources]], source, self.generator))
                picked = rows.tolist()  # iterating the tensor itself cost ~0.1 ms a draw (lab profile)
                parts.append((self.pool.states[rows].float(), self.pool.t[rows], self.pool.guidance[rows],
                              [self.pool.prompts[i] for i in picked], [source] * n,
                              [self.pool.keys[i] for i in picked]))
        x_t = torch.cat([p[0] for p in parts]).to(self.device)
        t = torch.cat([p[1] for p in parts])
        t_index = torch.tensor([self._position.get(int(v), -1) for v in t.tolist()], dtype=torch.long)
        prompts = [q for p in parts for q in p[3]]
        cond = self.teacher.encode(prompts)
        student_cond = cond if self.student.shares_conditioning(self.teacher) else self.student.encode(prompts)
        guidance = torch.cat([p[2] for p in parts])  # on the host still: its shared value is read here
        shared = guidance[0].item() if bool((guidance == guidance[0]).all()) else None
        return Batch(x_t=x_t, t=t.to(self.device), t_index=t_index.to(self.device), cond=cond,
                     student_cond=student_cond, guidance=guidance.to(self.device),
                     source=[s for p in parts for s in p[4]], keys=[k for p in parts for k in p[5]],
                     guidance_value=shared)


# ---- the DAgger collection hook ----------------------------------------------------------------
class DaggerCollector:
    """Every K updates: roll out the current student mixed with the teacher, store the visited
    states in the run's buffer (shards on disk) and the pool; pure teacher rollouts once."""

    def __init__(self, *, teacher, student, grids: list[Grid], plan: Plan, pool: ReplayPool, buffer_dir: Path,
                 rollouts: int, prompts_for, seed: int, total_updates: int, accelerator, phase: str,
                 fifo: FIFOPolicy, needs_teacher_states: bool, teacher_source: str, collect_every: int,
                 batch_size: int = 64, dtype: torch.dtype = torch.float32):
        # fingerprinted once: a stage teacher is a folder, hashing it at every collection is waste
        teacher_print = fingerprint(teacher_source)
        self.headers = [buffer_header(teacher, teacher_source, teacher_print, grid) for grid in grids]
        self.teacher, self.student, self.grids, self.plan, self.pool = teacher, student, grids, plan, pool
        self.collect_every = max(1, collect_every)
        self.buffer_dir, self.rollouts, self.prompts_for, self.seed = buffer_dir, rollouts, prompts_for, seed
        self.total_updates, self.acc, self.phase, self.fifo = total_updates, accelerator, phase, fifo
        self.needs_teacher_states = needs_teacher_states
        self.batch_size, self.dtype = batch_size, dtype
        # one writer per buffer folder for the whole phase, committing after each collection:
        # opening and closing one per collection (two more locked manifest rewrites, a scan for
        # crashed writers' files) cost as much as writing the states
        self._writers: dict[int, BufferWriter] = {}

    def _subfolder(self, grid: Grid) -> str:
        """'' for one grid; steps-N when the phase rolls out several, each into its own folder."""
        return "" if len(self.grids) == 1 else f"steps-{grid.num_transitions}"

    def _writer(self, which: int) -> BufferWriter:
        if which not in self._writers:
            grid = self.grids[which]
            folder = self.buffer_dir / self._subfolder(grid)
            self._writers[which] = BufferWriter(
                folder, self.headers[which], rank=self.acc.process_index, world_size=self.acc.num_processes,
                run_info={"command": "distill (DAgger)", "phase": self.phase}, on_commit=self.fifo).open()
        return self._writers[which]

    def close(self) -> None:
        """Mark this phase's collect runs finished (every collection is committed already)."""
        for writer in self._writers.values():
            writer.close()

    def _roll(self, writer: BufferWriter, grid: Grid, update: int, teacher_prob: float, salt: int) -> int:
        rank, world = self.acc.process_index, self.acc.num_processes
        first = (salt * 1_000_003 + update) * world * self.rollouts + rank * self.rollouts
        # seeded by the update (not by the buffer's run number) so a resumed run rolls out the same
        seeds = [(self.seed << 32) + first + i for i in range(self.rollouts)]
        prompts = self.prompts_for(self.rollouts)
        low, high = self.plan.guidance_range
        guidance = low + (high - low) * torch.rand(self.rollouts, generator=torch.Generator().manual_seed(seeds[0]))
        was_training = self.student.network.training
        self.student.network.eval()
        records = rollout_records(self.teacher, self.student, grid, prompts, seeds, teacher_prob=teacher_prob,
                                  guidance=guidance.to(self.acc.device), threshold=self.plan.threshold,
                                  device=self.acc.device, batch_size=self.batch_size, dtype=self.dtype)
        self.student.network.train(was_training)
        metas = [{"t": t, "t_index": t_index, "source": source, "rollout_id": seeds[row], "prompt": prompts[row],
                  "prompt_id": prompt_id(prompts[row]), "guidance": float(guidance[row]), "student_version": update,
                  "phase": self.phase, "teacher_prob": teacher_prob} for _, t, t_index, source, row in records]
        states = torch.stack([r[0] for r in records])
        rows = [r[4] for r in records]
        keys = []
        stored = states.numpy()
        for begin, end in record_spans(rows, stored[0].size):
            keys += writer.write_group(stored[begin:end], metas[begin:end])
        # pool keys name the subfolder: each folder numbers its shards from 0, so bare keys repeat
        prefix = f"{self._subfolder(grid)}/" if self._subfolder(grid) else ""
        self.pool.add(states, [r[1] for r in records], guidance[rows],
                      [prompts[r] for r in rows], [r[3] for r in records], [prefix + k for k in keys])
        return len(keys)

    def __call__(self, update: int) -> float:
        start = time.perf_counter()
        # states no prior from here on draws are not collected (a schedule ending on data only).
        # A data-only warm-up still collects from update 0: skipping those collections until the
        # warm-up's end was measured (5-seed lab map) and lost in 3 regimes where this rule ties
        # or wins (docs/distill.md, "Priors")
        roll_student = self.plan.schedule.draws_later("student", update, self.total_updates)
        roll_teacher = self.needs_teacher_states and self.plan.schedule.draws_later("teacher", update,
                                                                                   self.total_updates)
        if not (roll_student or roll_teacher):
            return time.perf_counter() - start
        student_prob = self.plan.student_prob.at(update, self.total_updates)
        # several grids (LCM's 3-5 step samplers): one per collection, in turn, each in its own buffer
        which = (update // self.collect_every) % len(self.grids)
        grid, writer = self.grids[which], self._writer(which)
        try:
            if roll_student:
                self._roll(writer, grid, update, 1.0 - student_prob, 0)
            # fresh teacher trajectories at every collection, as for the student: rolled once, the
            # `teacher` share of every batch came from --rollouts-per-collect trajectories for a
            # whole stage, and the lab student overfitted them (16 -> 4 quality 0.06 vs 0.23 fresh)
            if roll_teacher:
                self._roll(writer, grid, update, 1.0, 1)
        except BaseException:
            writer.abort()  # the collection's shard is dropped; committed ones stay
            raise
        writer.commit()
        return time.perf_counter() - start


class ExternalBuffer:
    """A buffer made by `ddil collect` (--buffer): its states join the pool of the stage whose
    student grid they were collected on."""

    def __init__(self, source: str, teacher: Denoiser, plan: Plan, teacher_spec: str):
        from ddil_cli.buffer.reader import resolve_buffer

        self.source = source
        _urls, _expected, manifest = resolve_buffer(source)
        header = (manifest or {}).get("header")
        if header is None:
            raise UserError(f"--buffer {source}: give a buffer folder made by `ddil collect` (with manifest.json)")
        if list(header["state"]["shape"]) != list(teacher.state_shape):
            raise UserError(f"--buffer {source} holds states of shape {tuple(header['state']['shape'])} but the "
                            f"teacher's are {tuple(teacher.state_shape)}; collect it with this teacher")
        check_collected_with(header, teacher_spec, teacher, source)
        self.timesteps = list(header["grid"]["timesteps"])
        if not any(self.usable_by(p) for p in plan.phases):
            raise UserError(f"--buffer {source} was collected on the grid {self.timesteps}, which no phase of this "
                            f"run trains on ({', '.join(p.name for p in plan.phases)}); collect it with --steps of "
                            "one of them")

    def usable_by(self, phase: Phase) -> bool:
        """A phase takes the buffer when it was collected on a grid the phase rolls its student out on."""
        return any(self.timesteps == grid.student for grid in phase.rollout_grids)

    def load_into(self, pool: ReplayPool, phase: Phase, default_guidance: float) -> int:
        from ddil_cli.buffer.reader import BufferReader

        if not self.usable_by(phase):
            return 0
        reader = BufferReader(self.source, shuffle=0, split_by_node=False, split_by_worker=False)
        samples = [s for s in reader if s.source in ("student", "teacher")]
        if samples:
            pool.add(torch.stack([s.state for s in samples]), [s.t for s in samples],
                     [s.meta.get("guidance", default_guidance) for s in samples],
                     [s.prompt or "" for s in samples], [s.source for s in samples], [s.key for s in samples])
        return len(samples)


class _RunState:
    """What the Trainer checkpoints besides the networks: the pool, the batch RNG, data position.

    With `buffer_dir` (one process) the pool's states stay out of the checkpoint: each is in the
    run's own buffer shards or among the --buffer states the phase loads before it resumes, so a
    resume reads them back by key. The disk FIFO keeps every shard the pool or the latest
    checkpoint reads (the run's buffer/ may then hold up to about twice --buffer-size)."""

    def __init__(self, pool: ReplayPool, assembler: InputAssembler, timesteps: list[int], *,
                 buffer_dir: Path | None = None, fifo: FIFOPolicy | None = None):
        self.pool, self.assembler, self.timesteps = pool, assembler, timesteps
        self.buffer_dir = buffer_dir
        self._checkpointed: set[str] = set()  # the shards the latest checkpoint reads
        if buffer_dir is not None and fifo is not None:
            fifo.pinned = lambda: self._checkpointed | self._shards(self.pool.keys)

    def state(self):
        tensors, info = self.pool.state()
        if self.buffer_dir is not None:
            tensors.pop("states", None)
            info["states"] = "shards"
            self._checkpointed = self._shards(self.pool.keys)
        tensors = {f"pool.{k}": v for k, v in tensors.items()}
        tensors["generator"] = self.assembler.generator.get_state()
        return tensors, {"pool": info, "data_index": self.assembler.data_index}

    def load(self, tensors, info):
        pool = {k[5:]: v for k, v in tensors.items() if k.startswith("pool.")}
        if info["pool"].get("states") == "shards" and info["pool"]["keys"]:
            pool["states"] = self._states_by_key(info["pool"]["keys"])
        self.pool.load(pool, info["pool"], timesteps=self.timesteps)
        self.assembler.generator.set_state(tensors["generator"])
        self.assembler.data_index = info["data_index"]

    @staticmethod
    def _shards(keys) -> set[str]:
        """Shard names of pool keys ('steps-N/KEY' in a multi-grid phase; the FIFO sees bare names)."""
        return {shard_of_key(k.rpartition("/")[2]) for k in keys}

    def _states_by_key(self, keys: list[str]) -> torch.Tensor:
        """The states of `keys`, in order: the pool's own (--buffer's), the rest from the run's shards."""
        from ddil_cli.buffer.reader import BufferReader

        found = dict(zip(self.pool.keys, self.pool.states)) if self.pool.states is not None else {}
        by_folder: dict[str, dict[str, str]] = {}  # subfolder -> bare key -> pool key
        for key in keys:
            if key not in found:
                folder, _, bare = key.rpartition("/")
                by_folder.setdefault(folder, {})[bare] = key
        for folder, wanted in by_folder.items():
            paths = [str(self.buffer_dir / folder / name) for name in sorted(self._shards(wanted))
                     if (self.buffer_dir / folder / name).is_file()]
            for sample in BufferReader(paths, shuffle=0, split_by_node=False, split_by_worker=False) if paths else ():
                if sample.key in wanted:
                    found[wanted[sample.key]] = sample.state.to(torch.float16)
        missing = [k for k in keys if k not in found]
        if missing:
            raise CheckpointError(f"{len(missing)} replay states this checkpoint reads (e.g. {missing[0]}) are no "
                                  f"longer in {self.buffer_dir}; resume from the latest checkpoint, or start again")
        return torch.stack([found[k] for k in keys])


# ---- the run ---------------------------------------------------------------------------------
def rank_seed(seed: int, phase_index: int, rank: int) -> int:
    """The global RNG seed of process `rank` (> 0) in a phase: apart from every other rank's."""
    return (seed * 1_000_003 + phase_index * 7919 + rank * 104_729) % 2 ** 63


COMPATIBLE_KEYS = ("method", "teacher", "steps", "teacher_steps", "guided_updates", "student_prediction", "options",
                   "lora_rank", "lora_alpha", "lora_targets")


def _run_config(run: Path) -> dict:
    """The config a distill run folder was started with (its manifest), checked to be one."""
    manifest_path = run / "manifest.json"
    if not manifest_path.is_file():
        raise UserError(f"--resume: {run} is not a ddil distill run (no manifest.json); check --out")
    try:
        manifest = json.loads(manifest_path.read_text())
        old = manifest["config"]
        if not isinstance(old, dict):
            raise TypeError("config is not a table")
        if manifest.get("stage") != "distill":
            raise UserError(f"--resume: {run} is not a ddil distill run (its manifest is a "
                            f"{manifest.get('stage')!r} output's); check --out")
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise UserError(f"--resume: {manifest_path} is damaged ({exc}); restore it, or start again with "
                        "--overwrite or another --out") from None
    return old


def _check_same_settings(cfg: DistillConfig, run: Path) -> None:
    old = _run_config(run)
    for key in COMPATIBLE_KEYS:
        if old.get(key, {"options": {}, "lora_rank": 0}.get(key)) != getattr(cfg, key):
            raise UserError(f"--resume: the run in {run} has {key}={old.get(key)!r}, this command "
                            f"{getattr(cfg, key)!r}; resume with the same settings or use another --out")
    _check_same_teacher_files(cfg, run)


def _check_same_teacher_files(cfg: DistillConfig, run: Path) -> None:
    """The same --teacher by content too: another model put at the same path is another teacher."""
    try:
        recorded = json.loads((run / "manifest.json").read_text())["inputs"]["teacher"]["fingerprint"]
    except (OSError, ValueError, KeyError, TypeError):
        return  # an older manifest: the name check above is all there is
    if isinstance(recorded, str) and recorded != fingerprint(cfg.teacher):
        raise UserError(f"--resume: the files of --teacher {cfg.teacher} changed since the run in {run} started "
                        "(their fingerprint is not the one its manifest.json records); resume with the teacher "
                        "the run started with, or start a new --out")


def _check_checkpoint_fits(path: Path, plan: Plan) -> None:
    """A checkpoint resumes only a phase of this plan, within that phase's updates."""
    try:
        info = json.loads((path / "state.json").read_text())
        phase_name, update = info["phase"], int(info["train"]["update"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise UserError(f"--resume {path}: {path / 'state.json'} is not a checkpoint's state ({exc}); use "
                        "--resume latest or another checkpoint") from None
    phases = {p.name: p for p in plan.phases}
    if phase_name not in phases:
        raise UserError(f"--resume {path}: its phase {phase_name!r} is not one of this run's "
                        f"({', '.join(phases)}); it comes from another method or step layout: resume with the "
                        "flags that made it or start a new --out")
    if update > phases[phase_name].updates:
        raise UserError(f"--resume {path}: the checkpoint is at update {update} of phase {phase_name}, past this "
                        f"run's {phases[phase_name].updates} for it; raise --max-updates (or --stage-updates) "
                        "to at least the checkpoint's")


def check_resume(cfg: DistillConfig, run: Path, plan: Plan | None = None) -> Path | None:
    """The checkpoint to resume from (None: start fresh), after checking the run matches."""
    if cfg.resume is None:
        if run.is_dir() and any(run.iterdir()) and not cfg.overwrite:  # a file: refused as not writable
            raise UserError(f"run folder {run} already exists; pass --resume latest to continue it, "
                            "another --out, or --overwrite to start again")
        return None
    _check_same_settings(cfg, run)
    if cfg.resume == "latest":
        path = latest_checkpoint(run)
    else:
        path = Path(cfg.resume)
        if not (path / "state.json").is_file():
            raise UserError(f"--resume {path}: not a checkpoint folder (no state.json); use latest or "
                            f"a folder under {run / 'checkpoints'}")
        problem = unreadable_file(path)
        if problem is not None:
            raise UserError(f"--resume {path}: {problem}; use --resume latest (it skips damaged checkpoints) "
                            f"or another folder under {run / 'checkpoints'}")
        origin = path.absolute().parent.parent  # RUN/checkpoints/checkpoint-N
        if origin != run.absolute() and (origin / "manifest.json").is_file():
            _check_same_settings(cfg, origin)  # a checkpoint of another run: the same method and teacher
    if path is not None and plan is not None:
        _check_checkpoint_fits(path, plan)
    return path


def _what_a_run_kept(run: Path, published: bool = True) -> str:
    checkpoint = latest_checkpoint(run) if published and run.is_dir() else None
    if checkpoint is None:
        return f"no checkpoint yet, so {run} is as it was before this command"
    return f"the checkpoint {checkpoint}; continue with the same flags plus --resume latest"


@contextmanager
def _one_writer(run: Path, accelerator):
    """The run's output lock (main process; every command takes it on its --out), after cleaning
    what a killed run left beside it (a resume, too, may find an old run to put back). The other
    processes of a launch wait for that before they look at the run."""
    main = accelerator.is_main_process
    with output_lock(run, "ddil distill") if main else nullcontext():
        for done in recover_beside(run) if main else []:
            warnings.warn(done)
        accelerator.wait_for_everyone()
        yield


@contextmanager
def _run_folder(run: Path, *, fresh: bool, overwrite: bool, accelerator, progress=None):
    """(the folder the run writes, what to call at each checkpoint). A fresh run builds beside --out
    and appears there (replacing an old run with --overwrite) at its first checkpoint, so a failed
    or interrupted start leaves --out as it was (atomic.build_beside); a resume trains in place."""
    if not fresh:
        with kept_if_interrupted(lambda: _what_a_run_kept(run)):
            yield run, None
        return
    with build_beside(run, replace=overwrite, main=accelerator.is_main_process,
                      barrier=accelerator.wait_for_everyone) as building, \
            kept_if_interrupted(lambda: _what_a_run_kept(run, building.published)):
        if progress is not None and not progress.disable and accelerator.is_main_process:
            progress.console.print(f"building the run in {building.path}; it appears at {run} at its first "
                                   "checkpoint", markup=False, highlight=False)
        yield building.path, building.publish


def run_distill(cfg: DistillConfig, *, progress=None) -> dict:
    from accelerate import Accelerator

    run = Path(cfg.out)
    # first: under a launcher every process validates, and only the main process writes
    # (a tracker's logs go to the folder the run is built in: _train points them there)
    accelerator = Accelerator(mixed_precision=cfg.mixed_precision, cpu=cfg.device == "cpu",
                              log_with=None if cfg.tracker == "none" else cfg.tracker, project_dir=str(run / "logs"))
    enable_tf32(accelerator.device)
    frozen = frozen_dtype(cfg.frozen_dtype, accelerator.device)
    teacher = load_denoiser(cfg.teacher, device=str(accelerator.device), dtype=frozen)
    plan = make_plan(cfg, teacher)
    with _one_writer(run, accelerator):
        return _run_locked(cfg, run, plan, teacher, accelerator, progress)


def _run_locked(cfg: DistillConfig, run: Path, plan: Plan, teacher: Denoiser, accelerator, progress) -> dict:
    resume_from = check_resume(cfg, run, plan)
    # the data source opens for forward-diffused inputs, for a loss that draws data, and, with
    # --data and no --prompts, as the rollouts' captions (a student- or teacher-only prior: DMD2's)
    uses_data = (any(p["data"] > 0 for p in plan.schedule.priors) or plan.method.needs_data(plan.options)
                 or not all(p.ddil for p in plan.phases)
                 or bool(cfg.data and plan.prompts is None))
    if uses_data and cfg.data:
        DataStates(teacher, data=cfg.data).captions(1)  # fail now, not after the run folder exists
    data = DataStates(teacher, data=cfg.data, prompts=plan.prompts,
                      part=accelerator.process_index, parts=accelerator.num_processes) if uses_data else None
    external = ExternalBuffer(cfg.buffer, teacher, plan, cfg.teacher) if cfg.buffer else None
    existing = next((p for p in [run, *run.absolute().parents] if p.exists()), Path("/"))
    if not os.access(existing, os.W_OK | os.X_OK) or (existing == run and not run.is_dir()):
        raise UserError(f"cannot write to {run} ({existing} is not a writable folder); choose a writable --out")
    if resume_from is None:
        writable_parent(run)  # a fresh run is built beside --out and renamed there
    # a --resume latest that finds no checkpoint starts again, replacing the run at its first one
    with _run_folder(run, fresh=resume_from is None, overwrite=cfg.overwrite or cfg.resume is not None,
                     accelerator=accelerator, progress=progress) as (work, on_checkpoint):
        return _train(cfg, work, plan, teacher, accelerator, resume_from, data, external, progress, on_checkpoint)


def _train(cfg, run: Path, plan: Plan, teacher: Denoiser, accelerator, resume_from, data, external, progress,
           on_checkpoint=None) -> dict:
    from accelerate.utils import set_seed

    frozen = frozen_dtype(cfg.frozen_dtype, accelerator.device)
    set_seed(cfg.seed)
    # a resume that fails on its checkpoint leaves the run's manifest (its original command) as it was
    previous_manifest = (run / "manifest.json").read_bytes() if resume_from is not None else None
    if accelerator.is_main_process:
        write_json_atomic(run / "manifest.json", build_manifest(
            "distill", cfg, inputs={"teacher": cfg.teacher, "data": cfg.data, "prompts": cfg.prompts},
            extra={"phases": [p.describe() for p in plan.phases], "method_options": asdict(plan.options),
                   "teacher_model": teacher.describe(),
                   # resolved: the method's or the stage's defaults when the flags were not given
                   "prior_schedule": plan.schedule.describe(),
                   "student_prob": [{"start": s, "prob": v} for s, v in zip(plan.student_prob.starts,
                                                                           plan.student_prob.values)]}))
    if cfg.tracker != "none":
        accelerator.project_configuration.project_dir = accelerator.project_configuration.logging_dir = str(run / "logs")
        accelerator.init_trackers("ddil-distill", config={k: v for k, v in asdict(cfg).items()
                                                          if isinstance(v, (int, float, str, bool))})
    metrics = MetricsLog(run / "metrics.jsonl")
    resume_info = json.loads((resume_from / "state.json").read_text()) if resume_from else None
    if resume_info is not None and not isinstance(resume_info, dict):
        resume_info = {"phase": None}  # not a checkpoint's state: load_checkpoint names the problem

    teacher = without_vae_on_device(teacher.to(accelerator.device), data)
    original_source = str(getattr(teacher, "spec", "") or cfg.teacher)  # normalised lab spec
    previous, previous_source = teacher, original_source  # the last finished phase's student
    offset, summaries = 0, []
    for k, phase in enumerate(plan.phases):
        stage_dir = run / "stages" / phase.name
        done = (stage_dir / "ddil_phase.json").is_file()
        if done and cfg.resume is not None:
            previous = without_vae_on_device(load_denoiser(str(stage_dir), device=accelerator.device,
                                                           dtype=frozen, base=teacher), data)
            previous_source = str(stage_dir)
            offset += phase.updates
            summaries.append(json.loads((stage_dir / "ddil_phase.json").read_text()))
            continue
        phase_teacher, teacher_source = (teacher, original_source) if phase.teacher == "original" \
            else (previous, previous_source)
        try:
            summaries.append(_run_phase(cfg, plan, phase, k, phase_teacher, teacher, data, run, accelerator, metrics,
                                        resume_from if resume_info and resume_info["phase"] == phase.name else None,
                                        offset, progress, teacher_source, external, on_checkpoint))
        except CheckpointError:
            if previous_manifest is not None and accelerator.is_main_process:
                write_bytes_atomic(run / "manifest.json", previous_manifest)
            raise
        # the finished phase's student, optimisers and gradients go before the next loads: accelerate
        # keeps every prepared model and optimiser until told (an SD-size stage's ~10 GB each)
        previous = phase_teacher = None
        accelerator.free_memory()
        # the phase ended with a checkpoint, which published a fresh run: from here paths name --out
        run, stage_dir = Path(cfg.out), Path(cfg.out) / "stages" / phase.name
        # a LoRA stage's student loads onto the teacher's UNet: the base stays held once
        previous = without_vae_on_device(load_denoiser(str(stage_dir), device=accelerator.device, dtype=frozen,
                                                       base=teacher), data)
        previous_source = str(stage_dir)
        offset += phase.updates
    final = run / "student"
    if accelerator.is_main_process:
        with atomic_folder(final) as tmp:
            shutil.copytree(run / "stages" / plan.phases[-1].name, tmp, dirs_exist_ok=True)
            (tmp / "ddil_phase.json").unlink()
    accelerator.end_training()
    summary = {"phases": summaries, "student": str(Path(cfg.out) / "student"),
               "collect_share": sum(s["collect_seconds"] for s in summaries) /
               max(1e-9, sum(s["collect_seconds"] + s["train_seconds"] for s in summaries))}
    if accelerator.is_main_process:
        write_json_atomic(run / "summary.json", summary)
    return summary


def _run_phase(cfg, plan, phase: Phase, index, phase_teacher, original_teacher, data, run, accelerator, metrics,
               resume_from, offset, progress, teacher_source: str, external: ExternalBuffer | None,
               on_checkpoint=None) -> dict:
    kwargs = {}
    if not phase.ddil:  # teacher-forced: data alone, so nothing is collected either
        plan = replace(plan, schedule=PriorSchedule.parse("data=1"))
    if is_lab(phase_teacher) and cfg.student_prediction:
        kwargs["prediction_type"] = cfg.student_prediction
    if plan.lora is not None:
        kwargs["lora"] = plan.lora
    needs_embedding = plan.guidance_embedding and not phase_teacher.guidance_conditioned
    torch.manual_seed(cfg.seed + index)
    student = plan.method.make_student(phase_teacher, phase, plan.options, guidance_embedding=needs_embedding,
                                       **kwargs).to(accelerator.device)
    if cfg.gradient_checkpointing and hasattr(student.network, "enable_gradient_checkpointing"):
        student.network.enable_gradient_checkpointing()
    method = plan.method(teacher=phase_teacher, student=student, phase=phase, options=plan.options,
                         threshold=plan.threshold, original_teacher=original_teacher, data=data)
    # the networks above start equal on every rank; what is drawn from here on (DMD2's timesteps and
    # noise) differs by rank, so N processes see N times the draws. Rank 0 keeps the stream a
    # 1-process run has (its results unchanged); checkpoints keep every rank's state.
    if accelerator.process_index > 0:
        torch.manual_seed(rank_seed(cfg.seed, index, accelerator.process_index))
    policy = PrioritizedPolicy(cfg.priority_alpha) if cfg.replay == "prioritised" else None
    pool = ReplayPool(cfg.buffer_size, policy)
    generator = torch.Generator().manual_seed(cfg.seed * 7919 + index * 104729 + accelerator.process_index)
    assembler = InputAssembler(teacher=phase_teacher, student=student, timesteps=phase.train_timesteps, plan=plan,
                               pool=pool, data=data, batch_size=cfg.batch_size, total_updates=phase.updates,
                               generator=generator, device=accelerator.device)
    if external is not None and phase.ddil:
        external.load_into(pool, phase, plan.guidance_range[0])
    uses = {s for p in plan.schedule.priors for s, w in p.items() if w > 0}
    hooks, collector, fifo = [], None, FIFOPolicy(cfg.buffer_size)
    if uses & {"student", "teacher"}:
        prompt_source = (lambda n: [plan.prompts[i % len(plan.prompts)] for i in
                                    torch.randint(len(plan.prompts), (n,), generator=generator).tolist()]) \
            if plan.prompts else data.captions
        collector = DaggerCollector(teacher=phase_teacher, student=student, grids=phase.rollout_grids, plan=plan,
                                    pool=pool, buffer_dir=run / "buffer" / phase.name,
                                    rollouts=cfg.rollouts_per_collect, prompts_for=prompt_source, seed=cfg.seed,
                                    total_updates=phase.updates, accelerator=accelerator, phase=phase.name,
                                    fifo=fifo, needs_teacher_states="teacher" in uses,
                                    teacher_source=teacher_source, collect_every=cfg.collect_every,
                                    batch_size=cfg.rollout_batch_size, dtype=frozen_dtype(cfg.frozen_dtype, accelerator.device))
        hooks.append((cfg.collect_every, collector))
    train_cfg = TrainConfig(max_updates=phase.updates, lr=cfg.lr, warmup=cfg.warmup, weight_decay=cfg.weight_decay,
                            max_grad_norm=cfg.max_grad_norm, grad_accum=cfg.grad_accum, ema_decay=cfg.ema_decay,
                            checkpoint_every=cfg.checkpoint_every, keep_checkpoints=cfg.keep_checkpoints,
                            log_every=cfg.log_every, max_nonfinite=cfg.max_nonfinite, optimizer=cfg.optimizer)
    observers = [PriorityScores(policy)] if policy is not None else []
    trainer = Trainer(accelerator=accelerator, method=method, config=train_cfg, run_dir=run, phase=phase.name,
                      make_batch=assembler, hooks=hooks,
                      # several processes: each pool is its own, so the main one's states stay in the checkpoint
                      extra_state=_RunState(pool, assembler, phase.train_timesteps, fifo=fifo,
                                            buffer_dir=run / "buffer" / phase.name
                                            if accelerator.num_processes == 1 else None),
                      progress=progress, log=metrics, update_offset=offset, loss_observers=observers,
                      on_checkpoint=on_checkpoint)
    if resume_from is not None:
        trainer.load_checkpoint(resume_from)
    state = trainer.run()
    if collector is not None:
        collector.close()
    trainer.save_checkpoint()  # the online weights (and the EMA's state), before the EMA is published
    stage_dir = run / "stages" / phase.name
    summary = {"phase": phase.name, "steps": phase.steps, "updates": state.update,
               "nonfinite_skipped": state.nonfinite_total, "collect_seconds": state.collect_seconds,
               "train_seconds": state.train_seconds, "buffer_states": len(pool)}
    if hasattr(student, "sampling_defaults"):  # a diffusers student: `ddil sample` reads its
        # default w there; copied from the teacher, it named the teacher's w (1.5 for digits) for
        # a student distilled at --guidance 4, a w it never saw
        student.sampling_defaults = {**student.sampling_defaults, "guidance": plan.sampling_guidance}
    if accelerator.is_main_process:
        with atomic_folder(stage_dir) as tmp, trainer.final_weights():
            # the EMA weights when EMA is on; the online ones are put back after
            student.save_pretrained(tmp, timesteps=phase.timesteps, scheduler=plan.method.student_scheduler,
                                    **({"merge_lora": True} if cfg.merge_lora and index == len(plan.phases) - 1 else {}))
            (tmp / "ddil_phase.json").write_text(to_json(summary, indent=2))
    accelerator.wait_for_everyone()
    return summary


class PriorityScores:
    """Prioritised replay's hook into the loop: each buffered state's last loss is its priority."""

    def __init__(self, policy: PrioritizedPolicy):
        self.policy = policy

    def __call__(self, batch: Batch, per_example: torch.Tensor) -> None:
        keyed = [(k, v) for k, v in zip(batch.keys, per_example.float().cpu().tolist()) if k]
        if keyed:
            self.policy.update([k for k, _ in keyed], [v for _, v in keyed])
