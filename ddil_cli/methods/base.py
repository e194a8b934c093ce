"""What every distillation method sees: a batch of student inputs, and the interface the one
training loop calls. A method never knows where its inputs came from (that is priors' job)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ddil_cli.models.base import Conditioning, Denoiser


@dataclass
class Batch:
    """Student training inputs (x_t, t, conditioning, guidance), with their provenance for metrics."""

    x_t: torch.Tensor  # (B, *state)
    t_index: torch.Tensor  # (B,) index on the student's grid
    t: torch.Tensor  # (B,) training timestep
    cond: Conditioning  # the teacher's encoding of the prompts
    student_cond: Conditioning  # the student's (same object when they share a text encoder)
    guidance: torch.Tensor  # (B,) CFG scale w per example
    source: list[str] = field(default_factory=list)  # data | student | teacher, per example
    keys: list[str | None] = field(default_factory=list)  # buffer keys (None: live data)

    def __len__(self) -> int:
        return self.x_t.shape[0]


class DistillMethod:
    """Base class. Subclasses implement `loss`; the rest are hooks with do-nothing defaults.

    - `loss(batch)`: per-example loss (B,), differentiable w.r.t. the student's network only.
    - `after_update()`: after each optimiser step (an EMA target network updates here, LCM).
    - `auxiliary_update(make_batch)`: extra networks with their own optimisers, several steps per
      student update (a fake critic, DMD2's two-timescale updates). Returns metrics.
    - `extra_state()` / `load_extra_state()`: tensors and JSON-able values those need in a checkpoint.
    """

    name = "base"

    def __init__(self, teacher: Denoiser, student: Denoiser):
        self.teacher = teacher
        self.student = student

    def loss(self, batch: Batch) -> torch.Tensor:
        raise NotImplementedError

    def after_update(self) -> None:
        pass

    def auxiliary_update(self, make_batch) -> dict[str, float]:
        return {}

    def extra_state(self) -> tuple[dict[str, torch.Tensor], dict]:
        return {}, {}

    def load_extra_state(self, tensors: dict[str, torch.Tensor], info: dict) -> None:
        pass

    def student_x0(self, batch: Batch) -> torch.Tensor:
        """The student's x0 at the batch inputs in one pass (its guidance embedding takes w)."""
        student = self.student
        w = batch.guidance if student.guidance_conditioned else None
        out = student.forward(batch.x_t, batch.t, batch.student_cond.cond, w)
        return student.x0_from_output(out, batch.x_t, batch.t)
