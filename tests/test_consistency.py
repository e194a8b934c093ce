"""The consistency boundary and the re-noising step (diffusion/consistency.py) against diffusers'
LCMScheduler, and a consistency student's rollout against LCMScheduler's own sampling loop."""

import torch
from diffusers import LCMScheduler

from ddil_cli.diffusion.consistency import boundary_scalings
from ddil_cli.models.gmm import GMM_SCHEDULER_CONFIG, GMMDenoiser
from ddil_cli.models.mlp import mlp_student_for
from ddil_cli.rollout import Grid, rollout_seeds


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

    # diffusers' own loop on the student's epsilon output, drawing its start and re-noising from a
    # generator per seed as its pipelines do: nothing injected
    sched = LCMScheduler.from_config({**sched.config, "prediction_type": "epsilon"})
    sched.set_timesteps(4)
    generators = [torch.Generator().manual_seed(seed) for seed in seeds]
    x = torch.cat([torch.randn((1, 2), generator=g) for g in generators])
    cond = student.encode(prompts)
    with torch.no_grad():
        for t in timesteps:
            eps = student.forward(x, torch.full((3,), t), cond.cond)
            x = sched.step(eps, t, x, generator=generators).prev_sample
    assert torch.allclose(ours, x, atol=1e-5), (ours - x).abs().max()
