"""LCM vs LCM + DDIL on the Gaussian-mixture lab, paired seeds, equal updates.

Each seed trains every variant (`ddil distill --method lcm`, through the stage function the CLI
calls), samples the 4-step student and scores it with the lab's exact metrics (bench/lab_common.py's
helpers); prints each variant's mean and its paired difference from the first variant with a
95% t interval.

    python bench/lab_lcm.py --seeds 5 --updates 2000
    python bench/lab_lcm.py --variant lcm=data=1 --variant ddil-0.2=data=0.8,student=0.2@1
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from lab_common import lab_numbers, sample_into  # noqa: E402

from ddil_cli.stages.distill import DistillConfig, run_distill  # noqa: E402

# two-sided 95% Student t quantiles by degrees of freedom
T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}
DEFAULT_VARIANTS = ["lcm=data=1", "lcm+ddil=data=0.5,student=0.5@1"]


def parse_variant(text: str) -> tuple[str, str, str | None]:
    """NAME=PRIOR[@STUDENT_PROB]"""
    name, _, rest = text.partition("=")
    prior, _, student_prob = rest.partition("@")
    return name, prior, student_prob or None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spec", default="gmm:ring:8")
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--updates", type=int, default=2000)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--per-class", type=int, default=256)
    parser.add_argument("--variant", action="append", default=None, help="NAME=PRIOR[@STUDENT_PROB]; the first is the baseline")
    parser.add_argument("--work", type=Path, default=None)
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="ddil-lab-lcm-"))
    variants = [parse_variant(v) for v in (args.variant or DEFAULT_VARIANTS)]
    results: dict[str, list[dict]] = {name: [] for name, _, _ in variants}
    for seed in range(args.seeds):
        for name, prior, student_prob in variants:
            out = work / f"{name}-s{seed}"
            extra = {"student_prob": student_prob} if student_prob else {}
            run_distill(DistillConfig(method="lcm", teacher=args.spec, steps=4, max_updates=args.updates,
                                      batch_size=args.batch_size, lr=args.lr, collect_every=50, rollouts_per_collect=64,
                                      log_every=100, seed=seed, prior=prior, quiet=True, out=str(out), overwrite=True,
                                      **extra))
            sample_into(out / "samples", args.spec, str(out / "student"), 4, args.per_class, 1.0, 32)
            results[name].append(lab_numbers(out / "samples", args.spec))
            print(seed, name, json.dumps(results[name][-1]), flush=True)
    (work / "results.json").write_text(json.dumps(results, indent=1))
    base = variants[0][0]
    for metric in results[base][0]:
        line = [f"{metric:18s} {base} {statistics.mean(r[metric] for r in results[base]):.4f}"]
        for name, _, _ in variants[1:]:
            diffs = [r[metric] - b[metric] for r, b in zip(results[name], results[base])]
            half = T95.get(len(diffs) - 1, 1.96) * statistics.stdev(diffs) / len(diffs) ** 0.5 \
                if len(diffs) > 1 else float("nan")
            line.append(f"{name} {statistics.mean(r[metric] for r in results[name]):.4f} "
                        f"(diff {statistics.mean(diffs):+.4f} +- {half:.4f})")
        print("  ".join(line))
    print(f"runs in {work}")


if __name__ == "__main__":
    main()
