"""Progressive distillation (Salimans & Ho; guided: Meng et al.), ALGORITHMS.md section 5.

One student step t -> t'' must land where two teacher DDIM steps t -> t' -> t'' land. The x0
that makes a single DDIM step from x_t reach the teacher's x_t'' is

    x0_tgt = (x_t'' - (s_t''/s_t) x_t) / (a_t'' - (s_t''/s_t) a_t),

and the loss is max(SNR_t, 1) ||x0_student - x0_tgt||^2 (truncated-SNR weighting, equivalent to a
v-space MSE). The `match` mode is guided distillation's first stage: same grid, target the
teacher's own (CFG) x0, so a guidance-conditioned student learns CFG in one pass.
"""

from __future__ import annotations

import torch

from ddil_cli.diffusion.ddim import ddim_step
from ddil_cli.diffusion.schedule import bcast
from ddil_cli.diffusion.threshold import Threshold, apply_threshold
from ddil_cli.methods.base import Batch, DistillMethod
from ddil_cli.models.base import Denoiser


def pd_target(x_t: torch.Tensor, x_next: torch.Tensor, t: torch.Tensor, t_next: torch.Tensor,
              schedule) -> torch.Tensor:
    """The x0 whose DDIM step from (x_t, t) lands exactly on x_next at t_next."""
    a_t, s_t = schedule.alpha_sigma(t, dtype=torch.float32)
    a_n, s_n = schedule.alpha_sigma(t_next, dtype=torch.float32)
    ratio = s_n / s_t
    return (x_next - bcast(ratio, x_t) * x_t) / bcast(a_n - ratio * a_t, x_t)


class PDMethod(DistillMethod):
    name = "pd"

    def __init__(self, teacher: Denoiser, student: Denoiser, *, student_grid: list[int],
                 threshold: Threshold | None = None, mode: str = "halve"):
        super().__init__(teacher, student)
        if mode not in ("halve", "match"):
            raise ValueError(f"unknown PD mode {mode!r}")
        self.mode = mode
        self.threshold = threshold or Threshold()
        self.grid = list(student_grid) + [-1]
        # the teacher's grid has twice the points: its midpoint between consecutive student times
        steps = len(student_grid)
        from ddil_cli.diffusion.schedule import trailing_timesteps

        fine = trailing_timesteps(2 * steps, teacher.schedule.num_train_timesteps) + [-1]
        if mode == "halve" and fine[::2] != self.grid:
            raise ValueError("the student's grid is not every other point of the teacher's")
        self.midpoints = fine[1::2]

    @torch.no_grad()
    def target(self, batch: Batch) -> torch.Tensor:
        teacher, x_t, t = self.teacher, batch.x_t.float(), batch.t
        x0 = apply_threshold(teacher.predict_x0(x_t, t, batch.cond, batch.guidance), self.threshold)
        if self.mode == "match":
            return x0
        idx = batch.t_index.cpu()
        t_mid = torch.tensor(self.midpoints, dtype=torch.long)[idx].to(t.device)
        t_next = torch.tensor(self.grid, dtype=torch.long)[idx + 1].to(t.device)
        x_mid = ddim_step(x_t, x0, t, t_mid, teacher.schedule)
        x0_mid = apply_threshold(teacher.predict_x0(x_mid, t_mid, batch.cond, batch.guidance), self.threshold)
        x_next = ddim_step(x_mid, x0_mid, t_mid, t_next, teacher.schedule)
        return pd_target(x_t, x_next, t, t_next, teacher.schedule)

    def loss(self, batch: Batch) -> torch.Tensor:
        target = self.target(batch)
        x0_student = self.student_x0(batch).float()
        weight = self.student.schedule.snr(batch.t).clamp(min=1.0).float().to(target.device)
        per_example = ((x0_student - target) ** 2).reshape(len(batch), -1).mean(1)
        return weight * per_example
