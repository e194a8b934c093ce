"""The diffusion math against diffusers' own scheduler (an independent implementation)."""

import pytest
import torch
from diffusers import DDIMScheduler

from ddil_cli.diffusion import (NoiseSchedule, Threshold, apply_threshold, cfg_combine, ddim_step,
                                nested_grids, parse_threshold, to_eps, to_x0, trailing_timesteps)
from ddil_cli.diffusion.parameterization import from_x0
from ddil_cli.diffusion.schedule import bcast

SD = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")


def _scheduler(steps, **kw):
    sched = DDIMScheduler(**SD, set_alpha_to_one=True, timestep_spacing="trailing", **kw)
    sched.set_timesteps(steps)
    return sched


def test_schedule_matches_diffusers():
    schedule = NoiseSchedule.from_scheduler_config(SD)
    assert torch.allclose(schedule.alphas_cumprod.float(), _scheduler(4).alphas_cumprod)
    a, s = schedule.alpha_sigma(torch.tensor([-1, 0, 999]))
    assert a[0] == 1 and s[0] == 0
    assert torch.allclose(a**2 + s**2, torch.ones(3))


def test_trailing_grid_matches_diffusers_and_nests():
    assert trailing_timesteps(4) == [999, 749, 499, 249]
    for steps in (1, 2, 4, 8, 16, 32, 50):
        assert trailing_timesteps(steps) == _scheduler(steps).timesteps.tolist()
    student, teacher, ratio = nested_grids(4, 32)
    assert ratio == 8 and teacher[::8] == student
    with pytest.raises(ValueError):
        nested_grids(3, 32)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_ddim_step_matches_diffusers(prediction_type):
    torch.manual_seed(0)
    sched = _scheduler(8, clip_sample=False, prediction_type=prediction_type)
    schedule = NoiseSchedule.from_scheduler_config(SD)
    grid = sched.timesteps.tolist() + [-1]
    for t, s in zip(grid[:-1], grid[1:]):
        x_t, out = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8)
        ref = sched.step(out, t, x_t, eta=0.0).prev_sample
        a, sg = schedule.alpha_sigma(torch.tensor([t] * 3))
        x0 = to_x0(out, x_t, bcast(a, x_t), bcast(sg, x_t), prediction_type)
        ours = ddim_step(x_t, x0, t, s, schedule)
        assert (ours - ref).abs().max() <= 1e-5


def test_dynamic_threshold_matches_diffusers():
    torch.manual_seed(1)
    sched = _scheduler(4, thresholding=True, dynamic_thresholding_ratio=0.9, sample_max_value=1e6)
    schedule = NoiseSchedule.from_scheduler_config(SD)
    x_t, eps = 3 * torch.randn(2, 3, 8, 8), torch.randn(2, 3, 8, 8)
    ref = sched.step(eps, 749, x_t, eta=0.0, use_clipped_model_output=True).prev_sample
    a, s = schedule.alpha_sigma(torch.tensor([749, 749]))
    x0 = to_x0(eps, x_t, bcast(a, x_t), bcast(s, x_t), "epsilon")
    ours = ddim_step(x_t, x0, 749, 499, schedule, Threshold("dynamic", 0.9))
    assert (ours - ref).abs().max() <= 1e-5


def test_static_threshold_matches_clip_sample():
    torch.manual_seed(2)
    sched = _scheduler(4, clip_sample=True, clip_sample_range=1.0)
    schedule = NoiseSchedule.from_scheduler_config(SD)
    x_t, eps = torch.randn(2, 3, 8, 8), 2 * torch.randn(2, 3, 8, 8)
    ref = sched.step(eps, 499, x_t, eta=0.0, use_clipped_model_output=True).prev_sample
    a, s = schedule.alpha_sigma(torch.tensor([499, 499]))
    x0 = to_x0(eps, x_t, bcast(a, x_t), bcast(s, x_t), "epsilon")
    ours = ddim_step(x_t, x0, 499, 249, schedule, parse_threshold("static:1"))
    assert (ours - ref).abs().max() <= 1e-5


def test_dynamic_threshold_keeps_in_range_samples():
    x0 = torch.rand(4, 10) * 1.8 - 0.9  # already inside [-1, 1]: q clamps to 1, nothing changes
    assert torch.equal(apply_threshold(x0, Threshold("dynamic", 0.995)), x0)


def test_conversions_round_trip():
    torch.manual_seed(3)
    x_t, x0 = torch.randn(5, 3), torch.randn(5, 3)
    a, s = torch.tensor(0.6), torch.tensor(0.8)
    for kind in ("epsilon", "v_prediction", "sample"):
        out = from_x0(x0, x_t, a, s, kind)
        assert torch.allclose(to_x0(out, x_t, a, s, kind), x0, atol=1e-5)
        assert torch.allclose(to_eps(out, x_t, a, s, kind), (x_t - a * x0) / s, atol=1e-5)


def test_cfg_combine():
    u, c = torch.zeros(2, 3), torch.ones(2, 3)
    assert torch.equal(cfg_combine(u, c, 1.0), c)
    assert torch.allclose(cfg_combine(u, c, torch.tensor([2.0, 3.0]))[:, 0], torch.tensor([2.0, 3.0]))


@pytest.mark.parametrize("text", ["static:0", "dynamic:1.5", "foo", "static:x"])
def test_bad_threshold(text):
    with pytest.raises(ValueError):
        parse_threshold(text)
