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
    resume: bool = False


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


PARTS_DIR = "parts"  # rows and lab states of an unfinished folder; removed when it is finished


def batch_ranges(num_samples: int, batch_size: int, part: int = 0, parts: int = 1) -> list[range]:
    """The batches (consecutive global indices) one of `parts` processes generates: whole batches
    dealt round-robin, so a batch is the same batch however many processes share the work and
    every image is computed exactly as one process computes it."""
    starts = range(0, num_samples, batch_size)
    return [range(b, min(b + batch_size, num_samples)) for i, b in enumerate(starts) if i % parts == part]


def read_rows(work: Path) -> dict[int, dict]:
    """Every sample row written so far into an unfinished folder, by global index. A row is
    appended only after its image (or states) is on disk; a line cut short by a crash is ignored
    (its sample is generated again)."""
    rows: dict[int, dict] = {}
    for path in sorted((work / PARTS_DIR).glob("rows-*.jsonl")):
        for line in path.read_text().splitlines():
            try:
                row = json.loads(line)
            except ValueError:
                continue
            if isinstance(row, dict) and isinstance(row.get("index"), int):
                rows[row["index"]] = row
    return {i: r for i, r in rows.items() if r.get("file") == "states.npy" or (work / r["file"]).is_file()}


class SampleWriter:
    """Writes PNGs (or the lab's states) and their rows on a thread while the next batch is
    generated; at most `depth` batches wait, so memory does not grow with the number of samples.
    An error on the thread (a full disk) is raised in the caller at the next call."""

    def __init__(self, work: Path, part: int, depth: int = 2):
        import queue
        import threading

        (work / PARTS_DIR).mkdir(exist_ok=True)
        self.work, self.rows_path = work, work / PARTS_DIR / f"rows-{part:05d}.jsonl"
        self.queue: queue.Queue = queue.Queue(maxsize=depth)
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="ddil-sample-writer", daemon=True)
        self.thread.start()

    def _write(self, files: list[tuple[str, object]], rows: list[dict]) -> None:
        from PIL import Image

        from ddil_cli.atomic import atomic_file

        for name, value in files:
            # each file published whole (temporary name, rename); the folder is flushed when finished
            with atomic_file(self.work / name, fsync=False) as tmp:
                if isinstance(value, np.ndarray) and value.dtype == np.uint8:
                    Image.fromarray(value).save(tmp, format="PNG")
                else:
                    with open(tmp, "wb") as f:
                        np.save(f, value)
        with open(self.rows_path, "a") as f:
            f.write("".join(to_json(row) + "\n" for row in rows))

    def _run(self) -> None:
        while True:
            item = self.queue.get()
            if item is None:
                return
            if self.error is None:
                try:
                    self._write(*item)
                except BaseException as exc:  # raised in the caller
                    self.error = exc

    def put(self, files: list[tuple[str, object]], rows: list[dict]) -> None:
        if self.error is not None:
            raise self.error
        self.queue.put((files, rows))

    def close(self) -> None:
        self.queue.put(None)
        self.thread.join()
        if self.error is not None:
            raise self.error


def _settings(cfg: SampleConfig, plan: SamplePlan, threshold) -> dict:
    return {"sampler": plan.sampler, "steps": plan.grid.num_transitions, "teacher_steps": cfg.teacher_steps,
            "teacher_prob": plan.teacher_prob, "switch": cfg.switch, "guidance": plan.guidance,
            "threshold": str(threshold)}


def generate_part(cfg: SampleConfig, work: Path, teacher: Denoiser, student: Denoiser | None, *, part: int = 0,
                  parts: int = 1, progress=None) -> dict:
    """Generate this process's batches into the unfinished folder `work`, skipping samples
    already written there (a resumed run). Returns {'written', 'seconds'}."""
    threshold = sample_threshold(cfg)
    plan = plan_sampling(cfg, teacher, student)
    jobs = [(p_idx, prompt) for p_idx, prompt in enumerate(plan.prompts) for _ in range(cfg.num_per_prompt)]
    settings = _settings(cfg, plan, threshold)
    done = set(read_rows(work))
    todo = [b for b in batch_ranges(len(jobs), cfg.batch_size, part, parts) if not set(b) <= done]
    task = progress.add_task("sampling" if parts == 1 else f"sampling (rank {part})",
                             total=sum(len(b) for b in todo)) if progress is not None else None
    writer, written, start = SampleWriter(work, part), 0, time.perf_counter()
    try:
        for batch in todo:
            seeds = [sample_seed(cfg.seed, index) for index in batch]
            result = generate(plan, teacher, seeds, [jobs[i][1] for i in batch], threshold, cfg.device)
            decoded = teacher.decode(result.final)
            files, rows = [], []
            if decoded is None:  # lab states: one small file per batch, joined into states.npy at the end
                files.append((f"{PARTS_DIR}/states-{batch[0]:09d}.npy", result.final.float().cpu().numpy()))
            for j, index in enumerate(batch):
                if index in done:
                    continue
                p_idx, prompt = jobs[index]
                row = {"index": index, "prompt": prompt, "prompt_index": p_idx, "seed": seeds[j], **settings,
                       "teacher_transitions": int(result.teacher_mask[j].sum())}
                if decoded is None:
                    row.update(file="states.npy", row=index, part_file=files[0][0], part_row=j)
                    if prompt.startswith("class "):
                        row["class"] = int(prompt.split()[1])
                else:
                    row["file"] = f"images/{index:06d}.png"
                    files.append((row["file"], decoded[j]))
                rows.append(row)
            if decoded is not None:
                (work / "images").mkdir(exist_ok=True)
            writer.put(files, rows)
            written += len(rows)
            if task is not None:
                progress.advance(task, len(batch))
    finally:
        writer.close()
    return {"written": written, "seconds": time.perf_counter() - start}


def is_complete(cfg: SampleConfig, work: Path, num_prompts: int) -> bool:
    return len(read_rows(work)) == num_prompts * cfg.num_per_prompt


def _grid_images(work: Path, rows: list[dict], num_per_prompt: int) -> tuple[list[np.ndarray], int]:
    """The images the grid shows (up to 8 prompts x 8 samples), read back from disk: the grid
    needs no image kept in memory while sampling."""
    from PIL import Image

    shown = {r * num_per_prompt + c for r in range(8) for c in range(min(num_per_prompt, 8))}
    images = []
    for index in range(min(len(rows), 8 * num_per_prompt)):
        if index in shown:
            with Image.open(work / rows[index]["file"]) as img:
                images.append(np.asarray(img.convert("RGB")))
        else:
            images.append(None)
    return images, num_per_prompt


def finish_folder(cfg: SampleConfig, work: Path, teacher: Denoiser, student: Denoiser | None,
                  seconds: float) -> dict:
    """Turn a folder whose every sample is written into the `ddil sample` format: samples.jsonl
    (by index), states.npy (lab), grid.png, manifest.json. Returns the summary."""
    from ddil_cli.atomic import remove_path

    plan = plan_sampling(cfg, teacher, student)
    found = read_rows(work)
    rows = [found[i] for i in range(len(found))]
    if rows and rows[0]["file"] == "states.npy":
        parts = {name: np.load(work / name) for name in {r["part_file"] for r in rows}}
        states = np.stack([parts[r["part_file"]][r["part_row"]] for r in rows]).astype(np.float32)
        np.save(work / "states.npy", states)
        _lab_grid_png(states, [r.get("class", 0) for r in rows], teacher, work / "grid.png")
    else:
        _image_grid_png(*_grid_images(work, rows, cfg.num_per_prompt), work / "grid.png")
    with open(work / "samples.jsonl", "w") as f:
        for row in rows:
            f.write(to_json({k: v for k, v in row.items() if k not in ("part_file", "part_row")}) + "\n")
    summary = {"samples": len(rows), "prompts": len(plan.prompts), "sampler": plan.sampler,
               "seconds": round(seconds, 3), "seconds_per_sample": round(seconds / max(len(rows), 1), 5),
               "nfe_per_sample": _nfe(plan)}
    write_manifest(work, "sample", cfg, inputs={"teacher": cfg.teacher, "student": cfg.student,
                                                "prompts": cfg.prompts},
                   extra={"summary": summary, "teacher": teacher.describe(),
                          "student": student.describe() if student else None})
    # last: until here the rows are on disk, so a failure above (a full disk) can be finished again
    remove_path(work / PARTS_DIR)
    for leftover in (work / "images").glob(".*") if (work / "images").is_dir() else []:
        remove_path(leftover)  # a temporary image of an interrupted run
    return summary


def write_sample_folder(cfg: SampleConfig, work: Path, teacher: Denoiser, student: Denoiser | None, *,
                        progress=None) -> dict:
    """Generate into the (empty, private) folder `work` in this one process. Returns a summary."""
    generated = generate_part(cfg, work, teacher, student, progress=progress)
    return finish_folder(cfg, work, teacher, student, generated["seconds"])


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
