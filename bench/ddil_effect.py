"""DDIL's effect with significance: a base method vs the same method + DDIL, at equal updates.

For every regime and seed, both arms run through the stage functions the `ddil` CLI calls:
`distill` (the base arm with the base prior, `--prior data=1` for PD; the DDIL arm with
distill's defaults, i.e. its default prior schedule and collection settings), `sample` (the
student at its steps), `evaluate` (the lab's exact mixture metrics, or the digits' embedded
feature space) and `covariate-shift --settings 'direct-*'` (per student timestep, the
teacher-target error on the student's own states vs on forward-diffused data states). Both
arms share the seed: the same initialisation, data order and evaluation seeds. A new method
plugs in by name (`--method lcm`): the bench only passes `method` to `distill`; `--base-arg`
and `--ddil-arg` (KEY=VALUE, any `distill` option) change what each arm runs.

Per metric: mean +- std per arm, the paired difference (DDIL - base) with a 95% confidence
interval from the paired t distribution, and a verdict: better / worse when the interval
excludes 0 (in the metric's good direction), tie otherwise. Also the DDIL arm's collect share
and its wall-clock overhead over the base arm (paired). Results are kept per run under
--work (a rerun reuses finished runs whose recorded settings match), and the report is a
markdown file plus a PNG heat map of the paired relative difference, regimes x metrics.

    python bench/ddil_effect.py --method pd --suite lab --seeds 5 --work runs/effect-pd
    python bench/ddil_effect.py --method pd --suite digits --seeds 3 --work runs/effect-pd
    python bench/ddil_effect.py --method pd --quick          # a smoke run of both suites
    python bench/ddil_effect.py --method pd --suite lab --timing 3   # wall-clock overhead only
    python bench/ddil_effect.py --method pd --suite lab --jumps --takeover   # one PD stage, 32 -> 16/8/4/2

The map's wall-clock column compares runs that may have run at different times (a rerun reuses
finished arms); `--timing K` measures the overhead apart: K paired repeats per regime, both
arms back to back in alternating order, distill only.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import typing
from pathlib import Path

from effect.report import heat_map, report, takeover_table
from effect.runner import merged, run_arm, slug, takeover_rows, teacher_row
from effect.stats import compare_regime
from effect.suites import Suite, make_suite, method_arms
from effect.timing import timing

from ddil_cli.atomic import write_text_atomic
from ddil_cli.stages.distill import DistillConfig


def _parse_overrides(items: list[str]) -> dict:
    fields = {f.name: f for f in dataclasses.fields(DistillConfig)}
    out = {}
    for item in items or []:
        key, eq, value = item.partition("=")
        key = key.strip().lstrip("-").replace("-", "_")
        if not eq or key not in fields:
            raise SystemExit(f"error: bad override {item!r}; write KEY=VALUE with KEY a distill option")
        kind = type(getattr(DistillConfig(), key))
        if kind is type(None) and not value.strip():  # `prior=` unsets an arm's own setting (distill's default)
            out[key] = None
            continue
        if kind is type(None):  # an optional field (guidance: float | None): its annotated type
            hint = typing.get_type_hints(DistillConfig)[key]
            kind = next(a for a in typing.get_args(hint) if a is not type(None))
        if kind is dict:  # method options as JSON: options={"critic_updates": 5}
            out[key] = json.loads(value)
            continue
        out[key] = value if kind in (str, type(None)) else kind(value) if kind is not bool else value in ("1", "true")
    return out


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--method", default="pd")
    parser.add_argument("--suite", choices=("lab", "digits", "all"), default="all")
    parser.add_argument("--seeds", type=int, default=None, help="paired seeds (default: lab 5, digits 3; quick 2)")
    parser.add_argument("--regimes", default=None, help="comma-separated substrings: run only matching regimes")
    parser.add_argument("--only-seeds", default=None, metavar="S,S",
                        help="run just these seeds' arms and write no report, to split a map over processes or "
                             "machines sharing --work; a last call without it assembles the report from the cache")
    parser.add_argument("--only-arms", default=None, metavar="ARM,ARM",
                        help="with --only-seeds: just these arms (base, ddil, ...) of those seeds")
    parser.add_argument("--base-arg", action="append", default=[], help="KEY=VALUE distill override, base arm")
    parser.add_argument("--ddil-arg", action="append", default=[], help="KEY=VALUE distill override, DDIL arm")
    parser.add_argument("--set", action="append", default=[], help="KEY=VALUE distill override, both arms")
    parser.add_argument("--quick", action="store_true", help="a small smoke run")
    parser.add_argument("--jumps", action="store_true",
                        help="the jump map instead of the suite's regimes: one PD stage 32 -> 16, 8, 4, 2 "
                             "(each student step spanning 2 to 16 teacher steps) at the suite's base budget")
    parser.add_argument("--takeover", action="store_true",
                        help="also score teacher/student hand-overs at the last student timestep (who makes "
                             "the error: covariate shift or the last step itself)")
    parser.add_argument("--reflected", action="store_true",
                        help="four arms: base and DDIL, each with distill's default thresholding (reflected) and "
                             "with --threshold none (plain); reports DDIL vs base in each, reflected vs plain, "
                             "and reflected + DDIL vs plain base")
    parser.add_argument("--timing", type=int, default=0, metavar="K",
                        help="instead of the map: K paired repeats per regime of base and DDIL distill, back to "
                             "back in alternating order, reporting the wall-clock overhead (run it on a quiet machine)")
    parser.add_argument("--work", type=Path, default=Path("runs/ddil-effect"))
    parser.add_argument("--markdown", type=Path, default=None, help="write the report here (default WORK/SUITE.md)")
    parser.add_argument("--heatmap", type=Path, default=None, help="PNG (default WORK/SUITE.png)")
    return parser


def _arms(args) -> tuple[dict[str, dict], dict[str, str], list[tuple[str, str]], dict]:
    """(arms: distill overrides by arm, tags: each arm's folder suffix for the user's overrides,
    the (reference, treated) pairs compared, the overrides shared by every arm)."""
    arms = method_arms(args.method)
    user = {"base": _parse_overrides(args.base_arg), "ddil": _parse_overrides(args.ddil_arg)}
    tags = {arm: slug(json.dumps(extra, sort_keys=True)) if extra else "" for arm, extra in user.items()}
    for arm, extra in user.items():
        arms[arm].update(extra)
    comparisons = [("base", "ddil")]
    if args.reflected:
        for arm in ("base", "ddil"):
            arms[f"{arm}-plain"] = {**arms[arm], "threshold": "none"}
            tags[f"{arm}-plain"] = tags[arm]
        comparisons = [("base-plain", "ddil-plain"), ("base", "ddil"), ("base-plain", "base"),
                       ("base-plain", "ddil")]
    shared = _parse_overrides(args.set)
    if shared:
        tags = {arm: "-".join(filter(None, [tag, slug(json.dumps(shared, sort_keys=True))])) for arm, tag in tags.items()}
    return arms, tags, comparisons, shared


def _suite_path(given: Path | None, default: Path, name: str, every_suite: bool) -> Path:
    """--markdown / --heatmap, or the default; with --suite all, the suite's name in the file name."""
    if given and every_suite:
        return given.with_name(f"{given.stem}-{name}{given.suffix}")
    return given or default


def _run_suite(args, suite: Suite, seeds: int, regimes: dict[str, dict], arms: dict, tags: dict, comparisons: list,
               shared: dict, work: Path, command: str) -> None:
    """Every arm of every seed of every regime, then the report, the heat maps and the results JSON."""
    name = suite.name
    only_seeds = [int(s) for s in args.only_seeds.split(",")] if args.only_seeds else None
    results, teachers, all_records = {pair: {} for pair in comparisons}, {}, {}
    for regime, override in regimes.items():
        settings = merged(suite.base, override, shared)
        teachers[regime] = teacher_row(suite, work, settings)
        records = {arm: [] for arm in arms}
        for seed in only_seeds if only_seeds is not None else range(seeds):
            for arm, overrides in arms.items():
                if only_seeds is not None and args.only_arms and arm not in args.only_arms.split(","):
                    continue
                record = run_arm(suite, work, args.method, regime, settings, arm, overrides, seed, tags[arm])
                records[arm].append(record)
                print(f"{name} | {regime} | seed {seed} | {arm}: " + ", ".join(
                    f"{k}={v[0]:.4g}" for k, v in record["metrics"].items()) +
                    f", wall {record['wall_seconds']:.1f}s", flush=True)
        all_records[regime] = records
        if only_seeds is not None:
            continue
        for pair in comparisons:
            results[pair][regime] = compare_regime({"base": records[pair[0]], "ddil": records[pair[1]]})
            results[pair][regime]["higher"] = {k: v[1] for k, v in records["base"][0]["metrics"].items()}
    if only_seeds is not None:  # the take-overs too (cached per arm), so a split map splits them as well
        if args.takeover:
            takeover_rows(suite, work, regimes, all_records, tags)
        print(f"{name}: seeds {args.only_seeds} done; run again without --only-seeds for the report")
        return
    texts = []
    for pair in comparisons:
        suffix = "" if pair == ("base", "ddil") else f"-{pair[1]}-vs-{pair[0]}"
        text = report(suite, args.method, work, results[pair], teachers, seeds, arms, pair)
        texts.append(text)
        heatmap = _suite_path(args.heatmap, work / f"{name}.png", name, args.suite == "all")
        heatmap = heatmap.with_name(f"{heatmap.stem}{suffix}{heatmap.suffix}")
        heat_map(results[pair], heatmap, f"{pair[1]} vs {pair[0]}, {args.method.upper()}, {name} "
                                         f"({seeds} paired seeds)")
        print(text)
        print(f"wrote {heatmap}")
    if args.takeover:
        texts.append(takeover_table(takeover_rows(suite, work, regimes, all_records, tags), seeds))
        print(texts[-1])
    markdown = _suite_path(args.markdown, work / f"{name}.md", name, args.suite == "all")
    markdown.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(markdown, "\n\n".join(texts) + f"\nCommand: `{command}`\n")
    write_text_atomic(work / f"{name}.json", json.dumps(
        {"results": {f"{b} vs {a}": r for (a, b), r in results.items()}, "teachers": teachers}, indent=1))
    print(f"wrote {markdown}")


def main(argv: list[str] | None = None) -> None:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.only_arms and not args.only_seeds:
        parser.error("--only-arms needs --only-seeds (a part of the map; the report comes from a call without both)")
    arms, tags, comparisons, shared = _arms(args)
    work = args.work / args.method
    work.mkdir(parents=True, exist_ok=True)
    command = "python bench/ddil_effect.py " + " ".join(argv if argv is not None else sys.argv[1:])
    for name in ("lab", "digits") if args.suite == "all" else (args.suite,):
        suite = make_suite(name, args.quick, work, args.jumps)
        seeds = args.seeds or (2 if args.quick else (5 if name == "lab" else 3))
        regimes = {r: s for r, s in suite.regimes.items()
                   if not args.regimes or any(p.strip() in r for p in args.regimes.split(","))}
        if not args.timing:
            _run_suite(args, suite, seeds, regimes, arms, tags, comparisons, shared, work, command)
            continue
        text = timing(suite, args.method, regimes, arms, shared, args.timing, work)
        markdown = args.markdown or work / f"{name}-timing.md"
        markdown.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(markdown, text + f"\nCommand: `{command}`\n")
        print(text)
        print(f"wrote {markdown}")


if __name__ == "__main__":
    main()
