"""DAgger: the collection hook that rolls out the current student into the run's buffer, the
states of an external `ddil collect` buffer, and prioritised replay's scores."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from ddil_cli.buffer.manifest import buffer_header, check_collected_with
from ddil_cli.buffer.pool import ReplayPool
from ddil_cli.buffer.replay import FIFOPolicy, PrioritizedPolicy
from ddil_cli.buffer.sources import record_spans, rollout_records
from ddil_cli.buffer.writer import BufferWriter, prompt_id
from ddil_cli.errors import UserError
from ddil_cli.manifest import fingerprint
from ddil_cli.methods import Batch, Phase
from ddil_cli.models.base import Denoiser
from ddil_cli.rollout import Grid
from ddil_cli.stages.distill.plan import Plan


@dataclass
class Rollouts:
    """How each collection rolls out (the run's settings)."""
    count: int  # trajectories per collection and process
    every: int  # updates between collections
    batch_size: int  # trajectories per forward batch (memory, not results)
    seed: int
    dtype: torch.dtype
    prompts_for: Callable[[int], list[str]]
    needs_teacher_states: bool  # the prior draws `teacher` states: pure teacher rollouts too


class DaggerCollector:
    """Every K updates: roll out the current student mixed with the teacher, store the visited
    states in the run's buffer (shards on disk) and the pool; pure teacher rollouts once."""

    def __init__(self, *, teacher: Denoiser, student: Denoiser, phase: Phase, plan: Plan, pool: ReplayPool,
                 fifo: FIFOPolicy, buffer_dir: Path, accelerator, teacher_source: str, rollouts: Rollouts):
        # fingerprinted once: a stage teacher is a folder, hashing it at every collection is waste
        teacher_print = fingerprint(teacher_source)
        self.grids = phase.rollout_grids
        self.headers = [buffer_header(teacher, teacher_source, teacher_print, grid) for grid in self.grids]
        self.teacher, self.student, self.plan, self.pool, self.fifo = teacher, student, plan, pool, fifo
        self.phase, self.total_updates = phase.name, phase.updates
        self.buffer_dir, self.acc, self.settings = buffer_dir, accelerator, rollouts
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
        rank, world, count = self.acc.process_index, self.acc.num_processes, self.settings.count
        first = (salt * 1_000_003 + update) * world * count + rank * count
        # seeded by the update (not by the buffer's run number) so a resumed run rolls out the same
        seeds = [(self.settings.seed << 32) + first + i for i in range(count)]
        prompts = self.settings.prompts_for(count)
        low, high = self.plan.guidance_range
        guidance = low + (high - low) * torch.rand(count, generator=torch.Generator().manual_seed(seeds[0]))
        was_training = self.student.network.training
        self.student.network.eval()
        records = rollout_records(self.teacher, self.student, grid, prompts, seeds, teacher_prob=teacher_prob,
                                  guidance=guidance.to(self.acc.device), threshold=self.plan.threshold,
                                  device=self.acc.device, batch_size=self.settings.batch_size,
                                  dtype=self.settings.dtype)
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
        roll_teacher = self.settings.needs_teacher_states and self.plan.schedule.draws_later("teacher", update,
                                                                                   self.total_updates)
        if not (roll_student or roll_teacher):
            return time.perf_counter() - start
        student_prob = self.plan.student_prob.at(update, self.total_updates)
        # several grids (LCM's 3-5 step samplers): one per collection, in turn, each in its own buffer
        which = (update // max(1, self.settings.every)) % len(self.grids)
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




class PriorityScores:
    """Prioritised replay's hook into the loop: each buffered state's last loss is its priority."""

    def __init__(self, policy: PrioritizedPolicy):
        self.policy = policy

    def __call__(self, batch: Batch, per_example: torch.Tensor) -> None:
        keyed = [(k, v) for k, v in zip(batch.keys, per_example.float().cpu().tolist()) if k]
        if keyed:
            self.policy.update([k for k, _ in keyed], [v for _, v in keyed])
