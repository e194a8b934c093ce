"""metrics.json, the printed table, and `--compare` deltas."""

from __future__ import annotations

import math
from pathlib import Path

from rich.table import Table

from ddil_cli.atomic import write_json_atomic
from ddil_cli.errors import UserError

# the headline number(s) of each metric, in table order; higher_is_better per number
HEADLINES = {
    "fid": [("value", False)],
    "clip": [("value", True)],
    "pr": [("precision", True), ("recall", True)],
    "dc": [("density", True), ("coverage", True)],
    "lpips-div": [("value", True)],
    "mode-coverage": [("value", True)],
    "quality": [("value", True)],
    "class-recall": [("value", True)],
    "swd": [("value", False)],
}


def write_metrics_json(path: Path, result: dict) -> None:
    write_json_atomic(path, result)  # a non-finite number is written as null: strict JSON


def load_metrics_json(path: str | Path) -> dict:
    path = Path(path)
    if path.is_dir():
        path = path / "metrics.json"
    if not path.is_file():
        raise UserError(f"--compare {path} not found; pass a metrics.json or an evaluate output folder")
    from ddil_cli.atomic import from_json

    try:
        data = from_json(path.read_text())
    except ValueError as exc:
        raise UserError(f"--compare {path} is not valid JSON ({exc})") from None
    if not isinstance(data, dict) or "metrics" not in data:
        raise UserError(f"--compare {path} is not a ddil evaluate metrics.json")
    metrics = data["metrics"]
    if not isinstance(metrics, dict) or not all(isinstance(v, dict) for v in metrics.values()):
        raise UserError(f"--compare {path}: its metrics are not a table of metric entries; pass a metrics.json "
                        "written by ddil evaluate")
    return data


def headline_numbers(result: dict) -> dict[str, tuple[float, bool]]:
    """{'fid': (12.3, False), 'pr.precision': (...), ...} for available metrics."""
    out = {}
    for name, entry in result.get("metrics", {}).items():
        if not entry.get("available"):
            continue
        for key, higher in HEADLINES.get(name, [("value", True)]):
            if isinstance(entry.get(key), (int, float)):
                out[name if key == "value" else f"{name}.{key}"] = (float(entry[key]), higher)
    return out


def _protocol(entry: dict) -> tuple:
    return (entry.get("feature_space"), entry.get("eval_res"), entry.get("weights_sha256"))


def compare(result: dict, other: dict) -> list[dict]:
    """Deltas (this - other) of every headline number both runs have, flagging protocol changes."""
    ours, theirs = headline_numbers(result), headline_numbers(other)
    rows = []
    for key, (value, higher) in ours.items():
        if key not in theirs:
            continue
        name = key.split(".")[0]
        same = _protocol(result["metrics"][name]) == _protocol(other["metrics"][name])
        delta = value - theirs[key][0]
        rows.append({"metric": key, "value": value, "other": theirs[key][0], "delta": delta,
                     "better": None if delta == 0 else (delta > 0) == higher, "same_protocol": same})
    return rows


def _fmt(x) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        if math.isnan(x):
            return "nan"
        return f"{x:.4g}" if abs(x) >= 1e-3 or x == 0 else f"{x:.3e}"
    return str(x)


def metrics_table(result: dict) -> Table:
    table = Table(title=f"ddil evaluate: {result['samples']['path']}", show_lines=False)
    for col in ("metric", "value", "feature space", "samples", "reference", "res"):
        table.add_column(col, justify="right" if col in ("value", "samples", "reference", "res") else "left")
    for name, entry in result["metrics"].items():
        if not entry.get("available"):
            table.add_row(name, "[yellow]unavailable[/]", entry.get("reason", ""), "", "", "")
            continue
        heads = HEADLINES.get(name, [("value", True)])
        value = "  ".join(f"{k[0].upper()}={_fmt(entry.get(k))}" if k != "value" else _fmt(entry.get(k))
                          for k, _ in heads)
        if name == "clip" and "clip_score_x100" in entry:
            value += f" ({_fmt(entry['clip_score_x100'])} x100)"
        if name == "swd" and "floor" in entry:
            value += f" (truth vs truth {_fmt(entry['floor'])})"
        table.add_row(name, value, str(entry.get("feature_space", "")), _fmt(entry.get("num_samples")),
                      _fmt(entry.get("num_reference")), _fmt(entry.get("eval_res")))
    return table


def compare_table(rows: list[dict], other_path: str) -> Table:
    table = Table(title=f"compared with {other_path}")
    for col in ("metric", "this", "other", "delta", ""):
        table.add_column(col, justify="left" if col in ("metric", "") else "right")
    for r in rows:
        mark = "" if r["better"] is None else ("[green]better[/]" if r["better"] else "[red]worse[/]")
        if not r["same_protocol"]:
            mark += " [yellow](different protocol: not comparable)[/]"
        table.add_row(r["metric"], _fmt(r["value"]), _fmt(r["other"]), f"{r['delta']:+.4g}", mark)
    return table
