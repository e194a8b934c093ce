"""One table from several `ddil evaluate` outputs: LABEL=EVAL_DIR ... (markdown on stdout).

Columns are each metric's headline numbers (evaluate's own `headline_numbers`) plus the
sampling cost read from the evaluated samples' manifest (seconds per image, network
evaluations per image).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from ddil_cli.evaluate.report import headline_numbers, load_metrics_json

NAMES = {"fid": "FD", "clip": "alignment", "pr.precision": "precision", "pr.recall": "recall",
         "dc.density": "density", "dc.coverage": "coverage"}


def main(argv: list[str]) -> None:
    rows, columns = [], []
    for arg in argv:
        label, _, folder = arg.partition("=")
        result = load_metrics_json(folder)
        numbers = {k: v for k, (v, _) in headline_numbers(result).items()}
        manifest = Path(result["samples"]["path"]) / "manifest.json"
        summary = json.loads(manifest.read_text()).get("summary", {}) if manifest.is_file() else {}
        numbers["s/image"] = summary.get("seconds_per_sample", float("nan"))
        numbers["NFE"] = summary.get("nfe_per_sample", float("nan"))
        columns += [c for c in numbers if c not in columns]
        rows.append((label, numbers))
    print("| model | " + " | ".join(NAMES.get(c, c) for c in columns) + " |")
    print("|---" * (len(columns) + 1) + "|")
    for label, numbers in rows:
        print(f"| {label} | " + " | ".join(f"{numbers[c]:.4g}" if c in numbers else "-" for c in columns) + " |")


if __name__ == "__main__":
    main(sys.argv[1:])
