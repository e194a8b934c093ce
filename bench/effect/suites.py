"""The bench's suites and each method's arms, as data.

A suite is a base distill setting, regimes that change one factor of it at a time, the same for
`--quick`, and how each run is scored. A method's arms are distill overrides over its defaults;
they live here, not in `ddil_cli.methods`, because "what DDIL is compared against" is a question
of this study, not a property of the method (a method not listed gets PD's arms).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

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


@dataclasses.dataclass(frozen=True)
class SuiteSpec:
    """One suite as data; `quick_*` are `--quick`'s smoke-run values."""

    base: dict
    regimes: dict[str, dict]
    quick_base: dict
    quick_regimes: dict[str, dict]
    per_prompt: tuple[int, int]  # samples per class / digit for evaluation (full, quick)
    shift_samples: tuple[int, int]  # (full, quick)
    digits: bool = False  # trains on the digits shards (built in the work folder), scored on their held-out split
    features: str | None = None
    metrics: list[str] | None = None


SUITES = {
    "lab": SuiteSpec(LAB_BASE, LAB_REGIMES, {**LAB_BASE, "max_updates": 300},
                     {"base": {}, "2 steps": {"steps": 2, "max_updates": 200}},
                     per_prompt=(256, 64), shift_samples=(1000, 256)),
    "digits": SuiteSpec(DIGITS_BASE, DIGITS_REGIMES,
                        {**DIGITS_BASE, "max_updates": 24, "collect_every": 8, "rollouts_per_collect": 4,
                         "teacher_steps": 8}, {"main": {}},
                        per_prompt=(50, 5), shift_samples=(200, 40), digits=True,
                        features="embedded:digits", metrics=["fid", "pr", "dc"]),
}

# the arms per method: DistillConfig overrides; a method not named here gets the PD ones
ARMS = {"pd": {"base": {"prior": "data=1"}, "ddil": {}},
        # LCM: teacher-forced vs the paper's half batches from the student's own LCM rollouts
        "lcm": {"base": {"prior": "data=1"}, "ddil": {"prior": "data=0.5,student=0.5", "student_prob": "1"}},  # = lcm's defaults
        # DMD2: its own backward simulation vs DDIL's student and teacher states (DMD2's default here)
        "dmd2": {"base": {"prior": "student=1", "student_prob": "1"}, "ddil": {}}}


def method_arms(method: str) -> dict[str, dict]:
    """A fresh copy of the method's arms (the caller adds the user's overrides to it)."""
    return {k: dict(v) for k, v in ARMS.get(method, ARMS["pd"]).items()}


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
    prompts: str | None = None  # a prompt file for sampling (digits: one prompt per digit)


def make_suite(name: str, quick: bool, work: Path, jumps: bool = False) -> Suite:
    spec = SUITES[name]
    base, regimes = (spec.quick_base, spec.quick_regimes) if quick else (spec.base, spec.regimes)
    suite = Suite(name, base, jump_regimes(base["teacher_steps"]) if jumps else regimes,
                  per_prompt=spec.per_prompt[quick], shift_samples=spec.shift_samples[quick],
                  features=spec.features, metrics=spec.metrics)
    if spec.digits:
        from ddil_cli.atomic import write_text_atomic
        from ddil_cli.data.digits import build_digits_shards, digit_prompt, split_source

        data_dir = work / "digits-data"
        if not (data_dir / "digits.json").is_file():
            build_digits_shards(data_dir)
        suite.prompts = str(work / "digit-prompts.txt")
        write_text_atomic(suite.prompts, "\n".join(digit_prompt(d) for d in range(10)) + "\n")
        suite.data, suite.reference = split_source(data_dir, "train"), split_source(data_dir, "heldout")
    return suite
