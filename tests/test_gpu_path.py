"""The GPU path, checked on CPU: fp16's GradScaler through an overflow, a NaN loss on one of two
ranks, finished PD stages released, per-rank random streams with an exact 2-process resume,
frozen networks in a lower dtype, and the host reads of one update counted."""

import gc
import json
import sys
import weakref
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ddil_cli.stages.distill import DistillConfig, run_distill
from ddil_cli.train import Trainer, _Group
from ranks import assert_ranks_identical, launch

LAB = dict(method="pd", teacher="gmm:ring:8", steps=4, teacher_steps=8, batch_size=16, lr=1e-3,
           collect_every=3, rollouts_per_collect=8, quiet=True, log_every=2)


def _rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in open(run / "metrics.jsonl")]


@pytest.fixture
def cpu_grad_scaler(monkeypatch):
    """accelerate runs fp16 on the CPU without a GradScaler; give it the one a GPU run has, with an
    initial scale so large that the first steps overflow (a GPU run reaches one sooner or later)."""
    import accelerate
    from accelerate.state import AcceleratorState

    # accelerate's process-wide state remembers the first run's precision: start and end afresh
    AcceleratorState._reset_state(reset_partial_state=True)
    created = []

    class ScaledAccelerator(accelerate.Accelerator):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            if self.mixed_precision == "fp16":
                self.scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 30, growth_interval=4)
                self.native_amp = True
                created.append(self.scaler)
    monkeypatch.setattr(accelerate, "Accelerator", ScaledAccelerator)
    yield created
    AcceleratorState._reset_state(reset_partial_state=True)


def test_fp16_overflow_is_a_skipped_step_and_resume_restores_the_scale(tmp_path, cpu_grad_scaler, monkeypatch):
    cfg = DistillConfig(**LAB, options={"stage_updates": "40"}, prior="data=1", mixed_precision="fp16", checkpoint_every=20,
                        out=str(tmp_path / "run"))
    summary = run_distill(cfg)  # died at the second clip ("unscale_() has already been called") before
    (scaler,) = cpu_grad_scaler
    rows = _rows(tmp_path / "run")
    assert 0 < rows[-1]["scaler_skipped"] < 40  # the overflowing steps were skipped by the scaler, then it stepped...
    assert all(s["nonfinite_skipped"] == 0 for s in summary["phases"])  # ...and they are not non-finite losses
    assert scaler.get_scale() < 2.0 ** 30  # it came down
    state = json.loads((tmp_path / "run/checkpoints/checkpoint-00000020/state.json").read_text())
    saved_scale = state["grad_scaler"]["scale"]
    assert saved_scale < 2.0 ** 30

    # a resume from update 20 restores the scale and ends where the uninterrupted run ended
    from resume import crash_and_resume

    cpu_grad_scaler.clear()
    crash_and_resume(cfg, tmp_path / "resumed", monkeypatch, crash_update=20)
    assert cpu_grad_scaler[-1].get_scale() == scaler.get_scale()
    for key, value in load_file(str(tmp_path / "run/student/model.safetensors")).items():
        assert torch.equal(value, load_file(str(tmp_path / "resumed/student/model.safetensors"))[key]), key


def test_a_nan_loss_on_one_rank_skips_the_update_on_both(tmp_path):
    """Rank 1's loss is NaN once: the run finishes (it hung in the all-reduce before), both ranks
    skip that update and end identical."""
    dump, run = tmp_path / "dump", tmp_path / "run"
    args = ["distill", "--teacher", "gmm:ring:8", "--teacher-steps", "8", "--steps", "4", "--stage-updates", "6",
            "--batch-size", "16", "--lr", "1e-3", "--prior", "data=1", "--log-every", "6", "--device", "cpu",
            "--quiet", "--out", str(run)]
    launch("torchrun", dump, args, env={"DDIL_TEST_NAN_AT": "1:3"})
    assert_ranks_identical(dump, ["pd-4"])
    assert json.loads((run / "summary.json").read_text())["phases"][0]["nonfinite_skipped"] == 1


def test_two_process_resume_is_exact_and_ranks_draw_apart(tmp_path):
    """DMD2 draws its timesteps and noise from the global RNG: each rank its own stream, each
    rank's stream checkpointed, so a killed 2-process run resumed ends as the uninterrupted one."""
    args = ["distill", "--method", "dmd2", "--teacher", "gmm:ring:8", "--teacher-steps", "8", "--max-updates", "8",
            "--batch-size", "8", "--lr", "1e-3", "--critic-updates", "2", "--collect-every", "3",
            "--rollouts-per-collect", "4", "--checkpoint-every", "4", "--device", "cpu", "--quiet"]
    whole, broken = tmp_path / "whole", tmp_path / "broken"
    launch("torchrun", tmp_path / "dump-whole", [*args, "--out", str(whole)])
    rng = [load_file(str(tmp_path / f"dump-whole/rank{r}-dmd2-4-rng.safetensors"))["torch_cpu"] for r in (0, 1)]
    assert not torch.equal(*rng)  # the ranks drew apart
    launch("torchrun", tmp_path / "dump-broken", [*args, "--out", str(broken)], env={"DDIL_TEST_CRASH_AT": "4"},
           expect=1)
    assert (broken / "checkpoints/checkpoint-00000004/rank-1.json").is_file()
    launch("torchrun", tmp_path / "dump-resumed", [*args, "--out", str(broken), "--resume", "latest"])
    for name in ("student", "critic"):
        for rank in (0, 1):
            a = load_file(str(tmp_path / f"dump-whole/rank{rank}-dmd2-4-{name}.safetensors"))
            b = load_file(str(tmp_path / f"dump-resumed/rank{rank}-dmd2-4-{name}.safetensors"))
            assert all(torch.equal(a[k], b[k]) for k in a), (name, rank)
    for rank in (0, 1):
        assert torch.equal(load_file(str(tmp_path / f"dump-whole/rank{rank}-dmd2-4-rng.safetensors"))["torch_cpu"],
                           load_file(str(tmp_path / f"dump-resumed/rank{rank}-dmd2-4-rng.safetensors"))["torch_cpu"])


def test_a_finished_stage_is_released_before_the_next(tmp_path, monkeypatch):
    optimizers, alive_at_start = [], []
    init = _Group.__init__

    def tracked(self, spec, accelerator, config, **kwargs):
        gc.collect()
        alive_at_start.append(sum(ref() is not None for ref in optimizers))
        init(self, spec, accelerator, config, **kwargs)
        optimizers.append(weakref.ref(self.optimizer))
    monkeypatch.setattr(_Group, "__init__", tracked)
    run_distill(DistillConfig(**{**LAB, "teacher_steps": 32}, options={"stage_updates": "3"}, prior="data=1",
                              out=str(tmp_path / "run")))
    assert len(alive_at_start) == 3  # 32 -> 16 -> 8 -> 4
    assert alive_at_start == [0, 0, 0]  # no earlier stage's optimiser (nor its student) is alive


def test_frozen_networks_in_bf16_and_the_student_in_fp32(tmp_path):
    from ddil_cli.models import load_denoiser, make_student
    from tiny_models import build_tiny_sd

    folder = build_tiny_sd(tmp_path / "sd")
    teacher = load_denoiser(str(folder), dtype=torch.bfloat16)
    assert teacher.unet.dtype == torch.bfloat16 and teacher.vae.dtype == torch.float32
    assert all(e.dtype == torch.bfloat16 for e in teacher.text_encoders.values())
    student = make_student(teacher, guidance_embedding=True)
    stored = load_denoiser(str(folder)).unet.state_dict()
    for key, value in student.unet.state_dict().items():  # the stored fp32 weights, not a bf16 rounding
        assert value.dtype == torch.float32
        if key in stored:
            assert torch.equal(value, stored[key]), key


def test_distill_with_bf16_frozen_networks_runs(tmp_path):
    from tiny_models import build_tiny_sd

    folder = build_tiny_sd(tmp_path / "sd")
    (tmp_path / "prompts.txt").write_text("a red square\na blue circle\n")
    cfg = DistillConfig(method="pd", teacher=str(folder), steps=2, teacher_steps=4, options={"stage_updates": "2"},
                        batch_size=2, prior="teacher=1", prompts=str(tmp_path / "prompts.txt"), collect_every=1, rollouts_per_collect=2,
                        rollout_batch_size=1, frozen_dtype="bf16", quiet=True, out=str(tmp_path / "run"))
    run_distill(cfg)
    student = load_file(str(tmp_path / "run/student/unet/diffusion_pytorch_model.safetensors"))
    assert all(v.dtype == torch.float32 and torch.isfinite(v).all() for v in student.values())


@pytest.mark.parametrize("method", ["pd", "lcm", "dmd2"])
def test_one_update_reads_the_device_once_per_optimiser_step(tmp_path, monkeypatch, method):
    """A GPU waits for the host at every .item(), .tolist(), float() or bool() of a tensor. Count
    them in the updates' optimiser steps (batches are assembled on the host: not counted)."""
    reads = {"n": 0}
    counting = {"on": False}
    originals = {name: getattr(torch.Tensor, name) for name in ("item", "tolist", "__float__", "__bool__")}

    def counted(name):
        def read(self, *args, **kwargs):
            # ours only: torch's AdamW reads its step counter, a host tensor on a GPU too
            if counting["on"] and "ddil_cli" in sys._getframe(1).f_code.co_filename:
                reads["n"] += 1
            return originals[name](self, *args, **kwargs)
        return read
    for name in originals:
        monkeypatch.setattr(torch.Tensor, name, counted(name))
    step = Trainer._step
    steps = {"n": 0}

    def counted_step(self, group, update):
        make_batch = self.make_batch

        def quiet_batch(u):
            counting["on"] = False
            try:
                return make_batch(u)
            finally:
                counting["on"] = True
        self.make_batch = quiet_batch
        counting["on"] = True
        try:
            return step(self, group, update)
        finally:
            counting["on"] = False
            self.make_batch = make_batch
            steps["n"] += 1
    monkeypatch.setattr(Trainer, "_step", counted_step)
    extra = {"dmd2": dict(options={"critic_updates": 2}), "lcm": {}, "pd": dict(options={"stage_updates": "4"})}[method]
    cfg = DistillConfig(**{**LAB, "method": method, "max_updates": 4, "log_every": 100, "collect_every": 100,
                           "prior": "data=1", **extra}, out=str(tmp_path / "run"))
    run_distill(replace(cfg))
    assert steps["n"] > 0
    assert reads["n"] <= steps["n"], f"{reads['n']} host reads in {steps['n']} optimiser steps"


def test_sample_holds_its_networks_in_the_frozen_dtype(tmp_path, capsys, monkeypatch):
    """`ddil sample --frozen-dtype bf16` loads the teacher in bf16 (the VAE in fp32) and samples
    under bf16 autocast; the images are written and close to the fp32 ones."""
    import numpy as np
    from PIL import Image

    import ddil_cli.cli.sample as sample_cli
    from cli_runner import run_cli
    from tiny_models import build_tiny_sd

    folder = build_tiny_sd(tmp_path / "sd")
    held = []
    load = sample_cli.load_models
    monkeypatch.setattr(sample_cli, "load_models", lambda cfg, device: held.append(load(cfg, device)) or held[-1])
    images = {}
    for dtype in ("fp32", "bf16"):
        code, err = run_cli(["sample", "--teacher", str(folder), "--teacher-steps", "4", "--prompt", "a red square",
                             "--num-per-prompt", "2", "--frozen-dtype", dtype, "--device", "cpu", "--quiet",
                             "--out", str(tmp_path / dtype)], capsys)
        assert code == 0, err
        images[dtype] = np.asarray(Image.open(tmp_path / dtype / "images/000000.png"), dtype=np.float32)
    teacher_bf16 = held[-1][0]
    assert teacher_bf16.unet.dtype == torch.bfloat16 and teacher_bf16.vae.dtype == torch.float32
    assert np.abs(images["bf16"] - images["fp32"]).mean() < 8  # bf16 rounding, not another image
