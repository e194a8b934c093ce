"""DMD2 vs DMD2 + DDIL on the Gaussian-mixture lab, paired seeds, equal generator updates.

DMD2: backward simulation only (`--prior student=1 --student-prob 1`: the generator's own
rollouts). DMD2 + DDIL: the method's default prior `student=0.5,teacher=0.5` with the default
`--student-prob` schedule (mixed student/teacher rollouts and pure teacher rollouts). Each seed
trains both, samples the 4-step generators (`ddil sample`) and scores them with the lab's exact
metrics (bench/lab_common.py); prints per-seed numbers and the paired difference
(DDIL - plain) with a 95% t interval.

    python bench/lab_dmd2.py --seeds 3 --updates 2000
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

from scipy.stats import t as student_t

sys.path.insert(0, str(Path(__file__).resolve().parent))
from lab_common import lab_numbers, sample_into  # noqa: E402

from ddil_cli.stages.distill import DistillConfig, run_distill  # noqa: E402

VARIANTS = {"DMD2": dict(prior="student=1", student_prob="1"), "DMD2 + DDIL": {}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spec", default="gmm:ring:8")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--updates", type=int, default=2000)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--critic-updates", type=int, default=5)
    parser.add_argument("--per-class", type=int, default=256)
    parser.add_argument("--work", type=Path, default=None)
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="ddil-lab-dmd2-"))
    results: dict[str, list[dict]] = {name: [] for name in VARIANTS}
    for seed in range(args.seeds):
        for name, flags in VARIANTS.items():
            out = work / f"{name.replace(' + ', '-').lower()}-{seed}"
            run_distill(DistillConfig(method="dmd2", teacher=args.spec, teacher_steps=16, max_updates=args.updates,
                                      batch_size=args.batch_size, lr=args.lr, collect_every=25,
                                      rollouts_per_collect=64, options={"critic_updates": args.critic_updates},
                                      seed=seed, quiet=True, log_every=100, out=str(out / "run"), **flags))
            sample_into(out / "samples", args.spec, str(out / "run/student"), 4, args.per_class, 1.0, 16)
            results[name].append(lab_numbers(out / "samples", args.spec))
            print(seed, name, {k: round(v, 4) for k, v in results[name][-1].items()}, flush=True)
    print(f"\n{args.spec}, {args.updates} generator updates x {args.critic_updates} critic steps, batch "
          f"{args.batch_size}, {args.seeds} paired seeds; difference = DMD2 + DDIL - DMD2, 95% t interval")
    for metric in results["DMD2"][0]:
        plain = [r[metric] for r in results["DMD2"]]
        ddil = [r[metric] for r in results["DMD2 + DDIL"]]
        diff = [b - a for a, b in zip(plain, ddil)]
        half = student_t.ppf(0.975, len(diff) - 1) * statistics.stdev(diff) / len(diff) ** 0.5 \
            if len(diff) > 1 else float("nan")
        print(f"{metric:<18} DMD2 {statistics.mean(plain):.4f}  DMD2+DDIL {statistics.mean(ddil):.4f}  "
              f"diff {statistics.mean(diff):+.4f} +- {half:.4f}")


if __name__ == "__main__":
    main()
