"""What every distillation method sees, and the interface the one training loop and the distill
stage call. A method never knows where its inputs came from (that is the priors' job).

A method owns:
- its plan: `plan(request, teacher)` turns the run's settings into phases (PD: an optional guided
  stage, then one stage per halving; LCM and DMD2: one phase), each with the timesteps the
  student samples on, the timesteps forward-diffused data are drawn at, the grids DDIL rolls the
  current student out on, and which model teaches it;
- the networks it trains (`groups()`), each group with its own optimiser, learning rate and
  number of optimiser steps per student update (DMD2's critic: several);
- its loss per group, called with the networks as the launcher wrapped them (DDP), as EDM's
  training loop passes its DDP module to the loss;
- the scheduler its student is saved with (`student_scheduler`: 'ddim' or 'lcm').
"""

from __future__ import annotations

from dataclasses import Field, dataclass, field, fields
from typing import Any, Callable, ClassVar

import torch

from ddil_cli.diffusion.threshold import Threshold
from ddil_cli.errors import UserError
from ddil_cli.models.base import Conditioning, Denoiser
from ddil_cli.rollout import Grid
from ddil_cli.validate import Rule, check_values


@dataclass
class Batch:
    """Student training inputs (x_t, t, conditioning, guidance), with their provenance for metrics."""

    x_t: torch.Tensor  # (B, *state)
    t: torch.Tensor  # (B,) training timestep of each input: what every loss uses
    t_index: torch.Tensor  # (B,) position (or bin) of t on the phase's training grid (-1: off it), for metrics
    cond: Conditioning  # the teacher's encoding of the prompts
    student_cond: Conditioning  # the student's (same object when they share a text encoder)
    guidance: torch.Tensor  # (B,) CFG scale w per example
    source: list[str] = field(default_factory=list)  # data | student | teacher, per example
    keys: list[str | None] = field(default_factory=list)  # buffer keys (None: live data)
    # the one w of every example when they share it, known on the host: a CFG teacher then decides
    # whether it needs its unconditional pass without reading `guidance` back from the device
    guidance_value: float | None = None

    def __len__(self) -> int:
        return self.x_t.shape[0]

    @property
    def guidance_all_one(self) -> bool:
        """Every w is 1 (a CFG teacher's conditional pass alone), known without a device read."""
        return self.guidance_value == 1


@dataclass
class Phase:
    """One training phase of a method's plan."""

    name: str  # also the folder stages/NAME and the checkpoints' phase
    updates: int  # student updates
    timesteps: list[int]  # the student's sampling grid, saved with it
    train_timesteps: list[int]  # where forward-diffused data inputs are drawn
    rollout_grids: list[Grid]  # the grids DDIL rolls the current student out on (cycled per collection)
    teacher: str = "previous"  # 'previous': the previous phase's student (the original one first); 'original'
    options: dict[str, Any] = field(default_factory=dict)  # method-specific (PD's 'mode')
    # False: the phase trains teacher-forced on data alone whatever the prior (PD's stages before
    # --ddil-from-stage); no rollouts are collected in it
    ddil: bool = True

    @property
    def steps(self) -> int:
        return len(self.timesteps)

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "updates": self.updates, "steps": self.steps, "timesteps": self.timesteps,
                "train_timesteps": self.train_timesteps if len(self.train_timesteps) <= 64 else
                f"{len(self.train_timesteps)} timesteps",
                "rollout_grids": [g.student for g in self.rollout_grids], "teacher": self.teacher,
                "ddil": self.ddil, **self.options}


@dataclass
class PlanRequest:
    """What the distill stage hands a method to plan with (resolved, validated settings)."""

    steps: int
    teacher_steps: int
    max_updates: int
    options: dict[str, Any] = field(default_factory=dict)  # the method's own Options, as given
    explicit_prior: bool = False  # --prior or --prior-schedule was given (not the default schedule)


@dataclass
class TrainedGroup:
    """Networks trained together by one optimiser. A method's first group is the loop's primary one
    (train.Objective): a distill method names it and its network 'student'."""

    name: str
    modules: dict[str, torch.nn.Module]
    lr: float | None = None  # None: the run's --lr
    steps_per_update: int = 1  # optimiser steps of this group per student update
    # module name -> the LoRA adapter trained in it (the rest of that module, its base, stays frozen)
    adapters: dict[str, str] = field(default_factory=dict)

    @classmethod
    def of(cls, name: str, models: dict[str, Denoiser], extra: dict[str, torch.nn.Module] | None = None,
           **kwargs) -> "TrainedGroup":
        """The group training each model's network (a LoRA model: its adapter alone) plus `extra` modules."""
        return cls(name, {**{k: m.network for k, m in models.items()}, **(extra or {})},
                   adapters={k: m.adapter for k, m in models.items() if getattr(m, "adapter", None)}, **kwargs)


def option(default: Any, help: str, rule: Rule | None = None, *, resumable: bool = False) -> Any:
    """A method option's field, declared once: `ddil distill` takes it as --NAME-WITH-DASHES with
    this help, and `rule` (validate.py: range, choices) checks it from a flag, a config file or
    the Python API alike. `resumable`: a resumed run may change it (a budget, not the model)."""
    return field(default=default, metadata={"help": help, "rule": rule, "resumable": resumable})


def option_help(f: Field) -> str:
    return f.metadata.get("help", "")


@dataclass
class MethodOptions:
    """Base of each method's own settings (flags such as --solver-steps). Subclasses add fields
    with `option(...)`; `validate` checks what a single field's rule cannot (one field against another)."""

    # lab only: steps fitting the first stage's MLP student to the analytic teacher before it trains
    # (models.mlp.fit_to_teacher). Real students start as copies of their teacher's weights; an
    # analytic teacher has none, so 0 starts from a fresh MLP
    lab_init_steps: int = option(0, "Lab teachers: steps fitting the first student MLP (DMD2: and its critic) to "
                                    "the analytic teacher first, as real students start from their teacher's "
                                    "weights (e.g. 2000; default 0: a fresh MLP).", Rule(low=0, high=10**7))

    @classmethod
    def rules(cls) -> dict[str, Rule]:
        """Each field's range or choices (validate.py), upper bounds included: a learning rate of
        1e308 or a guidance of 1e6 can only be a typo, and overflows."""
        return {f.name: f.metadata["rule"] for f in fields(cls) if f.metadata.get("rule") is not None}

    @classmethod
    def from_dict(cls, method: str, given: dict[str, Any]) -> "MethodOptions":
        names = {f.name for f in fields(cls)}
        foreign = sorted(k for k, v in given.items() if v is not None and k not in names)
        if foreign:
            flags = ", ".join("--" + k.replace("_", "-") for k in foreign)
            raise UserError(f"{flags} {'is not an option' if len(foreign) == 1 else 'are not options'} of "
                            f"--method {method}; drop {'it' if len(foreign) == 1 else 'them'} or choose the "
                            "method they belong to")
        # types from the dataclass fields, as for every command's own config (a config file's
        # `solver_steps = "fifty"` is one line, not a TypeError later)
        options = cls(**check_values(cls, {k: v for k, v in given.items() if k in names and v is not None},
                                     cls.rules()))
        options.validate()
        return options

    def validate(self) -> None:
        pass

    def resolve(self, teacher: Denoiser) -> None:
        """Fill in defaults that depend on the teacher (LCM's w range from its default guidance);
        called once, before the method plans, so the manifest records the values used."""

    def scheduler_config(self) -> dict[str, Any]:
        """Settings the student's saved scheduler takes from these options (none by default)."""
        return {}


@dataclass
class ConsistencyOptions(MethodOptions):
    """Options of a method whose student is a consistency model, saved with diffusers' LCMScheduler."""

    timestep_scaling: float = option(10.0, "g in the consistency student's boundary scalings c_skip, c_out "
                                           "(default 10, as diffusers' LCMScheduler).", Rule(above=0, high=1000))

    def scheduler_config(self) -> dict[str, Any]:
        return {"timestep_scaling": float(self.timestep_scaling)}


class DistillMethod:
    """Base class. Subclasses set `name`, `Options`, `student_scheduler`, implement `plan` and
    `loss`; the rest are hooks with do-nothing defaults.

    - `plan(request, teacher)` (classmethod): the phases.
    - `make_student(phase_teacher, phase, guidance_embedding, **kwargs)` (classmethod): the
      phase's student, by default a copy of its teacher (models.make_student).
    - `groups()`: the trained networks; the first is the student's ('student', the loop's primary group).
    - `loss(group, nets, batch)`: per-example loss (B,) for the optimiser of `group`, or
      (loss, metrics); `nets` maps each trained module's name to the module to call (wrapped).
    - `after_update(nets)`: after each student optimiser step (an EMA target updates here).
    - `extra_state()` / `load_extra_state()`: tensors and JSON-able values to checkpoint besides
      the trained networks and their optimisers (an EMA target network, a step counter).
    - `default_prior_schedule`: the prior schedule when the user gives none (None: the stage's).
    - `default_student_prob`: the same for --student-prob.
    - `needs_data(options)` (classmethod): the loss draws real data itself (DMD2's GAN head), so
      the stage opens the data source whatever the prior and passes it as `self.data`.
    """

    name: ClassVar[str] = "base"
    Options: ClassVar[type[MethodOptions]] = MethodOptions
    student_scheduler: ClassVar[str] = "ddim"  # 'lcm': a consistency student, re-noising sampler
    needs_guidance_embedding: ClassVar[bool] = False  # the student always takes w as an input
    # the prior schedule when the user gives neither --prior nor --prior-schedule (None: the stage's)
    default_prior_schedule: ClassVar[str | None] = None
    default_student_prob: ClassVar[str | None] = None  # None: the stage's default

    def __init__(self, *, teacher: Denoiser, student: Denoiser, phase: Phase, options: MethodOptions,
                 threshold: Threshold | None = None, original_teacher: Denoiser | None = None,
                 data=None):
        self.teacher = teacher  # the phase's teacher
        self.student = student
        self.phase = phase
        self.options = options
        self.threshold = threshold or Threshold()
        self.original_teacher = original_teacher or teacher
        self.data = data  # the stage's real data (buffer.sources.DataStates) when needs_data or the prior uses it

    # ---- plan ---------------------------------------------------------------------------------
    @classmethod
    def plan(cls, request: PlanRequest, teacher: Denoiser, options: MethodOptions) -> list[Phase]:
        raise NotImplementedError

    @classmethod
    def guidance_range(cls, options: MethodOptions) -> tuple[float, float] | None:
        """The range w is drawn from per example when --guidance-range is not given (None: the
        teacher's default guidance, fixed)."""
        return None

    @classmethod
    def needs_data(cls, options: MethodOptions) -> bool:
        """True when the loss itself draws real data (DMD2's GAN head), whatever the prior."""
        return False

    @classmethod
    def mix_sources(cls, options: MethodOptions, sources: list[str], timesteps: list[int],
                    held: Callable[[str], set[int]], generator: torch.Generator) -> tuple[list[str], torch.Tensor | None]:
        """How a batch mixing data with buffer states is drawn: `sources` (one per example, as the
        prior split them), the phase's training `timesteps`, `held(source)` the timesteps the
        replay pool holds states of. Returns the sources and each example's timestep, or None to
        leave data's timesteps to forward diffusion and buffer states' to the pool (the default)."""
        return sources, None

    @classmethod
    def make_student(cls, phase_teacher: Denoiser, phase: Phase, options: MethodOptions, *,
                     guidance_embedding: bool, **kwargs) -> Denoiser:
        """A copy of the phase teacher that samples as it will once saved: a consistency student
        (student_scheduler 'lcm') rolls out with the re-noising sampler during DDIL collection too.
        On the lab (an analytic teacher, no weights to copy) a fresh MLP, fitted to the teacher
        first when `lab_init_steps` is given."""
        from ddil_cli.models import make_student

        student = make_student(phase_teacher, guidance_embedding=guidance_embedding, **kwargs)
        if phase_teacher.kind == "gmm" and options.lab_init_steps:
            from ddil_cli.models.mlp import fit_to_teacher

            fit_to_teacher(student, phase_teacher, steps=options.lab_init_steps)
        if cls.student_scheduler == "lcm":
            student.scheduler_config = {**student.scheduler_config, "_class_name": "LCMScheduler",
                                        **options.scheduler_config()}
        return student

    # ---- training -----------------------------------------------------------------------------
    def groups(self) -> list[TrainedGroup]:
        return [TrainedGroup.of("student", {"student": self.student})]

    def loss(self, group: str, nets: dict[str, torch.nn.Module], batch: Batch):
        raise NotImplementedError

    def after_update(self, nets: dict[str, torch.nn.Module]) -> None:
        pass

    def extra_state(self) -> tuple[dict[str, torch.Tensor], dict]:
        return {}, {}

    def load_extra_state(self, tensors: dict[str, torch.Tensor], info: dict) -> None:
        pass

    # ---- shared helpers -----------------------------------------------------------------------
    def student_x0(self, batch: Batch, network: torch.nn.Module | None = None) -> torch.Tensor:
        """The student's x0 at the batch inputs in one pass (its guidance embedding takes w),
        through `network` (the wrapped module in training)."""
        student = self.student
        w = batch.guidance if student.guidance_conditioned else None
        out = student.forward(batch.x_t, batch.t, batch.student_cond.cond, w, network=network)
        return student.x0_from_output(out, batch.x_t, batch.t)
