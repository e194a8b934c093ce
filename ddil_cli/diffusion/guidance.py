"""Classifier-free guidance: eps_w = eps_u + w (eps_c - eps_u); linear, so it applies to x0 too."""

from __future__ import annotations

import torch


def cfg_combine(uncond: torch.Tensor, cond: torch.Tensor, scale) -> torch.Tensor:
    scale = torch.as_tensor(scale, dtype=cond.dtype, device=cond.device)
    if scale.ndim == 1:
        scale = scale.reshape(-1, *([1] * (cond.ndim - 1)))
    return uncond + scale * (cond - uncond)
