"""PD vs PD+DDIL on the Gaussian-mixture lab, at the same number of updates, over several seeds.

Each run: `ddil distill --method pd` (--teacher-steps, default 16, -> 4 steps) with the plain teacher-forced prior
(`--prior data=1`) and with the default DDIL prior schedule; then 4-step student samples
(`ddil sample`) and the lab's exact metrics (`ddil evaluate --reference gmm:...`), all through
the stage functions the CLI calls. Prints a mean +- std table (and writes it with --markdown).

    python bench/lab_pd.py --seeds 5 --updates 3000 --markdown docs/results-lab.md
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

from ddil_cli.evaluate.run import EvaluateConfig, score
from ddil_cli.stages.distill import DistillConfig, run_distill
from ddil_cli.sampling import SampleConfig
from ddil_cli.stages.sample import run_sample

# (column, metric in metrics.json, field of that metric)
METRICS = (("quality", "quality", "value"), ("mode coverage", "mode-coverage", "value"),
           ("class mode recall", "class-recall", "value"), ("class accuracy", "class-recall", "class_accuracy"),
           ("sliced W", "swd", "value"))


def lab_numbers(folder: Path, spec: str) -> dict:
    metrics = score(EvaluateConfig(samples=str(folder), reference=spec, quiet=True))["metrics"]
    return {column: metrics[name][field] for column, name, field in METRICS}


def sample_into(folder: Path, spec: str, student: str | None, steps: int, per_class: int, guidance: float,
                teacher_steps: int) -> float:
    folder.mkdir(parents=True)
    summary = run_sample(SampleConfig(teacher=spec, student=student, steps=steps, teacher_steps=teacher_steps,
                                      num_per_prompt=per_class, batch_size=512, guidance=guidance, quiet=True,
                                      out=str(folder)), folder)
    return summary["seconds_per_sample"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spec", default="gmm:ring:8")
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--updates", type=int, default=3000)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--teacher-steps", type=int, default=16)
    parser.add_argument("--per-class", type=int, default=256)
    parser.add_argument("--guidance", type=float, default=1.0)
    parser.add_argument("--markdown", type=Path, default=None)
    parser.add_argument("--work", type=Path, default=None)
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="ddil-lab-pd-"))
    variants = {"PD (teacher-forced, --prior data=1)": "data=1", "PD + DDIL (default prior schedule)": None}
    rows: dict[str, list[dict]] = {name: [] for name in variants}
    teacher_dir = work / "teacher-samples"
    sample_into(teacher_dir, args.spec, None, args.teacher_steps, args.per_class, args.guidance, args.teacher_steps)
    teacher = lab_numbers(teacher_dir, args.spec)
    for seed in range(args.seeds):
        for name, prior in variants.items():
            out = work / f"{'pd' if prior else 'ddil'}-{seed}"
            start = time.perf_counter()
            summary = run_distill(DistillConfig(method="pd", teacher=args.spec, steps=4,
                                                teacher_steps=args.teacher_steps, batch_size=args.batch_size,
                                                max_updates=args.updates, lr=args.lr, prior=prior, seed=seed,
                                                guidance=args.guidance, quiet=True, out=str(out)))
            wall = time.perf_counter() - start
            sample_into(out / "samples", args.spec, str(out / "student"), 4, args.per_class, args.guidance,
                        args.teacher_steps)
            numbers = lab_numbers(out / "samples", args.spec)
            numbers["wall_seconds"] = wall
            numbers["collect_share"] = summary["collect_share"]
            rows[name].append(numbers)
            print(f"seed {seed} {name}: {json.dumps({k: round(v, 4) for k, v in numbers.items()})}", flush=True)
    columns = [c for c, _, _ in METRICS]
    header = ["model", *columns, "distill wall s"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines.append(f"| teacher, {args.teacher_steps} steps | " + " | ".join(f"{teacher[c]:.4f}" for c in columns) + " | - |")
    for name, runs in rows.items():
        cells = []
        for metric in (*columns, "wall_seconds"):
            values = [r[metric] for r in runs]
            mean = statistics.fmean(values)
            std = statistics.stdev(values) if len(values) > 1 else 0.0
            cells.append(f"{mean:.4f} +- {std:.4f}" if metric != "wall_seconds" else f"{mean:.1f} +- {std:.1f}")
        lines.append(f"| {name}, 4 steps | " + " | ".join(cells) + " |")
    pd_wall = statistics.fmean(r["wall_seconds"] for r in rows[next(iter(variants))])
    ddil_wall = statistics.fmean(r["wall_seconds"] for r in rows[list(variants)[1]])
    share = statistics.fmean(r["collect_share"] for r in rows[list(variants)[1]])
    table = "\n".join(lines)
    stages = (args.teacher_steps // 4).bit_length() - 1
    note = (f"\n\n{args.seeds} seeds, {args.updates} updates each (split over the {stages} halving stages), "
            f"{args.per_class} samples per class, spec {args.spec}, guidance {args.guidance}.\n"
            f"DDIL wall-clock overhead at equal updates: {100 * (ddil_wall / pd_wall - 1):+.1f}% "
            f"(DAgger collection is {100 * share:.1f}% of DDIL's training time).\n")
    print(table + note)
    if args.markdown:
        args.markdown.write_text(table + note)


if __name__ == "__main__":
    main()
