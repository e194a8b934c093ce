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
import math
import statistics
import sys
import time
import typing
from pathlib import Path

from scipy import stats

from ddil_cli.evaluate.report import headline_numbers
from ddil_cli.evaluate.config import EvaluateConfig
from ddil_cli.evaluate.run import score
from ddil_cli.sample_folder import SampleConfig
from ddil_cli.stages.distill import DistillConfig, run_distill
from ddil_cli.stages.sample import run_sample
from ddil_cli.stages.shift import ShiftConfig, run_shift

# ---- statistics -------------------------------------------------------------------------------


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


# ---- suites and regimes -----------------------------------------------------------------------

LAB_BASE = {"teacher": "gmm:ring:8:d8", "teacher_steps": 32, "steps": 4, "max_updates": 1200, "batch_size": 256,
            "lr": 1e-3}
LAB_REGIMES = {  # one factor at a time from the base
    "base (d8, 32->4, 1200 upd, batch 256)": {},
    "dim 2": {"teacher": "gmm:ring:8"},
    "dim 32": {"teacher": "gmm:ring:8:d32"},
    "short (300 upd)": {"max_updates": 300},
    "batch 64": {"batch_size": 64},
    "2 steps (32->2)": {"steps": 2},
    "long (2400 upd)": {"max_updates": 2400},
    # a harder mode structure: 25 narrow modes on a grid, 5 classes of 5, in 32 dimensions
    "grid 25, d32": {"teacher": "gmm:grid:25:d32:std0.03"},
}
DIGITS_BASE = {"teacher": "embedded:digits", "teacher_steps": 32, "steps": 4, "max_updates": 360, "batch_size": 32,
               "lr": 1e-4, "collect_every": 40, "rollouts_per_collect": 16}
DIGITS_REGIMES = {
    "main job (32->4, 360 upd)": {},
    "short (120 upd, 32->4)": {"max_updates": 120},
    # a harder setting: four halvings on a small budget, where the student's states may drift
    "2 steps, short (160 upd, 32->2)": {"steps": 2, "max_updates": 160},
}


def jump_regimes(teacher_steps: int) -> dict[str, dict]:
    """`--jumps`: one PD stage from the teacher's steps, each student step spanning 2, 4, 8 or 16
    teacher steps (--pd-stages T,N; the jumps T allows), at the suite's base budget: does
    covariate shift grow with the jump, and does DDIL remove it? From the suite's own teacher
    steps, so the quick digits suite (an 8-step teacher) gets jumps 2, 4 and 8."""
    return {f"jump {jump} (1 stage {teacher_steps}->{teacher_steps // jump})":
            {"steps": teacher_steps // jump, "options": {"pd_stages": f"{teacher_steps},{teacher_steps // jump}"}}
            for jump in (2, 4, 8, 16) if teacher_steps % jump == 0}


QUICK = {"lab": ({**LAB_BASE, "max_updates": 300},
                 {"base": {}, "2 steps": {"steps": 2, "max_updates": 200}}),
         "digits": ({**DIGITS_BASE, "max_updates": 24, "collect_every": 8, "rollouts_per_collect": 4,
                     "teacher_steps": 8}, {"main": {}})}
# the arms per method: DistillConfig overrides; a method not named here gets the PD ones
ARMS = {"pd": {"base": {"prior": "data=1"}, "ddil": {}},
        # LCM: teacher-forced vs the paper's half batches from the student's own LCM rollouts
        "lcm": {"base": {"prior": "data=1"}, "ddil": {"prior": "data=0.5,student=0.5", "student_prob": "1"}},  # = lcm's defaults
        # DMD2: its own backward simulation vs DDIL's student and teacher states (DMD2's default here)
        "dmd2": {"base": {"prior": "student=1", "student_prob": "1"}, "ddil": {}}}


@dataclasses.dataclass
class Suite:
    name: str
    base: dict
    regimes: dict[str, dict]
    per_prompt: int  # samples per class / digit for evaluation
    shift_samples: int
    data: str | None = None  # training shards (digits)
    reference: str | None = None  # evaluation reference (digits: held-out shards)
    features: str | None = None
    metrics: list[str] | None = None


def make_suite(name: str, quick: bool, work: Path, jumps: bool = False) -> Suite:
    base, regimes = QUICK[name] if quick else ((LAB_BASE, LAB_REGIMES) if name == "lab" else
                                               (DIGITS_BASE, DIGITS_REGIMES))
    if jumps:
        regimes = jump_regimes(base["teacher_steps"])
    if name == "lab":
        return Suite(name, base, regimes, per_prompt=64 if quick else 256, shift_samples=256 if quick else 1000)
    from ddil_cli.data.digits import build_digits_shards, digit_prompt, split_source

    data_dir = work / "digits-data"
    if not (data_dir / "digits.json").is_file():
        build_digits_shards(data_dir)
    (work / "digit-prompts.txt").write_text("\n".join(digit_prompt(d) for d in range(10)) + "\n")
    return Suite(name, base, regimes, per_prompt=5 if quick else 50, shift_samples=40 if quick else 200,
                 data=split_source(data_dir, "train"), reference=split_source(data_dir, "heldout"),
                 features="embedded:digits", metrics=["fid", "pr", "dc"])


# ---- one run ----------------------------------------------------------------------------------


def _numbers(result: dict) -> dict[str, list]:
    return {k: [v, higher] for k, (v, higher) in headline_numbers(result).items()}


def merged(*layers: dict) -> dict:
    """Distill settings layered left to right; the method's `options` merge key by key, so that
    an arm's or --set's options (ddil_from_stage) keep a regime's (pd_stages)."""
    out: dict = {}
    for layer in layers:
        options = {**(out.get("options") or {}), **(layer.get("options") or {})}
        out.update(layer)
        if options:
            out["options"] = options
    return out


def _sample_and_evaluate(suite: Suite, work: Path, folder: Path, teacher: str, student: str | None, steps: int,
                         teacher_steps: int, guidance: float | None = None) -> dict:
    """`guidance` None: a student samples at the w it was distilled at, the teacher at its default."""
    samples = folder / "samples"
    if samples.exists():
        import shutil

        shutil.rmtree(samples)
    samples.mkdir(parents=True)
    prompts = str(work / "digit-prompts.txt") if suite.name == "digits" else None
    summary = run_sample(SampleConfig(teacher=teacher, student=student, steps=steps, teacher_steps=teacher_steps,
                                      guidance=guidance, prompts=prompts, num_per_prompt=suite.per_prompt,
                                      batch_size=512, quiet=True, out=str(samples)), samples)
    result = score(EvaluateConfig(samples=str(samples), reference=suite.reference or teacher,
                                     features=suite.features, metrics=suite.metrics, quiet=True,
                                     out=str(folder / "eval")))
    return {"metrics": _numbers(result), "seconds_per_sample": summary.get("seconds_per_sample")}


# settings a run that collected nothing (teacher-forced, data=1) does not depend on
COLLECTION_KEYS = {"collect_every", "rollouts_per_collect", "buffer_size", "student_prob", "prompts"}


def cache_matches(record: dict, cfg: DistillConfig) -> bool:
    """A cached arm counts only if it ran with these settings: a changed regime definition (the
    digits suite's collection settings, say) must not reuse runs made under the old one."""
    # through JSON, as the record was stored; a field the cached run predates had its default
    # (not `data`: the suite builds it inside the work folder, so a copied cache names another path)
    defaults = json.loads(json.dumps(dataclasses.asdict(DistillConfig())))
    wanted = json.loads(json.dumps({k: v for k, v in dataclasses.asdict(cfg).items()
                                    if k not in ("out", "overwrite", "data")}))
    cached = {k: record.get("config", {}).get(k, defaults[k]) for k in wanted}
    differ = {k for k in wanted if wanted[k] != cached[k]}
    return not differ or (differ <= COLLECTION_KEYS and record.get("collect_seconds", 1) == 0)


def run_arm(suite: Suite, work: Path, method: str, regime: str, settings: dict, arm: str, overrides: dict,
            seed: int, tag: str = "") -> dict:
    """One arm of one seed; `tag` names the user's overrides of this arm, so they get their own folder."""
    folder = arm_folder(work, suite, regime, seed, arm, tag)
    done = folder / "result.json"
    cfg = DistillConfig(**{"method": method, "data": suite.data, "seed": seed, "quiet": True,
                           "out": str(folder / "run"), "overwrite": True, **merged(settings, overrides)})
    if done.is_file():
        record = json.loads(done.read_text())
        if cache_matches(record, cfg):
            return record
        print(f"{suite.name} | {regime} | seed {seed} | {arm}: cached under other settings, run again", flush=True)
    start = time.perf_counter()
    summary = run_distill(cfg)
    wall = time.perf_counter() - start
    student = str(folder / "run" / "student")
    record = _sample_and_evaluate(suite, work, folder, cfg.teacher, student, cfg.steps, cfg.teacher_steps)
    shift_out = folder / "shift"
    run_shift(ShiftConfig(teacher=cfg.teacher, student=student, student_label=arm, steps=cfg.steps,
                          teacher_steps=cfg.teacher_steps, settings=["direct-*"], data=suite.data,
                          shift_samples=suite.shift_samples, seed=seed, quiet=True, out=str(shift_out),
                          prompts=str(work / "digit-prompts.txt") if suite.name == "digits" else None))
    direct = json.loads(next((shift_out / "direct").glob("*/setting.json")).read_text())["rows"]
    record.update(regime=regime, arm=arm, seed=seed, config={k: v for k, v in dataclasses.asdict(cfg).items()},
                  wall_seconds=wall, collect_share=summary["collect_share"],
                  collect_seconds=sum(p["collect_seconds"] for p in summary["phases"]),
                  train_seconds=sum(p["train_seconds"] for p in summary["phases"]),
                  direct=[r for r in direct if r["timestep"] >= 0])
    done.write_text(json.dumps(record, indent=1))
    import shutil

    for heavy in ("samples", "run/checkpoints", "run/buffer"):  # keep metrics.jsonl, stages and the student
        shutil.rmtree(folder / heavy, ignore_errors=True)
    return record


def takeover(suite: Suite, work: Path, record: dict, folder: Path) -> dict[str, dict[str, float]]:
    """Who makes the error: the student alone (beta-0), the exact teacher taking over from the
    student's own state at its last timestep (s2t), and the student's last step from the teacher's
    own state there (t2s), each scored like the run. s2t near the teacher alone says the student's
    states are where the teacher's are (no covariate shift to correct); t2s near the student alone
    says its error is made in the last step, on the teacher's distribution."""
    out = folder / "takeover"
    table = out / "table.csv"
    if not table.is_file():
        cfg = record["config"]
        from ddil_cli.rollout import Grid

        last = Grid.make(cfg["steps"], cfg["teacher_steps"]).student[-1]
        run_shift(ShiftConfig(teacher=cfg["teacher"], student=str(folder / "run" / "student"), steps=cfg["steps"],
                              teacher_steps=cfg["teacher_steps"], settings=["beta-1", "beta-0", f"s2t-{last}", f"t2s-{last}"],
                              betas="0", switch_at=str(last), metrics=",".join(suite.metrics or []) or None,
                              reference=suite.reference, features=suite.features, data=suite.data,
                              num_per_prompt=suite.per_prompt, seed=record["seed"], quiet=True, out=str(out),
                              prompts=str(work / "digit-prompts.txt") if suite.name == "digits" else None))
        import shutil

        shutil.rmtree(out / "settings", ignore_errors=True)
    import csv

    rows = {}
    with open(table) as handle:
        for row in csv.DictReader(handle):
            name = row["setting"].split("-")[0] if row["kind"] != "beta" else row["setting"]
            rows[name] = {k: float(v) for k, v in row.items() if k not in ("setting", "kind", "description")
                          and v not in ("", None)}
    return rows


def takeover_table(suite: Suite, work: Path, method: str, regimes: dict[str, dict], seeds: int,
                   records_by_regime: dict[str, dict[str, list[dict]]], tags: dict[str, str]) -> str:
    """Mean over seeds of each metric for: the teacher alone, the student alone, s2t, t2s, per arm."""
    lines = ["\n#### Who makes the error (`--takeover`)\n",
             "At the student's last timestep t: `s2t` = the student drives to t, the exact teacher (its own "
             "fine steps) from there; `t2s` = the teacher drives to t, the student takes the last step. "
             f"Means over {seeds} seeds.\n"]
    header = None
    for regime in regimes:
        for arm, tag in tags.items():
            tables = [takeover(suite, work, r, arm_folder(work, suite, regime, r["seed"], arm, tag))
                      for r in records_by_regime[regime][arm]]
            metrics = [m for m in tables[0]["beta-0"] if m not in ("value", "teacher_share", "nfe_per_sample")]
            if header is None:
                header = ["regime", "arm", *(f"{m}: teacher / student / s2t / t2s" for m in metrics)]
                lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
            cells = [regime, arm]
            for m in metrics:
                cells.append(" / ".join(_fmt(statistics.fmean(t[k][m] for t in tables))
                                        for k in ("beta-1", "beta-0", "s2t", "t2s")))
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def arm_folder(work: Path, suite: Suite, regime: str, seed: int, arm: str, tag: str = "") -> Path:
    return work / suite.name / _slug(regime) / f"seed{seed}" / (f"{arm}-{tag}" if tag else arm)


def teacher_row(suite: Suite, work: Path, settings: dict) -> dict:
    """The teacher's own numbers at the student's and at its own step count (cached per spec)."""
    out = {}
    guidance = settings.get("guidance")  # `--set guidance=W`: the teacher at the students' w
    for steps in (settings["steps"], settings["teacher_steps"]):
        name = f"{_slug(settings['teacher'])}-{steps}" + ("" if guidance is None else f"-w{guidance:g}")
        folder = work / suite.name / "teacher" / name
        done = folder / "result.json"
        if not done.is_file():
            record = _sample_and_evaluate(suite, work, folder, settings["teacher"], None, steps, steps, guidance)
            done.write_text(json.dumps(record))
            import shutil

            shutil.rmtree(folder / "samples", ignore_errors=True)
        out[steps] = json.loads(done.read_text())["metrics"]
    return out


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in text).strip("-")


# ---- the report -------------------------------------------------------------------------------


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
    fig.savefig(path)
    plt.close(fig)


# ---- timing -------------------------------------------------------------------------------------


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


# ---- main -------------------------------------------------------------------------------------


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


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--method", default="pd")
    parser.add_argument("--suite", choices=("lab", "digits", "all"), default="all")
    parser.add_argument("--seeds", type=int, default=None, help="paired seeds (default: lab 5, digits 3; quick 2)")
    parser.add_argument("--regimes", default=None, help="comma-separated substrings: run only matching regimes")
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
    args = parser.parse_args(argv)
    arms = {k: dict(v) for k, v in ARMS.get(args.method, ARMS["pd"]).items()}
    user = {"base": _parse_overrides(args.base_arg), "ddil": _parse_overrides(args.ddil_arg)}
    tags = {arm: _slug(json.dumps(extra, sort_keys=True)) if extra else "" for arm, extra in user.items()}
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
        tags = {arm: "-".join(filter(None, [tag, _slug(json.dumps(shared, sort_keys=True))])) for arm, tag in tags.items()}
    work = args.work / args.method
    work.mkdir(parents=True, exist_ok=True)
    for name in ("lab", "digits") if args.suite == "all" else (args.suite,):
        suite = make_suite(name, args.quick, work, args.jumps)
        seeds = args.seeds or (2 if args.quick else (5 if name == "lab" else 3))
        regimes = {r: s for r, s in suite.regimes.items()
                   if not args.regimes or any(p.strip() in r for p in args.regimes.split(","))}
        if args.timing:
            text = timing(suite, args.method, regimes, arms, shared, args.timing, work)
            command = "python bench/ddil_effect.py " + " ".join(argv if argv is not None else sys.argv[1:])
            markdown = args.markdown or work / f"{name}-timing.md"
            markdown.parent.mkdir(parents=True, exist_ok=True)
            markdown.write_text(text + f"\nCommand: `{command}`\n")
            print(text)
            print(f"wrote {markdown}")
            continue
        results, teachers, all_records = {pair: {} for pair in comparisons}, {}, {}
        for regime, override in regimes.items():
            settings = merged(suite.base, override, shared)
            teachers[regime] = teacher_row(suite, work, settings)
            records = {arm: [] for arm in arms}
            for seed in range(seeds):
                for arm, overrides in arms.items():
                    record = run_arm(suite, work, args.method, regime, settings, arm, overrides, seed, tags[arm])
                    records[arm].append(record)
                    print(f"{name} | {regime} | seed {seed} | {arm}: " + ", ".join(
                        f"{k}={v[0]:.4g}" for k, v in record["metrics"].items()) +
                        f", wall {record['wall_seconds']:.1f}s", flush=True)
            all_records[regime] = records
            for pair in comparisons:
                results[pair][regime] = compare_regime({"base": records[pair[0]], "ddil": records[pair[1]]})
                results[pair][regime]["higher"] = {k: v[1] for k, v in records["base"][0]["metrics"].items()}
        command = "python bench/ddil_effect.py " + " ".join(argv if argv is not None else sys.argv[1:])
        texts = []
        for pair in comparisons:
            suffix = "" if pair == ("base", "ddil") else f"-{pair[1]}-vs-{pair[0]}"
            text = report(suite, args.method, work, results[pair], teachers, seeds, arms, pair)
            texts.append(text)
            heatmap = args.heatmap or work / f"{name}.png"
            if args.heatmap and args.suite == "all":
                heatmap = args.heatmap.with_name(f"{args.heatmap.stem}-{name}{args.heatmap.suffix}")
            heatmap = heatmap.with_name(f"{heatmap.stem}{suffix}{heatmap.suffix}")
            heat_map(results[pair], heatmap, f"{pair[1]} vs {pair[0]}, {args.method.upper()}, {name} "
                                             f"({seeds} paired seeds)")
            print(text)
            print(f"wrote {heatmap}")
        if args.takeover:
            texts.append(takeover_table(suite, work, args.method, regimes, seeds, all_records, tags))
            print(texts[-1])
        markdown = args.markdown or work / f"{name}.md"
        if args.markdown and args.suite == "all":
            markdown = args.markdown.with_name(f"{args.markdown.stem}-{name}{args.markdown.suffix}")
        markdown.parent.mkdir(parents=True, exist_ok=True)
        markdown.write_text("\n\n".join(texts) + f"\nCommand: `{command}`\n")
        (work / f"{name}.json").write_text(json.dumps(
            {"results": {f"{b} vs {a}": r for (a, b), r in results.items()}, "teachers": teachers}, indent=1))
        print(f"wrote {markdown}")


if __name__ == "__main__":
    main()
