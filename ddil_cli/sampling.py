"""Generating a `ddil sample` folder: teacher, student and mixed generations on a shared grid.

The folder's format is in docs/architecture.md. The sample stage writes one; covariate-shift
writes one per setting, through the same `write_sample_folder`.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ddil_cli.atomic import to_json
from ddil_cli.diffusion.threshold import parse_threshold
from ddil_cli.errors import UserError
from ddil_cli.manifest import write_manifest
from ddil_cli.models import load_teacher_and_student
from ddil_cli.models.precision import frozen_autocast, held_dtype
from ddil_cli.models.base import Denoiser
from ddil_cli.models.checks import check_student_of
from ddil_cli.rollout import Grid, rollout_seeds, sampling_grid
from ddil_cli.specs import parse_switch, read_prompts


@dataclass
class SampleConfig:
    teacher: str = "gmm:ring:8"
    student: str | None = None
    steps: int = 4
    teacher_steps: int = 32
    teacher_prob: float | None = None
    switch: str | None = None
    guidance: float | None = None
    prompt: list[str] = field(default_factory=list)
    prompts: str | None = None
    num_per_prompt: int = 8
    batch_size: int = 64
    threshold: str = "none"
    seed: int = 0
    device: str = "cpu"
    frozen_dtype: str = "auto"  # the networks' dtype: bf16 on CUDA, fp32 elsewhere
    out: str = "samples"
    quiet: bool = False
    overwrite: bool = False


def sample_seed(base_seed: int, index: int) -> int:
    """Each sample's own seed: disjoint ranges for different --seed values up to 2**20 samples."""
    return (base_seed << 20) + index


@dataclass
class SamplePlan:
    """Everything resolved and validated before a single file is written."""

    teacher: Denoiser | None
    student: Denoiser | None
    grid: Grid
    prompts: list[str]
    guidance: float
    teacher_prob: float
    switch: tuple[str, int] | None
    sampler: str


def plan_sampling(cfg: SampleConfig, teacher: Denoiser, student: Denoiser | None) -> SamplePlan:
    if cfg.teacher_prob is not None and not 0.0 <= cfg.teacher_prob <= 1.0:
        raise UserError(f"--teacher-prob {cfg.teacher_prob} is outside [0, 1]")
    if cfg.num_per_prompt < 1 or cfg.batch_size < 1:
        raise UserError("--num-per-prompt and --batch-size must be >= 1")
    switch = parse_switch(cfg.switch)
    if student is None:
        if (cfg.teacher_prob not in (None, 1.0)) or switch:
            raise UserError("--teacher-prob below 1 and --switch need a --student to hand transitions to")
        steps, teacher_prob, sampler = cfg.teacher_steps, 1.0, "teacher"
    else:
        check_student_of(student, teacher)
        steps = cfg.steps
        teacher_prob = 0.0 if cfg.teacher_prob is None else cfg.teacher_prob
        sampler = "switch" if switch else ("student" if teacher_prob == 0 else
                                           "teacher" if teacher_prob == 1 else "mixed")
    try:
        grid = sampling_grid(student, steps, cfg.teacher_steps, teacher.schedule.num_train_timesteps)
    except ValueError as exc:
        raise UserError(f"{exc}; choose --steps that divides --teacher-steps (e.g. 4 and 32)") from None
    prompts = read_prompts(cfg.prompt, cfg.prompts, getattr(teacher, "default_prompts", lambda: None)())
    # a distilled student's folder records the w it was distilled at (ddil_defaults.json); else
    # the teacher's default
    student_w = getattr(student, "sampling_defaults", {}).get("guidance")
    guidance = cfg.guidance if cfg.guidance is not None else \
        float(student_w) if student_w is not None else getattr(teacher, "default_guidance", 1.0)
    return SamplePlan(teacher, student, grid, prompts, float(guidance), teacher_prob, switch, sampler)


def load_models(cfg: SampleConfig, device: str):
    return load_teacher_and_student(cfg.teacher, cfg.student, device=device, frozen=cfg.frozen_dtype)


def generate(plan: SamplePlan, teacher: Denoiser, seeds: list[int], prompts: list[str],
             threshold, device: str):
    """One batch: the rollout result for these seeds and prompts."""
    with frozen_autocast(device, held_dtype(teacher)):
        return rollout_seeds(seeds, prompts, plan.grid, teacher=teacher, student=plan.student,
                             teacher_prob=plan.teacher_prob, switch=plan.switch, guidance=plan.guidance,
                             threshold=threshold, device=device)


def _lab_grid_png(states: np.ndarray, classes: list[int], teacher: Denoiser, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 5), dpi=100)
    ax.scatter(states[:, 0], states[:, 1], c=classes, cmap="tab10", s=6, alpha=0.7)
    mixture = getattr(teacher, "mixture", None)
    if mixture is not None:
        ax.scatter(mixture.means[:, 0], mixture.means[:, 1], marker="x", c="black", s=40, label="modes")
        ax.legend(loc="upper right")
    ax.set_xlim(-1.2, 1.2)
    ax.set_ylim(-1.2, 1.2)
    ax.set_aspect("equal")
    ax.set_title(f"{len(states)} samples (first two coordinates)")
    fig.savefig(path)
    plt.close(fig)


def _image_grid_png(images: list[np.ndarray], num_per_prompt: int, path: Path) -> None:
    from PIL import Image

    cols = min(num_per_prompt, 8)
    rows = min(math.ceil(len(images) / num_per_prompt), 8)
    h, w = images[0].shape[:2]
    canvas = np.zeros((rows * h, cols * w, 3), dtype=np.uint8)
    for r in range(rows):
        for c in range(cols):
            i = r * num_per_prompt + c
            if i < len(images):
                canvas[r * h:(r + 1) * h, c * w:(c + 1) * w] = images[i]
    Image.fromarray(canvas).save(path)


def sample_threshold(cfg: SampleConfig):
    try:
        return parse_threshold(cfg.threshold)
    except ValueError as exc:
        raise UserError(f"--threshold: {exc}") from None


def write_sample_folder(cfg: SampleConfig, work: Path, teacher: Denoiser, student: Denoiser | None, *,
                        progress=None) -> dict:
    """Generate into the (empty, private) folder `work`. Returns a summary."""
    threshold = sample_threshold(cfg)
    plan = plan_sampling(cfg, teacher, student)
    jobs = [(p_idx, prompt, k) for p_idx, prompt in enumerate(plan.prompts) for k in range(cfg.num_per_prompt)]
    settings = {"sampler": plan.sampler, "steps": plan.grid.num_transitions, "teacher_steps": cfg.teacher_steps,
                "teacher_prob": plan.teacher_prob, "switch": cfg.switch, "guidance": plan.guidance,
                "threshold": str(threshold)}
    task = progress.add_task("sampling", total=len(jobs)) if progress is not None else None
    rows, lab_states, images = [], [], []
    start = time.perf_counter()
    for begin in range(0, len(jobs), cfg.batch_size):
        batch = jobs[begin:begin + cfg.batch_size]
        seeds = [sample_seed(cfg.seed, begin + j) for j in range(len(batch))]
        result = generate(plan, teacher, seeds, [b[1] for b in batch], threshold, cfg.device)
        decoded = teacher.decode(result.final)
        for j, (p_idx, prompt, _k) in enumerate(batch):
            index = begin + j
            row = {"index": index, "prompt": prompt, "prompt_index": p_idx, "seed": seeds[j], **settings,
                   "teacher_transitions": int(result.teacher_mask[j].sum())}
            if decoded is None:
                row.update(file="states.npy", row=index)
                if prompt.startswith("class "):
                    row["class"] = int(prompt.split()[1])
                lab_states.append(result.final[j].float().cpu().numpy())
            else:
                from PIL import Image

                (work / "images").mkdir(exist_ok=True)
                row["file"] = f"images/{index:06d}.png"
                Image.fromarray(decoded[j]).save(work / row["file"])
                images.append(decoded[j])
            rows.append(row)
        if task is not None:
            progress.advance(task, len(batch))
    seconds = time.perf_counter() - start
    with open(work / "samples.jsonl", "w") as f:
        for row in rows:
            f.write(to_json(row) + "\n")
    if lab_states:
        states = np.stack(lab_states).astype(np.float32)
        np.save(work / "states.npy", states)
        _lab_grid_png(states, [r.get("class", 0) for r in rows], teacher, work / "grid.png")
    else:
        _image_grid_png(images, cfg.num_per_prompt, work / "grid.png")
    summary = {"samples": len(rows), "prompts": len(plan.prompts), "sampler": plan.sampler,
               "seconds": round(seconds, 3), "seconds_per_sample": round(seconds / max(len(rows), 1), 5),
               "nfe_per_sample": _nfe(plan)}
    write_manifest(work, "sample", cfg, inputs={"teacher": cfg.teacher, "student": cfg.student,
                                                "prompts": cfg.prompts},
                   extra={"summary": summary, "teacher": teacher.describe(),
                          "student": student.describe() if student else None})
    return summary


def _nfe(plan: SamplePlan) -> float:
    """Network evaluations per sample (CFG counts twice), averaged for mixed rollouts."""
    cfg_cost = lambda m: 1 if (m is None or m.guidance_conditioned or plan.guidance == 1) else 2
    teacher_share = plan.teacher_prob if plan.switch is None else None
    per_transition_teacher = plan.grid.ratio * cfg_cost(plan.teacher)
    per_transition_student = cfg_cost(plan.student)
    if teacher_share is None:
        kind, t_star = plan.switch
        n_teacher = sum((t > t_star) == (kind == "t2s") for t in plan.grid.student)
    else:
        n_teacher = teacher_share * plan.grid.num_transitions
    n_student = plan.grid.num_transitions - n_teacher
    return float(n_teacher * per_transition_teacher + n_student * per_transition_student)
