"""sha256 of the weights tiny one-process distills save, one row per file: run it on two commits
and diff the tables to show a reshaping left every result bit-identical.

    PYTHONPATH=$PWD python bench/student_hashes.py [CASE ...] > hashes.txt

Cases: PD (plain, guided + prioritised replay + checkpoints, --pd-stages), LCM (matched and batch
mix), DMD2 (lab-fitted start) on the lab, and LCM, DMD2 and PD with DDIL on a tiny SD pipeline
(tests/tiny_models.py). A few minutes on two CPU cores.
"""

from __future__ import annotations

import hashlib
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from ddil_cli.stages.distill import DistillConfig, run_distill  # noqa: E402
from tiny_models import build_tiny_sd  # noqa: E402


def pd_budget(stage_updates: str, guided_updates: int = 0) -> dict:
    """PD's stage budget as this commit takes it (PD's options; before wave 10, config fields)."""
    given = {"stage_updates": stage_updates, "guided_updates": guided_updates}
    return given if "stage_updates" in DistillConfig.__dataclass_fields__ else {"options": given}


def cases(root: Path) -> dict[str, dict]:
    sd, prompts = build_tiny_sd(root / "sd"), root / "prompts.txt"
    prompts.write_text("a cat\na dog\n")
    lab = dict(teacher="gmm:ring:8", steps=4, batch_size=16, lr=1e-3, collect_every=3, rollouts_per_collect=8,
               quiet=True, log_every=2)
    tiny = dict(teacher=str(sd), prompts=str(prompts), teacher_steps=8, max_updates=2, batch_size=2,
                collect_every=2, rollouts_per_collect=2, quiet=True)
    return {
        "pd-lab": dict(lab, method="pd", teacher_steps=16, **pd_budget("6")),
        "pd-lab-guided": dict(lab, method="pd", teacher_steps=8, **pd_budget("4", 3), replay="prioritised",
                              prior="data=0.5,student=0.3,teacher=0.2", checkpoint_every=2),
        "pd-lab-stages": dict(lab, method="pd", teacher_steps=16, max_updates=10, options={"pd_stages": "16,4"}),
        "lcm-lab": dict(lab, method="lcm", max_updates=8, prior="data=0.5,student=0.5", student_prob="1"),
        "lcm-lab-batchmix": dict(lab, method="lcm", max_updates=8, prior="data=0.5,student=0.5",
                                 options={"ddil_mix": "batch"}),
        "dmd2-lab": dict(lab, method="dmd2", teacher_steps=8, max_updates=6,
                         options={"critic_updates": 2, "lab_init_steps": 10}),
        "lcm-sd": dict(tiny, method="lcm", prior="student=0.5,teacher=0.5", steps=4, options={"unroll_steps": "4"}),
        "dmd2-sd": dict(tiny, method="dmd2", prior="student=1", options={"critic_updates": 2, "real_guidance": 3.0}),
        "pd-sd": dict(tiny, method="pd", prior="student=0.5,teacher=0.5", steps=4),
    }


def main(names: list[str]) -> None:
    root = Path(tempfile.mkdtemp(prefix="student-hashes-"))
    table = cases(root)
    print(f"{'case':<18} {'file':<58} sha256[:16]")
    for name in names or list(table):
        out = root / name
        run_distill(DistillConfig(**table[name], out=str(out)))
        for path in sorted(p for p in out.rglob("*.safetensors") if "checkpoints" not in p.parts):
            digest = hashlib.sha256(path.read_bytes()).hexdigest()[:16]
            print(f"{name:<18} {str(path.relative_to(out)):<58} {digest}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
