"""PD's target against an independent k-step DDIM from diffusers' scheduler; --pd-stages plans,
resumes and saves students that plain diffusers samples on their grid."""

import pytest
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


def _method(teacher, student, grid, mode="jump", ratio=2):
    phase = Phase("pd-test", 1, grid, grid, [], options={"mode": mode, "ratio": ratio})
    return PDMethod(teacher=teacher, student=student, phase=phase, options=MethodOptions())


# diffusers' DDIM steps from t to t - T // N, which is its own trailing grid's next point only
# when N divides T = 1000: so the fine grids here have 8, 20, 40 or 100 points
@pytest.mark.parametrize("steps,ratio", [(4, 2), (2, 4), (1, 8), (4, 5), (5, 4), (4, 10), (2, 20), (4, 25)])
def test_student_outputting_target_lands_on_teacher_k_steps(steps, ratio):
    teacher = GMMDenoiser("gmm:ring:8")
    student = mlp_student_for(teacher, hidden=16, layers=1)
    sched = DDIMScheduler(**GMM_SCHEDULER_CONFIG, clip_sample=False, prediction_type="sample",
                          timestep_spacing="trailing", set_alpha_to_one=True)
    sched.set_timesteps(steps)
    grid = sched.timesteps.tolist()
    method = _method(teacher, student, grid, ratio=ratio)
    sched.set_timesteps(steps * ratio)
    fine = sched.timesteps.tolist()
    for i, t in enumerate(grid):
        batch = _batch(teacher, student, i, grid)
        target = method.target(batch)
        one_student_step = ddim_step(batch.x_t, target, batch.t,
                                     torch.full((5,), grid[i + 1] if i + 1 < steps else -1), teacher.schedule)
        x = batch.x_t
        for t_fine in fine[ratio * i:ratio * (i + 1)]:  # the teacher's k steps, by diffusers
            x0 = teacher.predict_x0(x, torch.full((5,), t_fine), batch.cond, batch.guidance)
            x = sched.step(x0, t_fine, x, eta=0.0).prev_sample
        assert (one_student_step - x).abs().max() < 1e-4, (t, (one_student_step - x).abs().max())
        # and not where fewer teacher steps land: the k sub-steps matter
        assert (one_student_step - batch.x_t).abs().max() > 1e-2


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
    assert _plan_ddil({"ddil_from_stage": 3, "guided_updates": 5}, explicit_prior=True) == (
        {"guided-32": False, "pd-16": False, "pd-8": False, "pd-4": True}, 3)
    assert _plan_ddil({"ddil_from_stage": 1, "guided_updates": 5})[0]["guided-32"] is True
    # clipped to the last stage: a one-halving run (8 -> 4) still trains on DDIL's inputs
    assert _plan_ddil({}, teacher_steps=8) == ({"pd-4": True}, 2)
    assert _plan_ddil({"ddil_from_stage": 9})[0] == {"pd-16": False, "pd-8": False, "pd-4": True}


def test_ddil_from_stage_zero_is_refused():
    import pytest

    from ddil_cli.errors import UserError
    from ddil_cli.methods.pd import PDOptions

    with pytest.raises(UserError, match="--ddil-from-stage must be >= 1"):
        PDOptions.from_dict("pd", {"ddil_from_stage": 0})


def _phases(options, **request):
    from ddil_cli.methods.base import PlanRequest
    from ddil_cli.methods.pd import PDOptions

    return PDMethod.plan(PlanRequest(**{"steps": 4, "teacher_steps": 32, "max_updates": 30, **request}),
                         GMMDenoiser("gmm:ring:8"), PDOptions(**options))


def test_pd_stages_plan_any_ratio_and_the_halving_chain_is_the_default():
    assert _phases({"pd_stages": "32,16,8,4"}) == _phases({})
    one = _phases({"pd_stages": "32,4"})
    assert [(p.name, p.updates, p.timesteps, p.options["ratio"], p.ddil) for p in one] == [
        ("pd-4", 30, [999, 749, 499, 249], 8, True)]  # a one-stage run trains on DDIL's inputs
    assert len(one[0].rollout_grids[0].teacher) == 32 and one[0].rollout_grids[0].ratio == 8
    two = _phases({"pd_stages": "32,8,4", "stage_updates": "10,20"})
    assert [(p.name, p.updates, p.options["ratio"], len(p.rollout_grids[0].teacher)) for p in two] == [
        ("pd-8", 10, 4, 32), ("pd-4", 20, 2, 8)]
    # the guided stage still goes first, at the teacher's steps
    assert [p.name for p in _phases({"pd_stages": "32,2", "guided_updates": 3}, steps=2)] == ["guided-32", "pd-2"]


@pytest.mark.parametrize("args,message", [
    (["--pd-stages", "32,12,4"], "each a multiple (2x or more) of the next"),
    (["--pd-stages", "32,32,4"], "each a multiple (2x or more) of the next"),
    (["--pd-stages", "32"], "each a multiple (2x or more) of the next"),
    (["--pd-stages", "32,x"], "each a multiple (2x or more) of the next"),
    (["--pd-stages", "16,4"], "must run from --teacher-steps 32 to --steps 4"),
    (["--pd-stages", "32,8", "--steps", "4"], "must run from --teacher-steps 32 to --steps 4"),
    (["--method", "lcm", "--pd-stages", "32,4"], "--pd-stages is not an option of --method lcm"),
    (["--teacher-steps", "24"], "--pd-stages 24,4"),
])
def test_bad_pd_stages_end_in_one_line(tmp_path, capsys, args, message):
    from cli_runner import run_cli

    out = tmp_path / "run"
    code, err = run_cli(["distill", "--quiet", "--max-updates", "2", "--out", str(out), *args], capsys)
    assert code == 2 and message in err, err
    assert len(err.strip().splitlines()) == 1 and not out.exists()


def test_one_stage_run_resumes_to_the_uninterrupted_weights(tmp_path, monkeypatch):
    from safetensors.torch import load_file

    from ddil_cli.stages.distill import DistillConfig, run_distill
    from resume import crash_and_resume

    cfg = DistillConfig(method="pd", teacher="gmm:ring:8", steps=2, teacher_steps=16, batch_size=16, lr=1e-3,
                        collect_every=3, rollouts_per_collect=8, quiet=True, max_updates=8, checkpoint_every=4,
                        options={"pd_stages": "16,2"}, out=str(tmp_path / "full"))
    summary = run_distill(cfg)
    assert [p["phase"] for p in summary["phases"]] == ["pd-2"] and summary["phases"][0]["buffer_states"] > 0
    crash_and_resume(cfg, tmp_path / "broken", monkeypatch, 4)
    full = load_file(str(tmp_path / "full/student/model.safetensors"))
    resumed = load_file(str(tmp_path / "broken/student/model.safetensors"))
    assert full.keys() == resumed.keys() and all(torch.equal(full[k], resumed[k]) for k in full)


def test_one_stage_diffusers_student_samples_its_grid_in_plain_diffusers(tmp_path):
    import json

    from diffusers import StableDiffusionPipeline

    from ddil_cli.stages.distill import DistillConfig, run_distill
    from tiny_models import build_tiny_sd

    build_tiny_sd(tmp_path / "teacher")
    (tmp_path / "prompts.txt").write_text("a cat\na dog\n")
    summary = run_distill(DistillConfig(method="pd", teacher=str(tmp_path / "teacher"), prior="student=1",
                                        prompts=str(tmp_path / "prompts.txt"), steps=2, teacher_steps=16,
                                        max_updates=2, batch_size=2, collect_every=1, rollouts_per_collect=2,
                                        options={"pd_stages": "16,2"}, quiet=True, out=str(tmp_path / "run")))
    assert [p["phase"] for p in summary["phases"]] == ["pd-2"] and summary["phases"][0]["buffer_states"] > 0
    manifest = json.loads((tmp_path / "run/manifest.json").read_text())
    assert manifest["phases"][0]["ratio"] == 8 and manifest["method_options"]["pd_stages"] == "16,2"
    pipe = StableDiffusionPipeline.from_pretrained(tmp_path / "run/student", safety_checker=None,
                                                   requires_safety_checker=False)
    pipe.scheduler.set_timesteps(2)
    assert type(pipe.scheduler).__name__ == "DDIMScheduler" and pipe.scheduler.timesteps.tolist() == [999, 499]
    images = pipe(["a cat"], num_inference_steps=2, guidance_scale=1.0, output_type="np",
                  generator=torch.Generator().manual_seed(0)).images
    assert images.shape[0] == 1 and torch.isfinite(torch.as_tensor(images)).all()
