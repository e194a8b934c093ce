"""`ddil covariate-shift`: the paper's mixed-rollout analysis (Table 9) and the direct measure.

Layout of `--out` (resumable: it is written into directly, one finished piece at a time):
    settings/<name>/   a `ddil sample` folder + metrics.json (`ddil evaluate`) + setting.json
    direct/<label>/    measure.json: the direct measure for one student
    table.md, table.csv, direct.csv, plots/{beta,switch,direct}.png, manifest.json
Each setting and measure is computed in a hidden sibling folder and renamed into place when
done; `setting.json` keeps the hash of everything that determines the result, and a later run
with the same hash reuses it instead of computing it again. Tables and plots are rebuilt at the
end of every run from all stored results whose hash matches the current configuration.
"""

from __future__ import annotations

import csv
import io
import json
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from ddil_cli.buffer.sources import DataStates, is_mixture_teacher
from ddil_cli.diffusion.threshold import parse_threshold
from ddil_cli.errors import UserError
from ddil_cli.evaluate import report
from ddil_cli.atomic import atomic_folder, write_json_atomic, write_text_atomic
from ddil_cli.evaluate.inputs import resolve_reference
from ddil_cli.evaluate.config import EvaluateConfig
from ddil_cli.evaluate.run import ALL_METRICS, score
from ddil_cli.manifest import fingerprint, write_manifest
from ddil_cli.models import EMBEDDED, load_denoiser
from ddil_cli.models.checks import check_student_of
from ddil_cli.sample_folder import SampleConfig, load_models, plan_sampling, sample_seed, write_sample_folder
from ddil_cli.covariate_shift import (REFERENCE_KINDS, Setting, build_settings, config_key, forward_diffused,
                                      load_json, markdown_table, measure_rows, parse_number_list, plot_beta,
                                      plot_direct, plot_switch, pure_rollout_states, select)

# Bump when a change in this code changes stored results, so old ones are recomputed.
RESULT_VERSION = 1
STAGE = "covariate-shift"


@dataclass
class ShiftConfig:
    teacher: str = "gmm:ring:8"
    student: str | None = None
    student_label: str | None = None
    compare_student: list[str] = field(default_factory=list)
    steps: int = 4
    teacher_steps: int = 32
    betas: str = "0.8,0.6,0.4,0.2,0"
    switch_at: str = "749,500,250"
    settings: list[str] = field(default_factory=list)
    metrics: str | None = None
    reference: str | None = None
    features: str | None = None
    data: str | None = None
    shift_reference: str = "auto"
    shift_samples: int = 1000
    shift_dims: int = 64
    guidance: float | None = None
    prompt: list[str] = field(default_factory=list)
    prompts: str | None = None
    num_per_prompt: int = 128
    batch_size: int = 256
    threshold: str = "none"
    seed: int = 0
    device: str = "cpu"
    out: str = "shift"
    quiet: bool = False


# ---- inputs -----------------------------------------------------------------------------------

def student_label(path: str) -> str:
    """runs/pd/student -> 'pd' (a distill output's student/ folder is named by its run)."""
    p = Path(path)
    return p.parent.name if p.name == "student" and p.parent.name else (p.name or str(path))


def parse_compare(items: list[str]) -> list[tuple[str, str]]:
    """'LABEL=DIR' or 'DIR' -> (label, dir)."""
    found = []
    for item in [items] if isinstance(items, str) else items or []:
        label, eq, path = str(item).partition("=")
        found.append((label, path) if eq and label and path else (student_label(item), str(item)))
    for label, _ in found:
        if "/" in label or label.startswith("."):
            raise UserError(f"student label {label!r} cannot name a folder; use letters, digits, - or _")
    return found


def model_fingerprint(spec: str) -> str | None:
    return fingerprint(EMBEDDED[spec]) if spec in EMBEDDED else fingerprint(spec)


def _metric_names(text) -> list[str] | None:
    if not text:
        return None
    items = text if isinstance(text, (list, tuple)) else [text]
    names = [m.strip() for item in items for m in str(item).split(",") if m.strip()]
    unknown = [m for m in names if m not in ALL_METRICS]
    if unknown:
        raise UserError(f"unknown --metrics {', '.join(unknown)}; choose from {', '.join(ALL_METRICS)}")
    return names


@dataclass
class Inputs:
    """Everything resolved and validated before anything is written."""

    teacher: object
    students: dict[str, object]  # label -> Denoiser; the first is --student
    student_paths: dict[str, str]
    fingerprints: dict[str, str | None]
    sample: SampleConfig
    plan: object
    threshold: object
    evaluate: EvaluateConfig
    settings: list[Setting]
    direct_names: dict[str, str]  # direct-LABEL -> LABEL
    chosen: list[str]  # the names --settings picked
    reference_kind: str


def resolve_inputs(cfg: ShiftConfig) -> Inputs:
    if not cfg.student:
        raise UserError("--student is required: the student folder to analyse (a `ddil distill` output's student/)")
    if cfg.shift_reference not in REFERENCE_KINDS:
        raise UserError(f"--shift-reference {cfg.shift_reference!r} is not one of {', '.join(REFERENCE_KINDS)}")
    if cfg.shift_samples < 2 or cfg.shift_dims < 1:
        raise UserError("--shift-samples must be >= 2 and --shift-dims >= 1")
    try:
        threshold = parse_threshold(cfg.threshold)
    except ValueError as exc:
        raise UserError(f"--threshold: {exc}") from None
    sample = SampleConfig(teacher=cfg.teacher, student=cfg.student, steps=cfg.steps, teacher_steps=cfg.teacher_steps,
                          guidance=cfg.guidance, prompt=list(cfg.prompt or []), prompts=cfg.prompts,
                          num_per_prompt=cfg.num_per_prompt, batch_size=cfg.batch_size, threshold=cfg.threshold,
                          seed=cfg.seed, device=cfg.device, quiet=True)
    teacher, student = load_models(sample, cfg.device)
    plan = plan_sampling(sample, teacher, student)
    label = parse_compare([f"{cfg.student_label or student_label(cfg.student)}={cfg.student}"])[0][0]
    students, paths = {label: student}, {label: cfg.student}
    for other_label, path in parse_compare(cfg.compare_student):
        if other_label in students:
            raise UserError(f"two students are labelled {other_label!r}; name them with --compare-student LABEL=DIR "
                            "or --student-label")
        other = load_denoiser(path, device=cfg.device)
        if tuple(other.state_shape) != tuple(teacher.state_shape):
            raise UserError(f"--compare-student {path} has states {tuple(other.state_shape)}, the teacher "
                            f"{tuple(teacher.state_shape)}; give a student distilled from this teacher")
        check_student_of(other, teacher)
        students[other_label], paths[other_label] = other, path
    reference = cfg.reference or (cfg.teacher if is_mixture_teacher(teacher) else None)
    resolve_reference(reference, None)  # a bad --reference fails now, not after the first setting
    evaluate_cfg = EvaluateConfig(reference=reference, metrics=_metric_names(cfg.metrics), features=cfg.features,
                                  batch_size=min(cfg.batch_size, 64), seed=cfg.seed, device=cfg.device, quiet=True)
    settings = build_settings(parse_number_list(cfg.betas, "--betas"),
                              parse_number_list(cfg.switch_at, "--switch-at", int),
                              teacher.schedule.num_train_timesteps)
    kind = cfg.shift_reference
    if kind == "auto":
        kind = "data" if (is_mixture_teacher(teacher) or cfg.data) else "teacher"
    if kind == "data" and not is_mixture_teacher(teacher) and not cfg.data:
        raise UserError("--shift-reference data needs real images for this teacher; pass --data SHARDS "
                        "or use --shift-reference teacher")
    fingerprints = {"teacher": model_fingerprint(cfg.teacher), "data": fingerprint(cfg.data),
                    "reference": fingerprint(reference), **{f"student:{k}": fingerprint(v) for k, v in paths.items()}}
    direct_names = {f"direct-{label}": label for label in students}
    chosen = select([s.name for s in settings] + list(direct_names), cfg.settings)
    return Inputs(teacher, students, paths, fingerprints, sample, plan, threshold, evaluate_cfg, settings,
                  direct_names, chosen, kind)


# ---- keys -------------------------------------------------------------------------------------

def _common_key(cfg: ShiftConfig, inputs: Inputs) -> dict:
    return {"version": RESULT_VERSION, "teacher": inputs.fingerprints["teacher"], "steps": cfg.steps,
            "teacher_steps": cfg.teacher_steps, "prompts": inputs.plan.prompts, "guidance": inputs.plan.guidance,
            "threshold": str(inputs.threshold), "seed": cfg.seed}


def setting_key(cfg: ShiftConfig, inputs: Inputs, setting: Setting) -> str:
    first = next(iter(inputs.students))
    ev = inputs.evaluate
    return config_key({**_common_key(cfg, inputs), "setting": setting.name, "num_per_prompt": cfg.num_per_prompt,
                       "student": inputs.fingerprints[f"student:{first}"],
                       "evaluate": {"reference": ev.reference, "reference_fingerprint": inputs.fingerprints["reference"],
                                    "metrics": ev.metrics, "features": ev.features}})


def direct_key(cfg: ShiftConfig, inputs: Inputs, label: str) -> str:
    return config_key({**_common_key(cfg, inputs), "direct": inputs.fingerprints[f"student:{label}"],
                       "reference": inputs.reference_kind, "data": inputs.fingerprints["data"],
                       "samples": cfg.shift_samples, "dims": cfg.shift_dims})


# ---- output folder ----------------------------------------------------------------------------

def prepare_out(out: Path) -> None:
    """--out may be new, empty, or an earlier covariate-shift output; anything else is refused."""
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file; give a folder path")
    if out.is_dir() and any(out.iterdir()):
        manifest = load_json(out / "manifest.json")
        if not (manifest and manifest.get("stage") == STAGE) and not (out / "settings").is_dir():
            raise UserError(f"--out {out} holds something other than a covariate-shift output; choose another folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"cannot write to {out} ({exc.strerror}); choose a writable --out") from None


def stored(folder: Path, key: str) -> dict | None:
    record = load_json(folder / "setting.json")
    return record if record and record.get("key") == key else None


# ---- computing one piece ----------------------------------------------------------------------

def compute_setting(cfg: ShiftConfig, inputs: Inputs, setting: Setting, key: str, folder: Path) -> dict:
    with atomic_folder(folder) as work:
        sample_cfg = replace(inputs.sample, teacher_prob=setting.teacher_prob, switch=setting.switch, out=str(folder))
        summary = write_sample_folder(sample_cfg, work, inputs.teacher, next(iter(inputs.students.values())))
        result = score(replace(inputs.evaluate, samples=str(work), out=str(folder)))
        # evaluate read the work folder; record where the samples live once it is renamed
        result["samples"]["path"] = result["config"]["samples"] = str(folder)
        report.write_metrics_json(work / "metrics.json", result)
        rows = [json.loads(line) for line in (work / "samples.jsonl").read_text().splitlines() if line.strip()]
        share = sum(r["teacher_transitions"] for r in rows) / (len(rows) * inputs.plan.grid.num_transitions)
        record = {"key": key, "name": setting.name, "kind": setting.kind, "value": setting.value,
                  "description": setting.describe(), "teacher_share": share,
                  "nfe_per_sample": summary["nfe_per_sample"], "samples": summary["samples"],
                  # one number per headline ('pr.precision', 'pr.recall', ...): pr and dc have no
                  # single value, and reading one crashed every multi-valued metric
                  "metrics": {**{name: None for name, m in result["metrics"].items() if not m.get("available")},
                              **{name: value for name, (value, _) in report.headline_numbers(result).items()}},
                  "unavailable": result["unavailable"]}
        write_json_atomic(work / "setting.json", record)
    return record


class References:
    """The reference state sets (and an independent second one for the floor), built once."""

    def __init__(self, cfg: ShiftConfig, inputs: Inputs):
        self.cfg, self.inputs = cfg, inputs
        self.sets = None

    def get(self):
        if self.sets is None:
            cfg, inputs, plan = self.cfg, self.inputs, self.inputs.plan
            n = cfg.shift_samples
            if inputs.reference_kind == "data":
                data = DataStates(inputs.teacher, data=None if is_mixture_teacher(inputs.teacher) else cfg.data,
                                  prompts=plan.prompts)
                gen = torch.Generator().manual_seed(cfg.seed)
                self.sets = tuple(forward_diffused(data, inputs.teacher, plan.grid, n, gen, cfg.batch_size)
                                  for _ in range(2))
            else:
                prompts = [plan.prompts[i % len(plan.prompts)] for i in range(n)]
                # the first set starts from the student's own noise (seeds of base cfg.seed), so only
                # the drift separates the two; the second, from other seeds, gives the noise floor
                self.sets = tuple(pure_rollout_states(inputs.teacher, inputs.teacher, plan.grid, prompts,
                                                      [sample_seed(cfg.seed + k, i) for i in range(n)], as_teacher=True,
                                                      guidance=plan.guidance, threshold=inputs.threshold,
                                                      batch_size=cfg.batch_size, device=cfg.device) for k in (0, 1))
        return self.sets


def compute_direct(cfg: ShiftConfig, inputs: Inputs, label: str, key: str, folder: Path, references: References,
                   progress=None) -> dict:
    plan, student = inputs.plan, inputs.students[label]
    n = cfg.shift_samples
    prompts = [plan.prompts[i % len(plan.prompts)] for i in range(n)]
    with atomic_folder(folder) as work:
        own = pure_rollout_states(student, inputs.teacher, plan.grid, prompts,
                                  [sample_seed(cfg.seed, i) for i in range(n)], as_teacher=False,
                                  guidance=plan.guidance, threshold=inputs.threshold, batch_size=cfg.batch_size,
                                  device=cfg.device)
        reference, reference2 = references.get()
        rows = measure_rows(inputs.teacher, student, plan.grid, own, reference, reference2, guidance=plan.guidance,
                            threshold=inputs.threshold, max_dims=cfg.shift_dims, batch_size=cfg.batch_size,
                            device=cfg.device, progress=progress)
        record = {"key": key, "label": label, "student": inputs.student_paths[label],
                  "reference": inputs.reference_kind, "samples": n, "rows": rows}
        write_json_atomic(work / "setting.json", record)
    return record


# ---- the stage --------------------------------------------------------------------------------

def run_shift(cfg: ShiftConfig, *, progress=None, inputs: Inputs | None = None) -> dict:
    """Every chosen setting into `cfg.out` (reusing stored ones), then the tables and plots.
    Returns the summary, plus `results` ({setting: its record, as table.csv lists it}) and
    `measures` ({student label: its direct-measure rows, as direct.csv lists them})."""
    inputs = inputs or resolve_inputs(cfg)
    out = Path(cfg.out)
    prepare_out(out)
    direct_names, chosen = inputs.direct_names, inputs.chosen
    setting_by_name = {s.name: s for s in inputs.settings}
    keys = {name: setting_key(cfg, inputs, s) for name, s in setting_by_name.items()}
    keys.update({name: direct_key(cfg, inputs, label) for name, label in direct_names.items()})
    folder_of = lambda name: (out / "direct" / direct_names[name]) if name in direct_names else (out / "settings" / name)
    references = References(cfg, inputs)
    task = progress.add_task("settings", total=len(chosen)) if progress is not None else None
    computed, reused = [], []
    start = time.perf_counter()
    for name in chosen:
        if task is not None:
            progress.update(task, description=f"settings: {name}")
        folder = folder_of(name)
        if stored(folder, keys[name]) is not None:
            reused.append(name)
        elif name in direct_names:
            compute_direct(cfg, inputs, direct_names[name], keys[name], folder, references, progress)
            computed.append(name)
        else:
            compute_setting(cfg, inputs, setting_by_name[name], keys[name], folder)
            computed.append(name)
        if task is not None:
            progress.advance(task)
    # every stored result of this configuration, from this run or an earlier one
    results = {n: r for n in setting_by_name if (r := stored(folder_of(n), keys[n])) is not None}
    measures = {direct_names[n]: r["rows"] for n in direct_names if (r := stored(folder_of(n), keys[n])) is not None}
    outputs = write_report(cfg, inputs, out, results, measures)
    summary = {"computed": computed, "reused": reused, "settings_in_table": list(results),
               "students_measured": list(measures), "seconds": round(time.perf_counter() - start, 2), **outputs}
    write_manifest(out, STAGE, cfg, inputs={"teacher": cfg.teacher, "data": cfg.data, "prompts": cfg.prompts,
                                            **{f"student:{k}": v for k, v in inputs.student_paths.items()}},
                   extra={"summary": summary, "grid": inputs.plan.grid.student,
                          "reference_states": inputs.reference_kind, "keys": keys})
    # the numbers themselves too, for callers (the manifest keeps the short summary)
    return {**summary, "results": results, "measures": measures}


# ---- tables and plots -------------------------------------------------------------------------

def _csv(header: list[str], rows: list[list]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    writer.writerows([["" if v is None else v for v in row] for row in rows])
    return buffer.getvalue()


def write_report(cfg: ShiftConfig, inputs: Inputs, out: Path, results: dict[str, dict],
                 measures: dict[str, list[dict]]) -> dict:
    metric_names = list(dict.fromkeys(m for r in results.values() for m in r["metrics"]))
    header = ["setting", "who drives", "teacher share", "NFE/sample"] + metric_names
    rows = [[r["name"], r["description"], r["teacher_share"], r["nfe_per_sample"]]
            + [r["metrics"].get(m) for m in metric_names] for r in results.values()]
    direct_header = ["student", "timestep", "fd", "fd_floor", "err_own", "err_ref", "err_ratio"]
    direct_rows = [[label] + [row[k] for k in direct_header[1:]] for label, rs in measures.items() for row in rs]
    reference_label = "forward-diffused data" if inputs.reference_kind == "data" else "teacher-trajectory"
    command = " ".join(["ddil", *sys.argv[1:]]) if Path(sys.argv[0]).name == "ddil" else None
    grid = inputs.plan.grid
    md = [f"# Covariate shift: {cfg.teacher}, {grid.num_transitions}-step student, "
          f"{cfg.teacher_steps}-step teacher\n",
          f"Grid {grid.student}; one student transition = {grid.ratio} teacher steps; "
          f"{cfg.num_per_prompt} samples per prompt x {len(inputs.plan.prompts)} prompts, seed {cfg.seed}, "
          f"the same seeds in every setting.\n"]
    if command:
        md.append(f"Command: `{command}`\n")
    md += ["## Mixed rollouts\n", markdown_table(header, rows) if rows else "(no settings computed)\n"]
    unavailable = {f"{r['name']}: {m}": why for r in results.values() for m, why in r.get("unavailable", {}).items()}
    if unavailable:
        md.append("Unavailable metrics: " + "; ".join(f"{k} ({v})" for k, v in list(unavailable.items())[:3]) + "\n")
    if measures:
        md += [f"\n## Direct measure (states the student visits vs the {reference_label} marginal)\n",
               f"fd: Frechet distance of the states ({cfg.shift_samples} per set, at most {cfg.shift_dims} "
               "dimensions); fd_floor: the same between two independent reference sets; err_own / err_ref: "
               "mean squared difference between the student's one-step and the teacher's landing state, on the "
               "student's own states / on the reference states; timestep -1: the clean samples.\n",
               markdown_table(direct_header, direct_rows)]
    write_text_atomic(out / "table.md", "\n".join(md))
    write_text_atomic(out / "table.csv", _csv(["setting", "kind", "value", "description", "teacher_share", "nfe_per_sample"]
                                        + metric_names,
                                        [[r["name"], r["kind"], r["value"], r["description"], r["teacher_share"],
                                          r["nfe_per_sample"]] + [r["metrics"].get(m) for m in metric_names]
                                         for r in results.values()]))
    write_text_atomic(out / "direct.csv", _csv(direct_header, direct_rows))
    plots = out / "plots"
    made = {"beta": plot_beta(results, metric_names, plots / "beta.png"),
            "switch": plot_switch(results, metric_names, plots / "switch.png"),
            "direct": plot_direct(measures, plots / "direct.png", reference_label)}
    return {"plots": [f"plots/{k}.png" for k, ok in made.items() if ok]}
