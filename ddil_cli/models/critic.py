"""A DMD2-style critic's parts: the GAN head on its bottleneck features, the module those come
from, and a context that freezes its parameters for the generator's pass through it."""

from __future__ import annotations

from contextlib import contextmanager

import torch

from ddil_cli.errors import UserError


def _groups(channels: int) -> int:
    return max(g for g in range(1, 33) if channels % g == 0)


class GANHead(torch.nn.Module):
    """A small classifier on bottleneck features: conv / GroupNorm / SiLU for feature maps
    (B, C, H, W), averaged over positions; Linear / SiLU for feature vectors (B, C). One logit each."""

    def __init__(self, channels: int, spatial: bool, width: int = 256):
        super().__init__()
        hidden = min(channels, width)
        if spatial:
            self.body = torch.nn.Sequential(
                torch.nn.Conv2d(channels, hidden, 3, padding=1), torch.nn.GroupNorm(_groups(hidden), hidden),
                torch.nn.SiLU(), torch.nn.Conv2d(hidden, hidden, 3, padding=1),
                torch.nn.GroupNorm(_groups(hidden), hidden), torch.nn.SiLU(), torch.nn.Conv2d(hidden, 1, 1))
        else:
            self.body = torch.nn.Sequential(torch.nn.Linear(channels, hidden), torch.nn.SiLU(),
                                            torch.nn.Linear(hidden, hidden), torch.nn.SiLU(),
                                            torch.nn.Linear(hidden, 1))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        out = self.body(features.float())
        return out.reshape(out.shape[0], -1).mean(1)


def bottleneck(network: torch.nn.Module) -> tuple[torch.nn.Module, int, bool]:
    """(module whose output is the bottleneck, its width, whether it is a feature map)."""
    mid = getattr(network, "mid_block", None)
    if mid is not None:
        return mid, int(network.config.block_out_channels[-1]), True
    body = getattr(network, "body", None)
    if isinstance(body, torch.nn.Sequential) and len(body) >= 2:  # the lab MLP: its last hidden layer
        return body[-2], int(network.config.hidden), False
    raise UserError("--gan-weight needs a critic with bottleneck features (a diffusers UNet with a mid "
                    "block, or the lab MLP); use --gan-weight 0 with this teacher")


@contextmanager
def frozen_parameters(*modules: torch.nn.Module):
    """Parameters out of the autograd graph for the forward passes inside (the graph keeps what it
    recorded), so a generator's GAN term reaches its sample through the critic without touching
    the critic's weights."""
    flags = [[p.requires_grad for p in m.parameters()] for m in modules]
    for m in modules:
        m.requires_grad_(False)
    try:
        yield
    finally:
        for m, saved in zip(modules, flags):
            for p, flag in zip(m.parameters(), saved):
                p.requires_grad_(flag)
