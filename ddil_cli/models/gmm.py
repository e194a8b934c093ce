"""The Gaussian-mixture lab: an analytic teacher whose x0 prediction is the exact posterior mean.

Spec grammar (every `--teacher` / `--reference` accepts it):
    gmm:LAYOUT:K[:dD][:stdS][:scaleR]
LAYOUT is `ring` (K modes on a circle of radius R) or `grid` (K = n*n modes on a square grid
spanning [-R, R]^2). D >= 2 is the dimension: the layout fills the first two coordinates and the
extra coordinates have mean 0 (all coordinates share the mode std S). Defaults: D = 2,
S = 0.05, R = 0.8, so every mode sits inside [-1, 1] and static thresholding is meaningful.
Classes: C = the smallest divisor of K that is >= sqrt(K) (ring:8 -> 4 classes of 2 opposite
modes; grid:25 -> 5 classes, one per grid column); mode k belongs to class k % C. Prompts are
`class 0` ... `class C-1`.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch

from ddil_cli.diffusion.schedule import NoiseSchedule
from ddil_cli.errors import UserError
from ddil_cli.models.base import Conditioning, Denoiser

# SD's schedule: the lab mirrors the noise levels of the models users distil.
GMM_SCHEDULER_CONFIG = {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012,
                        "beta_schedule": "scaled_linear"}

_SPEC = re.compile(r"^gmm:(ring|grid):(\d+)((?::(?:d\d+|std[0-9.eE+-]+|scale[0-9.eE+-]+))*)$")
_PROMPT = re.compile(r"^\s*class\s+(\d+)\s*$")


@dataclass(frozen=True)
class GMMSpec:
    layout: str
    num_modes: int
    dim: int = 2
    std: float = 0.05
    scale: float = 0.8

    def __str__(self) -> str:
        return f"gmm:{self.layout}:{self.num_modes}:d{self.dim}:std{self.std:g}:scale{self.scale:g}"


def is_gmm_spec(text: str) -> bool:
    return isinstance(text, str) and text.startswith("gmm:")


def parse_gmm_spec(text: str) -> GMMSpec:
    match = _SPEC.match(text.strip())
    usage = ("use gmm:LAYOUT:K[:dD][:stdS][:scaleR] with LAYOUT ring or grid, "
             "e.g. gmm:ring:8 or gmm:grid:25:d8:std0.03")
    if not match:
        raise ValueError(f"unknown Gaussian-mixture spec {text!r}; {usage}")
    layout, k = match.group(1), int(match.group(2))
    fields = {"dim": 2, "std": 0.05, "scale": 0.8}
    for part in filter(None, match.group(3).split(":")):
        try:
            if part.startswith("d"):
                fields["dim"] = int(part[1:])
            elif part.startswith("std"):
                fields["std"] = float(part[3:])
            else:
                fields["scale"] = float(part[5:])
        except ValueError:
            raise ValueError(f"bad field {part!r} in {text!r}; {usage}") from None
    if k < 1:
        raise ValueError(f"{text!r}: K must be >= 1")
    if layout == "grid" and math.isqrt(k) ** 2 != k:
        raise ValueError(f"{text!r}: a grid needs a square number of modes (4, 9, 16, 25, ...)")
    if fields["dim"] < 2:
        raise ValueError(f"{text!r}: dimension must be >= 2")
    if not (0 < fields["std"] < 1) or not (0 < fields["scale"] <= 1):
        raise ValueError(f"{text!r}: need 0 < std < 1 and 0 < scale <= 1 (modes inside [-1, 1])")
    return GMMSpec(layout, k, **fields)


def _num_classes(k: int) -> int:
    return next(d for d in range(1, k + 1) if k % d == 0 and d * d >= k)


class GaussianMixture:
    """The true data distribution of the lab: K isotropic Gaussians with equal weights."""

    def __init__(self, spec: GMMSpec):
        self.spec = spec
        k = spec.num_modes
        if spec.layout == "ring":
            angle = 2 * math.pi * torch.arange(k, dtype=torch.float64) / k
            plane = spec.scale * torch.stack([angle.cos(), angle.sin()], 1)
        else:
            n = math.isqrt(k)
            axis = torch.linspace(-spec.scale, spec.scale, n, dtype=torch.float64) if n > 1 \
                else torch.zeros(1, dtype=torch.float64)
            plane = torch.stack(torch.meshgrid(axis, axis, indexing="xy"), -1).reshape(k, 2)
        self.means = torch.cat([plane, torch.zeros(k, spec.dim - 2, dtype=torch.float64)], 1)
        self.std = spec.std
        self.num_classes = _num_classes(k)
        self.class_of_mode = torch.arange(k) % self.num_classes

    @property
    def dim(self) -> int:
        return self.spec.dim

    def mode_mask(self, classes: torch.Tensor) -> torch.Tensor:
        """(B, K) bool: which modes each example's class allows (class -1: all)."""
        classes = classes.long().reshape(-1, 1)
        return (classes < 0) | (self.class_of_mode.to(classes.device).reshape(1, -1) == classes)

    def sample(self, n: int, generator: torch.Generator | None = None, classes: torch.Tensor | None = None):
        """n exact samples (float64) and their mode indices; `classes` restricts each row's modes."""
        mask = self.mode_mask(classes if classes is not None else torch.full((n,), -1))
        mode = torch.multinomial(mask.double(), 1, generator=generator).squeeze(1)
        noise = torch.randn(n, self.dim, generator=generator, dtype=torch.float64)
        return self.means[mode] + self.std * noise, mode

    def posterior_mean(self, x_t: torch.Tensor, a: torch.Tensor, s: torch.Tensor,
                       classes: torch.Tensor) -> torch.Tensor:
        """E[x0 | x_t] for x_t = a x0 + s eps, restricted per row to the modes of its class."""
        x = x_t.double()
        a = a.double().reshape(-1, 1)
        var = a**2 * self.std**2 + s.double().reshape(-1, 1) ** 2  # variance of x_t given the mode
        means = self.means.to(x.device)
        sq = ((x[:, None, :] - a[:, :, None] * means[None]) ** 2).sum(-1)  # (B, K)
        logits = -0.5 * sq / var
        logits = logits.masked_fill(~self.mode_mask(classes).to(x.device), float("-inf"))
        resp = torch.softmax(logits, dim=1)
        # per mode: mu_k + (a std^2 / var) (x_t - a mu_k)
        gain = a * self.std**2 / var
        per_mode = means[None] + gain[:, :, None] * (x[:, None, :] - a[:, :, None] * means[None])
        return (resp[:, :, None] * per_mode).sum(1)


def class_ids_from_prompts(prompts: list[str], num_classes: int) -> torch.Tensor:
    ids = []
    for prompt in prompts:
        match = _PROMPT.match(prompt)
        if prompt.strip() == "":
            ids.append(-1)
            continue
        if not match or int(match.group(1)) >= num_classes:
            raise UserError(f"prompt {prompt!r} is not a class of this mixture; "
                             f"use 'class 0' ... 'class {num_classes - 1}'")
        ids.append(int(match.group(1)))
    return torch.tensor(ids, dtype=torch.long)


def class_prompts(num_classes: int) -> list[str]:
    return [f"class {c}" for c in range(num_classes)]


class GMMDenoiser(Denoiser):
    """The exact teacher: its x0 prediction is the posterior mean of the mixture."""

    kind = "gmm"
    prediction_type = "sample"

    def __init__(self, spec: GMMSpec | str):
        self.spec = parse_gmm_spec(spec) if isinstance(spec, str) else spec
        self.mixture = GaussianMixture(self.spec)
        self.schedule = NoiseSchedule.from_scheduler_config(GMM_SCHEDULER_CONFIG)
        self.scheduler_config = dict(GMM_SCHEDULER_CONFIG)
        self.state_shape = (self.spec.dim,)

    @property
    def num_classes(self) -> int:
        return self.mixture.num_classes

    def default_prompts(self) -> list[str]:
        return class_prompts(self.num_classes)

    def encode(self, prompts: list[str]) -> Conditioning:
        ids = class_ids_from_prompts(prompts, self.num_classes)
        return Conditioning(list(prompts), {"class": ids}, {"class": torch.full_like(ids, -1)})

    def forward(self, x_t, t, cond, guidance=None, *, network=None):  # analytic: no network
        a, s = self.schedule.alpha_sigma(t.cpu(), dtype=torch.float64)
        x0 = self.mixture.posterior_mean(x_t.cpu(), a, s, cond["class"].cpu())
        return x0.to(device=x_t.device, dtype=x_t.dtype if x_t.is_floating_point() else torch.float32)

    def shares_conditioning(self, other) -> bool:
        # lab models all encode a prompt as its class id
        return other.kind in ("gmm", "mlp") and getattr(other, "num_classes", None) == self.num_classes

    def describe(self):
        return {**super().describe(), "spec": str(self.spec), "num_classes": self.num_classes}
