"""`ddil collect` throughput on CPU: states per second and bytes per stored state.

Cases: the Gaussian-mixture lab (teacher rollouts, mixed student rollouts with a fresh MLP
student, exact data forward-diffused) and the embedded digits teacher (teacher rollouts, and the
digits image shards forward-diffused). When the digits teacher is not shipped yet
(ddil_cli/assets/digits/teacher), a tiny random pixel pipeline of the same state shape from
tests/tiny_models.py stands in, and the table says so. Timing covers collection only (rollouts,
encoding, shard writing), not model loading; every case writes a fresh buffer.

    python bench/collect.py                  # the table
    python bench/collect.py --rollouts 512   # longer runs for steadier numbers
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

from ddil_cli.buffer import load_manifest
from ddil_cli.models import EMBEDDED, load_denoiser, make_student
from ddil_cli.stages.collect import CollectConfig, run_collect

ROOT = Path(__file__).resolve().parent.parent


def digits_teacher(tmp: Path) -> tuple[str, str]:
    """The shipped digits teacher, or a stand-in of the same shape; (model path, label)."""
    shipped = EMBEDDED["embedded:digits"]
    if shipped.is_dir():
        return "embedded:digits", "embedded:digits"
    sys.path.insert(0, str(ROOT))
    from tests.tiny_models import build_tiny_pixel

    return str(build_tiny_pixel(tmp / "tiny_pixel", channels=1)), "tiny pixel (digits teacher absent)"


def run_case(name: str, cfg: CollectConfig, models) -> dict:
    summary = run_collect(cfg, models=models, student_version=0 if models[1] is not None else None)
    manifest = load_manifest(Path(cfg.out))
    on_disk = sum(s["bytes"] for s in manifest["shards"])
    return {"case": name, "states": summary["states"], "seconds": summary["seconds"],
            "states_per_s": summary["states"] / max(summary["seconds"], 1e-9),
            "bytes_per_state": on_disk / max(summary["states"], 1)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rollouts", type=int, default=256, help="lab rollouts per case")
    parser.add_argument("--digits-rollouts", type=int, default=16, help="digits-teacher rollouts per case")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--teacher-steps", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    rows = []
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        common = dict(steps=args.steps, teacher_steps=args.teacher_steps, quiet=True)
        lab = load_denoiser("gmm:ring:8")
        student = make_student(lab)
        lab_cases = [("lab: teacher rollouts", "teacher=1", (lab, None)),
                     ("lab: mixed student rollouts (p_teacher 0.5)", "student=1", (lab, student)),
                     ("lab: exact data, forward-diffused", "data=1", (lab, None))]
        for i, (name, prior, models) in enumerate(lab_cases):
            cfg = CollectConfig(teacher="gmm:ring:8", prior=prior, rollouts=args.rollouts, batch_size=64,
                                out=str(tmp / f"lab{i}"), **common)
            rows.append(run_case(name, cfg, models))

        from ddil_cli.data.digits import build_digits_shards

        spec, label = digits_teacher(tmp)
        build_digits_shards(tmp / "digits")
        pixel = load_denoiser(spec)
        digits_cases = [(f"{label}: teacher rollouts", "teacher=1"),
                        (f"{label}: digits data, forward-diffused", "data=1")]
        for i, (name, prior) in enumerate(digits_cases):
            cfg = CollectConfig(teacher=spec, prior=prior, rollouts=args.digits_rollouts, batch_size=16,
                                data=str(tmp / "digits" / "train-{000000..000001}.tar"),
                                out=str(tmp / f"digits{i}"), **common)
            rows.append(run_case(name, cfg, (pixel, None)))

    print(f"ddil collect on CPU ({torch.get_num_threads()} threads), {args.steps}-step student grid, "
          f"{args.teacher_steps}-step teacher")
    print(f"| {'case':<66} | {'states':>6} | {'s':>7} | {'states/s':>9} | {'bytes/state':>11} |")
    print(f"|{'-' * 68}|{'-' * 8}|{'-' * 9}|{'-' * 11}|{'-' * 13}|")
    for r in rows:
        print(f"| {r['case']:<66} | {r['states']:>6} | {r['seconds']:>7.2f} | {r['states_per_s']:>9.1f} | "
              f"{r['bytes_per_state']:>11.0f} |")


if __name__ == "__main__":
    main()
