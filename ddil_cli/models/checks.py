"""Checking a loaded model's content, not only that its files parse: what `ddil` wrote into a
model folder (prediction type, the student's timesteps, sampling defaults) must make sense, and
its weights must be finite (one NaN weight turns every sample into NaN). One line naming the
folder, the file and the field, raised when the model is loaded, before anything is written."""

from __future__ import annotations

import math
from pathlib import Path

import torch

from ddil_cli.diffusion.parameterization import PREDICTION_TYPES
from ddil_cli.errors import UserError
from ddil_cli.models.base import Denoiser


def _bad(folder: Path, what: str) -> UserError:
    return UserError(f"model folder {folder}: {what}; re-create it (re-run the command that made it) or restore "
                     "the file")


def check_loaded(model: Denoiser, folder: Path) -> Denoiser:
    """`model`, loaded from `folder`, after its content checks (UserError on the first failure)."""
    prediction = getattr(model, "prediction_type", None)
    if prediction not in PREDICTION_TYPES:
        raise _bad(folder, f"its prediction type {prediction!r} is not one of {', '.join(PREDICTION_TYPES)}")
    num_train = model.schedule.num_train_timesteps
    timesteps = getattr(model, "student_timesteps", None)
    if timesteps is not None:
        ok = (isinstance(timesteps, list) and timesteps
              and all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < num_train for t in timesteps)
              and all(b < a for a, b in zip(timesteps, timesteps[1:])))
        if not ok:
            raise _bad(folder, f"its student timesteps {timesteps!r} are not decreasing whole numbers below its "
                               f"scheduler's {num_train} training timesteps")
    defaults = getattr(model, "sampling_defaults", None) or {}
    if not isinstance(defaults, dict):
        raise _bad(folder, f"ddil_defaults.json holds {type(defaults).__name__}, not a table")
    guidance = defaults.get("guidance")
    if guidance is not None and (isinstance(guidance, bool) or not isinstance(guidance, (int, float))
                                 or not math.isfinite(guidance) or not 0 <= guidance <= 100):
        raise _bad(folder, f"ddil_defaults.json's guidance {guidance!r} is not a finite number in [0, 100]")
    prompts = defaults.get("prompts")
    if prompts is not None and not (isinstance(prompts, list) and all(isinstance(p, str) for p in prompts)):
        raise _bad(folder, "ddil_defaults.json's prompts must be a list of text")
    network = model.network
    if network is not None:
        for name, tensor in network.state_dict().items():
            if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                raise _bad(folder, f"its weights hold NaN or infinite values (in {name})")
    return model


def check_student_of(student: Denoiser, teacher: Denoiser) -> None:
    """UserError unless `student` can run on `teacher`'s states and was distilled from it (lab
    students record their teacher's spec, diffusers students their teachers' fingerprints: another
    model of the same state shape would run and give wrong samples without a word)."""
    if tuple(student.state_shape) != tuple(teacher.state_shape):
        raise UserError(f"student states {tuple(student.state_shape)} do not match the teacher's "
                        f"{tuple(teacher.state_shape)}; give a student distilled from this teacher")
    source = str(getattr(getattr(student, "config", None), "source", "") or "")
    spec = str(getattr(teacher, "spec", "") or "")
    if source.startswith("gmm:") and spec.startswith("gmm:") and source != spec:
        raise UserError(f"the student was distilled from {source}, not from --teacher {spec}; give its teacher "
                        "or a student of this one")
    # a diffusers student records the fingerprints of its teachers (ddil_student.json; none before wave 10)
    recorded = getattr(student, "teacher_fingerprints", None)
    if recorded and getattr(teacher, "kind", "") == "diffusers" and teacher.identity not in recorded:
        raise UserError(f"the student {getattr(student, 'source', '')} was not distilled from --teacher "
                        f"{getattr(teacher, 'source', '')} (its ddil_student.json records other teachers); "
                        "give the teacher it was distilled from, or a student of this one")


__all__ = ["check_loaded", "check_student_of"]
