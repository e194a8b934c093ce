"""Running one arm of one seed (distill, sample, evaluate, the direct covariate-shift measure),
the teacher's own row and the take-over settings, each cached in the work folder: a rerun reuses
finished runs whose recorded settings match."""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
from pathlib import Path

from effect.suites import Suite

from ddil_cli.atomic import write_text_atomic
from ddil_cli.evaluate.config import EvaluateConfig
from ddil_cli.evaluate.report import headline_numbers
from ddil_cli.evaluate.run import score
from ddil_cli.sample_folder import SampleConfig
from ddil_cli.stages.distill import DistillConfig, run_distill
from ddil_cli.stages.sample import run_sample
from ddil_cli.stages.shift import ShiftConfig, run_shift

# settings a run that collected nothing (teacher-forced, data=1) does not depend on
COLLECTION_KEYS = {"collect_every", "rollouts_per_collect", "buffer_size", "student_prob", "prompts"}


def _numbers(result: dict) -> dict[str, list]:
    return {k: [v, higher] for k, (v, higher) in headline_numbers(result).items()}


def slug(text: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in text).strip("-")


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


def arm_folder(work: Path, suite: Suite, regime: str, seed: int, arm: str, tag: str = "") -> Path:
    return work / suite.name / slug(regime) / f"seed{seed}" / (f"{arm}-{tag}" if tag else arm)


def _sample_and_evaluate(suite: Suite, folder: Path, teacher: str, student: str | None, steps: int,
                         teacher_steps: int, guidance: float | None = None) -> dict:
    """`guidance` None: a student samples at the w it was distilled at, the teacher at its default."""
    samples = folder / "samples"
    if samples.exists():
        shutil.rmtree(samples)
    samples.mkdir(parents=True)
    summary = run_sample(SampleConfig(teacher=teacher, student=student, steps=steps, teacher_steps=teacher_steps,
                                      guidance=guidance, prompts=suite.prompts, num_per_prompt=suite.per_prompt,
                                      batch_size=512, quiet=True, out=str(samples)), samples)
    result = score(EvaluateConfig(samples=str(samples), reference=suite.reference or teacher,
                                  features=suite.features, metrics=suite.metrics, quiet=True,
                                  out=str(folder / "eval")))
    return {"metrics": _numbers(result), "seconds_per_sample": summary.get("seconds_per_sample")}


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
    record = _sample_and_evaluate(suite, folder, cfg.teacher, student, cfg.steps, cfg.teacher_steps)
    shift = run_shift(ShiftConfig(teacher=cfg.teacher, student=student, student_label=arm, steps=cfg.steps,
                                  teacher_steps=cfg.teacher_steps, settings=["direct-*"], data=suite.data,
                                  shift_samples=suite.shift_samples, seed=seed, quiet=True, out=str(folder / "shift"),
                                  prompts=suite.prompts))
    (direct,) = shift["measures"].values()  # the one student's per-timestep rows
    record.update(regime=regime, arm=arm, seed=seed, config={k: v for k, v in dataclasses.asdict(cfg).items()},
                  wall_seconds=wall, collect_share=summary["collect_share"],
                  collect_seconds=sum(p["collect_seconds"] for p in summary["phases"]),
                  train_seconds=sum(p["train_seconds"] for p in summary["phases"]),
                  direct=[r for r in direct if r["timestep"] >= 0])
    write_text_atomic(done, json.dumps(record, indent=1))
    for heavy in ("samples", "run/checkpoints", "run/buffer"):  # keep metrics.jsonl, stages and the student
        shutil.rmtree(folder / heavy, ignore_errors=True)
    return record


def teacher_row(suite: Suite, work: Path, settings: dict) -> dict:
    """The teacher's own numbers at the student's and at its own step count (cached per spec)."""
    out = {}
    guidance = settings.get("guidance")  # `--set guidance=W`: the teacher at the students' w
    for steps in (settings["steps"], settings["teacher_steps"]):
        name = f"{slug(settings['teacher'])}-{steps}" + ("" if guidance is None else f"-w{guidance:g}")
        folder = work / suite.name / "teacher" / name
        done = folder / "result.json"
        if not done.is_file():
            record = _sample_and_evaluate(suite, folder, settings["teacher"], None, steps, steps, guidance)
            write_text_atomic(done, json.dumps(record))
            shutil.rmtree(folder / "samples", ignore_errors=True)
        out[steps] = json.loads(done.read_text())["metrics"]
    return out


def takeover(suite: Suite, record: dict, folder: Path) -> dict[str, dict[str, float]]:
    """Who makes the error: the student alone (beta-0), the exact teacher taking over from the
    student's own state at its last timestep (s2t), and the student's last step from the teacher's
    own state there (t2s), each scored like the run. s2t near the teacher alone says the student's
    states are where the teacher's are (no covariate shift to correct); t2s near the student alone
    says its error is made in the last step, on the teacher's distribution.

    {beta-1 / beta-0 / s2t / t2s: {value, teacher_share, nfe_per_sample, metric: number}}, from
    what `run_shift` returns, kept in takeover/rows.json."""
    out = folder / "takeover"
    cached = out / "rows.json"
    if cached.is_file():
        return json.loads(cached.read_text())
    cfg = record["config"]
    from ddil_cli.rollout import Grid

    last = Grid.make(cfg["steps"], cfg["teacher_steps"]).student[-1]
    shift = run_shift(ShiftConfig(teacher=cfg["teacher"], student=str(folder / "run" / "student"), steps=cfg["steps"],
                                  teacher_steps=cfg["teacher_steps"], settings=["beta-1", "beta-0", f"s2t-{last}",
                                                                                f"t2s-{last}"],
                                  betas="0", switch_at=str(last), metrics=",".join(suite.metrics or []) or None,
                                  reference=suite.reference, features=suite.features, data=suite.data,
                                  num_per_prompt=suite.per_prompt, seed=record["seed"], quiet=True, out=str(out),
                                  prompts=suite.prompts))
    rows = {}
    for setting in shift["results"].values():
        name = setting["name"].split("-")[0] if setting["kind"] != "beta" else setting["name"]
        numbers = {"value": setting["value"], "teacher_share": setting["teacher_share"],
                   "nfe_per_sample": setting["nfe_per_sample"], **setting["metrics"]}
        rows[name] = {k: float(v) for k, v in numbers.items() if v is not None}
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(cached, json.dumps(rows))
    shutil.rmtree(out / "settings", ignore_errors=True)
    return rows


def takeover_rows(suite: Suite, work: Path, regimes: dict[str, dict], records_by_regime: dict[str, dict[str, list[dict]]],
                  tags: dict[str, str]) -> dict[str, dict[str, list[dict]]]:
    """{regime: {arm: [take-over rows of each seed]}}."""
    return {regime: {arm: [takeover(suite, r, arm_folder(work, suite, regime, r["seed"], arm, tag))
                           for r in records_by_regime[regime][arm]] for arm, tag in tags.items()}
            for regime in regimes}
