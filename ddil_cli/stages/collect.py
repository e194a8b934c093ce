"""`ddil collect`: the student's training inputs, written into a replay buffer (docs/buffer.md).

Three sources, mixed by the prior: `data` (real data forward-diffused to a student timestep),
`student` (mixed rollouts in which the student takes each transition with probability
1 - teacher_prob) and `teacher` (pure teacher rollouts). Every rollout stores the state at each
student grid point before its transition. `--rollouts N` trajectories are split between student
and teacher by their prior weights; the data source adds as many states as its weight asks
(N * steps * data / (student + teacher)). A rollout where the teacher happened to take every
transition is labelled `teacher`: the label always says who drove the trajectory.

Work is cut into blocks of `batch_size` (rollouts or data states) dealt round-robin to the
processes of a launch, and every rollout and data block has its own seed from
(seed, collect run, block): the states do not depend on how many processes collect them.
distill's DAgger hook stores rollouts through the same `buffer.sources.rollout_records`.
"""

from __future__ import annotations

import errno
import hashlib
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from ddil_cli.atomic import remove_path, save_tensors_atomic
from ddil_cli.buffer import manifest as mf
from ddil_cli.buffer.manifest import buffer_header, teacher_fingerprint
from ddil_cli.buffer.replay import FIFOPolicy
from ddil_cli.buffer.sources import (DataStates, forward_diffuse, is_mixture_teacher, record_spans,
                                     rollout_records)
from ddil_cli.buffer.writer import (DEFAULT_SHARD_SAMPLES, BufferWriter, check_writable, load_manifest,
                                    prompt_id)
from ddil_cli.diffusion.threshold import parse_threshold
from ddil_cli.errors import UserError
from ddil_cli.manifest import build_manifest
from ddil_cli.models import load_teacher_and_student
from ddil_cli.models.precision import held_dtype
from ddil_cli.models.base import Denoiser
from ddil_cli.models.checks import check_student_of
from ddil_cli.priors import format_prior, parse_prior, require_sources
from ddil_cli.rollout import Grid
from ddil_cli.specs import read_prompts


@dataclass
class CollectConfig:
    teacher: str = "gmm:ring:8"
    student: str | None = None
    data: str | None = None
    prompts: str | None = None
    prior: str = "data=0.3,student=0.5,teacher=0.2"
    rollouts: int = 64
    steps: int = 4
    teacher_steps: int = 32
    teacher_prob: float = 0.5
    guidance: float | None = None
    threshold: str = "none"
    student_version: int | None = None
    batch_size: int = 64
    shard_samples: int = DEFAULT_SHARD_SAMPLES
    shard_mb: float = 1024.0
    max_samples: int | None = None
    cache_prompts: bool = False
    seed: int = 0
    device: str = "cpu"
    frozen_dtype: str = "auto"  # the networks' dtype: bf16 on CUDA, fp32 elsewhere
    out: str = "buffer"
    quiet: bool = False


@dataclass
class Block:
    """One batch of work: rollouts (ids) of one kind, or data states (indices)."""

    kind: str  # 'student' | 'teacher' | 'data'
    ids: list[int]


@dataclass
class CollectPlan:
    prior: dict[str, float]
    grid: Grid
    prompts: list[str] | None  # None: the data's captions
    guidance: float
    teacher_prob: float
    num_rollouts: dict[str, int]
    num_data: int
    header: dict[str, Any]


def derived_seed(*parts) -> int:
    """A 63-bit seed from any tuple (seed, run, kind, index): independent streams, no overlap."""
    digest = hashlib.sha256(":".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def load_models(cfg: CollectConfig, device: str):
    return load_teacher_and_student(cfg.teacher, cfg.student, device=device, frozen=cfg.frozen_dtype)


def plan_collect(cfg: CollectConfig, teacher: Denoiser, student: Denoiser | None) -> CollectPlan:
    """Validate everything and fix the amounts; raises UserError before anything is written."""
    prior = parse_prior(cfg.prior)
    lab = is_mixture_teacher(teacher)
    require_sources(prior, {"student": None if student is not None else "pass --student DIR",
                            "data": None if (lab or cfg.data) else "pass --data SHARDS"})
    if cfg.data and lab:
        raise UserError("the Gaussian-mixture lab draws exact samples of its mixture as data; drop --data")
    if not 0.0 <= cfg.teacher_prob <= 1.0:
        raise UserError(f"--teacher-prob {cfg.teacher_prob} is outside [0, 1]")
    if prior["student"] > 0 and cfg.teacher_prob == 1.0:
        raise UserError("--teacher-prob 1 gives the student no transitions, so no student states; "
                        "lower --teacher-prob or move the student weight of --prior to teacher")
    if cfg.rollouts < 1 or cfg.batch_size < 1 or cfg.shard_samples < 1 or cfg.shard_mb <= 0:
        raise UserError("--rollouts, --batch-size and --shard-samples must be >= 1 and --shard-mb > 0")
    FIFOPolicy(cfg.max_samples)  # validates the bound
    if student is not None:
        check_student_of(student, teacher)
    try:
        grid = Grid.make(cfg.steps, cfg.teacher_steps, teacher.schedule.num_train_timesteps)
    except ValueError as exc:
        raise UserError(f"{exc}; choose --steps that divides --teacher-steps (e.g. 4 and 32)") from None
    if cfg.prompts or lab or not cfg.data:
        prompts = read_prompts(None, cfg.prompts, getattr(teacher, "default_prompts", lambda: None)())
    else:
        prompts = None  # rollouts are conditioned on the data's captions
    guidance = cfg.guidance if cfg.guidance is not None else getattr(teacher, "default_guidance", 1.0)
    parse_threshold(cfg.threshold)

    rollout_weight = prior["student"] + prior["teacher"]
    if rollout_weight > 0:
        n_student = round(cfg.rollouts * prior["student"] / rollout_weight)
        num_rollouts = {"student": n_student, "teacher": cfg.rollouts - n_student}
        num_data = round(cfg.rollouts * grid.num_transitions * prior["data"] / rollout_weight)
    else:  # data only: --rollouts counts trajectories' worth of states
        num_rollouts = {"student": 0, "teacher": 0}
        num_data = cfg.rollouts * grid.num_transitions
    header = buffer_header(teacher, cfg.teacher, teacher_fingerprint(cfg.teacher, teacher), grid)
    return CollectPlan(prior, grid, prompts, float(guidance), float(cfg.teacher_prob), num_rollouts,
                       num_data, header)


def check_buffer(out: str | Path, header: dict[str, Any]) -> dict[str, Any] | None:
    """The existing manifest (None for a new buffer), checked writable and compatible; writes nothing."""
    out = Path(out)
    check_writable(out)
    existing = load_manifest(out) if out.is_dir() else None
    if existing is not None:
        mf.check_compatible(existing, header, out)
    return existing


def make_blocks(plan: CollectPlan, batch_size: int) -> list[Block]:
    """All the run's work in blocks, the sources interleaved so every shard mixes them."""
    ranges = {"student": range(plan.num_rollouts["student"]),
              "teacher": range(plan.num_rollouts["student"], plan.num_rollouts["student"] + plan.num_rollouts["teacher"]),
              "data": range(plan.num_data)}
    keyed = []
    for kind, ids in ranges.items():
        chunks = [list(ids[i:i + batch_size]) for i in range(0, len(ids), batch_size)]
        keyed += [((i + 0.5) / len(chunks), kind, Block(kind, chunk)) for i, chunk in enumerate(chunks)]
    return [block for _, _, block in sorted(keyed, key=lambda k: (k[0], k[1]))]


def _rollout_block(plan: CollectPlan, block: Block, teacher: Denoiser, student: Denoiser | None,
                   prompts: list[str], threshold, device: str, seed: int, run: int):
    seeds = [derived_seed(seed, run, "rollout", rid) for rid in block.ids]
    teacher_prob = plan.teacher_prob if block.kind == "student" else 1.0
    for state, t, t_index, source, row in rollout_records(teacher, student, plan.grid, prompts, seeds,
                                                          teacher_prob=teacher_prob, guidance=plan.guidance,
                                                         threshold=threshold, device=device,
                                                         dtype=held_dtype(teacher)):
        yield state, t, t_index, source, block.ids[row], prompts[row]


def run_collect(cfg: CollectConfig, *, models: tuple[Denoiser, Denoiser | None] | None = None,
                student_version: int | None = None, progress=None, rank: int = 0, world_size: int = 1,
                launch_key: str | None = None) -> dict[str, Any]:
    """Collect into the buffer `cfg.out` (created or appended). Returns a summary.

    `models` are already-loaded (teacher, student) (distill's in-memory student);
    `student_version` (the student's training step) overrides `cfg.student_version`.
    """
    threshold = parse_threshold(cfg.threshold)
    teacher, student = models if models is not None else load_models(cfg, cfg.device)
    plan = plan_collect(cfg, teacher, student)
    check_buffer(cfg.out, plan.header)
    data = None
    if plan.num_data or plan.prompts is None:
        data = DataStates(teacher, data=cfg.data, prompts=plan.prompts, part=rank, parts=world_size)
    version = student_version if student_version is not None else cfg.student_version
    if version is None and student is not None:
        version = 0
    blocks = [b for i, b in enumerate(make_blocks(plan, cfg.batch_size)) if i % world_size == rank]
    writer, new_folder = _open_writer(cfg, plan, version, rank, world_size, launch_key)
    total = sum(len(b.ids) * (1 if b.kind == "data" else plan.grid.num_transitions) for b in blocks)
    task = progress.add_task(f"collecting (rank {rank})" if world_size > 1 else "collecting", total=total) \
        if progress is not None else None
    start = time.perf_counter()
    used_prompts: dict[str, str] = {}
    try:
        for block in blocks:
            rows = _block_rows(cfg, plan, block, teacher, student, data, threshold, writer.run)
            _write_rows(writer, rows, plan, version, used_prompts,
                        advance=(lambda n: progress.advance(task, n)) if task is not None else None)
    except BaseException:
        writer.abort()  # the shard in progress is dropped; committed shards and the manifest stay valid
        if new_folder and not writer.committed:
            remove_path(cfg.out)
        raise
    shards = writer.close()
    if cfg.cache_prompts:
        cache_prompt_embeddings(teacher, used_prompts, Path(cfg.out), writer.run, rank)
    seconds = time.perf_counter() - start
    manifest = load_manifest(Path(cfg.out))
    return {"run": writer.run, "rank": rank, "states": writer.written, "shards": len(shards),
            "seconds": round(seconds, 3), "states_per_second": round(writer.written / max(seconds, 1e-9), 2),
            "buffer_total": manifest["counts"]["total"], "by_source": manifest["counts"]["by_source"],
            "dropped_samples": manifest["dropped"]["samples"]}


def _open_writer(cfg: CollectConfig, plan: CollectPlan, version: int | None, rank: int, world_size: int,
                 launch_key: str | None) -> tuple[BufferWriter, bool]:
    """(this run's opened buffer writer, whether the run creates the buffer folder)."""
    described = build_manifest("collect", cfg, inputs={"student": cfg.student, "data": cfg.data,
                                                       "prompts": cfg.prompts})
    run_info = {key: described[key] for key in ("command", "config", "inputs", "versions")}
    run_info.update(prior=format_prior(plan.prior), student_version=version, seed=cfg.seed,
                    planned={"rollouts": plan.num_rollouts, "data": plan.num_data})
    writer = BufferWriter(cfg.out, plan.header, run_info=run_info, rank=rank, world_size=world_size,
                          launch_key=launch_key, shard_samples=min(cfg.shard_samples, cfg.max_samples or cfg.shard_samples),
                          shard_bytes=int(cfg.shard_mb * (1 << 20)), on_commit=FIFOPolicy(cfg.max_samples))
    # a buffer this run creates and that ends without a shard is removed on failure: a failed first
    # collect (damaged --data, a full disk) leaves nothing behind. Only alone: other ranks share it.
    new_folder = world_size == 1 and not (Path(cfg.out) / mf.MANIFEST_NAME).exists() and \
        not (Path(cfg.out).exists() and any(Path(cfg.out).iterdir()))
    try:
        writer.open()
    except BaseException as exc:
        if new_folder:
            remove_path(cfg.out)
        if isinstance(exc, OSError) and exc.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise UserError(f"cannot create the buffer {cfg.out} ({exc.strerror}); choose a writable --out") from None
        raise
    return writer, new_folder


def _block_rows(cfg: CollectConfig, plan: CollectPlan, block, teacher: Denoiser, student: Denoiser | None,
                data: DataStates | None, threshold, run: int) -> list[tuple]:
    """The (state, t, t_index, source, rollout id, prompt) rows of one block: forward-diffused
    data, or every state of its rollouts."""
    if block.kind == "data":
        gen = torch.Generator().manual_seed(derived_seed(cfg.seed, run, "data", block.ids[0]))
        x0, prompts = data.batch(len(block.ids), gen, block.ids[0])
        x_t, ts, t_indices = forward_diffuse(x0, teacher.schedule, plan.grid.student, gen)
        return [(x_t[i], int(ts[i]), int(t_indices[i]), "data", None, prompts[i]) for i in range(len(prompts))]
    prompts = ([plan.prompts[rid % len(plan.prompts)] for rid in block.ids] if plan.prompts is not None
               else data.captions(len(block.ids)))
    return list(_rollout_block(plan, block, teacher, student, prompts, threshold, cfg.device, cfg.seed, run))


def _write_rows(writer: BufferWriter, rows: list[tuple], plan: CollectPlan, version: int | None,
                used_prompts: dict[str, str], advance: Callable[[int], None] | None) -> None:
    """One block's rows into the buffer, whole trajectories per record (a data block, whose
    rollout id is None, is one record); notes each prompt used."""
    metas = []
    for _, t, t_index, source, rid, prompt in rows:
        pid = prompt_id(prompt)
        used_prompts[pid] = prompt
        metas.append({"t": t, "t_index": t_index, "source": source, "rollout_id": rid, "prompt": prompt,
                      "prompt_id": pid, "guidance": plan.guidance,
                      "student_version": version if source == "student" else None})
    for begin, end in record_spans([row[4] for row in rows], rows[0][0].numel() if rows else 1):
        writer.write_group(torch.stack([row[0] for row in rows[begin:end]]).numpy(), metas[begin:end])
        if advance is not None:
            advance(end - begin)


def cache_prompt_embeddings(teacher: Denoiser, prompts: dict[str, str], root: Path, run: int, rank: int,
                            batch_size: int = 32) -> Path:
    """The teacher's encodings of the prompts this process used, once per prompt (never per state):
    `prompt_cache/RRRR-KKK.safetensors`, tensors `PROMPT_ID/cond/KEY` and `PROMPT_ID/uncond/KEY`."""
    ids = sorted(prompts)
    tensors: dict[str, torch.Tensor] = {}
    for begin in range(0, len(ids), batch_size):
        chunk = ids[begin:begin + batch_size]
        cond = teacher.encode([prompts[i] for i in chunk])
        for branch, values in (("cond", cond.cond), ("uncond", cond.uncond or {})):
            for key, tensor in values.items():
                for row, pid in enumerate(chunk):
                    tensors[f"{pid}/{branch}/{key}"] = tensor[row].detach().cpu().contiguous()
    folder = root / "prompt_cache"
    folder.mkdir(exist_ok=True)
    path = folder / f"{run:04d}-{rank:03d}.safetensors"
    save_tensors_atomic(tensors, path)
    return path
