"""Latent consistency distillation (Luo et al.; diffusers' examples/consistency_distillation);
docs/distill.md, "LCM".

The student is a consistency function f(x_t, t) = c_skip(t) x_t + c_out(t) x0_student(x_t, t, w)
(boundary scalings with sigma_data 0.5 and --timestep-scaling g, so f is the identity at t = 0).
For an input x_t at a point t of the DDIM solver grid (--solver-steps N, skip k = T // N):

    x_prev = DDIM step t -> t - k of the teacher's CFG x0 at scale w (thresholded),
    target = f_target(x_prev, t - k)         (an EMA copy of the student, no gradient;
                                              at t - k = -1, clean data, the target is x_prev),
    loss   = pseudo-Huber sqrt((f - target)^2 + c^2) - c, or L2, per element, mean per example.

w ~ U[--w-min, --w-max] per example, fed to the student through its guidance embedding (w - 1,
LCM pipeline's convention). With --threshold the teacher's x0 and the target network's x0 are
clamped (reflected LCM). The EMA target moves after every student update:
theta_target <- d theta_target + (1 - d) theta_student, d = --target-ema.

DDIL: the inputs may be states the student visits under its own multistep LCM samplers (by
default of its step count and its neighbours, 3, 4 and 5 for 4 steps; --unroll-steps); those
grids are subsets of the solver grid, so the same target applies. For a 4-step student they hold
10 of the 50 solver timesteps, so --ddil-mix matched (the default) draws each input's
timestep first, uniform on the solver grid, and takes a buffer state only at a timestep the
buffer holds (the stage's InputAssembler); splitting the batch by the prior instead (`batch`)
gives those 10 timesteps half of every batch and halves the other 40's share, which cost the
lab LCM half of its quality (docs/distill.md, "LCM + DDIL").
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch

from ddil_cli.diffusion.consistency import consistency_output, lcm_timesteps, solver_timesteps
from ddil_cli.diffusion.ddim import ddim_step
from ddil_cli.diffusion.threshold import apply_threshold
from ddil_cli.errors import UserError
from ddil_cli.methods.base import Batch, ConsistencyOptions, DistillMethod, Phase, PlanRequest, option
from ddil_cli.models.base import Denoiser
from ddil_cli.models.lora import add_adapter, ema_pairs, load_trained_state, trained_state
from ddil_cli.rollout import Grid
from ddil_cli.validate import GUIDANCE, Rule

TARGET_ADAPTER = "target"

# the LCM paper's guidance range for Stable Diffusion, in the standard CFG convention (its own
# convention, w - 1, writes it [2, 14]); lab and pixel teachers scale it by their default scale
SD_GUIDANCE = 7.5
SD_W_RANGE = (3.0, 15.0)


def default_w_range(default_guidance: float) -> tuple[float, float]:
    """[0.4 g, 2 g] around the teacher's default CFG scale g, floored at 1 (no guidance): 3..15
    for Stable Diffusion's 7.5, 1..3 for the digits teacher's 1.5, 1..2 for the unguided lab."""
    g = float(default_guidance)
    low = max(1.0, SD_W_RANGE[0] / SD_GUIDANCE * g)
    return low, max(low, SD_W_RANGE[1] / SD_GUIDANCE * g)


def default_unroll_steps(steps: int) -> list[int]:
    """The student's own step count and its neighbours: 3,4,5 for 4 steps (the paper's), 1,2 for 1."""
    return [n for n in (steps - 1, steps, steps + 1) if n >= 1]


def parse_unroll_steps(text) -> list[int]:
    try:
        steps = [int(v) for v in str(text).split(",") if v.strip()]
    except ValueError:
        steps = []
    if not steps or min(steps) < 1:
        raise UserError(f"--unroll-steps {text!r}: give step counts of the student's LCM sampler, e.g. 3,4,5")
    return steps


@dataclass
class LCMOptions(ConsistencyOptions):
    solver_steps: int = option(50, "DDIM solver grid the teacher steps on, skip k = T / N (default 50).",
                               Rule(low=1, high=1000))
    w_min: float | None = option(None, "lowest CFG scale w ~ U[w-min, w-max] (default: 0.4 x the teacher's default "
                                       "guidance, at least 1; 3 for SD's 7.5).", GUIDANCE)
    w_max: float | None = option(None, "highest CFG scale (default: 2 x the teacher's default guidance, at least "
                                       "w-min; 15 for SD's 7.5).", GUIDANCE)
    target_ema: float = option(0.95, "decay of the EMA target network (default 0.95).")
    loss: str = option("huber", "huber (pseudo-Huber, default) or l2.")
    huber_c: float = option(0.001, "pseudo-Huber c (default 0.001).", Rule(above=0, high=10))
    # the student's LCM samplers DDIL rolls out (one per collection, in turn); None: --steps - 1,
    # --steps, --steps + 1 (the paper's 3,4,5 for its 4-step student; at 2 steps the lab tied with
    # 1,2,3 where 3,4,5 was worse: docs/results.md, "LCM")
    unroll_steps: str | None = option(None, "with DDIL: the student's LCM samplers rolled out, one per collection "
                                            "in turn (default: --steps - 1, --steps, --steps + 1, i.e. 3,4,5 for "
                                            "4 steps).")
    # matched: each input's timestep drawn first, uniform on the solver grid, and a buffer state
    # used only where the buffer holds one at it; batch: the prior splits the batch (the paper's
    # wording), so the rollouts' 10 timesteps take half of every batch from the other 40
    ddil_mix: str = option("matched", "with DDIL: matched (default: each input's solver timestep first, a buffer "
                                      "state only where the buffer holds one at it) or batch (the prior splits "
                                      "every batch, the paper's wording).")

    def validate(self) -> None:
        if self.loss not in ("huber", "l2"):
            raise UserError(f"--loss {self.loss!r}: use huber or l2")
        if not 0 <= self.target_ema < 1:
            raise UserError(f"--target-ema {self.target_ema} must be in [0, 1)")
        for flag, w in (("--w-min", self.w_min), ("--w-max", self.w_max)):
            if w is not None and w < 1:
                raise UserError(f"{flag} {w} is below 1 (1 = no guidance); CFG scales start at 1")
        if self.w_min is not None and self.w_max is not None and self.w_min > self.w_max:
            raise UserError(f"--w-min {self.w_min} exceeds --w-max {self.w_max}")
        if self.unroll_steps is not None:
            parse_unroll_steps(self.unroll_steps)
        if self.ddil_mix not in ("matched", "batch"):
            raise UserError(f"--ddil-mix {self.ddil_mix!r}: use matched (buffer states only at the timesteps "
                            "they hold, every timestep trained as without DDIL) or batch (the prior splits each batch)")

    def resolve(self, teacher: Denoiser) -> None:
        """Fill in w_min / w_max the user left out, from the teacher's default CFG scale."""
        low, high = default_w_range(getattr(teacher, "default_guidance", 1.0))
        if self.w_min is None:
            self.w_min = low if self.w_max is None else min(low, self.w_max)
        if self.w_max is None:
            self.w_max = max(high, self.w_min)


class LCMMethod(DistillMethod):
    """Consistency distillation on the teacher's DDIM solver grid with an EMA target network."""

    name = "lcm"
    Options = LCMOptions
    student_scheduler = "lcm"
    needs_guidance_embedding = True
    # the paper's LCM + DDIL prior (with --ddil-mix matched: half of the inputs at the rollouts'
    # timesteps are the student's own states; docs/results.md, "LCM": digits FD better, lab tie)
    default_prior_schedule = "data=0.5,student=0.5"
    default_student_prob = "1"

    @classmethod
    def plan(cls, request: PlanRequest, teacher: Denoiser, options: LCMOptions) -> list[Phase]:
        num_train = teacher.schedule.num_train_timesteps
        if options.solver_steps > num_train:
            raise UserError(f"--solver-steps {options.solver_steps} exceeds the teacher's {num_train} timesteps")
        if options.unroll_steps is None:  # resolved here, where --steps is known, so the manifest records it
            options.unroll_steps = ",".join(str(n) for n in default_unroll_steps(request.steps))
        for flag, steps in (("--steps", [request.steps]), ("--unroll-steps", parse_unroll_steps(options.unroll_steps))):
            if max(steps) > options.solver_steps or min(steps) < 1:
                raise UserError(f"{flag} {','.join(map(str, steps))}: an LCM sampler takes 1 to --solver-steps "
                                f"({options.solver_steps}) steps")
        solver = solver_timesteps(options.solver_steps, num_train)
        grids = [Grid.from_timesteps(lcm_timesteps(n, options.solver_steps, num_train), request.teacher_steps,
                                     num_train) for n in parse_unroll_steps(options.unroll_steps)]
        return [Phase(f"lcm-{request.steps}", request.max_updates,
                      lcm_timesteps(request.steps, options.solver_steps, num_train), solver, grids,
                      teacher="original")]

    @classmethod
    def guidance_range(cls, options: LCMOptions) -> tuple[float, float] | None:
        return float(options.w_min), float(options.w_max)  # resolved from the teacher before planning

    @classmethod
    def mix_sources(cls, options: LCMOptions, sources: list[str], timesteps: list[int], held, generator):
        """`--ddil-mix matched`: each example's timestep first, uniform on the training grid as
        without DDIL; a buffer source keeps an example only where the pool holds its states at
        that timestep, else the example is forward-diffused data. DDIL then changes where inputs
        come from, never how much each timestep trains (LCM's rollouts visit 10 of its 50 solver
        points: replacing data there cost the low timesteps half their weight; docs/distill.md)."""
        if options.ddil_mix != "matched":
            return sources, None
        t = torch.tensor(timesteps, dtype=torch.long)[torch.randint(len(timesteps), (len(sources),),
                                                                    generator=generator)]
        holds = {s: held(s) for s in set(sources) if s != "data"}
        return [s if s == "data" or v in holds[s] else "data" for s, v in zip(sources, t.tolist())], t

    @classmethod
    def make_student(cls, phase_teacher: Denoiser, phase: Phase, options: LCMOptions, *,
                     guidance_embedding: bool, **kwargs) -> Denoiser:
        student = super().make_student(phase_teacher, phase, options, guidance_embedding=guidance_embedding,
                                       **kwargs)
        # the saved LCMScheduler picks its sampling grid from the solver grid it was distilled on
        student.scheduler_config = {**student.scheduler_config, "original_inference_steps": options.solver_steps}
        return student

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.solver = list(self.phase.train_timesteps)
        num_train = self.teacher.schedule.num_train_timesteps
        self.skip = num_train // len(self.solver)
        if self.solver != solver_timesteps(len(self.solver), num_train):
            raise ValueError(f"LCM's training grid must be the {len(self.solver)}-step solver grid")
        self._on_grid_table = torch.zeros(num_train, dtype=torch.bool)
        self._on_grid_table[self.solver] = True
        # f_target: an EMA of the student, never trained. A LoRA student's is a second adapter on
        # the same frozen base (an EMA of the adapter weights alone); a full student's, a copy
        if getattr(self.student, "adapter", None):
            add_adapter(self.student.network, TARGET_ADAPTER, self.student.lora, copy_from=self.student.adapter,
                        trainable=False)
            self.target_model, self.target_network = self.student.with_adapter(TARGET_ADAPTER), None
            self._target_pairs = ema_pairs(self.student.network, TARGET_ADAPTER, self.student.network,
                                           self.student.adapter)
        else:
            self.target_model = self.student
            self.target_network = copy.deepcopy(self.student.network).requires_grad_(False)
            self._target_pairs = ema_pairs(self.target_network, None, self.student.network, None)

    # ---- the pieces of the target ---------------------------------------------------------------
    def _check_on_grid(self, t: torch.Tensor) -> None:
        """Inputs must sit on the solver grid. Checked on the device (an asynchronous assert: reading
        the timesteps back would make every step wait for the GPU)."""
        table = self._on_grid_table.to(t.device)
        on_grid = table[t.clamp(0, len(table) - 1)] & (t >= 0) & (t < len(table))
        torch._assert_async(on_grid.all(), f"LCM inputs off the {len(self.solver)}-step solver grid "
                            f"({self.solver[0]}, {self.solver[1] if len(self.solver) > 1 else ''}...): the "
                            "teacher's solver step t -> t - k needs t on it")

    def consistency(self, x_t: torch.Tensor, x0: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """f = c_skip x_t + c_out x0 (t = -1, clean data, counts as the boundary: f = x_t)."""
        return consistency_output(x_t, x0, t.clamp(min=0), timestep_scaling=self.options.timestep_scaling)

    @torch.no_grad()
    def solver_step(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """(x_prev, t - k): the teacher's CFG DDIM step from the batch inputs (thresholded x0)."""
        self._check_on_grid(batch.t)
        x_t, t = batch.x_t.float(), batch.t
        x0 = apply_threshold(self.teacher.predict_x0(x_t, t, batch.cond, batch.guidance,
                                                     all_one=batch.guidance_all_one), self.threshold)
        t_prev = t - self.skip  # -1 below the last solver point: clean data
        return ddim_step(x_t, x0, t, t_prev, self.teacher.schedule), t_prev

    @torch.no_grad()
    def target(self, batch: Batch) -> torch.Tensor:
        x_prev, t_prev = self.solver_step(batch)
        student = self.student
        w = batch.guidance if student.guidance_conditioned else None
        t_net = t_prev.clamp(min=0)  # rows at clean data: c_out = 0, any x0 will do
        out = self.target_model.forward(x_prev, t_net, batch.student_cond.cond, w, network=self.target_network)
        x0 = apply_threshold(student.x0_from_output(out, x_prev, t_net), self.threshold)
        return self.consistency(x_prev, x0, t_prev)

    def loss(self, group, nets, batch: Batch):
        target = self.target(batch)
        f = self.consistency(batch.x_t.float(), self.student_x0(batch, nets["student"]), batch.t)
        diff = (f - target).reshape(len(batch), -1)
        if self.options.loss == "huber":
            c = self.options.huber_c
            per_example = (torch.sqrt(diff ** 2 + c ** 2) - c).mean(1)
        else:
            per_example = (diff ** 2).mean(1)
        return per_example

    # ---- the EMA target ---------------------------------------------------------------------------
    @torch.no_grad()
    def after_update(self, nets) -> None:
        """theta_target <- d theta_target + (1 - d) theta_student (raw parameters: the same tensors
        the wrapped module trains)."""
        d = self.options.target_ema
        for target, online in self._target_pairs:
            target.mul_(d).add_(online.detach(), alpha=1 - d)
        if self.target_network is not None:
            for target, online in zip(self.target_network.buffers(), self.student.network.buffers()):
                target.copy_(online)

    def _target_module(self) -> tuple[torch.nn.Module, str | None]:
        if self.target_network is not None:
            return self.target_network, None
        return self.student.network, TARGET_ADAPTER

    def extra_state(self):
        return {f"target.{k}": v for k, v in trained_state(*self._target_module()).items()}, {}

    def load_extra_state(self, tensors, info) -> None:
        load_trained_state(*self._target_module(), {k[len("target."):]: v for k, v in tensors.items()
                                                    if k.startswith("target.")})


__all__ = ["LCMMethod", "LCMOptions", "default_w_range", "lcm_timesteps", "solver_timesteps"]
