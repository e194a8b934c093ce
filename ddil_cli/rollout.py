"""Mixed teacher/student trajectories on nested grids (ALGORITHMS.md sections 4 and 8).

A student with S steps and a teacher with T steps (T a multiple of S) share the student's grid
(trailing spacing: 999, 749, 499, 249 for S = 4). Each student transition t_i -> t_{i+1} is
taken either by the student in one DDIM step or by the teacher in T/S DDIM steps of its own
grid. Because the DDIM step is stateless, the choice can differ per example and per transition.
This is the one rollout used by `sample`, `collect`, `distill` and `covariate-shift`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ddil_cli.diffusion.ddim import ddim_step
from ddil_cli.diffusion.schedule import nested_grids
from ddil_cli.diffusion.threshold import Threshold
from ddil_cli.models.base import Conditioning, Denoiser

SWITCH_KINDS = ("t2s", "s2t")


@dataclass(frozen=True)
class Grid:
    """The student's timesteps and, per student transition, the teacher's sub-steps."""

    student: list[int]
    teacher: list[int]
    ratio: int

    @classmethod
    def make(cls, student_steps: int, teacher_steps: int, num_train_timesteps: int = 1000) -> "Grid":
        student, teacher, ratio = nested_grids(student_steps, teacher_steps, num_train_timesteps)
        return cls(student, teacher, ratio)

    @property
    def num_transitions(self) -> int:
        return len(self.student)

    def student_path(self, i: int) -> list[int]:
        """[t_i, t_{i+1}] (the last transition ends at -1, clean data)."""
        return [self.student[i], self.student[i + 1] if i + 1 < len(self.student) else -1]

    def teacher_path(self, i: int) -> list[int]:
        """The teacher's timesteps from t_i to t_{i+1}, both ends included."""
        return self.teacher[i * self.ratio:(i + 1) * self.ratio] + [self.student_path(i)[1]]


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
            stop_at: int | None = None, record: bool = False) -> RolloutResult:
    """Run the transitions of `grid` from x_T; row b's transition i is the teacher's when mask[b, i].

    `student_cond` is the student's encoding of the same prompts when it differs from the
    teacher's (a lab MLP student); `stop_at` ends after that many transitions (for a state in the
    middle of a trajectory); `record` keeps every state on the student grid (for the buffer).
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
            nxt[rows_dev] = ddim_path(model, x[rows_dev], path, c.select(rows),
                                      _rows(guidance, rows), threshold).to(x.dtype)
        x = nxt
    return RolloutResult(final=x, states=states, timesteps=list(grid.student[:steps]), teacher_mask=mask)


def seeded_noise(seeds: list[int], shape: tuple[int, ...], num_transitions: int,
                 device="cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Per-example starting noise and transition uniforms, each drawn from its example's own seed,
    so a sample depends on its seed only (not on batch size or position)."""
    noises, uniforms = [], []
    for seed in seeds:
        gen = torch.Generator().manual_seed(int(seed))
        noises.append(torch.randn(shape, generator=gen))
        uniforms.append(torch.rand(num_transitions, generator=gen))
    return torch.stack(noises).to(device), torch.stack(uniforms).to(device)
