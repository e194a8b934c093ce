"""The VP noise schedule, read from a diffusers scheduler config, and timestep grids.

Time is the discrete training index t in [0, T-1] (T = 1000 for Stable Diffusion). The
pseudo-time t = -1 stands for clean data (a = 1, s = 0): the end of every sampling grid, as
diffusers' DDIM with ``set_alpha_to_one=True``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import torch


@dataclass(frozen=True)
class NoiseSchedule:
    alphas_cumprod: torch.Tensor  # float64, shape (T,)

    @classmethod
    def from_scheduler_config(cls, config: Mapping[str, Any]) -> "NoiseSchedule":
        """Build from any diffusers scheduler config (betas, beta_schedule, zero-SNR rescale...).

        diffusers already implements every beta schedule; we take its alphas_cumprod rather than
        restating them, so a teacher's own schedule is always the one used.
        """
        from diffusers import DDPMScheduler

        keys = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas",
                "rescale_betas_zero_snr")
        kwargs = {k: config[k] for k in keys if k in config and config[k] is not None}
        if kwargs.get("rescale_betas_zero_snr") is None:
            kwargs.pop("rescale_betas_zero_snr", None)
        sched = DDPMScheduler(**kwargs)
        return cls(sched.alphas_cumprod.to(torch.float64).clone())

    @property
    def num_train_timesteps(self) -> int:
        return int(self.alphas_cumprod.shape[0])

    def alpha_sigma(self, t: torch.Tensor, *, dtype: torch.dtype = torch.float32):
        """Signal and noise scales (a_t, s_t) at integer timesteps t (t = -1: clean data)."""
        t = torch.as_tensor(t)
        ac = self.alphas_cumprod.to(t.device)
        clean = t < 0
        alphabar = torch.where(clean, torch.ones((), dtype=ac.dtype, device=ac.device),
                               ac[t.clamp(min=0).long()])
        return alphabar.sqrt().to(dtype), (1.0 - alphabar).clamp(min=0).sqrt().to(dtype)

    def snr(self, t: torch.Tensor) -> torch.Tensor:
        a, s = self.alpha_sigma(t, dtype=torch.float64)
        return (a / s) ** 2

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Forward diffusion x_t = a_t x0 + s_t eps, t per example."""
        a, s = self.alpha_sigma(t, dtype=x0.dtype)
        return bcast(a, x0) * x0 + bcast(s, x0) * noise


def bcast(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Per-example scalars (B,) (or one scalar) shaped to broadcast against a batch."""
    v = torch.as_tensor(v, device=like.device)
    if v.ndim == 0:
        return v
    return v.reshape(v.shape[0], *([1] * (like.ndim - 1)))


def trailing_timesteps(num_steps: int, num_train_timesteps: int = 1000) -> list[int]:
    """Sampling grid with 'trailing' spacing, as diffusers and the paper (4 steps: 999, 749, 499, 249).

    Trailing grids nest: the 4-step grid is every 8th point of the 32-step one, which is what lets a
    teacher and a student share one trajectory.
    """
    if num_steps < 1 or num_steps > num_train_timesteps:
        raise ValueError(f"num_steps must be in [1, {num_train_timesteps}], got {num_steps}")
    step = num_train_timesteps / num_steps
    return [int(round(num_train_timesteps - i * step)) - 1 for i in range(num_steps)]


def nested_grids(student_steps: int, teacher_steps: int, num_train_timesteps: int = 1000):
    """The student's grid and the teacher's, checked to nest. Returns (student, teacher, ratio)."""
    if student_steps < 1 or teacher_steps < 1:
        raise ValueError("step counts must be positive")
    if teacher_steps % student_steps:
        raise ValueError(
            f"teacher steps ({teacher_steps}) must be a multiple of student steps ({student_steps})")
    ratio = teacher_steps // student_steps
    student = trailing_timesteps(student_steps, num_train_timesteps)
    teacher = trailing_timesteps(teacher_steps, num_train_timesteps)
    if teacher[::ratio] != student:
        raise ValueError(f"the {student_steps}-step grid is not a subset of the {teacher_steps}-step grid")
    return student, teacher, ratio
