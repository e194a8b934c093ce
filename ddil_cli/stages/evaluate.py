"""`ddil evaluate`: score a `ddil sample` folder, compare with another run, write metrics.json.

The metrics and their inputs live in the evaluate layer (`evaluate/metrics.py`, registered by
name; `evaluate/run.py` `score`); this stage adds the comparison and writes the result.
"""

from __future__ import annotations

from pathlib import Path

from ddil_cli.evaluate import report
from ddil_cli.evaluate.config import EvaluateConfig
from ddil_cli.evaluate.run import score


def run_evaluate(cfg: EvaluateConfig, work: Path | None = None, *, progress=None) -> dict:
    """The metrics of `cfg.samples` (plus deltas against `cfg.compare`), written to `work/metrics.json`."""
    result = score(cfg, progress=progress)
    if cfg.compare:
        other = report.load_metrics_json(cfg.compare)
        result["compare"] = {"other": str(cfg.compare), "deltas": report.compare(result, other)}
    if work is not None:
        report.write_metrics_json(Path(work) / "metrics.json", result)
    return result
