"""The `ddil evaluate` stage: read a `ddil sample` folder and a reference, compute metrics.

`evaluate(cfg, work)` writes `metrics.json` (and the manifest) into `work` and returns the
result dict. Metric names: fid, pr, dc, clip, lpips-div (images) and mode-coverage, quality,
class-recall, swd (Gaussian-mixture lab, reference `gmm:...`). A metric whose weights or inputs
are missing is recorded as unavailable with the reason and the fix; `strict` makes that an error.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from ddil_cli.errors import UserError
from ddil_cli.evaluate import report
from ddil_cli.evaluate.features import (ExtractorOptions, FeatureExtractor, WeightsUnavailable,
                                        build_feature_extractor, default_cache_dir)
from ddil_cli.evaluate.frechet import GaussianStats, frechet_distance_to_stats
from ddil_cli.evaluate.images import ImageFolderSource, ShardSource, load_prepared, prep_description

IMAGE_METRICS = ("fid", "clip", "pr", "dc", "lpips-div")
LAB_METRICS = ("mode-coverage", "quality", "class-recall", "swd")
ALL_METRICS = IMAGE_METRICS + LAB_METRICS
DEFAULT_SPACE = {"fid": "inception", "pr": "dinov2", "dc": "dinov2"}
STATS_VERSION = 1


@dataclass
class EvaluateConfig:
    samples: str = ""
    reference: str | None = None
    metrics: list[str] | None = None
    features: str | None = None
    eval_res: int = 256
    num_reference: int | None = None
    prdc_max: int = 10000
    nearest_k: int = 5
    inception: str | None = None
    dinov2: str | None = None
    dinov2_repo: str | None = None
    clip: str | None = None
    clip_arch: str = "ViT-g-14"
    lpips_backbone: str | None = None
    digits_classifier: str | None = None
    cache_dir: str | None = None
    no_cache: bool = False
    compare: str | None = None
    strict: bool = False
    batch_size: int = 32
    seed: int = 0
    device: str = "cpu"
    out: str = "evaluation"
    quiet: bool = False
    overwrite: bool = False


# ---- inputs -----------------------------------------------------------------------------------

@dataclass
class SampleSet:
    root: Path
    rows: list[dict]
    states: np.ndarray | None = None

    @property
    def kind(self) -> str:
        return "states" if self.states is not None else "images"

    @property
    def prompts(self) -> list[str]:
        return [r.get("prompt", "") for r in self.rows]

    def groups(self) -> dict[str, list[int]]:
        """Sample positions per prompt (ddil sample's prompt_index, else the prompt text)."""
        out: dict[str, list[int]] = {}
        for i, r in enumerate(self.rows):
            out.setdefault(str(r.get("prompt_index", r.get("prompt", ""))), []).append(i)
        return out

    def classes(self) -> np.ndarray | None:
        if not any("class" in r for r in self.rows):
            return None
        return np.array([int(r.get("class", -1)) for r in self.rows])

    def load(self, positions: list[int], res: int) -> np.ndarray:
        return np.stack([load_prepared(self.root / self.rows[i]["file"], res) for i in positions])

    def batches(self, res: int, batch_size: int):
        for start in range(0, len(self.rows), batch_size):
            positions = list(range(start, min(start + batch_size, len(self.rows))))
            yield positions, self.load(positions, res)

    def describe(self) -> dict:
        return {"path": str(self.root), "kind": self.kind, "num_samples": len(self.rows),
                "num_prompts": len(self.groups())}


def load_sample_set(folder: str) -> SampleSet:
    root = Path(folder)
    index = root / "samples.jsonl"
    if not index.is_file():
        raise UserError(f"--samples {root} has no samples.jsonl; pass a `ddil sample` output folder")
    try:
        rows = [json.loads(line) for line in index.read_text().splitlines() if line.strip()]
    except ValueError as exc:
        raise UserError(f"{index} is not valid JSON lines ({exc}); regenerate it with ddil sample") from None
    if not rows:
        raise UserError(f"{index} lists no samples")
    if all(r.get("file") == "states.npy" for r in rows):
        try:
            states = np.load(root / "states.npy", allow_pickle=False)
            if states.ndim < 2:
                raise ValueError(f"an array of shape {states.shape}, not one state per row")
        except (OSError, ValueError, EOFError) as exc:
            raise UserError(f"{root / 'states.npy'} is unreadable ({' '.join(str(exc).split())}); "
                            "regenerate the folder with ddil sample") from None
        rows_idx = [int(r.get("row", i)) for i, r in enumerate(rows)]
        if max(rows_idx) >= len(states):
            raise UserError(f"{index} refers to row {max(rows_idx)} but states.npy has {len(states)} rows")
        return SampleSet(root, rows, states[rows_idx])
    missing = [r.get("file") for r in rows if not r.get("file") or not (root / r["file"]).is_file()]
    if missing:
        raise UserError(f"{len(missing)} sample image(s) listed in {index} are missing (first: {missing[0]}); "
                        "regenerate the folder with ddil sample")
    return SampleSet(root, rows)


class ImageReference:
    def __init__(self, source):
        self.source = source

    def describe(self) -> dict:
        return {**self.source.describe(), "manifest_hash": self.source.manifest_hash()}


class StatsReference:
    """A statistics .npz: clean-fid's (mu, sigma) or ours (+ features, + meta)."""

    def __init__(self, path: Path):
        self.path = path
        try:
            data = np.load(path, allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise UserError(f"--reference {path} is not a readable .npz ({exc})") from None
        if "mu" not in data or "sigma" not in data:
            raise UserError(f"--reference {path} holds no mu/sigma; pass statistics written by ddil evaluate "
                            "or clean-fid")
        self.mu, self.sigma = data["mu"], data["sigma"]
        self.features = data["features"] if "features" in data else None
        self.meta = json.loads(str(data["meta"])) if "meta" in data else {}

    @property
    def feature_space(self) -> str:
        return self.meta.get("feature_space", "inception")  # clean-fid files are Inception stats

    def describe(self) -> dict:
        return {"kind": "statistics", "path": str(self.path), "meta": self.meta or
                "clean-fid format (assumed clean-fid Inception; weights and resolution unverified)"}


class GMMReference:
    def __init__(self, spec: str):
        from ddil_cli.models.gmm import GaussianMixture, parse_gmm_spec

        try:
            self.spec = parse_gmm_spec(spec)
        except ValueError as exc:
            raise UserError(f"--reference: {exc}") from None
        self.mixture = GaussianMixture(self.spec)

    def describe(self) -> dict:
        return {"kind": "gaussian-mixture", "spec": str(self.spec)}


def resolve_reference(arg: str | None, limit: int | None):
    if arg is None:
        return None
    if arg.startswith("gmm:"):
        return GMMReference(arg)
    path = Path(arg)
    if path.suffix == ".npz" and path.is_file():
        return StatsReference(path)
    if path.suffix == ".tar" or any(ch in arg for ch in "*?[") or (path.is_dir() and any(path.glob("*.tar"))):
        return ImageReference(ShardSource.from_arg(arg, limit))
    if path.is_dir():
        return ImageReference(ImageFolderSource(path, limit))
    raise UserError(f"--reference {arg} not found; pass an image folder, webdataset .tar shards (file, folder "
                    "or glob), a statistics .npz, or a Gaussian-mixture spec such as gmm:ring:8")


# ---- planning ---------------------------------------------------------------------------------

def _options(cfg: EvaluateConfig) -> ExtractorOptions:
    return ExtractorOptions(device=cfg.device, batch_size=cfg.batch_size, inception=cfg.inception,
                            dinov2=cfg.dinov2, dinov2_repo=cfg.dinov2_repo, clip=cfg.clip, clip_arch=cfg.clip_arch,
                            lpips_backbone=cfg.lpips_backbone, digits_classifier=cfg.digits_classifier,
                            cache_dir=str(_cache_dir(cfg)))


def _cache_dir(cfg: EvaluateConfig) -> Path:
    return Path(cfg.cache_dir) if cfg.cache_dir else default_cache_dir()


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


class Unavailable(Exception):
    """Internal: why one metric cannot run here (carried into metrics.json)."""


class Extractors:
    """Builds each feature space at most once; remembers why one could not be built."""

    def __init__(self, options: ExtractorOptions):
        self.options = options
        self.built: dict[str, FeatureExtractor | Exception] = {}

    def get(self, space: str) -> FeatureExtractor:
        if space not in self.built:
            try:
                self.built[space] = build_feature_extractor(space, self.options)
            except WeightsUnavailable as exc:
                self.built[space] = exc
        found = self.built[space]
        if isinstance(found, Exception):
            raise Unavailable(str(found))
        return found


# ---- reference statistics (cached) ------------------------------------------------------------

def _stats_key(reference: ImageReference, extractor: FeatureExtractor, res: int, cfg: EvaluateConfig) -> str:
    key = {"version": STATS_VERSION, "manifest": reference.source.manifest_hash(), "space": extractor.name,
           "weights_sha256": extractor.weights_sha256, "eval_res": res, "prep": prep_description(res),
           "prdc_max": cfg.prdc_max, "seed": cfg.seed}
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()


def _subsample(x: np.ndarray, limit: int, seed: int) -> np.ndarray:
    if len(x) <= limit:
        return x
    idx = np.sort(np.random.default_rng(seed).choice(len(x), limit, replace=False))
    return x[idx]


def reference_stats(reference: ImageReference, extractor: FeatureExtractor, res: int, cfg: EvaluateConfig,
                    progress=None) -> tuple[GaussianStats, np.ndarray, dict]:
    """(Gaussian stats over all reference images, features subsampled to prdc_max, info)."""
    key = _stats_key(reference, extractor, res, cfg)
    path = _cache_dir(cfg) / "reference-stats" / f"{extractor.name.replace(':', '-')}-{res}-{key[:20]}.npz"
    if path.is_file() and not cfg.no_cache:
        try:
            with np.load(path, allow_pickle=False) as data:
                meta = json.loads(str(data["meta"]))
                return (GaussianStats(data["mu"], data["sigma"], int(meta["num"])), data["features"],
                        {"cache": str(path), "cache_hit": True})
        except (OSError, ValueError, KeyError, EOFError) as exc:  # a damaged cache entry is recomputed
            warnings.warn(f"reference statistics cache {path} is unreadable ({exc}); recomputing it")
    task = progress.add_task(f"reference {extractor.name}", total=len(reference.source)) if progress else None
    feats = []
    for batch in reference.source.batches(res, cfg.batch_size):
        feats.append(extractor.features(batch))
        if task is not None:
            progress.advance(task, len(batch))
    features = np.concatenate(feats)
    stats = GaussianStats.from_features(features)
    kept = _subsample(features, cfg.prdc_max, cfg.seed).astype(np.float32)
    meta = {"feature_space": extractor.name, "weights_sha256": extractor.weights_sha256, "eval_res": res,
            "num": stats.num, "reference": reference.describe(), "image_prep": prep_description(res),
            "stats_version": STATS_VERSION}
    if not cfg.no_cache:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.stem}.partial.npz")
        np.savez(tmp, mu=stats.mu, sigma=stats.sigma, features=kept, meta=np.array(json.dumps(meta)))
        tmp.replace(path)
    return stats, kept, {"cache": None if cfg.no_cache else str(path), "cache_hit": False}


# ---- the stage --------------------------------------------------------------------------------

def evaluate(cfg: EvaluateConfig, work: Path | None = None, *, progress=None) -> dict:
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
    extractors = Extractors(_options(cfg))
    results: dict[str, dict] = {}
    notes: list[str] = []

    def run_metric(name: str, fn: Callable[[], dict]) -> None:
        try:
            results[name] = {"available": True, **fn()}
        except Unavailable as exc:
            results[name] = {"available": False, "reason": str(exc)}

    lab_cache: dict = {}
    feature_cache: dict[str, np.ndarray] = {}

    def sample_features(extractor: FeatureExtractor) -> np.ndarray:
        if extractor.name not in feature_cache:
            if extractor.input_kind == "states":
                if samples.states is None:
                    raise Unavailable(f"{extractor.name} reads lab states; these samples are images")
                feature_cache[extractor.name] = extractor.features(samples.states)
            else:
                require_images()
                res = extractor.eval_res or cfg.eval_res
                task = progress.add_task(f"samples {extractor.name}", total=len(samples.rows)) if progress else None
                feats = []
                for positions, batch in samples.batches(res, cfg.batch_size):
                    feats.append(extractor.features(batch))
                    if task is not None:
                        progress.advance(task, len(positions))
                feature_cache[extractor.name] = np.concatenate(feats)
        return feature_cache[extractor.name]

    def require_images():
        if samples.kind != "images":
            raise Unavailable("these samples are lab states, not images; use a gmm: --reference for lab metrics")

    def image_reference():
        if isinstance(reference, (ImageReference, StatsReference)):
            return reference
        raise Unavailable("needs an image reference: pass --reference with an image folder, shards or a stats .npz")

    ref_cache: dict[str, tuple] = {}

    def reference_for(extractor: FeatureExtractor) -> tuple[GaussianStats, np.ndarray | None, dict]:
        ref = image_reference()
        res = extractor.eval_res or cfg.eval_res
        if isinstance(ref, StatsReference):
            if ref.feature_space != extractor.name:
                raise Unavailable(f"--reference {ref.path} holds {ref.feature_space} statistics, not {extractor.name}")
            if ref.meta:
                if ref.meta.get("weights_sha256") != extractor.weights_sha256:
                    raise UserError(f"--reference {ref.path} was computed with other {extractor.name} weights "
                                    f"(sha256 {ref.meta.get('weights_sha256')}); recompute it from the images")
                if ref.meta.get("eval_res") != res:
                    raise UserError(f"--reference {ref.path} was computed at eval-res {ref.meta.get('eval_res')}, "
                                    f"not {res}; pass --eval-res {ref.meta.get('eval_res')} or recompute it")
            stats = GaussianStats(ref.mu, ref.sigma, int(ref.meta.get("num", 0)) or -1)
            return stats, ref.features, {"statistics_file": str(ref.path)}
        if extractor.name not in ref_cache:
            ref_cache[extractor.name] = reference_stats(ref, extractor, res, cfg, progress)
        return ref_cache[extractor.name]

    def common(extractor: FeatureExtractor, n_samples: int, n_ref: int | None) -> dict:
        return {"feature_space": extractor.name, "feature_description": extractor.description,
                "weights": extractor.weights_path, "weights_sha256": extractor.weights_sha256,
                "eval_res": extractor.eval_res or cfg.eval_res, "num_samples": n_samples, "num_reference": n_ref}

    def fid() -> dict:
        image_reference()
        extractor = extractors.get(cfg.features or DEFAULT_SPACE["fid"])
        x = sample_features(extractor)
        ref_stats, _, info = reference_for(extractor)
        if len(x) < 2:
            raise Unavailable("needs at least 2 samples")
        value = frechet_distance_to_stats(x, ref_stats)
        if min(len(x), ref_stats.num if ref_stats.num > 0 else len(x)) <= x.shape[1]:
            notes.append(f"fid: fewer samples than feature dimensions ({x.shape[1]}): the covariance is "
                         "rank-deficient and FD is biased upward; compare only runs with equal sample counts")
        n_ref = ref_stats.num if ref_stats.num > 0 else None  # clean-fid stats files omit the count
        return {"value": value, **common(extractor, len(x), n_ref), "reference_stats": info}

    def prdc_values() -> dict:
        if "prdc" not in lab_cache:
            from ddil_cli.evaluate.prdc import compute_prdc

            image_reference()
            extractor = extractors.get(cfg.features or DEFAULT_SPACE["pr"])
            x = sample_features(extractor)
            _, ref_feats, info = reference_for(extractor)
            if ref_feats is None:
                raise Unavailable(f"--reference statistics hold no features for {extractor.name}; "
                                  "pass the reference images instead")
            fake = _subsample(x, cfg.prdc_max, cfg.seed + 1)
            for label, n in (("samples", len(fake)), ("reference", len(ref_feats))):
                if n <= cfg.nearest_k:
                    raise Unavailable(f"needs more than k = {cfg.nearest_k} {label}, got {n}")
            device = cfg.device if cfg.device.startswith("cuda") else "cpu"
            values = compute_prdc(ref_feats, fake, k=cfg.nearest_k, device=device).as_dict()
            lab_cache["prdc"] = {**values, "k": cfg.nearest_k, **common(extractor, len(fake), len(ref_feats)),
                                 "reference_stats": info}
        return lab_cache["prdc"]

    def pr() -> dict:
        v = prdc_values()
        return {k: v[k] for k in v if k not in ("density", "coverage")}

    def dc() -> dict:
        v = prdc_values()
        return {k: v[k] for k in v if k not in ("precision", "recall")}

    def clip() -> dict:
        require_images()
        prompts = samples.prompts
        if cfg.features and cfg.features.startswith("embedded:"):
            extractor = extractors.get(cfg.features)
            if not hasattr(extractor, "prompt_alignment"):
                raise Unavailable(f"{cfg.features} has no prompt alignment (the CLIP-score analogue)")
            res = extractor.eval_res or cfg.eval_res
            scores = np.concatenate([extractor.prompt_alignment(batch, [prompts[i] for i in pos])
                                     for pos, batch in samples.batches(res, cfg.batch_size)])
            return {"value": float(scores.mean()), "kind": "prompt alignment (classifier reads the prompt's class)",
                    **common(extractor, len(scores), None)}
        from ddil_cli.evaluate.clip_score import clip_cosines, summarize_clip_scores
        from ddil_cli.evaluate.features import ClipExtractor, ClipModel

        try:
            model = ClipModel(extractors.options)
        except WeightsUnavailable as exc:
            raise Unavailable(str(exc)) from None
        batches = ((batch, [prompts[i] for i in pos]) for pos, batch in samples.batches(cfg.eval_res, cfg.batch_size))
        summary = summarize_clip_scores(clip_cosines(model, batches))
        info = ClipExtractor(extractors.options, model)
        return {"value": summary["clip_score"], **summary, "kind": "mean cosine(image, caption)",
                **common(info, summary["num_samples"], None), "arch": model.arch}

    def lpips_div() -> dict:
        from ddil_cli.evaluate.features import file_sha256
        from ddil_cli.evaluate.lpips_div import LpipsModel, lpips_diversity

        require_images()
        try:
            model = LpipsModel(extractors.options)
        except WeightsUnavailable as exc:
            raise Unavailable(str(exc)) from None
        groups = samples.groups()
        out = lpips_diversity(model, groups, lambda pos: samples.load(pos, cfg.eval_res), cfg.batch_size)
        if out.get("available") is False:
            raise Unavailable(out["reason"])
        return {"value": out.pop("lpips_diversity"), **out, "feature_space": "lpips-alex-v0.1",
                "weights": str(model.path), "weights_sha256": file_sha256(model.path, extractors.options.cache_dir),
                "eval_res": cfg.eval_res, "num_samples": sum(len(v) for v in groups.values() if len(v) >= 2),
                "num_reference": None}

    def lab_values() -> dict:
        if "lab" not in lab_cache:
            from ddil_cli.evaluate.lab import lab_metrics

            if not isinstance(reference, GMMReference):
                raise Unavailable("lab metrics need a Gaussian-mixture --reference such as gmm:ring:8")
            if samples.states is None:
                raise Unavailable("lab metrics need lab samples (states.npy); these samples are images")
            if samples.states.shape[1] != reference.spec.dim:
                raise UserError(f"samples have dimension {samples.states.shape[1]} but {reference.spec} has "
                                f"{reference.spec.dim}; pass the spec the samples were drawn from")
            lab_cache["lab"] = lab_metrics(samples.states, reference.mixture, samples.classes(), seed=cfg.seed)
        return lab_cache["lab"]

    def lab_common(v: dict) -> dict:
        return {"feature_space": "states (exact)", "num_samples": v["num_samples"], "num_reference": None,
                "eval_res": None, "weights_sha256": None}

    def mode_coverage() -> dict:
        v = lab_values()
        return {"value": v["mode_coverage"], "modes_covered": v["modes_covered"], "num_modes": v["num_modes"],
                "min_share": v["mode_min_share"], "mode_histogram": v["mode_histogram"], **lab_common(v)}

    def quality() -> dict:
        v = lab_values()
        return {"value": v["quality"], "quality_radius": v["quality_radius"], **lab_common(v)}

    def class_recall() -> dict:
        v = lab_values()
        if "per_class" not in v:
            raise Unavailable("the samples carry no class labels (sample with prompts 'class 0', ...)")
        return {"value": v["class_mode_recall"], "class_accuracy": v["class_accuracy"],
                "per_class": v["per_class"], **lab_common(v)}

    def swd() -> dict:
        v = lab_values()
        return {"value": v["sliced_wasserstein"], "floor": v["sliced_wasserstein_floor"],
                "num_projections": v["num_projections"], **lab_common(v), "num_reference": v["num_samples"]}

    table = {"fid": fid, "pr": pr, "dc": dc, "clip": clip, "lpips-div": lpips_div, "mode-coverage": mode_coverage,
             "quality": quality, "class-recall": class_recall, "swd": swd}
    for name in names:
        run_metric(name, table[name])

    unavailable = {k: v["reason"] for k, v in results.items() if not v["available"]}
    if unavailable and cfg.strict:
        raise UserError("--strict: unavailable metric(s): " + "; ".join(f"{k}: {v}" for k, v in unavailable.items()))
    result = {
        "samples": samples.describe(),
        "reference": reference.describe() if reference is not None else None,
        "image_prep": prep_description(cfg.eval_res) if samples.kind == "images" else None,
        "metrics": results,
        "unavailable": unavailable,
        "requested": names,
        "requested_explicitly": explicit,
        "notes": notes,
        "config": asdict(cfg),
    }
    if cfg.compare:
        other = report.load_metrics_json(cfg.compare)
        result["compare"] = {"other": str(cfg.compare), "deltas": report.compare(result, other)}
    if work is not None:
        report.write_metrics_json(Path(work) / "metrics.json", result)
    return result
