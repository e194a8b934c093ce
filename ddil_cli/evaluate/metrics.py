"""The metrics `ddil evaluate` computes, each registered by name with what it needs.

A metric declares the reference it needs (`image`: folder, shards or statistics; `gmm`: a
Gaussian-mixture spec), the samples it reads (`images` or lab `states`), the feature space it
works in (its default, overridden by --features) and whether it needs reference statistics in
that space. `run_metric` checks and gathers those needs through the `EvaluationContext`, in that
order, and turns the first one that is missing into an "unavailable" entry with its reason; the
metric's own function only computes. Protocol and formulas: docs/evaluate.md.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from ddil_cli.errors import UserError
from ddil_cli.evaluate.context import EvaluationContext, Unavailable, subsample
from ddil_cli.evaluate.features import FeatureExtractor, WeightsUnavailable
from ddil_cli.evaluate.frechet import GaussianStats, frechet_distance_to_stats


@dataclass
class Needs:
    """What `run_metric` gathered for a metric: its extractor, the samples' features, the reference's."""

    extractor: FeatureExtractor | None = None
    features: np.ndarray | None = None
    reference_stats: GaussianStats | None = None
    reference_features: np.ndarray | None = None
    reference_info: dict | None = None


@dataclass(frozen=True)
class Metric:
    name: str
    compute: Callable[[EvaluationContext, Needs], dict]
    family: str                      # "images" or "lab": the default set a run picks
    reference: str | None = None     # "image" or "gmm"
    samples: str | None = None       # "images" or "states" (None: the feature extractor decides)
    feature_space: str | None = None  # default space; --features replaces it
    reference_stats: bool = False    # needs the reference's statistics/features in that space


METRICS: dict[str, Metric] = {}


def metric(name: str, *, family: str, **needs):
    def register(fn):
        METRICS[name] = Metric(name, fn, family, **needs)
        return fn
    return register


def names(family: str | None = None) -> tuple[str, ...]:
    return tuple(n for n, m in METRICS.items() if family is None or m.family == family)


def alignment_space(cfg, names: list[str]) -> str | None:
    """The embedded space whose prompt alignment stands in for the CLIP score, if asked for."""
    return cfg.features if "clip" in names and cfg.features and cfg.features.startswith("embedded:") else None


def feature_spaces(cfg, names: list[str]) -> list[str]:
    """The feature spaces the metrics `names` work in (--features replaces their defaults; the
    CLIP score reads OpenCLIP's image embeddings, or the embedded space's prompt alignment)."""
    spaces = []
    for name in names:
        m = METRICS[name]
        if m.feature_space is not None:
            spaces.append(cfg.features or m.feature_space)
        elif name == "clip":
            spaces.append(alignment_space(cfg, names) or "clip")
    return list(dict.fromkeys(spaces))


def run_metric(ctx: EvaluationContext, m: Metric) -> dict:
    """`{"available": True, ...values}` or `{"available": False, "reason": ...}`."""
    try:
        needs = Needs()
        if m.reference == "image":
            ctx.image_reference()
        elif m.reference == "gmm":
            ctx.gmm_reference()
        if m.samples == "images":
            ctx.require_images()
        elif m.samples == "states":
            ctx.require_states()
        if m.feature_space is not None:
            needs.extractor = ctx.extractors.get(ctx.cfg.features or m.feature_space)
            needs.features = ctx.sample_features(needs.extractor)
            if m.reference_stats:
                needs.reference_stats, needs.reference_features, needs.reference_info = \
                    ctx.reference_for(needs.extractor)
        values = m.compute(ctx, needs)
    except Unavailable as exc:
        return {"available": False, "reason": str(exc)}
    bad = [k for k, v in values.items() if isinstance(v, float) and not np.isfinite(v)]
    if bad:  # strict JSON would write null beside `available: true`: a score nobody can read
        return {"available": False, "reason": f"{', '.join(bad)} came out NaN or infinite (degenerate inputs, "
                                              "e.g. too few distinct samples)"}
    return {"available": True, **values}


# ---- image metrics ----------------------------------------------------------------------------

@metric("fid", family="images", reference="image", feature_space="inception", reference_stats=True)
def fid(ctx: EvaluationContext, n: Needs) -> dict:
    """Frechet distance between Gaussians fitted to sample and reference features (clean-fid protocol)."""
    x, ref_stats = n.features, n.reference_stats
    if len(x) < 2:
        raise Unavailable("needs at least 2 samples")
    value = frechet_distance_to_stats(x, ref_stats)
    if min(len(x), ref_stats.num if ref_stats.num > 0 else len(x)) <= x.shape[1]:
        ctx.notes.append(f"fid: fewer samples than feature dimensions ({x.shape[1]}): the covariance is "
                         "rank-deficient and FD is biased upward; compare only runs with equal sample counts")
    n_ref = ref_stats.num if ref_stats.num > 0 else None  # clean-fid stats files omit the count
    return {"value": value, **ctx.describe_features(n.extractor, len(x), n_ref), "reference_stats": n.reference_info}


@metric("clip", family="images", samples="images")
def clip_score(ctx: EvaluationContext, n: Needs) -> dict:
    """Mean cosine(image, caption) in OpenCLIP; with an embedded --features, its prompt alignment."""
    cfg, prompts = ctx.cfg, ctx.samples.prompts
    if cfg.features and cfg.features.startswith("embedded:"):
        extractor = ctx.extractors.get(cfg.features)
        if not hasattr(extractor, "prompt_alignment"):
            raise Unavailable(f"{cfg.features} has no prompt alignment (the CLIP-score analogue)")
        scores = ctx.prompt_alignment(extractor)
        return {"value": float(scores.mean()), "kind": "prompt alignment (classifier reads the prompt's class)",
                **ctx.describe_features(extractor, len(scores), None)}
    from ddil_cli.evaluate.clip_score import cosines_with_prompts, summarize_clip_scores

    extractor = ctx.extractors.get("clip")  # its image embeddings come from the one pass over the images
    cosines = cosines_with_prompts(extractor.clip, ctx.sample_features(extractor), prompts, cfg.batch_size)
    summary = summarize_clip_scores(cosines)
    return {"value": summary["clip_score"], **summary, "kind": "mean cosine(image, caption)",
            **ctx.describe_features(extractor, summary["num_samples"], None), "arch": extractor.clip.arch}


def _prdc(ctx: EvaluationContext, n: Needs) -> dict:
    """Precision, recall, density and coverage from one k-NN computation (Naeem et al. 2020)."""
    from ddil_cli.evaluate.prdc import compute_prdc

    cfg = ctx.cfg
    ref_feats = n.reference_features
    if ref_feats is None:
        raise Unavailable(f"--reference statistics hold no features for {n.extractor.name}; "
                          "pass the reference images instead")
    fake = subsample(n.features, cfg.prdc_max, cfg.seed + 1)
    for label, count in (("samples", len(fake)), ("reference", len(ref_feats))):
        if count <= cfg.nearest_k:
            raise Unavailable(f"needs more than k = {cfg.nearest_k} {label}, got {count}")
    device = cfg.device if cfg.device.startswith("cuda") else "cpu"
    values = compute_prdc(ref_feats, fake, k=cfg.nearest_k, device=device).as_dict()
    return {**values, "k": cfg.nearest_k, **ctx.describe_features(n.extractor, len(fake), len(ref_feats)),
            "reference_stats": n.reference_info}


@metric("pr", family="images", reference="image", feature_space="dinov2", reference_stats=True)
def precision_recall(ctx: EvaluationContext, n: Needs) -> dict:
    v = ctx.shared("prdc", lambda: _prdc(ctx, n))
    return {k: v[k] for k in v if k not in ("density", "coverage")}


@metric("dc", family="images", reference="image", feature_space="dinov2", reference_stats=True)
def density_coverage(ctx: EvaluationContext, n: Needs) -> dict:
    v = ctx.shared("prdc", lambda: _prdc(ctx, n))
    return {k: v[k] for k in v if k not in ("precision", "recall")}


@metric("lpips-div", family="images", samples="images")
def lpips_div(ctx: EvaluationContext, n: Needs) -> dict:
    """Mean pairwise LPIPS between samples of the same prompt, averaged over prompts."""
    from ddil_cli.evaluate.features import file_sha256
    from ddil_cli.evaluate.lpips_div import LpipsModel, lpips_diversity

    cfg, samples = ctx.cfg, ctx.samples
    try:
        model = LpipsModel(ctx.extractors.options)
    except WeightsUnavailable as exc:
        raise Unavailable(str(exc)) from None
    groups = samples.groups()
    out = lpips_diversity(model, groups, lambda pos: samples.load(pos, cfg.eval_res), cfg.batch_size)
    if out.get("available") is False:
        raise Unavailable(out["reason"])
    return {"value": out.pop("lpips_diversity"), **out, "feature_space": "lpips-alex-v0.1",
            "weights": str(model.path), "weights_sha256": file_sha256(model.path, ctx.extractors.options.cache_dir),
            "eval_res": cfg.eval_res, "num_samples": sum(len(v) for v in groups.values() if len(v) >= 2),
            "num_reference": None}


# ---- Gaussian-mixture lab metrics (exact, from the known mixture: evaluate/lab.py) -------------

def _lab(ctx: EvaluationContext) -> dict:
    def compute() -> dict:
        from ddil_cli.evaluate.lab import lab_metrics

        reference, states = ctx.reference, ctx.samples.states
        if states.shape[1] != reference.spec.dim:
            raise UserError(f"samples have dimension {states.shape[1]} but {reference.spec} has "
                            f"{reference.spec.dim}; pass the spec the samples were drawn from")
        return lab_metrics(states, reference.mixture, ctx.samples.classes(), seed=ctx.cfg.seed)
    return ctx.shared("lab", compute)


def _lab_fields(v: dict) -> dict:
    return {"feature_space": "states (exact)", "num_samples": v["num_samples"], "num_reference": None,
            "eval_res": None, "weights_sha256": None}


@metric("mode-coverage", family="lab", reference="gmm", samples="states")
def mode_coverage(ctx: EvaluationContext, n: Needs) -> dict:
    v = _lab(ctx)
    return {"value": v["mode_coverage"], "modes_covered": v["modes_covered"], "num_modes": v["num_modes"],
            "min_share": v["mode_min_share"], "mode_histogram": v["mode_histogram"], **_lab_fields(v)}


@metric("quality", family="lab", reference="gmm", samples="states")
def quality(ctx: EvaluationContext, n: Needs) -> dict:
    v = _lab(ctx)
    return {"value": v["quality"], "quality_radius": v["quality_radius"], **_lab_fields(v)}


@metric("class-recall", family="lab", reference="gmm", samples="states")
def class_recall(ctx: EvaluationContext, n: Needs) -> dict:
    v = _lab(ctx)
    if "per_class" not in v:
        raise Unavailable("the samples carry no class labels (sample with prompts 'class 0', ...)")
    return {"value": v["class_mode_recall"], "class_accuracy": v["class_accuracy"],
            "per_class": v["per_class"], **_lab_fields(v)}


@metric("swd", family="lab", reference="gmm", samples="states")
def swd(ctx: EvaluationContext, n: Needs) -> dict:
    v = _lab(ctx)
    return {"value": v["sliced_wasserstein"], "floor": v["sliced_wasserstein_floor"],
            "num_projections": v["num_projections"], **_lab_fields(v), "num_reference": v["num_samples"]}
