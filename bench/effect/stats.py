"""Paired statistics of the DDIL-effect bench: one arm against another over shared seeds."""

from __future__ import annotations

import math
import statistics

from scipy import stats


def paired_comparison(base: list[float], treated: list[float], *, higher_is_better: bool,
                      confidence: float = 0.95) -> dict:
    """Paired-t comparison of `treated` against `base` (one value per shared seed).

    Returns the per-arm mean and sample std, the mean paired difference (treated - base) with its
    two-sided `confidence` interval (t quantile with n - 1 degrees of freedom), the relative
    difference (mean difference / |mean base|) and a verdict: 'better' / 'worse' when the interval
    excludes 0 on the good / bad side, 'tie' when it contains 0, 'n/a' with fewer than 2 pairs.
    """
    if len(base) != len(treated):
        raise ValueError(f"paired comparison needs equal lengths, got {len(base)} and {len(treated)}")
    n = len(base)
    diffs = [b - a for a, b in zip(base, treated)]
    mean_base, mean_treated = statistics.fmean(base), statistics.fmean(treated)
    mean_diff = statistics.fmean(diffs)
    result = {"n": n, "mean_base": mean_base, "std_base": statistics.stdev(base) if n > 1 else 0.0,
              "mean_treated": mean_treated, "std_treated": statistics.stdev(treated) if n > 1 else 0.0,
              "diff": mean_diff, "rel_diff": mean_diff / abs(mean_base) if mean_base else math.nan,
              "lo": math.nan, "hi": math.nan, "p": math.nan, "verdict": "n/a"}
    if n < 2:
        return result
    sd = statistics.stdev(diffs)
    half = stats.t.ppf(0.5 + confidence / 2, n - 1) * sd / math.sqrt(n)
    result.update(lo=mean_diff - half, hi=mean_diff + half)
    if sd == 0:
        result["p"] = 1.0 if mean_diff == 0 else 0.0
    else:
        result["p"] = float(2 * stats.t.sf(abs(mean_diff) / (sd / math.sqrt(n)), n - 1))
    if result["lo"] > 0 or result["hi"] < 0:
        result["verdict"] = "better" if (mean_diff > 0) == higher_is_better else "worse"
    else:
        result["verdict"] = "tie"
    return result


def compare_regime(records: dict[str, list[dict]]) -> dict:
    """Paired comparisons of every metric and of the per-timestep own-state error, plus overhead."""
    base, ddil = records["base"], records["ddil"]
    rows = {}
    for metric, (_, higher) in base[0]["metrics"].items():
        rows[metric] = paired_comparison([r["metrics"][metric][0] for r in base],
                                         [r["metrics"][metric][0] for r in ddil], higher_is_better=higher)
    shift = {}
    for i, step in enumerate(base[0]["direct"]):
        for key in ("err_own", "err_ref", "err_ratio"):
            shift[f"{key}@t{step['timestep']}"] = paired_comparison(
                [r["direct"][i][key] for r in base], [r["direct"][i][key] for r in ddil], higher_is_better=False)
    overhead = paired_comparison([r["wall_seconds"] for r in base], [r["wall_seconds"] for r in ddil],
                                 higher_is_better=False)
    return {"metrics": rows, "shift": shift, "overhead": overhead,
            "collect_share": statistics.fmean(r["collect_share"] for r in ddil)}
