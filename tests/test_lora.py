"""LoRA students (--lora-rank) for every method on tiny SD pipelines: only adapters (and named
extras) get gradients, one frozen base is shared by teacher, student, LCM's target and DMD2's
critic (storage pointers), checkpoints hold the adapters alone and resume exactly, and plain
diffusers (the teacher's pipeline + `load_lora_weights(student)` + the student's scheduler)
reproduces `ddil sample`'s pixels; the 8-bit optimizer resumes exactly where bitsandbytes runs."""

import json
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from cli_runner import run_cli as cli
from resume import crash_and_resume
from ddil_cli.errors import UserError
from ddil_cli.methods.base import Batch
from ddil_cli.stages.distill import DistillConfig, make_plan, run_distill

RUNS = {"pd": dict(steps=2, teacher_steps=8),  # two halving stages: the second's teacher is a LoRA folder
        "lcm": dict(steps=2, teacher_steps=8, options={"unroll_steps": "2", "solver_steps": 10}),
        "dmd2": dict(steps=2, teacher_steps=8, options={"critic_updates": 2, "critic_lora_rank": 2})}


def _config(root, method, out, **extra):
    return DistillConfig(**{**dict(method=method, teacher=str(root / "teacher"), prompts=str(root / "prompts.txt"),
                                   prior="student=1", max_updates=4, batch_size=2, collect_every=2,
                                   rollouts_per_collect=2, lora_rank=2, quiet=True, out=str(out)),
                            **RUNS[method], **extra})


def _method(root, name):
    """The method of a LoRA run's (first) phase, built as the stage builds it."""
    from ddil_cli.models import load_denoiser

    cfg = _config(root, name, root / "unused")
    teacher = load_denoiser(cfg.teacher)
    plan = make_plan(cfg, teacher)
    phase = plan.phases[0]
    student = plan.method.make_student(teacher, phase, plan.options, guidance_embedding=plan.guidance_embedding,
                                       lora=plan.lora)
    return plan.method(teacher=teacher, student=student, phase=phase, options=plan.options), plan


def _batch(method, plan):
    t = torch.tensor(method.phase.train_timesteps[:2])
    cond = method.teacher.encode(["a cat", "a dog"])
    return Batch(x_t=torch.randn(2, *method.teacher.state_shape, generator=torch.Generator().manual_seed(0)), t=t,
                 t_index=torch.zeros(2, dtype=torch.long), cond=cond, student_cond=cond,
                 guidance=torch.full((2,), plan.guidance_range[0]), source=["data"] * 2, keys=[None] * 2)


@pytest.mark.parametrize("name", ["pd", "lcm", "dmd2"])
def test_each_loss_trains_only_its_adapter_on_one_shared_base(tiny_sd_root, name):
    from ddil_cli.models.lora import adapter_parameters

    method, plan = _method(tiny_sd_root, name)
    unet = method.teacher.network
    nets = {"student": method.student.network}
    models = [method.teacher, method.student, getattr(method, "critic", None), getattr(method, "target_model", None)]
    base = {n: p for n, p in unet.named_parameters() if "lora_" not in n}
    for model in filter(None, models):  # every role runs on the teacher's own base tensors
        mine = {n: p for n, p in model.network.named_parameters() if "lora_" not in n}
        assert {n: p.data_ptr() for n, p in mine.items()} == {n: p.data_ptr() for n, p in base.items()}
    groups = {g.name: g for g in method.groups()}
    if name == "dmd2":
        nets["critic"] = method.critic.network
    for group in groups.values():
        unet.zero_grad(set_to_none=True)
        out = method.loss(group.name, nets, _batch(method, plan))
        (out[0] if isinstance(out, tuple) else out).mean().backward()
        (module, adapter), = [(m, group.adapters[k]) for k, m in group.modules.items()]
        own = set(adapter_parameters(unet, adapter))
        touched = {n for n, p in unet.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
        assert touched and touched <= own, (group.name, sorted(touched - own)[:3])
    assert not any(p.requires_grad for p in base.values())


@pytest.mark.parametrize("name", ["pd", "lcm", "dmd2"])
def test_lora_run_resumes_exactly_and_checkpoints_hold_adapters_only(tiny_sd_root, tmp_path, monkeypatch, name):
    cfg = _config(tiny_sd_root, name, tmp_path / "full", checkpoint_every=1)
    run_distill(cfg)
    crash_and_resume(cfg, tmp_path / "broken", monkeypatch, 3 if name == "pd" else 1)
    last = sorted((tmp_path / "full/checkpoints").iterdir())[-1].name
    for name_ in ("student/pytorch_lora_weights.safetensors", f"checkpoints/{last}/state.safetensors",
                  *[f"checkpoints/{last}/{f.name}" for f in (tmp_path / "full/checkpoints" / last).glob("*.safetensors")]):
        full, resumed = load_file(str(tmp_path / "full" / name_)), load_file(str(tmp_path / "broken" / name_))
        assert full.keys() == resumed.keys(), name_
        for key in full:
            assert torch.equal(full[key], resumed[key]), (name_, key)
    weights = load_file(str(tmp_path / "full/checkpoints" / last / "student.safetensors"))
    assert weights and all(".lora_" in k for k in weights)  # no frozen base in the checkpoint
    if name == "dmd2":
        critic = load_file(str(tmp_path / "full/checkpoints" / last / "critic.safetensors"))
        assert critic and all(".lora_" in k and ".critic." in k for k in critic)


def _diffusers_images(root, student_dir, rows, steps, *, lora=True):
    """The teacher's pipeline + load_lora_weights(student) + the student's scheduler, at the w and
    seed `ddil sample` wrote, with `generator=torch.Generator().manual_seed(seed)`: nothing injected."""
    from diffusers import StableDiffusionPipeline

    full = (student_dir / "unet").is_dir()  # a full student is a pipeline itself
    pipe = StableDiffusionPipeline.from_pretrained(student_dir if full else root / "teacher", safety_checker=None,
                                                   requires_safety_checker=False)
    if lora and not full:
        pipe.load_lora_weights(student_dir)
    config = json.loads((student_dir / "scheduler/scheduler_config.json").read_text())
    import diffusers

    pipe.scheduler = getattr(diffusers, config["_class_name"]).from_config(config)
    images = [pipe(row["prompt"], num_inference_steps=steps, guidance_scale=row["guidance"], output_type="np",
                   generator=torch.Generator().manual_seed(row["seed"])).images[0] for row in rows]
    return np.round(np.stack(images) * 255).astype(int)


@pytest.mark.parametrize("name, rank", [("pd", 2), ("lcm", 2), ("dmd2", 2), ("dmd2", 0)])
def test_diffusers_load_lora_weights_reproduces_ddil_sample(tiny_sd_root, tmp_path, capsys, name, rank):
    """LoRA students through the teacher's pipeline; a full DMD2 student (its guidance embedding
    taking w, beside a LoRA critic) through StableDiffusionPipeline itself."""
    run_distill(_config(tiny_sd_root, name, tmp_path / "run", max_updates=2, lr=0.02, lora_rank=rank))  # far from zero
    student = tmp_path / "run/student"
    assert (student / "unet").is_dir() == (rank == 0)
    code, err = cli(["sample", "--quiet", "--teacher", str(tiny_sd_root / "teacher"), "--student", str(student),
                     "--steps", "2", "--prompt", "a cat", "--prompt", "a dog", "--num-per-prompt", "1",
                     "--out", str(tmp_path / "samples")], capsys)
    assert code == 0, err
    rows = [json.loads(line) for line in open(tmp_path / "samples/samples.jsonl")]
    assert all((r["guidance"] == 1.0) == (rank > 0) for r in rows)  # LoRA: guidance folded in, guidance_scale=1
    ours = np.stack([np.asarray(Image.open(tmp_path / "samples" / r["file"])) for r in rows]).astype(int)
    theirs = _diffusers_images(tiny_sd_root, student, rows, 2)
    assert np.abs(ours - theirs).max() <= 1
    if rank:
        assert np.abs(ours - _diffusers_images(tiny_sd_root, student, rows, 2, lora=False)).max() > 8  # the adapter mattered


def test_merge_lora_saves_a_full_folder_equal_to_base_plus_adapter(tiny_sd_root, tmp_path):
    from diffusers import StableDiffusionPipeline

    cfg = _config(tiny_sd_root, "lcm", tmp_path / "lora", max_updates=2, lr=0.02)
    run_distill(cfg)
    run_distill(replace(cfg, merge_lora=True, out=str(tmp_path / "merged")))
    merged = StableDiffusionPipeline.from_pretrained(tmp_path / "merged/student", safety_checker=None,
                                                     requires_safety_checker=False).unet
    lora = StableDiffusionPipeline.from_pretrained(tiny_sd_root / "teacher", safety_checker=None,
                                                   requires_safety_checker=False)
    lora.load_lora_weights(tmp_path / "lora/student")
    x, t, e = torch.randn(1, 4, 8, 8), torch.tensor([500]), torch.randn(1, 77, 16)
    with torch.no_grad():
        out = merged(x, t, e).sample
        assert torch.allclose(out, lora.unet(x, t, e).sample, atol=1e-5)
        lora.unet.disable_lora()
        assert (out - lora.unet(x, t, e).sample).abs().max() > 1e-2  # the adapter is in the merged weights


def test_pd_stage_teacher_loads_onto_the_run_s_base(tiny_sd_root, tmp_path):
    from ddil_cli.models import load_denoiser

    run_distill(_config(tiny_sd_root, "pd", tmp_path / "run", max_updates=2, prior="teacher=1"))
    teacher = load_denoiser(str(tiny_sd_root / "teacher"))
    stage = load_denoiser(str(tmp_path / "run/stages/pd-4"), base=teacher)
    assert stage.network is teacher.network and stage.adapter and teacher.adapter is None
    alone = load_denoiser(str(tmp_path / "run/stages/pd-4"))  # its own copy of the base, same outputs
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([999, 499])
    cond = teacher.encode(["a cat", "a dog"])
    with torch.no_grad():
        assert torch.equal(stage.predict_x0(x, t, cond, 4.0), alone.predict_x0(x, t, cond, 4.0))
        assert not torch.equal(stage.predict_x0(x, t, cond), teacher.predict_x0(x, t, cond))


@pytest.mark.parametrize("argv, needle", [
    (["--teacher", "gmm:ring:8", "--lora-rank", "4"], "diffusers UNet"),
    (["--merge-lora"], "--lora-rank R"),
    (["--lora-rank", "2", "--lora-targets", "no_such_layer"], "--lora-targets"),
    (["--optimizer", "sgd"], "--optimizer"),
])
def test_bad_lora_input_is_one_line(tiny_sd_root, tmp_path, capsys, argv, needle):
    root = tiny_sd_root
    base = ["distill", "--method", "lcm", "--teacher", str(root / "teacher"), "--prompts", str(root / "prompts.txt"),
            "--prior", "student=1", "--max-updates", "1", "--batch-size", "1", "--quiet", "--out", str(tmp_path / "r")]
    code, err = cli(base + argv, capsys)
    assert code == 2 and needle in err and "Traceback" not in err, err
    assert len(err.strip().splitlines()) == 1, err


def test_adamw8bit_missing_is_one_line(tiny_sd_root, monkeypatch):
    import builtins

    real = builtins.__import__

    def no_bnb(name, *args, **kwargs):
        if name == "bitsandbytes":
            raise ImportError("No module named 'bitsandbytes'")
        return real(name, *args, **kwargs)
    monkeypatch.setattr(builtins, "__import__", no_bnb)
    from ddil_cli.train import check_optimizer

    with pytest.raises(UserError, match="pip install 'ddil-cli\\[lean\\]'"):
        check_optimizer("adamw8bit", "cpu")


def test_adamw8bit_resumes_exactly(tiny_sd_root, tmp_path, monkeypatch):
    from ddil_cli.train import check_optimizer

    try:
        check_optimizer("adamw8bit", "cpu")
    except UserError as exc:
        pytest.skip(f"no 8-bit AdamW here: {exc}")
    cfg = _config(tiny_sd_root, "lcm", tmp_path / "full", checkpoint_every=1, max_updates=3, optimizer="adamw8bit", lora_rank=0)
    run_distill(cfg)
    crash_and_resume(cfg, tmp_path / "broken", monkeypatch, 1)
    state = json.loads((tmp_path / "full/checkpoints/checkpoint-00000003/state.json").read_text())
    assert "state1" in json.dumps(state["optimizer"])  # bitsandbytes' 8-bit moments were checkpointed
    for name in ("student/unet/diffusion_pytorch_model.safetensors", "checkpoints/checkpoint-00000003/state.safetensors"):
        full, resumed = load_file(str(tmp_path / "full" / name)), load_file(str(tmp_path / "broken" / name))
        assert full.keys() == resumed.keys() and all(torch.equal(full[k], resumed[k]) for k in full), name


def test_sdxl_lora_student_loads_in_the_sdxl_pipeline(tmp_path):
    from diffusers import StableDiffusionXLPipeline

    from ddil_cli.models import load_denoiser
    from ddil_cli.models.diffusers_t2i import lora_student
    from ddil_cli.models.lora import DEFAULT_TARGETS, LoraSpec, adapter_parameters
    from tiny_models import build_tiny_sdxl

    teacher = load_denoiser(str(build_tiny_sdxl(tmp_path / "sdxl")))
    student = lora_student(teacher, LoraSpec(2, 4.0, DEFAULT_TARGETS))
    with torch.no_grad():
        for param in adapter_parameters(student.network, "student").values():
            param.normal_(0, 0.2)
    student.save_pretrained(tmp_path / "student", timesteps=[999, 499], scheduler="lcm")
    pipe = StableDiffusionXLPipeline.from_pretrained(tmp_path / "sdxl")
    pipe.load_lora_weights(tmp_path / "student")
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([999, 499])
    cond = teacher.encode(["a cat", "a dog"]).cond
    added = {"text_embeds": cond["text_embeds"], "time_ids": cond["time_ids"]}
    with torch.no_grad():
        theirs = pipe.unet(x, t, encoder_hidden_states=cond["encoder_hidden_states"], added_cond_kwargs=added).sample
        assert torch.allclose(student.forward(x, t, cond), theirs, atol=1e-5)
        assert (teacher.forward(x, t, cond) - theirs).abs().max() > 1e-2  # the teacher runs the bare base


def test_two_processes_train_one_lora_student(tmp_path):
    """DDP wraps the shared UNet; only the adapter trains, so both ranks must hold the same one."""
    from ddil_cli.data.digits import build_digits_shards
    from ranks import assert_ranks_identical, launch
    from tiny_models import build_tiny_pixel

    build_tiny_pixel(tmp_path / "teacher")
    build_digits_shards(tmp_path / "digits")
    dump = tmp_path / "dump"
    launch("torchrun", dump, ["distill", "--teacher", str(tmp_path / "teacher"), "--steps", "2", "--teacher-steps", "8",
                              "--stage-updates", "2", "--batch-size", "2", "--lora-rank", "2", "--lr", "0.01",
                              "--data", str(tmp_path / "digits/train-{000000..000001}.tar"), "--collect-every", "2",
                              "--rollouts-per-collect", "2", "--device", "cpu", "--quiet", "--out", str(tmp_path / "run")])
    assert_ranks_identical(dump, ["pd-4", "pd-2"])
    assert (tmp_path / "run/student/pytorch_lora_weights.safetensors").is_file()
