"""One evaluation's shared state: the inputs, the feature extractors and every cache.

Metrics (`evaluate/metrics.py`) ask the context for what they need; each feature space is built
once, each side's features are extracted once per space, reference statistics are computed once
per space (and cached on disk across runs, keyed by everything that determines them), and a value
two metrics share (precision/recall and density/coverage come from one k-NN computation; the
four lab metrics from one pass) is computed once.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from pathlib import Path
from typing import Callable

import numpy as np

from ddil_cli.atomic import save_npz_atomic, to_json
from ddil_cli.errors import UserError
from ddil_cli.evaluate.config import EvaluateConfig
from ddil_cli.evaluate.features import (ExtractorOptions, FeatureExtractor, WeightsUnavailable,
                                        build_feature_extractor, default_cache_dir)
from ddil_cli.evaluate.frechet import GaussianStats
from ddil_cli.evaluate.images import prep_description
from ddil_cli.evaluate.inputs import GMMReference, ImageReference, SampleSet, StatsReference, stats_problem

STATS_VERSION = 1


class Unavailable(Exception):
    """Why one metric cannot run here (carried into metrics.json as its reason)."""


def cache_dir(cfg: EvaluateConfig) -> Path:
    return Path(cfg.cache_dir) if cfg.cache_dir else default_cache_dir()


def extractor_options(cfg: EvaluateConfig) -> ExtractorOptions:
    return ExtractorOptions(device=cfg.device, batch_size=cfg.batch_size, inception=cfg.inception,
                            dinov2=cfg.dinov2, dinov2_repo=cfg.dinov2_repo, clip=cfg.clip, clip_arch=cfg.clip_arch,
                            lpips_backbone=cfg.lpips_backbone, digits_classifier=cfg.digits_classifier,
                            cache_dir=str(cache_dir(cfg)))


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


# ---- reference statistics (cached on disk) ----------------------------------------------------

def _stats_key(reference: ImageReference, extractor: FeatureExtractor, res: int, cfg: EvaluateConfig) -> str:
    key = {"version": STATS_VERSION, "manifest": reference.source.manifest_hash(), "space": extractor.name,
           "weights_sha256": extractor.weights_sha256, "eval_res": res, "prep": prep_description(res),
           "prdc_max": cfg.prdc_max, "seed": cfg.seed}
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()


def subsample(x: np.ndarray, limit: int, seed: int) -> np.ndarray:
    """At most `limit` rows, a seeded random subset in their original order."""
    if len(x) <= limit:
        return x
    idx = np.sort(np.random.default_rng(seed).choice(len(x), limit, replace=False))
    return x[idx]


def _stats_path(reference: ImageReference, extractor: FeatureExtractor, res: int, cfg: EvaluateConfig) -> Path:
    key = _stats_key(reference, extractor, res, cfg)
    return cache_dir(cfg) / "reference-stats" / f"{extractor.name.replace(':', '-')}-{res}-{key[:20]}.npz"


def cached_reference_stats(path: Path, cfg: EvaluateConfig) -> tuple[GaussianStats, np.ndarray, dict] | None:
    if not path.is_file() or cfg.no_cache:
        return None
    try:
        with np.load(path, allow_pickle=False) as data:
            problem = stats_problem(data)
            if problem is not None:
                raise ValueError(problem)
            meta = json.loads(str(data["meta"]))
            return (GaussianStats(data["mu"], data["sigma"], int(meta["num"])), data["features"],
                    {"cache": str(path), "cache_hit": True})
    except (OSError, ValueError, KeyError, EOFError, TypeError) as exc:  # a damaged cache entry is recomputed
        warnings.warn(f"reference statistics cache {path} is unreadable ({exc}); recomputing it")
        return None


def reference_stats(reference: ImageReference, extractors: list[tuple[FeatureExtractor, int]], cfg: EvaluateConfig,
                    progress=None, workers: int = 0) -> dict[str, tuple[GaussianStats, np.ndarray, dict]]:
    """{space: (Gaussian stats over all reference images, features subsampled to prdc_max, info)}
    for (extractor, eval_res) pairs: read from the cache (keyed by the reference's content hash,
    the weights and the protocol), the rest computed in one pass over the reference images."""
    found, missing = {}, []
    for extractor, res in extractors:
        hit = cached_reference_stats(_stats_path(reference, extractor, res, cfg), cfg)
        if hit is not None:
            found[extractor.name] = hit
        else:
            missing.append((extractor, res))
    if not missing:
        return found
    names = ", ".join(e.name for e, _ in missing)
    task = progress.add_task(f"reference {names}", total=len(reference.source)) if progress else None
    feats: dict[str, list] = {e.name: [] for e, _ in missing}
    for batch in reference.source.prepared([res for _, res in missing], cfg.batch_size, workers):
        for extractor, res in missing:
            feats[extractor.name].append(extractor.features(batch[res]))
        if task is not None:
            progress.advance(task, len(next(iter(batch.values()))))
    for extractor, res in missing:
        features = np.concatenate(feats[extractor.name])
        stats = GaussianStats.from_features(features)
        kept = subsample(features, cfg.prdc_max, cfg.seed).astype(np.float32)
        meta = {"feature_space": extractor.name, "weights_sha256": extractor.weights_sha256, "eval_res": res,
                "num": stats.num, "reference": reference.describe(), "image_prep": prep_description(res),
                "stats_version": STATS_VERSION}
        path = _stats_path(reference, extractor, res, cfg)
        if not cfg.no_cache:
            path.parent.mkdir(parents=True, exist_ok=True)
            save_npz_atomic(path, mu=stats.mu, sigma=stats.sigma, features=kept, meta=np.array(to_json(meta)))
        found[extractor.name] = (stats, kept, {"cache": None if cfg.no_cache else str(path), "cache_hit": False})
    return found


# ---- the context ------------------------------------------------------------------------------

class EvaluationContext:
    """The inputs of one `ddil evaluate` run and the caches its metrics share."""

    def __init__(self, cfg: EvaluateConfig, samples: SampleSet, reference, progress=None):
        self.cfg, self.samples, self.reference, self.progress = cfg, samples, reference, progress
        self.extractors = Extractors(extractor_options(cfg))
        self.notes: list[str] = []
        self._sample_features: dict[str, np.ndarray] = {}
        self._reference_stats: dict[str, tuple] = {}
        self._shared: dict[str, dict] = {}
        self.planned: list[str] = []  # the image feature spaces the requested metrics use
        self.alignment_space: str | None = None  # an embedded space whose prompt alignment is asked for
        self._alignment: dict[str, np.ndarray] = {}

    def plan(self, spaces: list[str], alignment: str | None = None) -> None:
        """The feature spaces this run's metrics will ask for: the first ask extracts them all in
        one pass over the images (each decoded once), the samples' and the reference's; in that
        pass the space `alignment` also scores each sample against its prompt."""
        self.planned = list(dict.fromkeys(spaces))
        self.alignment_space = alignment

    def _image_extractors(self, first: FeatureExtractor, done) -> list[FeatureExtractor]:
        """`first` and every other planned image space that builds here and is not done yet."""
        found = [first]
        for space in self.planned:
            try:
                extractor = self.extractors.get(space)
            except Unavailable:
                continue  # its metrics report it
            if extractor.input_kind == "images" and extractor.name not in done and \
                    all(extractor.name != e.name for e in found):
                found.append(extractor)
        return found

    # what a metric may require
    def require_images(self) -> None:
        if self.samples.kind != "images":
            raise Unavailable("these samples are lab states, not images; use a gmm: --reference for lab metrics")

    def require_states(self) -> None:
        if self.samples.states is None:
            raise Unavailable("lab metrics need lab samples (states.npy); these samples are images")

    def image_reference(self) -> ImageReference | StatsReference:
        if isinstance(self.reference, (ImageReference, StatsReference)):
            return self.reference
        raise Unavailable("needs an image reference: pass --reference with an image folder, shards or a stats .npz")

    def gmm_reference(self) -> GMMReference:
        if not isinstance(self.reference, GMMReference):
            raise Unavailable("lab metrics need a Gaussian-mixture --reference such as gmm:ring:8")
        return self.reference

    def eval_res(self, extractor: FeatureExtractor) -> int:
        return extractor.eval_res or self.cfg.eval_res

    # cached computations
    def sample_features(self, extractor: FeatureExtractor) -> np.ndarray:
        """The samples' features in `extractor`'s space (lab states go in raw for a states extractor)."""
        if extractor.name not in self._sample_features:
            samples = self.samples
            if extractor.input_kind == "states":
                if samples.states is None:
                    raise Unavailable(f"{extractor.name} reads lab states; these samples are images")
                self._sample_features[extractor.name] = extractor.features(samples.states)
            else:
                self.require_images()
                self._extract_samples(self._image_extractors(extractor, self._sample_features))
        return self._sample_features[extractor.name]

    def _extract_samples(self, extractors: list[FeatureExtractor]) -> None:
        """Every extractor's features of the samples, in one pass: each image opened once."""
        progress = self.progress
        names = ", ".join(e.name for e in extractors)
        task = progress.add_task(f"samples {names}", total=len(self.samples.rows)) if progress else None
        feats: dict[str, list] = {e.name: [] for e in extractors}
        resolutions = [self.eval_res(e) for e in extractors]
        aligned = [e for e in extractors if e.name == self.alignment_space and hasattr(e, "prompt_alignment")]
        scores: list = []
        prompts = self.samples.prompts
        for positions, batch in self.samples.prepared(resolutions, self.cfg.batch_size, self.cfg.workers or 0):
            for extractor in extractors:
                feats[extractor.name].append(extractor.features(batch[self.eval_res(extractor)]))
            for extractor in aligned:
                scores.append(extractor.prompt_alignment(batch[self.eval_res(extractor)], [prompts[i] for i in positions]))
            if task is not None:
                progress.advance(task, len(positions))
        for extractor in extractors:
            self._sample_features[extractor.name] = np.concatenate(feats[extractor.name])
        for extractor in aligned:
            self._alignment[extractor.name] = np.concatenate(scores)

    def prompt_alignment(self, extractor: FeatureExtractor) -> np.ndarray:
        """Each sample's `prompt_alignment` score in an embedded space (the CLIP-score analogue)."""
        if extractor.name not in self._alignment:
            if extractor.name in self._sample_features:  # extracted before the alignment was planned
                del self._sample_features[extractor.name]
            self.alignment_space = extractor.name
            self.require_images()
            self._extract_samples([extractor])
        return self._alignment[extractor.name]

    def reference_for(self, extractor: FeatureExtractor) -> tuple[GaussianStats, np.ndarray | None, dict]:
        """(reference Gaussian stats, reference features or None, info) in `extractor`'s space."""
        ref = self.image_reference()
        res = self.eval_res(extractor)
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
        if extractor.name not in self._reference_stats:
            wanted = self._image_extractors(extractor, self._reference_stats)
            self._reference_stats.update(reference_stats(ref, [(e, self.eval_res(e)) for e in wanted], self.cfg,
                                                         self.progress, self.cfg.workers or 0))
        return self._reference_stats[extractor.name]

    def shared(self, key: str, compute: Callable[[], dict]) -> dict:
        """A value several metrics report parts of, computed once (a failure is not cached)."""
        if key not in self._shared:
            self._shared[key] = compute()
        return self._shared[key]

    def describe_features(self, extractor, n_samples: int, n_ref: int | None) -> dict:
        """The fields every feature-space metric records, so runs are only compared like with like."""
        return {"feature_space": extractor.name, "feature_description": extractor.description,
                "weights": extractor.weights_path, "weights_sha256": extractor.weights_sha256,
                "eval_res": self.eval_res(extractor), "num_samples": n_samples, "num_reference": n_ref}
