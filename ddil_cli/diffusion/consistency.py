"""Consistency-model boundary scalings and the re-noising multistep transition (LCM, DMD2).

A consistency function maps a state to its clean endpoint and must be the identity at t = 0:

    f(x_t, t) = c_skip(t) x_t + c_out(t) x0_hat(x_t, t),
    c_skip(t) = sd^2 / ((g t)^2 + sd^2),   c_out(t) = g t / sqrt((g t)^2 + sd^2),

with sd = sigma_data (0.5) and g the timestep scaling (10), diffusers' `LCMScheduler` convention.
A few-step sampler then re-noises the endpoint to the next time s with fresh noise z:

    x_s = a_s f(x_t, t) + s_s z          (s = -1, clean data: x_s = f(x_t, t)).

Unlike DDIM, the step needs a fresh z, so a rollout draws it per example from the example's seed.
"""

from __future__ import annotations

import torch

from ddil_cli.diffusion.schedule import NoiseSchedule, bcast

SIGMA_DATA = 0.5
TIMESTEP_SCALING = 10.0


def boundary_scalings(t: torch.Tensor, *, sigma_data: float = SIGMA_DATA,
                      timestep_scaling: float = TIMESTEP_SCALING) -> tuple[torch.Tensor, torch.Tensor]:
    """(c_skip, c_out) per timestep: (1, 0) at t = 0, about (0, 1) from a few steps on."""
    scaled = torch.as_tensor(t, dtype=torch.float32) * timestep_scaling
    c_skip = sigma_data ** 2 / (scaled ** 2 + sigma_data ** 2)
    c_out = scaled / (scaled ** 2 + sigma_data ** 2) ** 0.5
    return c_skip, c_out


def consistency_output(x_t: torch.Tensor, x0_hat: torch.Tensor, t, *, sigma_data: float = SIGMA_DATA,
                       timestep_scaling: float = TIMESTEP_SCALING) -> torch.Tensor:
    """f(x_t, t) = c_skip x_t + c_out x0_hat."""
    t = torch.as_tensor(t, device=x_t.device)
    c_skip, c_out = boundary_scalings(t, sigma_data=sigma_data, timestep_scaling=timestep_scaling)
    c_skip, c_out = c_skip.to(x_t.device), c_out.to(x_t.device)
    return bcast(c_skip, x_t) * x_t.float() + bcast(c_out, x_t) * x0_hat.float()


def renoise_step(x0: torch.Tensor, s, schedule: NoiseSchedule, noise: torch.Tensor) -> torch.Tensor:
    """x_s = a_s x0 + s_s z; at s = -1 (clean data: a = 1, s = 0) the endpoint itself."""
    a_s, s_s = schedule.alpha_sigma(torch.as_tensor(s, device=x0.device), dtype=x0.dtype)
    return bcast(a_s, x0) * x0 + bcast(s_s, x0) * noise.to(x0.dtype)


def solver_timesteps(solver_steps: int, num_train_timesteps: int = 1000) -> list[int]:
    """The DDIM solver grid of consistency distillation, decreasing: k i - 1 for i = N..1 with
    skip k = T // N (N = 50, T = 1000: 999, 979, ..., 19), the grid diffusers' LCMScheduler calls
    its `original_inference_steps` schedule. The solver steps t -> t - k; from the last point it
    lands on clean data (t = -1)."""
    if not 1 <= solver_steps <= num_train_timesteps:
        raise ValueError(f"solver steps must be in [1, {num_train_timesteps}], got {solver_steps}")
    skip = num_train_timesteps // solver_steps
    return [skip * i - 1 for i in range(solver_steps, 0, -1)]


def lcm_timesteps(steps: int, solver_steps: int, num_train_timesteps: int = 1000) -> list[int]:
    """A multistep LCM sampler's grid: `steps` points of the solver grid at evenly spaced positions
    from its top (floor of linspace, endpoint excluded), as diffusers' `LCMScheduler.set_timesteps(
    steps, original_inference_steps=solver_steps)` picks them (4 of 50: 999, 759, 499, 259)."""
    grid = solver_timesteps(solver_steps, num_train_timesteps)
    if not 1 <= steps <= len(grid):
        raise ValueError(f"an LCM grid of {steps} steps needs 1 <= steps <= the {len(grid)} solver steps")
    return [grid[(i * len(grid)) // steps] for i in range(steps)]
