"""Distillation methods, one small class per method (EDM's training/loss.py in spirit).

A method registers itself in METHODS by name; the distill stage builds it from there and knows
no method by name (docs/distill.md, "Adding a method").
"""

from ddil_cli.methods.base import Batch, DistillMethod, MethodOptions, Phase, PlanRequest, TrainedGroup
from ddil_cli.methods.lcm import LCMMethod
from ddil_cli.methods.pd import PDMethod

METHODS: dict[str, type[DistillMethod]] = {"pd": PDMethod, "lcm": LCMMethod}
PLANNED = ("dmd2",)

__all__ = ["Batch", "DistillMethod", "LCMMethod", "METHODS", "MethodOptions", "PDMethod", "PLANNED", "Phase",
           "PlanRequest", "TrainedGroup"]
