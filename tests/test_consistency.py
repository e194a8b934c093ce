"""The consistency boundary and the re-noising step (diffusion/consistency.py) against diffusers'
LCMScheduler, and a consistency student's rollout against LCMScheduler's own sampling loop."""

from unittest import mock

import torch
from diffusers import LCMScheduler

from ddil_cli.diffusion.consistency import boundary_scalings
from ddil_cli.models.gmm import GMM_SCHEDULER_CONFIG, GMMDenoiser
from ddil_cli.models.mlp import mlp_student_for
from ddil_cli.rollout import Grid, rollout_seeds, seeded_noise, seeded_renoise


def _lcm(**kwargs):
    return LCMScheduler(**GMM_SCHEDULER_CONFIG, prediction_type="sample", clip_sample=False,
                        set_alpha_to_one=True, **kwargs)


def test_boundary_scalings_match_lcm_scheduler():
    sched = _lcm(timestep_scaling=10.0)
    for t in (0, 1, 19, 259, 999):
        c_skip, c_out = boundary_scalings(torch.tensor(t), timestep_scaling=10.0)
        ref_skip, ref_out = sched.get_scalings_for_boundary_condition_discrete(t)
        assert abs(float(c_skip) - float(ref_skip)) < 1e-6 and abs(float(c_out) - float(ref_out)) < 1e-6  # float32
    assert boundary_scalings(torch.tensor(0)) == (1.0, 0.0)  # f(x, 0) = x


def test_consistency_student_rollout_is_lcm_schedulers_sampling_loop():
    teacher = GMMDenoiser("gmm:ring:8")
    student = mlp_student_for(teacher, prediction_type="epsilon", hidden=16, layers=1)
    student.scheduler_config = {**student.scheduler_config, "_class_name": "LCMScheduler", "timestep_scaling": 10.0}
    sched = _lcm(timestep_scaling=10.0, original_inference_steps=50)
    sched.set_timesteps(4)
    timesteps = sched.timesteps.tolist()
    assert timesteps == [999, 759, 499, 259]
    grid = Grid.from_timesteps(timesteps, 50)
    seeds, prompts = [3, 4, 5], ["class 0", "class 1", "class 2"]
    ours = rollout_seeds(seeds, prompts, grid, teacher=teacher, student=student, teacher_prob=0.0).final

    # diffusers' own loop on the student's epsilon output; its scheduler draws its own noise,
    # so each step is handed the noise our rollout drew for that step from the example's seed
    sched = LCMScheduler.from_config({**sched.config, "prediction_type": "epsilon"})
    sched.set_timesteps(4)
    x, _ = seeded_noise(seeds, (2,), 4)
    noise = seeded_renoise(seeds, (2,), 4)
    cond = student.encode(prompts)
    with torch.no_grad():
        for i, t in enumerate(timesteps):
            eps = student.forward(x, torch.full((3,), t), cond.cond)
            with mock.patch("diffusers.schedulers.scheduling_lcm.randn_tensor", return_value=noise[:, i]):
                x = sched.step(eps, t, x).prev_sample
    assert torch.allclose(ours, x, atol=1e-5), (ours - x).abs().max()
