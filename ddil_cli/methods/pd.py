"""Progressive distillation (Salimans & Ho; guided: Meng et al.); docs/distill.md.

One student step t -> t'' must land where k teacher DDIM steps t -> ... -> t'' land (k = 2: the
paper's halving; `--pd-stages` chooses any integer ratio per stage). The x0 that makes a single
DDIM step from x_t reach the teacher's x_t'' is

    x0_tgt = (x_t'' - (s_t''/s_t) x_t) / (a_t'' - (s_t''/s_t) a_t),

and the loss is max(SNR_t, 1) ||x0_student - x0_tgt||^2 (truncated-SNR weighting, equivalent to a
v-space MSE). The `match` mode is guided distillation's first stage: same grid, target the
teacher's own (CFG) x0, so a guidance-conditioned student learns CFG in one pass.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ddil_cli.diffusion.ddim import ddim_step
from ddil_cli.diffusion.schedule import bcast, trailing_timesteps
from ddil_cli.diffusion.threshold import apply_threshold
from ddil_cli.errors import UserError
from ddil_cli.methods.base import Batch, DistillMethod, MethodOptions, Phase, PlanRequest, option
from ddil_cli.models.base import Denoiser
from ddil_cli.rollout import Grid
from ddil_cli.validate import Rule


def pd_target(x_t: torch.Tensor, x_next: torch.Tensor, t: torch.Tensor, t_next: torch.Tensor,
              schedule) -> torch.Tensor:
    """The x0 whose DDIM step from (x_t, t) lands exactly on x_next at t_next."""
    a_t, s_t = schedule.alpha_sigma(t, dtype=torch.float32)
    a_n, s_n = schedule.alpha_sigma(t_next, dtype=torch.float32)
    ratio = s_n / s_t
    return (x_next - bcast(ratio, x_t) * x_t) / bcast(a_n - ratio * a_t, x_t)


def stage_steps(teacher_steps: int, steps: int, pd_stages: str | None = None) -> list[int]:
    """The student step count of each PD stage: `--pd-stages 32,8,4` gives [8, 4]; without it the
    halvings, 32 -> 4 giving [16, 8, 4]."""
    if pd_stages is None:
        ratio = teacher_steps / steps
        if steps < 1 or ratio < 2 or ratio != int(ratio) or int(ratio) & (int(ratio) - 1):
            raise UserError(f"progressive distillation halves the steps, so --teacher-steps {teacher_steps} "
                            f"cannot reach --steps {steps}; use a power-of-two ratio such as 32 -> 4, "
                            f"or give the stages with --pd-stages {teacher_steps},{steps}")
        chain = [teacher_steps]
        while chain[-1] > steps:
            chain.append(chain[-1] // 2)
        return chain[1:]
    chain = parse_pd_stages(pd_stages)
    if chain[0] != teacher_steps or chain[-1] != steps:
        raise UserError(f"--pd-stages {pd_stages} must run from --teacher-steps {teacher_steps} to --steps "
                        f"{steps}; start it at {teacher_steps} and end it at {steps}, or change those flags")
    return chain[1:]


def parse_pd_stages(text: str) -> list[int]:
    """'32,8,4' -> [32, 8, 4], each count a whole multiple (>= 2) of the next, so grids nest."""
    try:
        chain = [int(v) for v in str(text).split(",")]
    except ValueError:
        chain = []
    if len(chain) < 2 or min(chain) < 1 or any(a < 2 * b or a % b for a, b in zip(chain, chain[1:])):
        raise UserError(f"--pd-stages {text!r}: give the step counts from the teacher's to the student's, "
                        "each a multiple (2x or more) of the next, e.g. 32,4 or 32,8,4")
    return chain


def stage_budgets(max_updates: int, stage_updates: str | None, stages: int) -> list[int]:
    """Updates per PD stage: --stage-updates N or N1,N2,..., else --max-updates split evenly."""
    if stage_updates:
        try:
            budgets = [int(v) for v in str(stage_updates).split(",")]
        except ValueError:
            budgets = []
        if len(budgets) == 1:
            budgets *= stages
        if len(budgets) != stages or min(budgets) < 1 or max(budgets) > 10**9:  # --max-updates' bound
            raise UserError(f"--stage-updates {stage_updates!r}: give one count in [1, 1000000000], or one per "
                            f"PD stage ({stages} here)")
        return budgets
    base = max_updates // stages
    if base < 1:
        raise UserError(f"--max-updates {max_updates} is fewer than the {stages} PD stages")
    return [base + (1 if i < max_updates % stages else 0) for i in range(stages)]


# Under the default prior schedule DDIL starts at the second halving stage: on the lab map the
# first stage's DDIL made every significant difference, gains and the one loss (batch 64), and
# DDIL from stage 2 on was nowhere worse (docs/distill.md, "Which stages"). A stage before it
# trains teacher-forced; an explicit --prior / --prior-schedule applies to every stage.
DEFAULT_DDIL_FROM_STAGE = 2


@dataclass
class PDOptions(MethodOptions):
    # the first halving stage (1-based) that trains on the prior; earlier ones on data alone. None:
    # DEFAULT_DDIL_FROM_STAGE under the default schedule, 1 when a prior is given. Clipped to the
    # last stage, so a run always ends on DDIL when its prior has buffer states
    ddil_from_stage: int | None = option(
        None, "with DDIL: the first halving stage trained on the prior; earlier stages train on data alone "
              "(default 2 under the default schedule, 1 with --prior / --prior-schedule; at most the last stage).")
    # the stage schedule as step counts, --teacher-steps first and --steps last ('32,4': one stage,
    # each student step spanning 8 teacher steps). None: halving stages (32,16,8,4)
    stage_updates: str | None = option(None, "updates per stage: N or N1,N2,... (overrides --max-updates' split).",
                                       Rule(comma_list=True), resumable=True)
    guided_updates: int = option(0, "updates of the guided stage (CFG into a w-conditioned student at the "
                                    "teacher's steps); 0 skips it.", Rule(low=0, high=10**9))
    pd_stages: str | None = option(
        None, "the stages as step counts from --teacher-steps to --steps, each a multiple of the next: 32,4 is "
              "one stage whose student step spans 8 teacher steps; 32,8,4 two (default: halving, 32,16,8,4).")

    def validate(self) -> None:
        if self.pd_stages is not None:
            parse_pd_stages(self.pd_stages)
        if self.ddil_from_stage is not None and self.ddil_from_stage < 1:
            raise UserError(f"--ddil-from-stage must be >= 1 (1: DDIL in every halving stage), "
                            f"got {self.ddil_from_stage}")


class PDMethod(DistillMethod):
    """Progressive distillation: each stage's student learns k of its teacher's DDIM steps in one
    (k = 2 unless --pd-stages says otherwise); each stage's teacher is the previous stage's student."""

    name = "pd"
    Options = PDOptions
    student_scheduler = "ddim"

    @classmethod
    def plan(cls, request: PlanRequest, teacher: Denoiser, options: PDOptions) -> list[Phase]:
        num_train = teacher.schedule.num_train_timesteps
        stages = stage_steps(request.teacher_steps, request.steps, options.pd_stages)
        options.pd_stages = ",".join(str(n) for n in [request.teacher_steps, *stages])  # the manifest's record
        budgets = stage_budgets(request.max_updates, options.stage_updates, len(stages))
        if options.ddil_from_stage is None:  # resolved here, so the manifest records the value used
            options.ddil_from_stage = 1 if request.explicit_prior else DEFAULT_DDIL_FROM_STAGE
        first_ddil = min(options.ddil_from_stage, len(stages))
        phases = []
        if options.guided_updates > 0:  # goes with the first halving stage
            grid = trailing_timesteps(request.teacher_steps, num_train)
            phases.append(Phase(f"guided-{request.teacher_steps}", options.guided_updates, grid, grid,
                                [Grid.make(request.teacher_steps, request.teacher_steps, num_train)],
                                teacher="original", options={"mode": "match"}, ddil=first_ddil == 1))
        teacher_steps = request.teacher_steps
        for number, (steps, updates) in enumerate(zip(stages, budgets), start=1):
            grid, ratio = trailing_timesteps(steps, num_train), teacher_steps // steps
            phases.append(Phase(f"pd-{steps}", updates, grid, grid, [Grid.make(steps, teacher_steps, num_train)],
                                teacher="previous", options={"mode": "jump", "ratio": ratio},
                                ddil=number >= first_ddil))
            teacher_steps = steps
        return phases

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.mode = self.phase.options.get("mode", "jump")
        if self.mode not in ("jump", "match"):
            raise ValueError(f"unknown PD mode {self.mode!r}")
        student_grid = self.phase.timesteps
        self._position = {t: i for i, t in enumerate(student_grid)}
        # timestep -> position on the student's grid (-1: off it), built once: the step looks inputs up in it
        self._position_table = torch.full((self.teacher.schedule.num_train_timesteps,), -1, dtype=torch.long)
        self._position_table[list(self._position)] = torch.tensor(list(self._position.values()), dtype=torch.long)
        # the teacher's grid has k times the points; row i of `paths`: the teacher's timesteps
        # from student time i to student time i + 1, both ends included
        k = int(self.phase.options.get("ratio", 2)) if self.mode == "jump" else 1
        fine = trailing_timesteps(k * len(student_grid), self.teacher.schedule.num_train_timesteps) + [-1]
        if fine[::k] != list(student_grid) + [-1]:
            raise ValueError(f"the student's grid is not every {k}th point of the teacher's")
        self.paths = torch.tensor([fine[i * k:(i + 1) * k + 1] for i in range(len(student_grid))], dtype=torch.long)

    def _grid_positions(self, t: torch.Tensor) -> torch.Tensor:
        """Each input's position on the student's grid, looked up on the device (reading the
        timesteps back would make every step wait for the GPU); off the grid is an async error."""
        table = self._position_table.to(t.device)
        idx = table[t.clamp(0, len(table) - 1)]
        torch._assert_async((idx >= 0).all(), f"PD inputs off the student's grid {self.phase.timesteps}")
        return idx

    @torch.no_grad()
    def target(self, batch: Batch) -> torch.Tensor:
        teacher, x_t, t = self.teacher, batch.x_t.float(), batch.t
        if self.mode == "match":
            return apply_threshold(teacher.predict_x0(x_t, t, batch.cond, batch.guidance,
                                                      all_one=batch.guidance_all_one), self.threshold)
        paths = self.paths.to(t.device)[self._grid_positions(t)]  # (B, k + 1), per example
        x = x_t
        for now, then in zip(paths.T[:-1], paths.T[1:]):  # the teacher's k DDIM steps
            x0 = teacher.predict_x0(x, now, batch.cond, batch.guidance, all_one=batch.guidance_all_one)
            x = ddim_step(x, x0, now, then, teacher.schedule, self.threshold)
        return pd_target(x_t, x, t, paths[:, -1], teacher.schedule)

    def loss(self, group, nets, batch: Batch) -> torch.Tensor:
        target = self.target(batch)
        x0_student = self.student_x0(batch, nets["student"]).float()
        weight = self.student.schedule.snr(batch.t).clamp(min=1.0).float().to(target.device)
        per_example = ((x0_student - target) ** 2).reshape(len(batch), -1).mean(1)
        return weight * per_example
