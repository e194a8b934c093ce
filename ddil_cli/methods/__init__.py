"""Distillation methods, one small class per method (EDM's training/loss.py in spirit).

A method registers itself in METHODS by name; the distill stage builds it from there and knows
no method by name (docs/distill.md, "Adding a method").
"""

from ddil_cli.methods.base import Batch, DistillMethod, MethodOptions, Phase, PlanRequest, TrainedGroup
from ddil_cli.methods.dmd2 import DMD2Method
from ddil_cli.methods.lcm import LCMMethod
from ddil_cli.methods.pd import PDMethod

METHODS: dict[str, type[DistillMethod]] = {"pd": PDMethod, "lcm": LCMMethod, "dmd2": DMD2Method}

__all__ = ["Batch", "DMD2Method", "DistillMethod", "LCMMethod", "METHODS", "MethodOptions", "PDMethod", "Phase",
           "PlanRequest", "TrainedGroup"]
