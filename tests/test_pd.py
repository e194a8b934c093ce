"""PD's target against an independent two-step DDIM from diffusers' scheduler."""

import torch
from diffusers import DDIMScheduler

from ddil_cli.diffusion.ddim import ddim_step
from ddil_cli.methods.base import Batch, MethodOptions, Phase
from ddil_cli.methods.pd import PDMethod
from ddil_cli.models.gmm import GMM_SCHEDULER_CONFIG, GMMDenoiser
from ddil_cli.models.mlp import mlp_student_for


def _batch(teacher, student, t_index, grid, w=2.0, n=5):
    torch.manual_seed(0)
    t_index = torch.full((n,), t_index)
    cond = teacher.encode([f"class {i % 4}" for i in range(n)])
    return Batch(x_t=torch.randn(n, 2), t_index=t_index, t=torch.tensor(grid)[t_index], cond=cond,
                 student_cond=cond, guidance=torch.full((n,), w), source=["data"] * n, keys=[None] * n)


def _method(teacher, student, grid, mode="halve"):
    phase = Phase("pd-test", 1, grid, grid, [], options={"mode": mode})
    return PDMethod(teacher=teacher, student=student, phase=phase, options=MethodOptions())


def test_student_outputting_target_lands_on_teacher_two_steps():
    teacher = GMMDenoiser("gmm:ring:8")
    student = mlp_student_for(teacher, hidden=16, layers=1)
    grid = [999, 749, 499, 249]
    method = _method(teacher, student, grid)
    sched = DDIMScheduler(**GMM_SCHEDULER_CONFIG, clip_sample=False, prediction_type="sample",
                          timestep_spacing="trailing", set_alpha_to_one=True)
    sched.set_timesteps(8)
    fine = sched.timesteps.tolist()
    for i, t in enumerate(grid):
        batch = _batch(teacher, student, i, grid)
        target = method.target(batch)
        one_student_step = ddim_step(batch.x_t, target, batch.t, torch.full((5,), grid[i + 1] if i < 3 else -1),
                                     teacher.schedule)
        x = batch.x_t
        for t_fine in fine[2 * i:2 * i + 2]:  # the teacher's two steps, by diffusers
            x0 = teacher.predict_x0(x, torch.full((5,), t_fine), batch.cond, batch.guidance)
            x = sched.step(x0, t_fine, x, eta=0.0).prev_sample
        assert (one_student_step - x).abs().max() < 1e-4, (t, (one_student_step - x).abs().max())


def test_loss_zero_when_student_predicts_target_and_snr_weighting():
    teacher = GMMDenoiser("gmm:ring:8")
    student = mlp_student_for(teacher, hidden=16, layers=1)
    grid = [999, 749, 499, 249]
    method = _method(teacher, student, grid)
    batch = _batch(teacher, student, 3, grid)
    target = method.target(batch)
    method.student_x0 = lambda b, network=None: target  # a perfect student
    assert method.loss("student", {"student": student.network}, batch).abs().max() < 1e-10
    method.student_x0 = lambda b, network=None: target + 0.1
    snr = teacher.schedule.snr(torch.tensor([249])).item()
    assert torch.allclose(method.loss("student", {"student": student.network}, batch), torch.full((5,), max(snr, 1) * 0.01), rtol=1e-4)


def test_match_mode_targets_teacher_cfg_x0():
    teacher = GMMDenoiser("gmm:ring:8")
    student = mlp_student_for(teacher, guidance_conditioned=True, hidden=16, layers=1)
    grid = [999, 749, 499, 249]
    method = _method(teacher, student, grid, mode="match")
    batch = _batch(teacher, student, 1, grid, w=3.0)
    assert torch.allclose(method.target(batch), teacher.predict_x0(batch.x_t, batch.t, batch.cond, 3.0))


def _plan_ddil(options, **request):
    from ddil_cli.methods.base import PlanRequest
    from ddil_cli.methods.pd import PDOptions

    options = PDOptions(**options)
    phases = PDMethod.plan(PlanRequest(**{"steps": 4, "teacher_steps": 32, "max_updates": 30, **request}),
                           GMMDenoiser("gmm:ring:8"), options)
    return {p.name: p.ddil for p in phases}, options.ddil_from_stage


def test_ddil_starts_at_the_second_stage_under_the_default_schedule_and_everywhere_under_a_given_prior():
    assert _plan_ddil({}) == ({"pd-16": False, "pd-8": True, "pd-4": True}, 2)
    assert _plan_ddil({}, explicit_prior=True) == ({"pd-16": True, "pd-8": True, "pd-4": True}, 1)
    # the flag wins over either default; the guided stage goes with the first halving stage
    assert _plan_ddil({"ddil_from_stage": 3}, explicit_prior=True, guided_updates=5) == (
        {"guided-32": False, "pd-16": False, "pd-8": False, "pd-4": True}, 3)
    assert _plan_ddil({"ddil_from_stage": 1}, guided_updates=5)[0]["guided-32"] is True
    # clipped to the last stage: a one-halving run (8 -> 4) still trains on DDIL's inputs
    assert _plan_ddil({}, teacher_steps=8) == ({"pd-4": True}, 2)
    assert _plan_ddil({"ddil_from_stage": 9})[0] == {"pd-16": False, "pd-8": False, "pd-4": True}


def test_ddil_from_stage_zero_is_refused():
    import pytest

    from ddil_cli.errors import UserError
    from ddil_cli.methods.pd import PDOptions

    with pytest.raises(UserError, match="--ddil-from-stage must be >= 1"):
        PDOptions.from_dict("pd", {"ddil_from_stage": 0})
