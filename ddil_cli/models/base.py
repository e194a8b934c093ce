"""One interface for every model: a denoiser (k-diffusion's external.py in spirit).

A Denoiser wraps one network (or an analytic teacher) and answers one uniform call,
`predict_x0(x_t, t, conditioning, guidance)`, the x0 estimate after classifier-free guidance
(two passes) or guidance embedding (one pass, for a guidance-conditioned student). Everything
above this layer (rollouts, losses, samplers) talks only through it.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ddil_cli.diffusion.guidance import cfg_combine
from ddil_cli.diffusion.parameterization import to_x0
from ddil_cli.diffusion.schedule import NoiseSchedule, bcast


@dataclass
class Conditioning:
    """Encoded prompts for a batch. `cond` / `uncond` map a network's conditioning keyword to a
    tensor with one row per example (uncond is None when the model has no null condition)."""

    prompts: list[str]
    cond: dict[str, torch.Tensor]
    uncond: dict[str, torch.Tensor] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.prompts)

    def select(self, index: torch.Tensor | list[int]) -> "Conditioning":
        """The rows `index` (a long tensor or list), e.g. the examples a teacher takes in a mixed step."""
        idx = torch.as_tensor(index, dtype=torch.long)
        pick = lambda d: None if d is None else {k: v[idx.to(v.device)] for k, v in d.items()}
        return Conditioning([self.prompts[i] for i in idx.tolist()], pick(self.cond), pick(self.uncond),
                            dict(self.extra))

    @staticmethod
    def cat(parts: list["Conditioning"]) -> "Conditioning":
        """The rows of several encodings one after the other (DMD2 runs fake and real inputs in one pass)."""
        def cat(dicts):
            if any(d is None for d in dicts):
                return None
            return {k: torch.cat([d[k] for d in dicts]) for k in dicts[0]}
        return Conditioning([p for c in parts for p in c.prompts], cat([c.cond for c in parts]),
                            cat([c.uncond for c in parts]), dict(parts[0].extra))


class Denoiser(ABC):
    """A model of E[x0 | x_t] in the teacher's noise schedule.

    Subclasses set: `schedule`, `prediction_type` ('epsilon' | 'v_prediction' | 'sample'),
    `state_shape` (one state, e.g. (4, 64, 64) or (2,)), `guidance_conditioned` (takes the
    guidance scale as an input), and implement `encode` and `forward`.
    """

    schedule: NoiseSchedule
    prediction_type: str
    state_shape: tuple[int, ...]
    guidance_conditioned: bool = False
    # the guidance is distilled into the weights (a LoRA student: no layer to take w): one
    # conditional pass whatever w is asked for
    guidance_folded: bool = False
    kind: str = "denoiser"  # short label written into manifests

    # ---- what a subclass provides -------------------------------------------------------------
    @abstractmethod
    def encode(self, prompts: list[str]) -> Conditioning:
        """Encode prompts (and their unconditional counterpart) for this model."""

    @abstractmethod
    def forward(self, x_t: torch.Tensor, t: torch.Tensor, cond: dict[str, torch.Tensor],
                guidance: torch.Tensor | None = None, *, network: torch.nn.Module | None = None) -> torch.Tensor:
        """The raw network output in `prediction_type` (differentiable; used by the losses).

        `network` is the module to call instead of `self.network`: in training, the one the
        launcher wrapped (DDP), so that gradients are synchronised across processes."""

    @property
    def network(self) -> torch.nn.Module | None:
        """The trainable module (None for an analytic model)."""
        return None

    @property
    def device(self) -> torch.device:
        net = self.network
        if net is None:
            return torch.device("cpu")
        return next(net.parameters()).device

    def to(self, device) -> "Denoiser":
        if self.network is not None:
            self.network.to(device)
        return self

    def decode(self, x0: torch.Tensor) -> np.ndarray | None:
        """Clean states to uint8 images (B, H, W, 3); None when states are not images (the lab)."""
        return None

    def shares_conditioning(self, other: "Denoiser") -> bool:
        """True when `other.encode(prompts)` would give what this model needs, so one encoding
        serves both (a student made from its teacher shares the frozen text encoders)."""
        return other is self

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """Images (B, C, H, W) in [-1, 1] to clean states (a VAE encode for latent models)."""
        raise NotImplementedError(f"{type(self).__name__} does not take images")

    @property
    def sampler(self) -> str:
        """How this model takes a few-step transition when it is the student of a rollout: 'ddim'
        (deterministic) or 'consistency' (re-noising, LCM / DMD2), from its scheduler config."""
        config = getattr(self, "scheduler_config", None) or {}
        return "consistency" if config.get("_class_name") == "LCMScheduler" else "ddim"

    @property
    def timestep_scaling(self) -> float:
        """The consistency boundary's timestep scaling g (diffusers' LCMScheduler default 10)."""
        config = getattr(self, "scheduler_config", None) or {}
        return float(config.get("timestep_scaling", 10.0))

    def describe(self) -> dict[str, Any]:
        """What goes into a manifest about this model."""
        return {"kind": self.kind, "prediction_type": self.prediction_type,
                "state_shape": list(self.state_shape), "guidance_conditioned": self.guidance_conditioned}

    def save_pretrained(self, path: str | Path, *, timesteps: list[int] | None = None,
                        scheduler: str = "ddim", merge_lora: bool = False) -> None:
        raise NotImplementedError(f"{type(self).__name__} cannot be saved")

    # ---- the uniform call ---------------------------------------------------------------------
    def x0_from_output(self, output: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        a, s = self.schedule.alpha_sigma(t, dtype=torch.float32)
        return to_x0(output.float(), x_t.float(), bcast(a, x_t), bcast(s, x_t), self.prediction_type)

    def predict_x0(self, x_t: torch.Tensor, t: torch.Tensor, conditioning: Conditioning,
                   guidance: float | torch.Tensor = 1.0, *, network: torch.nn.Module | None = None,
                   all_one: bool | None = None) -> torch.Tensor:
        """x0 estimate (float32) at (x_t, t) under guidance scale w (w = 1: conditional only).

        A guidance-conditioned model gets w as an input in one pass; otherwise w != 1 runs the
        conditional and unconditional branches in one batched pass and combines them by CFG.
        `all_one` says whether every w is 1 when the caller knows it (else it is read from `guidance`).
        """
        batch = x_t.shape[0]
        t = torch.as_tensor(t, device=x_t.device).long().expand(batch) if torch.as_tensor(t).ndim == 0 \
            else torch.as_tensor(t, device=x_t.device).long()
        w = torch.as_tensor(guidance, dtype=torch.float32, device=x_t.device)
        w = w.expand(batch) if w.ndim == 0 else w
        if self.guidance_conditioned:
            return self.x0_from_output(self.forward(x_t, t, conditioning.cond, w, network=network), x_t, t)
        if all_one is None:  # `all_one` from a caller that knows it: no device read (a GPU sync)
            all_one = bool((w == 1).all())
        if self.guidance_folded or conditioning.uncond is None or all_one:
            return self.x0_from_output(self.forward(x_t, t, conditioning.cond, None, network=network), x_t, t)
        both = {k: torch.cat([conditioning.uncond[k], conditioning.cond[k]]) for k in conditioning.cond}
        out = self.forward(torch.cat([x_t, x_t]), torch.cat([t, t]), both, None, network=network)
        x0_u, x0_c = self.x0_from_output(out, torch.cat([x_t, x_t]), torch.cat([t, t])).chunk(2)
        return cfg_combine(x0_u, x0_c, w)
