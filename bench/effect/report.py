"""The DDIL-effect report: the map (one row per regime), a section per regime, the take-over
table and the heat map of paired relative differences."""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

from effect.suites import Suite

from ddil_cli.atomic import atomic_file


def _fmt(value: float) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{value:.3g}" if abs(value) < 1000 else f"{value:.0f}"


def report(suite: Suite, method: str, work: Path, results: dict[str, dict], teachers: dict[str, dict],
           seeds: int, arms: dict, pair: tuple[str, str] = ("base", "ddil")) -> str:
    """`pair`: the two arms compared (reference, treated); PD's is base vs ddil."""
    name = {"base": method.upper(), "ddil": f"{method.upper()} + DDIL", "base-plain": f"{method.upper()} (plain)",
            "ddil-plain": f"{method.upper()} + DDIL (plain)"}
    lines = [f"### {name.get(pair[1], pair[1])} vs {name.get(pair[0], pair[0])}, suite `{suite.name}` "
             f"({seeds} paired seeds)\n",
             f"Base regime: `{json.dumps(suite.base)}`; reference arm `{json.dumps(arms[pair[0]])}`, "
             f"treated arm `{json.dumps(arms[pair[1]])}` over distill's defaults. Difference = treated - "
             "reference, 95% paired-t interval; verdict from the interval (metric's good direction). In the "
             "tables `base` is the reference arm and `+ DDIL` the treated one.\n"]
    lines.append(map_table(results, teachers))
    for regime, comparison in results.items():
        teacher = teachers[regime]
        steps = sorted(teacher)
        lines.append(f"\n#### {regime}\n")
        header = ["metric", *(f"teacher {s} steps" for s in steps), "base", "+ DDIL", "difference [95% CI]",
                  "verdict"]
        lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for metric, c in comparison["metrics"].items():
            cells = [metric, *(_fmt(teacher[s].get(metric, [math.nan])[0]) for s in steps),
                     f"{_fmt(c['mean_base'])} +- {_fmt(c['std_base'])}",
                     f"{_fmt(c['mean_treated'])} +- {_fmt(c['std_treated'])}",
                     f"{_fmt(c['diff'])} [{_fmt(c['lo'])}, {_fmt(c['hi'])}]", f"**{c['verdict']}**"
                     if c["verdict"] in ("better", "worse") else c["verdict"]]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("\nOwn-state vs data-state teacher-target error per student timestep (lower is better):\n")
        header = ["timestep", "base err_own / err_ref", "+ DDIL err_own / err_ref", "err_own difference [95% CI]",
                  "verdict"]
        lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        timesteps = sorted({k.split("@t")[1] for k in comparison["shift"]}, key=lambda t: -int(t))
        for t in timesteps:
            own, ref = comparison["shift"][f"err_own@t{t}"], comparison["shift"][f"err_ref@t{t}"]
            lines.append(f"| {t} | {_fmt(own['mean_base'])} / {_fmt(ref['mean_base'])} | "
                         f"{_fmt(own['mean_treated'])} / {_fmt(ref['mean_treated'])} | "
                         f"{_fmt(own['diff'])} [{_fmt(own['lo'])}, {_fmt(own['hi'])}] | {own['verdict']} |")
        o = comparison["overhead"]
        lines.append(f"\nDistill wall-clock of the map's runs (each ran when its cache was cold, under that "
                     f"moment's load: `--timing` measures the overhead): base {o['mean_base']:.1f} +- {o['std_base']:.1f} s, + DDIL "
                     f"{o['mean_treated']:.1f} +- {o['std_treated']:.1f} s, overhead {100 * o['rel_diff']:+.1f}% "
                     f"[{100 * o['lo'] / o['mean_base']:+.1f}%, {100 * o['hi'] / o['mean_base']:+.1f}%]; "
                     f"DAgger collection {100 * comparison['collect_share']:.1f}% of DDIL's training time.\n")
    return "\n".join(lines)


def map_table(results: dict[str, dict], teachers: dict[str, dict]) -> str:
    """One row per regime: each metric as teacher S/T steps, base -> DDIL, difference [CI] verdict;
    the own/data-state error ratio at the last student step per arm; collect share."""
    metrics = [m for m in dict.fromkeys(m for r in results.values() for m in r["metrics"])
               if any(r["metrics"][m]["std_base"] or r["metrics"][m]["std_treated"] or r["metrics"][m]["diff"]
                      for r in results.values() if m in r["metrics"])]  # constant metrics say nothing
    header = ["regime", *metrics, "last-step err_own/err_ref (base, DDIL)", "collect share",
              "wall overhead (map runs)"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for regime, r in results.items():
        steps = sorted(teachers[regime])
        cells = [regime]
        for m in metrics:
            c = r["metrics"][m]
            verdict = f"**{c['verdict']}**" if c["verdict"] in ("better", "worse") else c["verdict"]
            teacher = "/".join(_fmt(teachers[regime][s].get(m, [math.nan])[0]) for s in steps)
            cells.append(f"T {teacher}; {_fmt(c['mean_base'])} -> {_fmt(c['mean_treated'])}, "
                         f"{_fmt(c['diff'])} [{_fmt(c['lo'])}, {_fmt(c['hi'])}] {verdict}")
        last = min((k for k in r["shift"] if k.startswith("err_ratio@t")), key=lambda k: int(k.split("@t")[1]))
        cells.append(f"{_fmt(r['shift'][last]['mean_base'])}, {_fmt(r['shift'][last]['mean_treated'])}")
        cells.append(f"{100 * r['collect_share']:.1f}%")
        o = r["overhead"]
        cells.append(f"{100 * o['rel_diff']:+.0f}% [{100 * o['lo'] / o['mean_base']:+.0f}%, "
                     f"{100 * o['hi'] / o['mean_base']:+.0f}%]")
        lines.append("| " + " | ".join(cells) + " |")
    return ("\nThe map (T a/b: the teacher's own numbers at the student's and at its own step count; then "
            "base -> DDIL means, the paired difference DDIL - base with its 95% interval, the verdict):\n\n"
            + "\n".join(lines) + "\n")


def heat_map(results: dict[str, dict], path: Path, title: str) -> None:
    """Regimes x metrics, colour = paired relative difference signed so that + is DDIL better."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    regimes = list(results)
    metrics = list(dict.fromkeys(m for r in results.values() for m in r["metrics"]))
    shift_cols = sorted({k for r in results.values() for k in r["shift"] if k.startswith("err_own@")},
                        key=lambda k: -int(k.split("@t")[1]))
    columns = metrics + shift_cols
    values = np.full((len(regimes), len(columns)), np.nan)
    marks = [["" for _ in columns] for _ in regimes]
    for i, regime in enumerate(regimes):
        for j, col in enumerate(columns):
            c = results[regime]["metrics"].get(col) or results[regime]["shift"].get(col)
            if c is None:
                continue
            sign = (1.0 if results[regime]["higher"][col] else -1.0) if col in metrics else -1.0
            values[i, j] = 100 * sign * c["rel_diff"]
            marks[i][j] = {"better": "+", "worse": "-"}.get(c["verdict"], "")
    # colours saturate at +-50% so that one huge relative change does not wash out the rest
    limit = min(50.0, max(5.0, float(np.nanmax(np.abs(values))))) if np.isfinite(values).any() else 5.0
    fig, ax = plt.subplots(figsize=(1.1 * len(columns) + 3, 0.55 * len(regimes) + 2), dpi=110)
    image = ax.imshow(np.clip(values, -limit, limit), cmap="RdYlGn", vmin=-limit, vmax=limit, aspect="auto")
    ax.set_xticks(range(len(columns)), [c.replace("@t", "\n@t") for c in columns], rotation=45, ha="right",
                  fontsize=8)
    ax.set_yticks(range(len(regimes)), regimes, fontsize=8)
    for i in range(len(regimes)):
        for j in range(len(columns)):
            if np.isfinite(values[i, j]):
                ax.text(j, i, f"{values[i, j]:+.0f}%{marks[i][j]}", ha="center", va="center", fontsize=7)
    fig.colorbar(image, ax=ax, label="DDIL vs base, % (green: DDIL better)")
    ax.set_title(title + "\n+/- : 95% paired-t interval excludes 0", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


def takeover_table(tables: dict[str, dict[str, list[dict]]], seeds: int) -> str:
    """Mean over seeds of each metric for: the teacher alone, the student alone, s2t, t2s, per arm
    (`tables`: runner.takeover_rows)."""
    lines = ["\n#### Who makes the error (`--takeover`)\n",
             "At the student's last timestep t: `s2t` = the student drives to t, the exact teacher (its own "
             "fine steps) from there; `t2s` = the teacher drives to t, the student takes the last step. "
             f"Means over {seeds} seeds.\n"]
    header = None
    for regime, by_arm in tables.items():
        for arm, arm_tables in by_arm.items():
            metrics = [m for m in arm_tables[0]["beta-0"] if m not in ("value", "teacher_share", "nfe_per_sample")]
            if header is None:
                header = ["regime", "arm", *(f"{m}: teacher / student / s2t / t2s" for m in metrics)]
                lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
            cells = [regime, arm]
            for m in metrics:
                cells.append(" / ".join(_fmt(statistics.fmean(t[k][m] for t in arm_tables))
                                        for k in ("beta-1", "beta-0", "s2t", "t2s")))
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
