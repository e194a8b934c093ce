"""Distillation losses, one small class per method (EDM's training/loss.py in spirit)."""

from ddil_cli.methods.base import Batch, DistillMethod
from ddil_cli.methods.pd import PDMethod

METHODS = {"pd": PDMethod}
PLANNED = ("lcm", "dmd2")

__all__ = ["Batch", "DistillMethod", "METHODS", "PDMethod", "PLANNED"]
