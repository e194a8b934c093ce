"""Mixed rollouts: the extremes reduce to pure teacher / pure student, checked against diffusers."""

import torch
from diffusers import DDIMScheduler

from ddil_cli.models.gmm import GMM_SCHEDULER_CONFIG, GMMDenoiser
from ddil_cli.models.mlp import mlp_student_for
from ddil_cli.rollout import Grid, rollout, seed_draws, seeded_noise, teacher_mask


def _setup(n=6):
    teacher = GMMDenoiser("gmm:ring:8")
    student = mlp_student_for(teacher, hidden=32, layers=2)
    grid = Grid.make(4, 32)
    x_T, u = seeded_noise(list(range(n)), (2,), grid.num_transitions)
    cond = teacher.encode([f"class {i % 4}" for i in range(n)])
    return teacher, student, grid, x_T, u, cond


def _run(mask, teacher, student, grid, x_T, cond, guidance=2.0):
    return rollout(x_T, cond, grid, mask, teacher=teacher, student=student, guidance=guidance).final


def test_pure_teacher_matches_diffusers_ddim():
    teacher, _, grid, x_T, u, cond = _setup()
    ours = _run(teacher_mask(u, grid, teacher_prob=1.0), teacher, None, grid, x_T, cond)
    sched = DDIMScheduler(**GMM_SCHEDULER_CONFIG, clip_sample=False, prediction_type="sample",
                          timestep_spacing="trailing", set_alpha_to_one=True)
    sched.set_timesteps(32)
    x = x_T.clone()
    for t in sched.timesteps:
        x0 = teacher.predict_x0(x, torch.full((x.shape[0],), int(t)), cond, 2.0)
        x = sched.step(x0, t, x, eta=0.0).prev_sample
    # each step agrees to 1e-6 (tests/test_diffusion.py); 32 float32 steps through a sharp
    # posterior amplify rounding to ~1e-4
    assert (ours - x).abs().max() < 1e-3


def test_teacher_prob_extremes_equal_pure_models():
    teacher, student, grid, x_T, u, cond = _setup()
    all_teacher = torch.ones(6, 4, dtype=torch.bool)
    pure_t = _run(all_teacher, teacher, None, grid, x_T, cond)
    pure_s = _run(~all_teacher, None, student, grid, x_T, cond)
    assert torch.equal(_run(teacher_mask(u, grid, teacher_prob=1.0), teacher, student, grid, x_T, cond), pure_t)
    assert torch.equal(_run(teacher_mask(u, grid, teacher_prob=0.0), teacher, student, grid, x_T, cond), pure_s)
    mixed = _run(teacher_mask(u, grid, teacher_prob=0.5), teacher, student, grid, x_T, cond)
    assert not torch.equal(mixed, pure_t) and not torch.equal(mixed, pure_s)


def test_switch_endpoints_reduce_to_pure_models():
    _, _, grid, _, u, _ = _setup()
    assert teacher_mask(u, grid, switch=("t2s", 999)).logical_not().all()
    assert teacher_mask(u, grid, switch=("t2s", 0)).all()
    assert teacher_mask(u, grid, switch=("s2t", 999)).all()
    assert teacher_mask(u, grid, switch=("s2t", 0)).logical_not().all()
    # t2s at 500: the teacher takes 999->749 and 749->499, the student the rest
    assert teacher_mask(u, grid, switch=("t2s", 500))[0].tolist() == [True, True, False, False]


def test_mixed_rows_match_their_own_pure_runs():
    """Per-example choice: a row the teacher drives throughout equals that row of a pure teacher run."""
    teacher, student, grid, x_T, u, cond = _setup()
    mask = torch.zeros(6, 4, dtype=torch.bool)
    mask[::2] = True
    mixed = _run(mask, teacher, student, grid, x_T, cond)
    pure_t = _run(torch.ones_like(mask), teacher, None, grid, x_T, cond)
    pure_s = _run(torch.zeros_like(mask), None, student, grid, x_T, cond)
    assert torch.allclose(mixed[::2], pure_t[::2], atol=1e-6)
    assert torch.allclose(mixed[1::2], pure_s[1::2], atol=1e-6)


def test_record_and_stop_at():
    teacher, student, grid, x_T, u, cond = _setup()
    res = rollout(x_T, cond, grid, teacher_mask(u, grid, teacher_prob=0.5), teacher=teacher,
                  student=student, record=True, stop_at=2)
    assert res.timesteps == [999, 749] and len(res.states) == 2
    assert torch.equal(res.states[0], x_T)


def test_seeded_noise_independent_of_batch():
    a, ua = seeded_noise([5, 6, 7], (3,), 4)
    b, ub = seeded_noise([7], (3,), 4)
    assert torch.equal(a[2], b[0]) and torch.equal(ua[2], ub[0])
    both, alone = seed_draws([5, 7], (3,), 4, renoise=True), seed_draws([7], (3,), 4, renoise=True)
    assert torch.equal(both.renoise[1], alone.renoise[0]) and torch.equal(both.start[1], a[2])
    # the start first, then the re-noising of every step but the last, as one generator in diffusers
    gen = torch.Generator().manual_seed(7)
    draws = [torch.randn(3, generator=gen) for _ in range(4)]
    assert torch.equal(torch.stack(draws[1:]), alone.renoise[0, :3])
    assert not alone.renoise[0, 3].any()
