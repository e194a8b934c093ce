"""Reflected thresholding: keep every x0 estimate inside the data support (docs/sampling.md).

static:C   x0 = clamp(x0, -C, C)
dynamic:P  q = max(quantile(|x0|, P) per sample, 1);  x0 = clamp(x0, -q, q) / q   (Imagen)
The DDIM step recomputes eps from the clamped x0, so the step stays consistent.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Threshold:
    kind: str = "none"  # none | static | dynamic
    value: float = 1.0  # static: the bound c; dynamic: the quantile p

    def __str__(self) -> str:
        return "none" if self.kind == "none" else f"{self.kind}:{self.value:g}"


def parse_threshold(text: str) -> Threshold:
    """'none', 'static:C' (C > 0) or 'dynamic:P' (0 < P <= 1)."""
    text = (text or "none").strip().lower()
    if text == "none":
        return Threshold()
    kind, _, value = text.partition(":")
    try:
        number = float(value) if value else (1.0 if kind == "static" else 0.995)
    except ValueError:
        number = float("nan")
    if kind == "static" and number > 0:
        return Threshold("static", number)
    if kind == "dynamic" and 0 < number <= 1:
        return Threshold("dynamic", number)
    raise ValueError(f"bad threshold {text!r}: use none, static:C with C > 0, or dynamic:P with 0 < P <= 1")


def apply_threshold(x0: torch.Tensor, threshold: Threshold, *, max_value: float | None = None) -> torch.Tensor:
    """Static: clamp to [-c, c]. Dynamic (Imagen): per sample q = quantile(|x0|, p), q >= 1, clamp/q.

    `max_value` caps q as diffusers' `sample_max_value` does (None: no cap).
    """
    if threshold.kind == "none":
        return x0
    if threshold.kind == "static":
        return x0.clamp(-threshold.value, threshold.value)
    flat = x0.reshape(x0.shape[0], -1).abs().float()
    q = torch.quantile(flat, threshold.value, dim=1).clamp(min=1.0)
    if max_value is not None:
        q = q.clamp(max=max_value)
    q = q.to(x0.dtype).reshape(-1, *([1] * (x0.ndim - 1)))
    return x0.clamp(-q, q) / q
