"""DMD2: the DM gradient against hand arithmetic; two-timescale updates counted in the optimisers;
exact resume with critic and GAN head; tiny runs on the lab and tiny diffusers pipelines with each
prior; two processes keep generator and critic identical; the SSD-1B recipe end to end on a tiny
random SDXL-architecture pipeline."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ddil_cli.methods.dmd2 import DMD2Method, dm_gradient, dm_loss
from ddil_cli.stages.distill import DistillConfig, run_distill
from cli_runner import run_cli as cli
from lab_fit import x0_error_to_teacher
from resume import crash_and_resume

HERE = Path(__file__).parent
LAB = dict(method="dmd2", teacher="gmm:ring:8", teacher_steps=8, batch_size=8, lr=1e-3, collect_every=2,
           rollouts_per_collect=4, log_every=2, quiet=True)
FIT = {"lab_init_steps": 20}  # --lab-init-steps, short: a fitted start's wiring, not its quality


def test_dm_gradient_and_loss_against_hand_arithmetic():
    x0_g = torch.tensor([[1.0, 2.0], [0.0, -1.0], [0.5, 0.5]], requires_grad=True)
    x0_real = torch.tensor([[0.0, 1.0], [0.0, 0.0], [0.5, 0.5]])
    x0_fake = torch.tensor([[2.0, 2.0], [1.0, -1.0], [0.0, 0.0]])
    grad = dm_gradient(x0_g.detach(), x0_real, x0_fake)
    # row 0: x0_fake - x0_real = (2, 1), mean|x0_g - x0_real| = (1 + 1) / 2 = 1
    # row 1: (1, -1) / ((0 + 1) / 2) = (2, -2); row 2: x0_g == x0_real, so (-0.5, -0.5) / 0: no
    # direction, 0 (not DMD2's nan_to_num of -inf, -3.4e38)
    assert torch.equal(grad, torch.tensor([[2.0, 1.0], [2.0, -2.0], [0.0, 0.0]]))
    loss = dm_loss(x0_g, grad)
    assert torch.allclose(loss, torch.tensor([0.5 * (4 + 1) / 2, 0.5 * (4 + 4) / 2, 0.0]))
    loss.sum().backward()
    assert torch.allclose(x0_g.grad, grad / 2)  # d loss / d x0_g = grad / D per element


def _method(teacher, guidance_embedding=False, **options):
    from ddil_cli.buffer.sources import DataStates
    from ddil_cli.methods.base import PlanRequest
    from ddil_cli.methods.dmd2 import DMD2Options

    opts = DMD2Options(**options)
    phase = DMD2Method.plan(PlanRequest(steps=4, teacher_steps=8, max_updates=1), teacher, opts)[0]
    student = DMD2Method.make_student(teacher, phase, opts, guidance_embedding=guidance_embedding)
    data = DataStates(teacher, prompts=teacher.default_prompts()) if opts.gan_weight > 0 else None
    method = DMD2Method(teacher=teacher, student=student, phase=phase, options=opts, data=data)
    nets = {name: module for group in method.groups() for name, module in group.modules.items()}
    return method, nets


def _batch(teacher, n=4):
    from ddil_cli.methods.base import Batch

    torch.manual_seed(1)
    cond = teacher.encode((teacher.default_prompts() or ["a cat", "a dog"]) * n)
    cond = cond.select(list(range(n)))
    t = torch.tensor([999, 749, 499, 249])[torch.arange(n) % 4]
    return Batch(x_t=torch.randn(n, *teacher.state_shape), t=t, t_index=torch.arange(n) % 4, cond=cond,
                 student_cond=cond, guidance=torch.ones(n), source=["data"] * n, keys=[None] * n)


def test_critic_equal_to_teacher_gives_no_dm_gradient(tiny):
    from ddil_cli.models.diffusers_t2i import DiffusersDenoiser

    teacher = DiffusersDenoiser.from_pretrained(tiny / "sd")
    method, nets = _method(teacher)
    batch = _batch(teacher)
    loss, metrics = method.generator_loss(nets, batch)  # critic = teacher's copy, real score at w = 1
    assert torch.equal(loss, torch.zeros(len(batch))) and metrics["dmd/grad_norm"] == 0
    batch.guidance = torch.full((len(batch),), 4.0)  # CFG moves the real score away from the critic
    loss, metrics = method.generator_loss(nets, batch)
    assert bool((loss > 0).all()) and metrics["dmd/grad_norm"] > 0


def test_each_loss_reaches_only_its_own_networks():
    from ddil_cli.models.gmm import GMMDenoiser

    teacher = GMMDenoiser("gmm:ring:8")
    method, nets = _method(teacher, gan_weight=1.0)
    batch = _batch(teacher)

    def grads(name):
        return [p.grad for p in nets[name].parameters()]
    loss, metrics = method.generator_loss(nets, batch)
    loss.mean().backward()
    assert all(g is not None and g.abs().sum() > 0 for g in grads("student"))
    assert all(g is None for g in grads("critic") + grads("gan_head"))  # the GAN term went through them
    assert all(p.requires_grad for p in nets["critic"].parameters())  # and they train again afterwards
    assert "dmd/gan_g" in metrics
    for module in nets.values():
        module.zero_grad(set_to_none=True)
    loss, metrics = method.critic_loss(nets, batch)
    loss.mean().backward()
    assert all(g is None for g in grads("student"))
    assert all(g is not None for g in grads("critic") + grads("gan_head"))
    assert {"critic/denoise", "critic/gan"} <= set(metrics)


def test_threshold_on_the_generator_passes_the_gradient_through():
    from ddil_cli.diffusion.threshold import Threshold
    from ddil_cli.models.gmm import GMMDenoiser

    teacher = GMMDenoiser("gmm:ring:8")
    method, nets = _method(teacher)
    method.threshold = Threshold("static", 1e-3)
    batch = _batch(teacher)
    x0_g = method.generator_x0(batch, nets["student"])
    assert float(x0_g.detach().abs().max()) <= 1e-3 + 1e-6  # clamped (c_skip ~1e-7 at t >= 249)
    x0_g.sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in nets["student"].parameters())


def _optimizer_steps(checkpoint: Path, key: str) -> set[int]:
    tensors = load_file(str(checkpoint / "state.safetensors"))
    return {int(v.item()) for k, v in tensors.items() if k.startswith(f"{key}.state.") and k.endswith(".step")}


def test_critic_takes_critic_updates_steps_per_generator_update(tmp_path, monkeypatch):
    calls = []
    loss = DMD2Method.loss

    def record(self, group, nets, batch):
        calls.append(group)
        return loss(self, group, nets, batch)
    monkeypatch.setattr(DMD2Method, "loss", record)
    run_distill(DistillConfig(**LAB, max_updates=4, options={"critic_updates": 3}, prior="data=1",
                              out=str(tmp_path / "run")))
    assert calls == (["critic"] * 3 + ["student"]) * 4
    final = tmp_path / "run/checkpoints/checkpoint-00000004"
    assert _optimizer_steps(final, "optimizer") == {4}
    assert _optimizer_steps(final, "optimizer.critic") == {12}
    state = json.loads((final / "state.json").read_text())
    assert state["schedulers"]["critic"]["last_epoch"] == 12 and state["groups"] == ["student", "critic"]


@pytest.mark.parametrize("start", [{}, FIT], ids=["fresh", "fitted"])
def test_exact_resume_with_critic_and_gan_head(tmp_path, monkeypatch, start):
    cfg = DistillConfig(**LAB, max_updates=6, checkpoint_every=3,
                        options={**start, "critic_updates": 2, "gan_weight": 0.1}, out=str(tmp_path / "full"))
    run_distill(cfg)
    crash_and_resume(cfg, tmp_path / "broken", monkeypatch, 3)
    for name in ("student", "critic", "gan_head"):
        full = load_file(str(tmp_path / f"full/checkpoints/checkpoint-00000006/{name}.safetensors"))
        resumed = load_file(str(tmp_path / f"broken/checkpoints/checkpoint-00000006/{name}.safetensors"))
        assert full.keys() == resumed.keys()
        assert all(torch.equal(full[k], resumed[k]) for k in full), name
    # and the resumed run's critic did train: it moved away from its first checkpoint
    first = load_file(str(tmp_path / "broken/checkpoints/checkpoint-00000003/critic.safetensors"))
    final = load_file(str(tmp_path / "broken/checkpoints/checkpoint-00000006/critic.safetensors"))
    assert any(not torch.equal(first[k], final[k]) for k in first)
    rows = [json.loads(line) for line in open(tmp_path / "full/metrics.jsonl")]
    assert {"loss", "loss/critic", "critic/denoise", "critic/gan", "dmd/dm_loss", "dmd/gan_g",
            "dmd/grad_norm", "lr/critic"} <= set(rows[-1])


@pytest.mark.parametrize("prior", ["data=1", "student=1", "teacher=1"])
def test_lab_runs_with_each_prior(tmp_path, prior):
    summary = run_distill(DistillConfig(**LAB, max_updates=3, prior=prior, options={"critic_updates": 2},
                                        out=str(tmp_path / "run")))
    sources = {k[5:] for row in map(json.loads, open(tmp_path / "run/metrics.jsonl")) for k in row
               if k in ("loss/data", "loss/student", "loss/teacher")}
    assert sources == {prior.split("=")[0]}
    assert (summary["phases"][0]["buffer_states"] > 0) == (prior != "data=1")
    config = json.loads((tmp_path / "run/student/ddil_mlp.json").read_text())
    assert config["timesteps"] == [999, 749, 499, 249]
    assert config["scheduler_config"]["_class_name"] == "LCMScheduler"


def test_default_prior_is_student_and_teacher(tmp_path):
    run_distill(DistillConfig(**LAB, max_updates=2, options={"critic_updates": 1}, out=str(tmp_path / "run")))
    manifest = json.loads((tmp_path / "run/manifest.json").read_text())
    assert manifest["config"]["prior"] is None
    rows = [json.loads(line) for line in open(tmp_path / "run/metrics.jsonl")]
    assert "loss/data" not in rows[-1] and {"loss/student", "loss/teacher"} <= set(rows[-1])


def test_lab_generator_and_critic_start_from_the_teacher_fitted_mlp():
    # --lab-init-steps: DMD2 starts generator and critic from the teacher's weights; the lab's
    # analytic teacher has none, so both start from one MLP fitted to it
    from ddil_cli.models import load_denoiser

    teacher = load_denoiser("gmm:ring:8")
    torch.manual_seed(0)
    method, _ = _method(teacher, lab_init_steps=300)
    for a, b in zip(method.student.network.parameters(), method.critic.network.parameters()):
        assert torch.equal(a, b) and a.data_ptr() != b.data_ptr()  # equal copies, trained apart
    torch.manual_seed(0)
    fresh, _ = _method(teacher, lab_init_steps=0)
    assert x0_error_to_teacher(method.student, teacher) < 0.2 * x0_error_to_teacher(fresh.student, teacher)


def test_lab_guidance_conditioned_generator_gets_its_own_fitted_critic():
    # a w-conditioned generator (--real-guidance != 1) cannot be the critic's copy: the critic
    # scores at guidance 1 without a w input, so it is fitted to the teacher on its own
    from ddil_cli.models import load_denoiser

    teacher = load_denoiser("gmm:ring:8")
    torch.manual_seed(0)
    method, _ = _method(teacher, guidance_embedding=True, lab_init_steps=300)
    assert method.student.guidance_conditioned and not method.critic.guidance_conditioned
    torch.manual_seed(0)
    fresh, _ = _method(teacher, guidance_embedding=True, lab_init_steps=0)
    unfitted = x0_error_to_teacher(fresh.critic, teacher)
    assert x0_error_to_teacher(method.student, teacher) < 0.2 * unfitted
    assert x0_error_to_teacher(method.critic, teacher) < 0.2 * unfitted


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from ddil_cli.data.digits import build_digits_shards
    from tiny_models import build_tiny_pixel, build_tiny_sd

    root = tmp_path_factory.mktemp("tiny")
    build_tiny_sd(root / "sd")
    build_tiny_pixel(root / "pixel")
    build_digits_shards(root / "digits")
    (root / "prompts.txt").write_text("a cat\na dog\n")
    return root


TINY = dict(method="dmd2", teacher_steps=8, max_updates=2, batch_size=2, collect_every=2, rollouts_per_collect=2,
            quiet=True)


@pytest.mark.parametrize("prior", ["student=1", "teacher=1"])
def test_tiny_sd_with_rollout_priors_runs_in_diffusers_with_lcm(tiny, tmp_path, prior):
    from diffusers import LCMScheduler, StableDiffusionPipeline

    run_distill(DistillConfig(**TINY, teacher=str(tiny / "sd"), prompts=str(tiny / "prompts.txt"), prior=prior,
                              gradient_checkpointing=True, options={"critic_updates": 2, "real_guidance": 3.0},
                              out=str(tmp_path / "run")))
    pipe = StableDiffusionPipeline.from_pretrained(tmp_path / "run/student", safety_checker=None,
                                                   requires_safety_checker=False)
    assert isinstance(pipe.scheduler, LCMScheduler)
    pipe.scheduler.set_timesteps(4)
    assert pipe.scheduler.timesteps.tolist() == [999, 749, 499, 249]
    images = pipe("a cat", num_inference_steps=4, guidance_scale=3.0, output_type="np",
                  generator=torch.Generator().manual_seed(0)).images
    assert images.shape[0] == 1 and bool(torch.isfinite(torch.as_tensor(images)).all())


def test_tiny_pixel_with_data_and_gan_head(tiny, tmp_path):
    run_distill(DistillConfig(**TINY, teacher=str(tiny / "pixel"), prior="data=1",
                              data=str(tiny / "digits/train-{000000..000001}.tar"),
                              options={"critic_updates": 2, "gan_weight": 0.01}, out=str(tmp_path / "run")))
    row = [json.loads(line) for line in open(tmp_path / "run/metrics.jsonl")][-1]
    assert {"critic/gan", "dmd/gan_g", "loss/data"} <= set(row)
    head = load_file(str(tmp_path / "run/checkpoints/checkpoint-00000002/gan_head.safetensors"))
    assert head["body.0.weight"].shape[1] == 16  # the UNet's mid-block width


def test_gan_without_data_is_one_line(tiny, tmp_path, capsys):
    code, err = cli(["distill", "--method", "dmd2", "--teacher", str(tiny / "sd"), "--prompts",
                     str(tiny / "prompts.txt"), "--gan-weight", "0.01", "--quiet", "--out", str(tmp_path / "run")],
                    capsys)
    assert code == 2 and "--data" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()
    code, err = cli(["distill", "--method", "pd", "--critic-updates", "3", "--quiet", "--out",
                     str(tmp_path / "run")], capsys)
    assert code == 2 and "--critic-updates is not an option of --method pd" in err


def test_two_processes_keep_generator_and_critic_identical(tmp_path):
    dump = tmp_path / "dump"
    args = ["distill", "--method", "dmd2", "--teacher", "gmm:ring:8", "--teacher-steps", "8", "--max-updates", "4",
            "--batch-size", "8", "--lr", "1e-3", "--critic-updates", "2", "--gan-weight", "0.1", "--lab-init-steps", "20",
            "--collect-every", "2", "--rollouts-per-collect", "4", "--device", "cpu", "--quiet",
            "--out", str(tmp_path / "run")]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(HERE.parent), str(HERE)])}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(HERE / "mp_distill.py"), str(dump), *args], capture_output=True, text=True, env=env,
                          timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for name in ("student", "critic", "gan_head"):
        rank0 = load_file(str(dump / f"rank0-dmd2-4-{name}.safetensors"))
        rank1 = load_file(str(dump / f"rank1-dmd2-4-{name}.safetensors"))
        for key in rank0:
            assert torch.allclose(rank0[key], rank1[key], atol=1e-6, rtol=0), (name, key)


def test_ssd1b_recipe_end_to_end_on_a_tiny_sdxl(tmp_path):
    from ddil_cli.data.digits import build_digits_shards
    from tiny_models import build_tiny_sdxl

    build_tiny_sdxl(tmp_path / "sdxl")
    build_digits_shards(tmp_path / "digits")
    (tmp_path / "prompts.txt").write_text("a cat\na dog\n")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(HERE.parent),
           "DDIL": f"{sys.executable} -m ddil_cli", "LAUNCH": f"{sys.executable} -m ddil_cli",
           "TEACHER": str(tmp_path / "sdxl"), "DATA": str(tmp_path / "digits/train-{000000..000001}.tar"),
           "PROMPTS": str(tmp_path / "prompts.txt"), "OUT": str(tmp_path / "run"), "UPDATES": "2", "BATCH": "2",
           "CRITIC_UPDATES": "2", "COLLECT_EVERY": "1", "ROLLOUTS": "2", "TEACHER_STEPS": "8",
           "NUM_PER_PROMPT": "1", "EXTRA": "--device cpu --quiet --mixed-precision no"}
    proc = subprocess.run(["bash", str(HERE.parent / "recipes/ssd1b-dmd2.sh")], capture_output=True, text=True,
                          env=env, timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    manifest = json.loads((tmp_path / "run/manifest.json").read_text())
    assert manifest["config"]["batch_size"] == 2 and manifest["config"]["threshold"] == "static:4"
    assert manifest["method_options"]["gan_weight"] == 5e-3
    assert len(list((tmp_path / "run/samples/images").glob("*.png"))) == 2
