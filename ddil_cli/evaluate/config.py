"""What `ddil evaluate` was asked: one dataclass, below every evaluate module that reads it.

It carries the command's own fields too (`compare`, `out`, `quiet`, `overwrite`) because `score`
records the whole config in metrics.json; the scoring modules read only the rest.
"""

from __future__ import annotations

from dataclasses import dataclass


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
    workers: int | None = None  # image decoding processes (None: 0 here; the CLI picks by cores)
    seed: int = 0
    device: str = "cpu"
    out: str = "evaluation"
    quiet: bool = False
    overwrite: bool = False

