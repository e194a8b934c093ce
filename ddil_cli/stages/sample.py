"""`ddil sample`: teacher, student and mixed generations on a shared grid, into one folder."""

from __future__ import annotations

from pathlib import Path

from ddil_cli.sampling import SampleConfig, load_models, sample_threshold, write_sample_folder


def run_sample(cfg: SampleConfig, work: Path, *, progress=None, models=None) -> dict:
    """Generate into the (empty, private) folder `work`. Returns a summary."""
    sample_threshold(cfg)  # a bad --threshold fails before any model is loaded
    teacher, student = models if models is not None else load_models(cfg, cfg.device)
    return write_sample_folder(cfg, work, teacher, student, progress=progress)
