"""Score a `ddil sample` folder against a reference: the evaluate layer's entry point.

`score(cfg)` returns the result dict that `ddil evaluate` writes as metrics.json (the stage,
`stages/evaluate.py`, adds --compare and writes it; `ddil covariate-shift` scores each of its
settings with it). Metric names: fid, pr, dc, clip, lpips-div (images) and mode-coverage,
quality, class-recall, swd (Gaussian-mixture lab, reference `gmm:...`); each is registered in
`evaluate/metrics.py`. A metric whose weights or inputs are missing is recorded as unavailable
with the reason and the fix; `strict` makes that an error.
"""

from __future__ import annotations

from dataclasses import asdict

from ddil_cli.errors import UserError
from ddil_cli.evaluate.config import EvaluateConfig
from ddil_cli.evaluate import metrics as M
from ddil_cli.evaluate.context import EvaluationContext
from ddil_cli.evaluate.images import prep_description
from ddil_cli.evaluate.inputs import GMMReference, SampleSet, load_sample_set, resolve_reference

IMAGE_METRICS = M.names("images")
LAB_METRICS = M.names("lab")
ALL_METRICS = IMAGE_METRICS + LAB_METRICS


def requested_metrics(cfg: EvaluateConfig, samples: SampleSet, reference) -> tuple[list[str], bool]:
    """(metric names, explicitly asked)."""
    if cfg.metrics:
        items = [cfg.metrics] if isinstance(cfg.metrics, str) else cfg.metrics
        names = [m.strip() for item in items for m in str(item).split(",") if m.strip()]
        unknown = [m for m in names if m not in ALL_METRICS]
        if unknown:
            raise UserError(f"unknown metric(s) {', '.join(unknown)}; choose from {', '.join(ALL_METRICS)}")
        return list(dict.fromkeys(names)), True
    if isinstance(reference, GMMReference) or samples.kind == "states":
        return list(LAB_METRICS), False
    return list(IMAGE_METRICS), False


def score(cfg: EvaluateConfig, *, progress=None) -> dict:
    """Every requested metric of the samples in `cfg.samples` against `cfg.reference`."""
    samples = load_sample_set(cfg.samples)
    reference = resolve_reference(cfg.reference, cfg.num_reference)
    if reference is not None and (samples.kind == "states") != isinstance(reference, GMMReference):
        # no metric compares lab states with images: every row would be "unavailable"
        raise UserError(f"--samples {cfg.samples} holds {'lab states' if samples.kind == 'states' else 'images'} "
                        f"but --reference {cfg.reference} is {'a Gaussian-mixture spec' if isinstance(reference, GMMReference) else 'images'}; "
                        "score lab samples against a gmm: spec and images against images")
    names, explicit = requested_metrics(cfg, samples, reference)
    if cfg.eval_res < 8:
        raise UserError(f"--eval-res {cfg.eval_res} is too small; use e.g. 256")
    if cfg.nearest_k < 1 or cfg.prdc_max <= cfg.nearest_k:
        raise UserError("--nearest-k must be >= 1 and --prdc-max larger than it")
    ctx = EvaluationContext(cfg, samples, reference, progress)
    ctx.plan(M.feature_spaces(cfg, names), alignment=M.alignment_space(cfg, names))
    results = {name: M.run_metric(ctx, M.METRICS[name]) for name in names}
    unavailable = {k: v["reason"] for k, v in results.items() if not v["available"]}
    if unavailable and cfg.strict:
        raise UserError("--strict: unavailable metric(s): " + "; ".join(f"{k}: {v}" for k, v in unavailable.items()))
    return {
        "samples": samples.describe(),
        "reference": reference.describe() if reference is not None else None,
        "image_prep": prep_description(cfg.eval_res) if samples.kind == "images" else None,
        "metrics": results,
        "unavailable": unavailable,
        "requested": names,
        "requested_explicitly": explicit,
        "notes": ctx.notes,
        "config": asdict(cfg),
    }
