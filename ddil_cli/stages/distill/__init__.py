"""`ddil distill`: plan (config and validation), batches, dagger (collection), runfolder
(resume checks, checkpointed state, the folder's life), phase (one phase's wiring) and the stage
that runs the phases."""

from ddil_cli.stages.distill.plan import DistillConfig, make_plan
from ddil_cli.stages.distill.stage import run_distill

__all__ = ["DistillConfig", "make_plan", "run_distill"]
