"""Conversions between eps, v and x0 (sample) predictions. a, s broadcast against x_t."""

from __future__ import annotations

import torch

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


def to_x0(model_output: torch.Tensor, x_t: torch.Tensor, a, s, prediction_type: str) -> torch.Tensor:
    if prediction_type == "epsilon":
        return (x_t - s * model_output) / a
    if prediction_type == "v_prediction":
        return a * x_t - s * model_output
    if prediction_type == "sample":
        return model_output
    raise ValueError(f"unknown prediction type {prediction_type!r}; expected one of {PREDICTION_TYPES}")


def eps_from_x0(x0: torch.Tensor, x_t: torch.Tensor, a, s) -> torch.Tensor:
    # s is never 0 on a noisy state; callers do not ask for eps at t = -1.
    return (x_t - a * x0) / s


def to_eps(model_output: torch.Tensor, x_t: torch.Tensor, a, s, prediction_type: str) -> torch.Tensor:
    if prediction_type == "epsilon":
        return model_output
    if prediction_type == "v_prediction":
        return s * x_t + a * model_output
    return eps_from_x0(to_x0(model_output, x_t, a, s, prediction_type), x_t, a, s)


def to_v(x0: torch.Tensor, eps: torch.Tensor, a, s) -> torch.Tensor:
    return a * eps - s * x0


def from_x0(x0: torch.Tensor, x_t: torch.Tensor, a, s, prediction_type: str) -> torch.Tensor:
    """The model output in `prediction_type` that corresponds to the estimate x0 at x_t."""
    if prediction_type == "sample":
        return x0
    eps = eps_from_x0(x0, x_t, a, s)
    if prediction_type == "epsilon":
        return eps
    if prediction_type == "v_prediction":
        return to_v(x0, eps, a, s)
    raise ValueError(f"unknown prediction type {prediction_type!r}; expected one of {PREDICTION_TYPES}")
