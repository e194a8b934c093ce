"""What bench/lab_lcm.py and bench/lab_dmd2.py share: sample a lab student through the sample
stage and score it with the lab's exact metrics (the evaluate stage's `score`). The PD map, and
any method's DDIL-effect map, is bench/ddil_effect.py."""

from __future__ import annotations

from pathlib import Path

from ddil_cli.evaluate.run import EvaluateConfig, score
from ddil_cli.sampling import SampleConfig
from ddil_cli.stages.sample import run_sample

# (column, metric in metrics.json, field of that metric)
METRICS = (("quality", "quality", "value"), ("mode coverage", "mode-coverage", "value"),
           ("class mode recall", "class-recall", "value"), ("class accuracy", "class-recall", "class_accuracy"),
           ("sliced W", "swd", "value"))


def lab_numbers(folder: Path, spec: str) -> dict:
    metrics = score(EvaluateConfig(samples=str(folder), reference=spec, quiet=True))["metrics"]
    return {column: metrics[name][field] for column, name, field in METRICS}


def sample_into(folder: Path, spec: str, student: str | None, steps: int, per_class: int, guidance: float,
                teacher_steps: int) -> float:
    folder.mkdir(parents=True)
    summary = run_sample(SampleConfig(teacher=spec, student=student, steps=steps, teacher_steps=teacher_steps,
                                      num_per_prompt=per_class, batch_size=512, guidance=guidance, quiet=True,
                                      out=str(folder)), folder)
    return summary["seconds_per_sample"]
