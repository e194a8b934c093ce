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
import shutil
from contextlib import closing, nullcontext
from dataclasses import asdict
from pathlib import Path

from ddil_cli.atomic import atomic_folder, writable_parent, write_bytes_atomic, write_json_atomic
from ddil_cli.buffer.sources import DataStates, without_vae_on_device
from ddil_cli.models import load_denoiser
from ddil_cli.models.precision import enable_tf32, frozen_dtype
from ddil_cli.stages.distill.dagger import ExternalBuffer
from ddil_cli.stages.distill.phase import DistillRun, PhaseJob, run_phase
from ddil_cli.stages.distill.plan import DistillConfig, make_plan
from ddil_cli.stages.distill.runfolder import (check_resume, check_writable, checkpoint_phase, one_writer, run_folder,
                                               write_run_manifest)
from ddil_cli.train import CheckpointError, MetricsLog


def run_distill(cfg: DistillConfig, *, progress=None) -> dict:
    from accelerate import Accelerator

    folder = Path(cfg.out)
    # first: under a launcher every process validates, and only the main process writes
    accelerator = Accelerator(mixed_precision=cfg.mixed_precision, cpu=cfg.device == "cpu",
                              log_with=None if cfg.tracker == "none" else cfg.tracker,
                              project_dir=str(folder / "logs"))
    enable_tf32(accelerator.device)
    frozen = frozen_dtype(cfg.frozen_dtype, accelerator.device)
    teacher = load_denoiser(cfg.teacher, device=str(accelerator.device), dtype=frozen)
    run = DistillRun(cfg, make_plan(cfg, teacher), folder, accelerator, teacher, frozen, progress=progress)
    with one_writer(folder, accelerator):
        return _run_locked(run)


def _run_locked(run: DistillRun) -> dict:
    cfg, plan = run.cfg, run.plan
    resume_from = check_resume(cfg, run.folder, plan)
    # the data source opens for forward-diffused inputs, for a loss that draws data, and, with
    # --data and no --prompts, as the rollouts' captions (a student- or teacher-only prior: DMD2's)
    uses_data = (any(p["data"] > 0 for p in plan.schedule.priors) or plan.method.needs_data(plan.options)
                 or not all(p.ddil for p in plan.phases)
                 or bool(cfg.data and plan.prompts is None))
    if uses_data and cfg.data:
        DataStates(run.teacher, data=cfg.data).captions(1)  # fail now, not after the run folder exists
    run.data = DataStates(run.teacher, data=cfg.data, prompts=plan.prompts, part=run.accelerator.process_index,
                          parts=run.accelerator.num_processes, seed=cfg.seed, workers=cfg.data_workers,
                          device=run.accelerator.device) if uses_data else None
    run.external = ExternalBuffer(cfg.buffer, run.teacher, plan, cfg.teacher) if cfg.buffer else None
    check_writable(run.folder)
    if resume_from is None:
        writable_parent(run.folder)  # a fresh run is built beside --out and renamed there
    # a --resume latest that finds no checkpoint starts again, replacing the run at its first one
    with run_folder(run.folder, fresh=resume_from is None, overwrite=cfg.overwrite or cfg.resume is not None,
                    accelerator=run.accelerator, progress=run.progress) as (run.folder, run.on_checkpoint), \
            closing(run.data) if run.data is not None else nullcontext():  # the loader's workers stop with the run
        return _train(run, resume_from)


def _train(run: DistillRun, resume_from: Path | None) -> dict:
    from accelerate.utils import set_seed

    cfg, plan, folder, accelerator = run.cfg, run.plan, run.folder, run.accelerator
    set_seed(cfg.seed)
    # a resume that fails on its checkpoint leaves the run's manifest (its original command) as it was
    previous_manifest = (folder / "manifest.json").read_bytes() if resume_from is not None else None
    if accelerator.is_main_process:
        write_run_manifest(cfg, folder, plan, run.teacher)
    if cfg.tracker != "none":  # its logs go where the run is built
        accelerator.project_configuration.project_dir = accelerator.project_configuration.logging_dir = \
            str(folder / "logs")
        accelerator.init_trackers("ddil-distill", config={k: v for k, v in asdict(cfg).items()
                                                          if isinstance(v, (int, float, str, bool))})
    run.metrics = MetricsLog(folder / "metrics.jsonl")
    resume_phase = checkpoint_phase(resume_from)
    run.teacher = without_vae_on_device(run.teacher.to(accelerator.device), run.data)
    original_source = str(getattr(run.teacher, "spec", "") or cfg.teacher)  # normalised lab spec
    previous, previous_source = run.teacher, original_source  # the last finished phase's student
    offset, summaries = 0, []
    for k, phase in enumerate(plan.phases):
        stage_dir = folder / "stages" / phase.name
        if (stage_dir / "ddil_phase.json").is_file() and cfg.resume is not None:
            summaries.append(json.loads((stage_dir / "ddil_phase.json").read_text()))
        else:
            job = PhaseJob(phase, k, *((run.teacher, original_source) if phase.teacher == "original"
                                       else (previous, previous_source)), offset,
                           resume_from if resume_phase == phase.name else None)
            try:
                summaries.append(run_phase(run, job))
            except CheckpointError:
                if previous_manifest is not None and accelerator.is_main_process:
                    write_bytes_atomic(folder / "manifest.json", previous_manifest)
                raise
            # the finished phase's student, optimisers and gradients go before the next loads: accelerate
            # keeps every prepared model and optimiser until told (an SD-size stage's ~10 GB each)
            previous = job = None
            accelerator.free_memory()
            # the phase ended with a checkpoint, which published a fresh run: from here paths name --out
            folder = run.folder = Path(cfg.out)
            stage_dir = folder / "stages" / phase.name
        # a LoRA stage's student loads onto the teacher's UNet: the base stays held once
        previous = without_vae_on_device(load_denoiser(str(stage_dir), device=accelerator.device, dtype=run.frozen,
                                                       base=run.teacher), run.data)
        previous_source = str(stage_dir)
        offset += phase.updates
    return _finish(run, summaries)


def _finish(run: DistillRun, summaries: list[dict]) -> dict:
    """The last phase's student as OUT/student, and the run's summary."""
    final = run.folder / "student"
    if run.accelerator.is_main_process:
        with atomic_folder(final) as tmp:
            shutil.copytree(run.folder / "stages" / run.plan.phases[-1].name, tmp, dirs_exist_ok=True)
            (tmp / "ddil_phase.json").unlink()
    run.accelerator.end_training()
    summary = {"phases": summaries, "student": str(Path(run.cfg.out) / "student"),
               "collect_share": sum(s["collect_seconds"] for s in summaries) /
               max(1e-9, sum(s["collect_seconds"] + s["train_seconds"] for s in summaries))}
    if run.accelerator.is_main_process:
        write_json_atomic(run.folder / "summary.json", summary)
    return summary
