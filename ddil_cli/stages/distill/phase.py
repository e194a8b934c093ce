"""One phase of `ddil distill`: its student, its batches, its DAgger hook, the Trainer, and the
phase's student published as OUT/stages/PHASE."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from ddil_cli.atomic import atomic_folder, to_json
from ddil_cli.buffer.pool import ReplayPool
from ddil_cli.buffer.replay import FIFOPolicy, PrioritizedPolicy
from ddil_cli.buffer.sources import DataStates, is_mixture_teacher
from ddil_cli.methods import Phase
from ddil_cli.models.base import Denoiser
from ddil_cli.priors import PriorSchedule
from ddil_cli.stages.distill.batches import InputAssembler
from ddil_cli.stages.distill.dagger import DaggerCollector, ExternalBuffer, PriorityScores, Rollouts
from ddil_cli.stages.distill.plan import DistillConfig, Plan
from ddil_cli.stages.distill.runfolder import RunState
from ddil_cli.train import MetricsLog, TrainConfig, Trainer


def rank_seed(seed: int, phase_index: int, rank: int) -> int:
    """The global RNG seed of process `rank` (> 0) in a phase: apart from every other rank's."""
    return (seed * 1_000_003 + phase_index * 7919 + rank * 104_729) % 2 ** 63

@dataclass
class DistillRun:
    """What every phase of one run shares."""
    cfg: DistillConfig
    plan: Plan
    folder: Path
    accelerator: Any
    teacher: Denoiser  # the original teacher
    frozen: torch.dtype  # the dtype of every network not trained
    data: DataStates | None = None
    external: ExternalBuffer | None = None
    metrics: MetricsLog | None = None
    progress: Any = None
    on_checkpoint: Any = None  # the Trainer calls it after each checkpoint: the first publishes a fresh run


@dataclass
class PhaseJob:
    """One phase to train, against its teacher (the original, or the previous phase's student)."""
    phase: Phase
    index: int
    teacher: Denoiser
    teacher_source: str
    offset: int  # the updates of the phases before it
    resume_from: Path | None  # a checkpoint of this phase


def run_phase(run: DistillRun, job: PhaseJob) -> dict:
    cfg, plan, phase, accelerator = run.cfg, run.plan, job.phase, run.accelerator
    if not phase.ddil:  # teacher-forced: data alone, so nothing is collected either
        plan = replace(plan, schedule=PriorSchedule.parse("data=1"))
    kwargs = {}
    if is_mixture_teacher(job.teacher) and cfg.student_prediction:
        kwargs["prediction_type"] = cfg.student_prediction
    if plan.lora is not None:
        kwargs["lora"] = plan.lora
    needs_embedding = plan.guidance_embedding and not job.teacher.guidance_conditioned
    torch.manual_seed(cfg.seed + job.index)
    student = plan.method.make_student(job.teacher, phase, plan.options, guidance_embedding=needs_embedding,
                                       **kwargs).to(accelerator.device)
    if cfg.gradient_checkpointing and hasattr(student.network, "enable_gradient_checkpointing"):
        student.network.enable_gradient_checkpointing()
    method = plan.method(teacher=job.teacher, student=student, phase=phase, options=plan.options,
                         threshold=plan.threshold, original_teacher=run.teacher, data=run.data)
    # the networks above start equal on every rank; what is drawn from here on (DMD2's timesteps and
    # noise) differs by rank, so N processes see N times the draws. Rank 0 keeps the stream a
    # 1-process run has (its results unchanged); checkpoints keep every rank's state.
    if accelerator.process_index > 0:
        torch.manual_seed(rank_seed(cfg.seed, job.index, accelerator.process_index))
    policy = PrioritizedPolicy(cfg.priority_alpha) if cfg.replay == "prioritised" else None
    pool, fifo = ReplayPool(cfg.buffer_size, policy), FIFOPolicy(cfg.buffer_size)
    generator = torch.Generator().manual_seed(cfg.seed * 7919 + job.index * 104729 + accelerator.process_index)
    if run.data is not None:  # every phase reads the data from the stream's start, so a resume that finds
        run.data.load_state(None)  # the previous phase done starts this one where an unbroken run does
    assembler = InputAssembler(teacher=job.teacher, student=student, timesteps=phase.train_timesteps, plan=plan,
                               pool=pool, data=run.data, batch_size=cfg.batch_size, total_updates=phase.updates,
                               generator=generator, device=accelerator.device)
    if run.external is not None and phase.ddil:
        run.external.load_into(pool, phase, plan.guidance_range[0])
    collector = _collector(run, job, plan, student, pool, fifo, generator)
    buffer_dir = run.folder / "buffer" / phase.name
    trainer = Trainer(accelerator=accelerator, method=method, config=_train_config(cfg, phase), run_dir=run.folder,
                      phase=phase.name, make_batch=assembler,
                      hooks=[(cfg.collect_every, collector)] if collector is not None else [],
                      # several processes: each pool is its own, so the main one's states stay in the checkpoint
                      extra_state=RunState(pool, assembler, phase.train_timesteps, fifo=fifo,
                                           buffer_dir=buffer_dir if accelerator.num_processes == 1 else None),
                      progress=run.progress, log=run.metrics, update_offset=job.offset,
                      loss_observers=[PriorityScores(policy)] if policy is not None else [],
                      on_checkpoint=run.on_checkpoint)
    if job.resume_from is not None:
        trainer.load_checkpoint(job.resume_from)
    state = trainer.run()
    if collector is not None:
        collector.close()
    trainer.save_checkpoint()  # the online weights (and the EMA's state), before the EMA is published
    summary = {"phase": phase.name, "steps": phase.steps, "updates": state.update,
               "nonfinite_skipped": state.nonfinite_total, "collect_seconds": state.collect_seconds,
               "train_seconds": state.train_seconds, "buffer_states": len(pool)}
    _publish(run, job, student, trainer, summary)
    return summary


def _train_config(cfg: DistillConfig, phase: Phase) -> TrainConfig:
    return TrainConfig(max_updates=phase.updates, lr=cfg.lr, warmup=cfg.warmup, weight_decay=cfg.weight_decay,
                       max_grad_norm=cfg.max_grad_norm, grad_accum=cfg.grad_accum, ema_decay=cfg.ema_decay,
                       checkpoint_every=cfg.checkpoint_every, keep_checkpoints=cfg.keep_checkpoints,
                       log_every=cfg.log_every, max_nonfinite=cfg.max_nonfinite, optimizer=cfg.optimizer)


def _collector(run: DistillRun, job: PhaseJob, plan: Plan, student, pool, fifo, generator) -> DaggerCollector | None:
    """The phase's DAgger hook, when its prior draws rollout states (None: data alone)."""
    uses = {s for p in plan.schedule.priors for s, w in p.items() if w > 0}
    if not uses & {"student", "teacher"}:
        return None
    prompts = plan.prompts
    prompt_source = (lambda n: [prompts[i % len(prompts)] for i in
                                torch.randint(len(prompts), (n,), generator=generator).tolist()]) \
        if prompts else run.data.captions
    cfg = run.cfg
    settings = Rollouts(count=cfg.rollouts_per_collect, every=cfg.collect_every, batch_size=cfg.rollout_batch_size,
                        seed=cfg.seed, dtype=run.frozen, prompts_for=prompt_source,
                        needs_teacher_states="teacher" in uses)
    return DaggerCollector(teacher=job.teacher, student=student, phase=job.phase, plan=plan, pool=pool, fifo=fifo,
                           buffer_dir=run.folder / "buffer" / job.phase.name, accelerator=run.accelerator,
                           teacher_source=job.teacher_source, rollouts=settings)


def _publish(run: DistillRun, job: PhaseJob, student, trainer: Trainer, summary: dict) -> None:
    """The phase's student (the EMA weights when EMA is on) as OUT/stages/PHASE, with its summary."""
    if hasattr(student, "sampling_defaults"):  # a diffusers student: `ddil sample` reads its
        # default w there; copied from the teacher, it named the teacher's w (1.5 for digits) for
        # a student distilled at --guidance 4, a w it never saw
        student.sampling_defaults = {**student.sampling_defaults, "guidance": run.plan.sampling_guidance}
    last = job.index == len(run.plan.phases) - 1
    if run.accelerator.is_main_process:
        with atomic_folder(run.folder / "stages" / job.phase.name) as tmp, trainer.final_weights():
            # the EMA weights when EMA is on; the online ones are put back after
            student.save_pretrained(tmp, timesteps=job.phase.timesteps, scheduler=run.plan.method.student_scheduler,
                                    **({"merge_lora": True} if run.cfg.merge_lora and last else {}))
            (tmp / "ddil_phase.json").write_text(to_json(summary, indent=2))
    run.accelerator.wait_for_everyone()
