"""The stateless DDIM transition t -> s (eta = 0), the primitive every rollout is built on."""

from __future__ import annotations

import torch

from ddil_cli.diffusion.parameterization import eps_from_x0
from ddil_cli.diffusion.schedule import NoiseSchedule, bcast
from ddil_cli.diffusion.threshold import Threshold, apply_threshold


def ddim_step(x_t: torch.Tensor, x0_hat: torch.Tensor, t, s, schedule: NoiseSchedule,
              threshold: Threshold | None = None) -> torch.Tensor:
    """x_s = a_s x0 + s_s eps with eps recomputed from the (thresholded) x0 so the step stays
    consistent. Depends only on (x_t, x0_hat, t, s): no solver state, so any transition of a
    trajectory can be taken by the teacher or by the student."""
    if threshold is not None:
        x0_hat = apply_threshold(x0_hat, threshold)
    a_t, s_t = schedule.alpha_sigma(t, dtype=x_t.dtype)
    a_s, s_s = schedule.alpha_sigma(s, dtype=x_t.dtype)
    eps_hat = eps_from_x0(x0_hat, x_t, bcast(a_t, x_t), bcast(s_t, x_t))
    return bcast(a_s, x_t) * x0_hat + bcast(s_s, x_t) * eps_hat
