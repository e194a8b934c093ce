"""The model layer: one Denoiser interface and one loader for every way a user names a model."""

from __future__ import annotations

import re
from pathlib import Path

import torch

from ddil_cli.atomic import unreadable_file
from ddil_cli.errors import UserError
from ddil_cli.models.base import Conditioning, Denoiser

EMBEDDED = {"embedded:digits": Path(__file__).resolve().parent.parent / "assets" / "digits" / "teacher"}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
MODEL_HELP = ("a diffusers folder, a hub id, embedded:digits, a ddil student folder, "
              "or a gmm:LAYOUT:K[:dD][:stdS][:scaleR] spec")


def load_denoiser(spec: str, *, device: str = "cpu", dtype: torch.dtype = torch.float32,
                  base: Denoiser | None = None) -> Denoiser:
    """Load whatever the user named (see MODEL_HELP) as a Denoiser. A LoRA student folder loads
    onto `base`'s UNet when `base` is the pipeline it was distilled from (the base held once)."""
    from ddil_cli.models.gmm import GMMDenoiser, is_gmm_spec
    from ddil_cli.models.mlp import CONFIG_NAME, WEIGHTS_NAME, MLPDenoiser

    spec = str(spec)
    if is_gmm_spec(spec):
        try:
            return GMMDenoiser(spec)
        except ValueError as exc:
            raise UserError(str(exc)) from None
    if spec.startswith("embedded:"):
        if spec not in EMBEDDED:
            raise UserError(f"unknown embedded model {spec!r}; available: {', '.join(EMBEDDED)}")
        path = EMBEDDED[spec]
        if not path.is_dir():
            raise UserError(f"{spec} is not shipped in this install ({path} missing); reinstall ddil-cli")
        return _diffusers(path, device, dtype)
    path = Path(spec).expanduser()
    if path.is_dir():
        problem = unreadable_file(path)  # a truncated weights file or a broken config, named
        if problem is not None:
            raise UserError(f"model folder {path}: {problem}; re-create it (e.g. re-run the ddil distill that "
                            "made it) or restore the file")
        from ddil_cli.models.checks import check_loaded
        from ddil_cli.models.lora import is_lora_folder

        if is_lora_folder(path):
            from ddil_cli.models.diffusers_t2i import DiffusersDenoiser

            return check_loaded(DiffusersDenoiser.from_lora_folder(
                path, device=device, dtype=dtype, base=base if getattr(base, "kind", "") == "diffusers" else None), path)
        if (path / CONFIG_NAME).is_file():
            if not (path / WEIGHTS_NAME).is_file():
                raise UserError(f"model folder {path}: {WEIGHTS_NAME} is missing; re-create it (re-run the ddil "
                                "distill that made it) or restore the file")
            try:
                return check_loaded(MLPDenoiser.from_pretrained(path).to(device), path)
            except (TypeError, KeyError, ValueError, RuntimeError, OSError) as exc:  # another format, other shapes
                raise UserError(f"model folder {path} does not hold a loadable ddil MLP student "
                                f"({type(exc).__name__}: {' '.join(str(exc).split())[:120]}); re-create it with "
                                "ddil distill") from None
        if (path / "model_index.json").is_file() or (path / "unet").is_dir():
            try:
                return check_loaded(_diffusers(path, device, dtype), path)
            except (NotImplementedError, KeyError, TypeError, ValueError) as exc:  # e.g. an unknown beta_schedule
                raise UserError(f"model folder {path} cannot be loaded ({type(exc).__name__}: "
                                f"{' '.join(str(exc).split())[:160]}); re-create it or restore its files") from None
        raise UserError(f"{path} is a folder but holds no model (no model_index.json, unet/ or "
                        f"{CONFIG_NAME}); give {MODEL_HELP}")
    if path.exists():
        raise UserError(f"{path} is a file; give {MODEL_HELP}")
    if _HUB_ID.match(spec) and not spec.startswith((".", "/", "~")):
        return _diffusers(spec, device, dtype)
    raise UserError(f"model {spec!r} not found; give {MODEL_HELP}")


def load_teacher_and_student(teacher: str, student: str | None, *, device: str,
                             frozen: str = "auto") -> tuple[Denoiser, Denoiser | None]:
    """The models of a forward-only command (sample, collect, covariate-shift), both frozen:
    held in `--frozen-dtype` (bf16 on CUDA by default)."""
    from ddil_cli.models.precision import frozen_dtype

    dtype = frozen_dtype(frozen, device)
    first = load_denoiser(teacher, device=device, dtype=dtype)
    # a LoRA student distilled from this teacher loads onto its UNet: one base in memory
    return first, load_denoiser(student, device=device, dtype=dtype, base=first) if student else None


def _diffusers(source, device, dtype) -> Denoiser:
    from ddil_cli.models.diffusers_t2i import DiffusersDenoiser

    return DiffusersDenoiser.from_pretrained(source, device=device, dtype=dtype)


def make_student(teacher: Denoiser, *, guidance_embedding: bool = False, **kwargs) -> Denoiser:
    """A student initialised from its teacher: a copy of its network (diffusers), optionally with a
    guidance embedding; for the analytic lab teacher, a fresh MLP."""
    if teacher.kind == "gmm":
        from ddil_cli.models.mlp import mlp_student_for

        # the caller's seeded stream initialises it: a fixed seed here gave every --seed one init
        return mlp_student_for(teacher, guidance_conditioned=guidance_embedding, **{"seed": None, **kwargs})
    if teacher.kind == "mlp":
        import copy

        student = copy.deepcopy(teacher)
        if guidance_embedding and not teacher.guidance_conditioned:
            raise UserError("an MLP student without a guidance embedding cannot gain one; "
                            "distil a guidance-conditioned student from the gmm teacher first")
        return student
    from ddil_cli.models.diffusers_t2i import make_student as make_diffusers_student

    return make_diffusers_student(teacher, guidance_embedding=guidance_embedding, **kwargs)


__all__ = ["Conditioning", "Denoiser", "EMBEDDED", "MODEL_HELP", "load_denoiser", "load_teacher_and_student",
           "make_student"]
