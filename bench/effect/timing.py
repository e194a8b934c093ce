"""The DDIL arm's wall-clock overhead at equal updates, measured apart from the map (`--timing K`)."""

from __future__ import annotations

import statistics
import time
from pathlib import Path

from effect.runner import merged
from effect.stats import paired_comparison
from effect.suites import Suite

from ddil_cli.stages.distill import DistillConfig, run_distill


def _relative(o: dict) -> str:
    """A paired comparison's mean difference and interval, relative to the base mean."""
    return (f"{100 * o['rel_diff']:+.1f}% [{100 * o['lo'] / o['mean_base']:+.1f}%, "
            f"{100 * o['hi'] / o['mean_base']:+.1f}%]")


def timing(suite: Suite, method: str, regimes: dict[str, dict], arms: dict[str, dict], shared: dict,
           repeats: int, work: Path) -> str:
    """Wall-clock overhead of the DDIL arm at equal updates, measured apart from the map.

    The map's arms run whenever their cache is cold, under whatever else the machine runs, so their
    wall-clock ratio mixes DDIL's cost with the load. Here each repeat runs both arms back to back
    with the same seed, in alternating order (base first on even repeats), distill only, fresh
    folders: the paired difference then cancels slow drifts of the machine's load.
    """
    import tempfile

    lines = [f"\n### Wall-clock overhead, {suite.name} ({repeats} paired repeats, alternating order)\n",
             "| regime | base s | + DDIL s | overhead [95% CI] | CPU overhead [95% CI] | collect share |",
             "|---|---|---|---|---|---|"]

    def run(settings: dict, arm: str, seed: int) -> tuple[float, float, dict]:
        with tempfile.TemporaryDirectory(dir=work) as tmp:
            cfg = DistillConfig(**{"method": method, "data": suite.data, "seed": seed, "quiet": True,
                                   "out": str(Path(tmp) / "run"), **merged(settings, arms[arm])})
            # CPU time beside wall-clock: on a shared machine identical work took 8% more wall
            # time from one run to the next; the process's CPU seconds do not count others' load
            start, cpu_start = time.perf_counter(), time.process_time()
            summary = run_distill(cfg)
            return time.perf_counter() - start, time.process_time() - cpu_start, summary

    if not regimes:
        return "\nNo regime matched --regimes.\n"
    # a short discarded run of each arm: the first pays for imports and lazily built kernels
    first = merged(suite.base, next(iter(regimes.values())), shared)
    for arm in ("base", "ddil"):
        run({**first, "max_updates": max(1, first["max_updates"] // 10)}, arm, 0)
    for regime, override in regimes.items():
        settings = merged(suite.base, override, shared)
        walls: dict[str, list[float]] = {"base": [], "ddil": []}
        cpus: dict[str, list[float]] = {"base": [], "ddil": []}
        shares = []
        for repeat in range(repeats):
            for arm in (("base", "ddil") if repeat % 2 == 0 else ("ddil", "base")):
                wall, cpu, summary = run(settings, arm, repeat)
                walls[arm].append(wall)
                cpus[arm].append(cpu)
                if arm == "ddil":
                    shares.append(summary["collect_share"])
                print(f"timing | {suite.name} | {regime} | repeat {repeat} | {arm}: {wall:.2f}s wall, {cpu:.2f}s CPU",
                      flush=True)
        o = paired_comparison(walls["base"], walls["ddil"], higher_is_better=False)
        c = paired_comparison(cpus["base"], cpus["ddil"], higher_is_better=False)
        lines.append(f"| {regime} | {o['mean_base']:.2f} +- {o['std_base']:.2f} | {o['mean_treated']:.2f} +- "
                     f"{o['std_treated']:.2f} | {_relative(o)} | {_relative(c)} | {100 * statistics.fmean(shares):.1f}% |")
    return "\n".join(lines) + "\n"
