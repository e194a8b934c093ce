"""Mixed teacher/student trajectories on nested grids (docs/sampling.md, docs/distill.md).

A student with S steps and a teacher with T steps share the student's grid (trailing spacing:
999, 749, 499, 249 for S = 4; or any decreasing list, e.g. an LCM grid 999, 759, 499, 259). Each
student transition t_i -> t_{i+1} is taken either by the student in one step or by the teacher
in DDIM steps over its own grid points in between. The student's step is its own sampler's:
DDIM (PD) or the consistency re-noising step x_s = a_s f(x_t, t) + s_s z (LCM, DMD2). Both are
stateless, so the choice can differ per example and per transition. This is the one rollout
used by `sample`, `collect`, `distill` and `covariate-shift`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ddil_cli.diffusion.consistency import consistency_output, lcm_timesteps, renoise_step
from ddil_cli.diffusion.ddim import ddim_step
from ddil_cli.diffusion.schedule import nested_grids, trailing_timesteps
from ddil_cli.diffusion.threshold import Threshold, apply_threshold
from ddil_cli.models.base import Conditioning, Denoiser

SWITCH_KINDS = ("t2s", "s2t")


@dataclass(frozen=True)
class Grid:
    """The student's timesteps and the teacher's, which it uses between two student timesteps."""

    student: list[int]
    teacher: list[int]

    @classmethod
    def make(cls, student_steps: int, teacher_steps: int, num_train_timesteps: int = 1000) -> "Grid":
        """Nested trailing grids (the student's points are every T/S-th of the teacher's)."""
        student, teacher, _ratio = nested_grids(student_steps, teacher_steps, num_train_timesteps)
        return cls(student, teacher)

    @classmethod
    def from_timesteps(cls, student: list[int], teacher_steps: int, num_train_timesteps: int = 1000) -> "Grid":
        """Any decreasing student grid (an LCM scheduler's, say) with a trailing teacher grid."""
        student = [int(t) for t in student]
        if not student or any(b >= a for a, b in zip(student, student[1:])) or student[-1] < 0 \
                or student[0] >= num_train_timesteps:
            raise ValueError(f"student timesteps must decrease within [0, {num_train_timesteps}), got {student}")
        return cls(student, trailing_timesteps(teacher_steps, num_train_timesteps))

    @property
    def num_transitions(self) -> int:
        return len(self.student)

    @property
    def ratio(self) -> int:
        """Teacher steps per student transition (the most over the grid)."""
        return max(len(self.teacher_path(i)) - 1 for i in range(self.num_transitions))

    def student_path(self, i: int) -> list[int]:
        """[t_i, t_{i+1}] (the last transition ends at -1, clean data)."""
        return [self.student[i], self.student[i + 1] if i + 1 < len(self.student) else -1]

    def teacher_path(self, i: int) -> list[int]:
        """The teacher's timesteps from t_i to t_{i+1}, both ends included: t_i, then its own grid
        points strictly between, then t_{i+1}."""
        start, end = self.student_path(i)
        return [start] + [t for t in self.teacher if end < t < start] + [end]


def sampling_grid(student: Denoiser | None, steps: int, teacher_steps: int, num_train_timesteps: int = 1000) -> Grid:
    """The grid a rollout with this student runs on: the timesteps the student was distilled on
    when it has `steps` of them (an LCM student's 999, 759, 499, 259); for another step count, a
    consistency student's LCMScheduler grid (as `set_timesteps(steps)` picks it from its
    `original_inference_steps` solver grid); else nested trailing grids."""
    own = getattr(student, "student_timesteps", None) if student is not None else None
    if own and len(own) == steps and own != trailing_timesteps(steps, num_train_timesteps):
        return Grid.from_timesteps(own, teacher_steps, num_train_timesteps)
    solver = (getattr(student, "scheduler_config", None) or {}).get("original_inference_steps")
    if student is not None and student.sampler == "consistency" and solver and steps <= int(solver):
        return Grid.from_timesteps(lcm_timesteps(steps, int(solver), num_train_timesteps), teacher_steps,
                                   num_train_timesteps)
    return Grid.make(steps, teacher_steps, num_train_timesteps)


def teacher_mask(uniforms: torch.Tensor, grid: Grid, *, teacher_prob: float = 1.0,
                 switch: tuple[str, int] | None = None) -> torch.Tensor:
    """(B, S) bool: which transitions the teacher takes.

    Stochastic: transition i goes to the teacher when uniforms[:, i] < teacher_prob, so
    teacher_prob 1 is pure teacher and 0 pure student. A switch ('t2s', t*) gives the teacher
    every transition that starts above t* and the student the rest; ('s2t', t*) the reverse.
    """
    if switch is None:
        return uniforms < teacher_prob
    kind, t_star = switch
    starts_above = torch.tensor([t > t_star for t in grid.student], device=uniforms.device)
    starts_above = starts_above.expand(uniforms.shape[0], -1)
    return starts_above if kind == "t2s" else ~starts_above


def ddim_path(model: Denoiser, x: torch.Tensor, path: list[int], cond: Conditioning, guidance,
              threshold: Threshold | None) -> torch.Tensor:
    """DDIM steps of one model along consecutive timesteps `path`."""
    for t, s in zip(path[:-1], path[1:]):
        t_batch = torch.full((x.shape[0],), t, dtype=torch.long, device=x.device)
        x0_hat = model.predict_x0(x, t_batch, cond, guidance)
        x = ddim_step(x, x0_hat, t, s, model.schedule, threshold)
    return x


def consistency_step(model: Denoiser, x: torch.Tensor, t: int, s: int, cond: Conditioning, guidance,
                     threshold: Threshold | None, noise: torch.Tensor) -> torch.Tensor:
    """One re-noising multistep-consistency step: x_s = a_s f(x_t, t) + s_s z (LCM's sampler)."""
    t_batch = torch.full((x.shape[0],), t, dtype=torch.long, device=x.device)
    x0_hat = model.predict_x0(x, t_batch, cond, guidance)
    if threshold is not None:
        x0_hat = apply_threshold(x0_hat, threshold)
    endpoint = consistency_output(x, x0_hat, t_batch, timestep_scaling=model.timestep_scaling)
    return renoise_step(endpoint, s, model.schedule, noise).to(x.dtype)


def student_path(model: Denoiser, x: torch.Tensor, path: list[int], cond: Conditioning, guidance,
                 threshold: Threshold | None, noise: torch.Tensor | None = None) -> torch.Tensor:
    """The student's one transition along `path` = [t, s] with its own sampler (model.sampler)."""
    if model.sampler == "consistency":
        if noise is None:
            raise ValueError("a consistency student's transition needs its re-noising noise")
        return consistency_step(model, x, path[0], path[-1], cond, guidance, threshold, noise)
    return ddim_path(model, x, path, cond, guidance, threshold)


@dataclass
class RolloutResult:
    final: torch.Tensor  # the clean state (t = -1)
    states: list[torch.Tensor]  # the state at each student timestep, before its transition
    timesteps: list[int]  # the student's grid
    teacher_mask: torch.Tensor  # (B, S) which model took each transition


def _rows(value, index):
    value = torch.as_tensor(value)
    return value if value.ndim == 0 else value[index.to(value.device)]


@torch.no_grad()
def rollout(x_T: torch.Tensor, cond: Conditioning, grid: Grid, mask: torch.Tensor, *,
            teacher: Denoiser | None, student: Denoiser | None, guidance=1.0,
            threshold: Threshold | None = None, student_cond: Conditioning | None = None,
            stop_at: int | None = None, record: bool = False,
            renoise: torch.Tensor | None = None) -> RolloutResult:
    """Run the transitions of `grid` from x_T; row b's transition i is the teacher's when mask[b, i].

    `student_cond` is the student's encoding of the same prompts when it differs from the
    teacher's (a lab MLP student); `stop_at` ends after that many transitions (for a state in the
    middle of a trajectory); `record` keeps every state on the student grid (for the buffer);
    `renoise` (B, S, *state) is the fresh noise of a consistency student's steps.
    """
    student_cond = cond if student_cond is None else student_cond
    x = x_T
    states = []
    steps = grid.num_transitions if stop_at is None else stop_at
    for i in range(steps):
        if record:
            states.append(x.clone())
        nxt = torch.empty_like(x)
        for use_teacher, model, path, c in ((True, teacher, grid.teacher_path(i), cond),
                                            (False, student, grid.student_path(i), student_cond)):
            rows = (mask[:, i] == use_teacher).nonzero().squeeze(1)
            if rows.numel() == 0:
                continue
            if model is None:
                raise ValueError(f"transition {i} needs the {'teacher' if use_teacher else 'student'}, "
                                 "which was not given")
            rows_dev = rows.to(x.device)
            if use_teacher:
                landed = ddim_path(model, x[rows_dev], path, c.select(rows), _rows(guidance, rows), threshold)
            else:
                noise = None if renoise is None else renoise[rows_dev, i]
                landed = student_path(model, x[rows_dev], path, c.select(rows), _rows(guidance, rows),
                                      threshold, noise)
            nxt[rows_dev] = landed.to(x.dtype)
        x = nxt
    return RolloutResult(final=x, states=states, timesteps=list(grid.student[:steps]), teacher_mask=mask)


@dataclass
class SeedDraws:
    """Everything random in a seeded rollout, per example (row b from seeds[b] alone)."""

    start: torch.Tensor  # (B, *shape) the noise x_T
    uniforms: torch.Tensor  # (B, S) which model takes each transition (`teacher_mask`)
    renoise: torch.Tensor | None  # (B, S, *shape) a re-noising sampler's noise; its last step draws none


def seed_draws(seeds: list[int], shape: tuple[int, ...], num_transitions: int, *, renoise: bool = False,
               device="cpu") -> SeedDraws:
    """Each example's draws from `torch.Generator().manual_seed(seed)`, in the order diffusers'
    pipelines draw from that generator for one image: the starting latents, then (`renoise`: an
    LCMScheduler student) one noise per step but the last, as `LCMScheduler.step` draws it. So the
    seed reproduces the image in plain diffusers, and a sample depends on its seed only (not on
    batch size or position). The transition uniforms, ours alone, come last."""
    starts, uniforms, noises = [], [], []
    for seed in seeds:
        gen = torch.Generator().manual_seed(int(seed))
        starts.append(torch.randn(shape, generator=gen))
        if renoise:
            steps = [torch.randn(shape, generator=gen) for _ in range(num_transitions - 1)]
            noises.append(torch.stack([*steps, torch.zeros(shape)]))
        uniforms.append(torch.rand(num_transitions, generator=gen))
    return SeedDraws(torch.stack(starts).to(device), torch.stack(uniforms).to(device),
                     torch.stack(noises).to(device) if renoise else None)


def seeded_noise(seeds: list[int], shape: tuple[int, ...], num_transitions: int,
                 device="cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """The starting noise and transition uniforms of a rollout without re-noising (`seed_draws`)."""
    draws = seed_draws(seeds, shape, num_transitions, device=device)
    return draws.start, draws.uniforms


def rollout_seeds(seeds: list[int], prompts: list[str], grid: Grid, *, teacher: Denoiser,
                  student: Denoiser | None, teacher_prob: float = 1.0, switch: tuple[str, int] | None = None,
                  guidance=1.0, threshold: Threshold | None = None, record: bool = False,
                  stop_at: int | None = None, device="cpu") -> RolloutResult:
    """One trajectory per seed and prompt, everything random drawn from the seed: the start
    noise, which model takes each transition, and a consistency student's re-noising noise."""
    # the draws depend on the student's sampler, never on the mask, so a seed means one trajectory
    draws = seed_draws(seeds, tuple(teacher.state_shape), grid.num_transitions, device=device,
                       renoise=student is not None and student.sampler == "consistency")
    mask = teacher_mask(draws.uniforms, grid, teacher_prob=teacher_prob, switch=switch)
    cond = teacher.encode(prompts)
    uses_student = student is not None and not bool(mask.all())
    student_cond = None
    if uses_student:
        student_cond = cond if student.shares_conditioning(teacher) else student.encode(prompts)
    return rollout(draws.start, cond, grid, mask, teacher=teacher, student=student if uses_student else None,
                   guidance=guidance, threshold=threshold, student_cond=student_cond, record=record,
                   renoise=draws.renoise, stop_at=stop_at)
