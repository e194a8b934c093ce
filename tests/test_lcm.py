"""LCM: grids and boundary scalings against diffusers' LCMScheduler, the target against a hand
computation with diffusers' DDIMScheduler.step, the EMA target's update, refusal of off-grid
inputs, tiny runs (lab and a tiny SD pipeline, with and without DDIL), the saved student in
diffusers' LatentConsistencyModelPipeline, exact resume, and the recipe on a tiny pipeline."""

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, LCMScheduler
from safetensors.torch import load_file

from ddil_cli.diffusion.consistency import lcm_timesteps, solver_timesteps
from ddil_cli.diffusion.threshold import Threshold
from ddil_cli.errors import UserError
from ddil_cli.methods.base import Batch, PlanRequest
from ddil_cli.methods.lcm import LCMMethod, LCMOptions, default_w_range
from ddil_cli.models.gmm import GMM_SCHEDULER_CONFIG, GMMDenoiser
from ddil_cli.stages.distill import DistillConfig, run_distill
from cli_runner import run_cli as cli
from resume import crash_and_resume

HERE = Path(__file__).parent
LAB = dict(method="lcm", teacher="gmm:ring:8", steps=4, batch_size=16, lr=1e-3, collect_every=2,
           rollouts_per_collect=4, quiet=True, log_every=2)


def _method(options=None, threshold=Threshold("static", 1.0)):
    teacher = GMMDenoiser("gmm:ring:8")
    options = options or LCMOptions()
    options.validate()
    (phase,) = LCMMethod.plan(PlanRequest(steps=4, teacher_steps=32, max_updates=10), teacher, options)
    student = LCMMethod.make_student(teacher, phase, options, guidance_embedding=True, hidden=16, layers=1)
    return LCMMethod(teacher=teacher, student=student, phase=phase, options=options, threshold=threshold)


def _batch(method, t, w=2.5):
    n = len(t)
    gen = torch.Generator().manual_seed(1)
    cond = method.teacher.encode([f"class {i % 4}" for i in range(n)])
    return Batch(x_t=1.5 * torch.randn(n, 2, generator=gen), t=torch.tensor(t), t_index=torch.zeros(n, dtype=torch.long),
                 cond=cond, student_cond=cond, guidance=torch.full((n,), w), source=["data"] * n, keys=[None] * n)


@pytest.mark.parametrize("solver", [50, 25, 8])
def test_grids_are_lcm_schedulers(solver):
    sched = LCMScheduler(**GMM_SCHEDULER_CONFIG)
    for steps in range(1, solver + 1):
        sched.set_timesteps(steps, original_inference_steps=solver)
        assert lcm_timesteps(steps, solver) == sched.timesteps.tolist(), steps
    assert lcm_timesteps(solver, solver) == solver_timesteps(solver)
    assert lcm_timesteps(4, 50) == [999, 759, 499, 259]


def test_boundary_scalings_are_lcm_schedulers_and_identity_at_the_boundary():
    method = _method(LCMOptions(timestep_scaling=7.0))
    sched = LCMScheduler(timestep_scaling=7.0)
    x, x0 = torch.randn(4, 2), torch.randn(4, 2)
    t = torch.tensor([0, 19, 259, 999])
    c_skip, c_out = zip(*(sched.get_scalings_for_boundary_condition_discrete(int(v)) for v in t))
    expected = torch.tensor(c_skip)[:, None] * x + torch.tensor(c_out)[:, None] * x0
    assert torch.allclose(method.consistency(x, x0, t), expected, atol=1e-6)
    assert (c_skip[0], c_out[0]) == (1.0, 0.0)
    # t = 0 and clean data (-1) are the boundary: f is the identity
    assert torch.equal(method.consistency(x, x0, torch.tensor([0, -1, 0, -1])), x)


@pytest.mark.parametrize("threshold", [Threshold(), Threshold("static", 1.0)])
def test_target_equals_a_hand_computation_with_diffusers(threshold):
    method = _method(threshold=threshold)
    student = method.student
    target_net = copy.deepcopy(student.network)  # the target as made: a copy of the student
    with torch.no_grad():  # the online student moves on; the target must not follow it
        for p in student.network.parameters():
            p.add_(0.05 * torch.randn_like(p))
    t = [999, 759, 499, 19, 39, 259]
    batch = _batch(method, t)
    ddim = DDIMScheduler(**GMM_SCHEDULER_CONFIG, prediction_type="sample", set_alpha_to_one=True,
                         clip_sample=threshold.kind == "static", clip_sample_range=threshold.value)
    ddim.set_timesteps(50)
    lcm = LCMScheduler(**GMM_SCHEDULER_CONFIG)
    expected = []
    for i, ti in enumerate(t):
        row = lambda c: type(c)(c.prompts[i:i + 1], {k: v[i:i + 1] for k, v in c.cond.items()},
                                {k: v[i:i + 1] for k, v in c.uncond.items()})
        x, cond, w = batch.x_t[i:i + 1], row(batch.cond), batch.guidance[i:i + 1]
        x0_teacher = method.teacher.predict_x0(x, torch.tensor([ti]), cond, w)
        x_prev = ddim.step(x0_teacher, ti, x, eta=0.0, use_clipped_model_output=True).prev_sample
        s = ti - 20
        with torch.no_grad():
            x0_target = student.predict_x0(x_prev, torch.tensor([max(s, 0)]), cond, w, network=target_net)
        if threshold.kind == "static":
            x0_target = x0_target.clamp(-1, 1)
        c_skip, c_out = lcm.get_scalings_for_boundary_condition_discrete(max(s, 0))
        expected.append(c_skip * x_prev + c_out * x0_target)
    expected = torch.cat(expected)
    assert torch.allclose(method.target(batch), expected, atol=1e-5), (method.target(batch) - expected).abs().max()
    # at t = 19 the solver lands on clean data and the target is the teacher's (clamped) x0 itself
    assert not torch.allclose(expected[3], batch.x_t[3])

    # the loss: pseudo-Huber of f(x_t, t) - target, per example
    with torch.no_grad():
        x0_student = student.predict_x0(batch.x_t, batch.t, batch.cond, batch.guidance)
    c_skip, c_out = zip(*(lcm.get_scalings_for_boundary_condition_discrete(v) for v in t))
    f = torch.tensor(c_skip)[:, None] * batch.x_t + torch.tensor(c_out)[:, None] * x0_student
    huber = (torch.sqrt((f - expected) ** 2 + 0.001 ** 2) - 0.001).mean(1)
    assert torch.allclose(method.loss("student", {"student": student.network}, batch), huber, atol=1e-5)
    method.options.loss = "l2"
    assert torch.allclose(method.loss("student", {"student": student.network}, batch),
                          ((f - expected) ** 2).mean(1), atol=1e-5)


@pytest.mark.parametrize("steps,given,expected", [(4, None, [3, 4, 5]), (2, None, [1, 2, 3]), (1, None, [1, 2]),
                                                  (2, "3,4,5", [3, 4, 5])])
def test_rollout_samplers_default_to_the_student_s_steps_and_neighbours(steps, given, expected):
    teacher = GMMDenoiser("gmm:ring:8")
    options = LCMOptions(unroll_steps=given)
    options.validate()
    (phase,) = LCMMethod.plan(PlanRequest(steps=steps, teacher_steps=32, max_updates=10), teacher, options)
    assert [g.student for g in phase.rollout_grids] == [lcm_timesteps(n, 50) for n in expected]
    assert options.unroll_steps == ",".join(map(str, expected))  # resolved, so the manifest records it


def test_off_grid_inputs_are_refused():
    method = _method()
    with pytest.raises(RuntimeError, match=r"off the 50-step solver grid"):
        method.target(_batch(method, [999, 749]))


def test_ema_target_update_is_exact():
    method = _method(LCMOptions(target_ema=0.9))
    student, target = method.student.network, method.target_network
    before = [p.detach().clone().double() for p in target.parameters()]
    with torch.no_grad():
        for p in student.parameters():
            p.add_(torch.randn_like(p))
    method.after_update({"student": student})
    for old, new, online in zip(before, target.parameters(), student.parameters()):
        expected = 0.9 * old + 0.1 * online.detach().double()
        assert torch.allclose(new.double(), expected, atol=1e-6, rtol=0)  # float32: a few ulps
        assert not new.requires_grad
    method.options.target_ema = 0.0  # decay 0: the target becomes the student, bit for bit
    method.after_update({"student": student})
    assert all(torch.equal(a, b) for a, b in zip(target.parameters(), student.parameters()))


def test_default_guidance_ranges_and_option_checks():
    assert default_w_range(7.5) == (3.0, 15.0)  # Stable Diffusion: the LCM paper's range
    assert default_w_range(1.5) == (1.0, 3.0) and default_w_range(1.0) == (1.0, 2.0)
    options = LCMOptions(w_max=1.5)
    options.resolve(GMMDenoiser("gmm:ring:8"))
    assert (options.w_min, options.w_max) == (1.0, 1.5)
    for bad, needle in (({"loss": "l1"}, "huber or l2"), ({"w_min": 0.5}, "below 1"),
                        ({"w_min": 5.0, "w_max": 4.0}, "exceeds"), ({"unroll_steps": "3,x"}, "--unroll-steps"),
                        ({"ddil_mix": "half"}, "--ddil-mix"),
                        ({"target_ema": 1.0}, r"in \[0, 1\)"), ({"solver_steps": "fifty"}, "solver")):
        with pytest.raises(UserError, match=needle):
            LCMOptions.from_dict("lcm", bad)


@pytest.mark.parametrize("extra,needle", [
    (["--method", "lcm", "--steps", "60"], "1 to --solver-steps (50)"),
    (["--method", "lcm", "--loss", "l1"], "huber or l2"),
    (["--method", "lcm", "--guided-updates", "5"], "--guided-updates is not an option of --method lcm"),
    (["--method", "pd", "--solver-steps", "20"], "--solver-steps is not an option of --method pd"),
])
def test_bad_lcm_input_is_one_line(tmp_path, capsys, extra, needle):
    code, err = cli(["distill", "--quiet", "--out", str(tmp_path / "run"), *extra], capsys)
    assert code == 2 and needle in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "run").exists()


def _buffer_timesteps(run: Path) -> dict[int, list[int]]:
    from ddil_cli.buffer.reader import BufferReader

    found = {}
    for folder in sorted((run / "buffer/lcm-4").glob("steps-*")):
        header = json.loads((folder / "manifest.json").read_text())["header"]
        states = {s.t for s in BufferReader(str(folder), shuffle=0, split_by_node=False, split_by_worker=False)}
        assert states == set(header["grid"]["timesteps"])
        found[len(header["grid"]["timesteps"])] = header["grid"]["timesteps"]
    return found


def test_lab_runs_with_and_without_ddil(tmp_path):
    from ddil_cli.models import load_denoiser

    ddil = run_distill(DistillConfig(**LAB, max_updates=6, out=str(tmp_path / "ddil")))
    plain = run_distill(DistillConfig(**LAB, max_updates=6, prior="data=1", out=str(tmp_path / "plain")))
    assert [p["phase"] for p in ddil["phases"]] == ["lcm-4"]
    assert ddil["phases"][0]["buffer_states"] > 0 and plain["phases"][0]["buffer_states"] == 0
    # DDIL: one collection per LCM sampler (3, 4, 5 steps), states on each sampler's own grid
    assert _buffer_timesteps(tmp_path / "ddil") == {3: [999, 679, 339], 4: [999, 759, 499, 259],
                                                    5: [999, 799, 599, 399, 199]}
    rows = [json.loads(line) for line in open(tmp_path / "ddil/metrics.jsonl")]
    assert "loss/student" in rows[-1] and "loss/data" in rows[-1]
    assert all(np.isfinite(r["loss"]) for r in rows)
    manifest = json.loads((tmp_path / "ddil/manifest.json").read_text())  # the resolved LCM defaults
    assert manifest["prior_schedule"] == [{"start": 0, "prior": {"data": 0.5, "student": 0.5, "teacher": 0.0}}]
    assert manifest["student_prob"] == [{"start": 0, "prob": 1.0}]
    student = load_denoiser(str(tmp_path / "ddil/student"))
    assert student.sampler == "consistency" and student.student_timesteps == [999, 759, 499, 259]
    assert student.guidance_conditioned
    # other step counts: LCMScheduler's grid for them, as diffusers' set_timesteps(3) gives
    from ddil_cli.rollout import sampling_grid

    assert sampling_grid(student, 3, 32).student == [999, 679, 339]
    assert sampling_grid(student, 4, 32).student == [999, 759, 499, 259]
    manifest = json.loads((tmp_path / "ddil/manifest.json").read_text())
    assert manifest["method_options"]["w_min"] == 1.0 and manifest["method_options"]["w_max"] == 2.0


def test_resume_gives_the_uninterrupted_student_and_target(tmp_path, monkeypatch):
    cfg = DistillConfig(**LAB, max_updates=8, checkpoint_every=4, out=str(tmp_path / "full"))
    run_distill(cfg)
    crash_and_resume(cfg, tmp_path / "broken", monkeypatch, 4)
    for name in ("student/model.safetensors", "checkpoints/checkpoint-00000008/state.safetensors"):
        full, resumed = load_file(str(tmp_path / "full" / name)), load_file(str(tmp_path / "broken" / name))
        assert full.keys() == resumed.keys()
        assert any(k.startswith("method.target.") for k in full) or name.startswith("student")
        for key in full:
            assert torch.equal(full[key], resumed[key]), (name, key)


@pytest.fixture(scope="module")
def tiny_sd(tmp_path_factory):
    from ddil_cli.data.digits import build_digits_shards
    from tiny_models import build_tiny_sd

    root = tmp_path_factory.mktemp("lcm-sd")
    build_tiny_sd(root / "teacher")
    build_digits_shards(root / "digits")
    (root / "prompts.txt").write_text("a cat\na dog\n")
    return root


@pytest.mark.parametrize("prior", ["student=0.5,teacher=0.5", None])
def test_tiny_sd_runs_with_and_without_ddil_and_student_runs_in_diffusers_lcm_pipeline(tiny_sd, tmp_path, prior,
                                                                                       capsys):
    from diffusers import LatentConsistencyModelPipeline

    data = None if prior else str(tiny_sd / "digits/train-{000000..000001}.tar")  # without DDIL: real images
    summary = run_distill(DistillConfig(method="lcm", teacher=str(tiny_sd / "teacher"), data=data,
                                        prompts=str(tiny_sd / "prompts.txt") if prior else None,
                                        prior=prior or "data=1", steps=4, teacher_steps=8, max_updates=2,
                                        batch_size=2, collect_every=2, rollouts_per_collect=2, quiet=True,
                                        options={"unroll_steps": "4"}, out=str(tmp_path / "run")))
    (phase,) = summary["phases"]
    assert (phase["buffer_states"] > 0) == (prior is not None)
    rows = [json.loads(line) for line in open(tmp_path / "run/metrics.jsonl")]
    assert all(np.isfinite(r["loss"]) for r in rows) and ("loss/student" in rows[-1]) == (prior is not None)
    student_dir = tmp_path / "run/student"
    scheduler = LCMScheduler.from_pretrained(student_dir / "scheduler")
    assert scheduler.config.original_inference_steps == 50 and scheduler.config.timestep_scaling == 10.0
    scheduler.set_timesteps(4)
    assert scheduler.timesteps.tolist() == [999, 759, 499, 259]
    if prior is None:
        return
    # `ddil sample`'s images from diffusers' LCM pipeline in one batched call, a generator per seed
    # (tests/test_seeds_in_diffusers.py reruns one seed at a time)
    w, prompts = 4.0, ["a cat", "a dog"]
    code, _ = cli(["sample", "--quiet", "--teacher", str(tiny_sd / "teacher"), "--student", str(student_dir),
                   "--steps", "4", "--guidance", str(w), "--prompt", prompts[0], "--prompt", prompts[1],
                   "--num-per-prompt", "1", "--out", str(tmp_path / "samples")], capsys)
    assert code == 0
    rows = [json.loads(line) for line in open(tmp_path / "samples/samples.jsonl")]
    pipe = LatentConsistencyModelPipeline.from_pretrained(student_dir, safety_checker=None,
                                                          requires_safety_checker=False)
    images = pipe(prompts, num_inference_steps=4, guidance_scale=w, output_type="np",
                  generator=[torch.Generator().manual_seed(r["seed"]) for r in rows]).images
    from PIL import Image

    pngs = np.stack([np.asarray(Image.open(tmp_path / "samples" / r["file"])) for r in rows]).astype(int)
    assert np.abs(pngs - np.round(images * 255).astype(int)).max() <= 1


def test_recipe_runs_end_to_end_on_a_tiny_sd_pipeline(tiny_sd, tmp_path):
    """recipes/sd15-lcm.sh, its command chain unchanged, with the teacher and sizes from the environment."""
    ddil = Path(sys.executable).parent / "ddil"
    if not ddil.exists():
        pytest.skip("the ddil entry point is not installed next to this Python")
    env = {**os.environ, "TEACHER": str(tiny_sd / "teacher"), "PROMPTS": str(tiny_sd / "prompts.txt"),
           "OUT": str(tmp_path / "run"), "DDIL": str(ddil), "LAUNCH": sys.executable, "PRIOR": "student=0.5,teacher=0.5",
           "MAX_UPDATES": "2", "BATCH_SIZE": "2", "GRAD_ACCUM": "1", "COLLECT_EVERY": "2", "ROLLOUTS": "2",
           "MIXED_PRECISION": "no", "NUM_PER_PROMPT": "1", "SAMPLE_BATCH": "2", "TRACKER": "none",
           "EXTRA_FLAGS": "--device cpu --teacher-steps 8", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(HERE.parent), os.environ.get("PYTHONPATH", "")])}
    env.pop("DATA", None)
    proc = subprocess.run(["bash", str(HERE.parent / "recipes/sd15-lcm.sh")], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert LCMScheduler.from_pretrained(tmp_path / "run/student/scheduler").config.original_inference_steps == 50
    assert len(list((tmp_path / "run/samples/images").glob("*.png"))) == 2


def test_two_processes_train_one_student_and_one_target(tmp_path):
    """A real 2-process (gloo) LCM + DDIL lab run: ranks end with identical students and EMA targets."""
    from test_train import _assert_ranks_identical, _launch

    dump = tmp_path / "dump"
    _launch("torchrun", dump, ["distill", "--method", "lcm", "--teacher", "gmm:ring:8", "--max-updates", "4",
                               "--batch-size", "16", "--lr", "1e-3", "--collect-every", "2",
                               "--rollouts-per-collect", "4", "--device", "cpu", "--quiet", "--out", str(tmp_path / "run")])
    _assert_ranks_identical(dump, ["lcm-4"], names=("student", "method"))
    assert sorted(p.name for p in (tmp_path / "run/buffer/lcm-4").iterdir()) == ["steps-3", "steps-4"]


def test_pixel_student_by_hand_with_unet_and_lcm_scheduler(tmp_path):
    """A pixel-space student (no VAE, so no pipeline class): its UNet driven by hand with the saved
    LCMScheduler, the pipeline's prompt encoding and guidance embedding, equals our rollout."""
    from diffusers import LatentConsistencyModelPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    from ddil_cli.data.digits import build_digits_shards
    from ddil_cli.models import load_denoiser
    from ddil_cli.rollout import rollout_seeds, sampling_grid
    from tiny_models import build_tiny_pixel

    build_tiny_pixel(tmp_path / "teacher")
    build_digits_shards(tmp_path / "digits")
    run_distill(DistillConfig(method="lcm", teacher=str(tmp_path / "teacher"), max_updates=2, batch_size=2,
                              data=str(tmp_path / "digits/train-{000000..000001}.tar"), collect_every=1,
                              rollouts_per_collect=2, quiet=True, out=str(tmp_path / "run")))
    folder, w, seeds, prompts = tmp_path / "run/student", 2.0, [3, 4], ["zero", "seven"]
    teacher, student = load_denoiser(str(tmp_path / "teacher")), load_denoiser(str(folder))
    ours = rollout_seeds(seeds, prompts, sampling_grid(student, 4, 32), teacher=teacher, student=student,
                         teacher_prob=0.0, guidance=w).final
    # diffusers' draws, nothing injected: a generator per seed for the start and each step's noise
    generators = [torch.Generator().manual_seed(seed) for seed in seeds]
    x = torch.cat([torch.randn((1, *teacher.state_shape), generator=g) for g in generators])
    unet = UNet2DConditionModel.from_pretrained(folder / "unet")
    tokenizer = CLIPTokenizer.from_pretrained(folder / "tokenizer")
    ids = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids
    text = CLIPTextModel.from_pretrained(folder / "text_encoder")(ids)[0]
    w_embedding = LatentConsistencyModelPipeline.get_guidance_scale_embedding(
        None, torch.full((2,), w - 1), embedding_dim=unet.config.time_cond_proj_dim)
    scheduler = LCMScheduler.from_pretrained(folder / "scheduler")
    scheduler.set_timesteps(4)
    with torch.no_grad():
        for t in scheduler.timesteps:
            out = unet(x, t, encoder_hidden_states=text, timestep_cond=w_embedding).sample
            x, denoised = scheduler.step(out, t, x, generator=generators, return_dict=False)
    assert torch.allclose(denoised, ours, atol=1e-4), (denoised - ours).abs().max()
