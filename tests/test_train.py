"""The one training loop under several processes (gloo on CPU): gradients all-reduced through the
prepared modules, so ranks end with identical networks; one LR step per update, as with one
process; checkpoints written once. Launched for real, with torchrun and with accelerate launch."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ddil_cli.stages.distill import DistillConfig, run_distill
from ranks import assert_ranks_identical as _assert_ranks_identical
from ranks import launch as _launch
from resume import crash_and_resume

HERE = Path(__file__).parent
LAB = ["distill", "--teacher", "gmm:ring:8", "--teacher-steps", "8", "--steps", "4", "--stage-updates", "8",
       "--batch-size", "16", "--lr", "1e-3", "--collect-every", "3", "--rollouts-per-collect", "4",
       "--log-every", "2", "--checkpoint-every", "4", "--device", "cpu", "--quiet"]


def _lrs(run: Path) -> list[tuple[str, int, float]]:
    return [(r["phase"], r["update"], r["lr"]) for r in map(json.loads, open(run / "metrics.jsonl"))]


@pytest.mark.parametrize("launcher", ["torchrun", "accelerate"])
def test_two_processes_train_one_student(tmp_path, launcher):
    dump, run = tmp_path / "dump", tmp_path / "run"
    _launch(launcher, dump, [*LAB, "--out", str(run)])
    _assert_ranks_identical(dump, ["pd-4"])
    # the student published is the ranks' common one
    published = load_file(str(run / "student/model.safetensors"))
    rank0 = load_file(str(dump / "rank0-pd-4-student.safetensors"))
    assert all(torch.equal(published[k], rank0[k]) for k in rank0)
    # one LR step per update: the same LR per logged update as a one-process run
    single = tmp_path / "single"
    run_distill(DistillConfig(teacher="gmm:ring:8", teacher_steps=8, steps=4, options={"stage_updates": "8"}, batch_size=16,
                              lr=1e-3, collect_every=3, rollouts_per_collect=4, log_every=2, quiet=True,
                              out=str(single)))
    assert _lrs(run) == _lrs(single)
    assert [r[2] for r in _lrs(run)][:2] == [pytest.approx(1e-3 * 6 / 8), pytest.approx(1e-3 * 4 / 8)]
    # checkpoints written once, whole: updates 4 and 8, no temp folders, one metrics row per log step
    names = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert names == ["checkpoint-00000004", "checkpoint-00000008"], names
    assert len(_lrs(run)) == 4


def test_two_processes_on_a_tiny_diffusers_pipeline(tmp_path):
    from ddil_cli.data.digits import build_digits_shards
    from tiny_models import build_tiny_pixel

    build_tiny_pixel(tmp_path / "teacher")
    build_digits_shards(tmp_path / "digits")
    dump = tmp_path / "dump"
    _launch("torchrun", dump, ["distill", "--teacher", str(tmp_path / "teacher"), "--steps", "4",
                               "--teacher-steps", "8", "--stage-updates", "3", "--batch-size", "4",
                               "--data", str(tmp_path / "digits/train-{000000..000001}.tar"),
                               "--collect-every", "2", "--rollouts-per-collect", "2", "--device", "cpu", "--quiet",
                               "--out", str(tmp_path / "run")])
    _assert_ranks_identical(dump, ["pd-4"])


class _WithCritic:
    """PD plus a second trained network (a stand-in for DMD2's critic): its own optimiser, LR and
    three optimiser steps per student update."""

    @staticmethod
    def make():
        from ddil_cli.methods.base import TrainedGroup
        from ddil_cli.methods.pd import PDMethod

        class PDWithCritic(PDMethod):
            name = "pd-critic"

            def __init__(self, **kwargs):
                super().__init__(**kwargs)
                torch.manual_seed(123)
                self.critic = torch.nn.Linear(2, 2)

            def groups(self):
                return [*super().groups(), TrainedGroup("critic", {"critic": self.critic}, lr=0.01, steps_per_update=3)]

            def loss(self, group, nets, batch):
                if group == "critic":
                    per_example = (nets["critic"](batch.x_t.float()) ** 2).mean(1)
                    return per_example, {"critic/mean_out": float(per_example.detach().mean())}
                return super().loss(group, nets, batch)
        return PDWithCritic


def test_a_second_trained_network_steps_logs_and_resumes_exactly(tmp_path, monkeypatch):

    from ddil_cli import methods

    method = _WithCritic.make()
    monkeypatch.setitem(methods.METHODS, "pd-critic", method)
    cfg = DistillConfig(method="pd-critic", teacher="gmm:ring:8", teacher_steps=8, steps=4, options={"stage_updates": "8"},
                        batch_size=16, lr=1e-3, collect_every=3, rollouts_per_collect=4, log_every=4,
                        checkpoint_every=4, quiet=True, out=str(tmp_path / "full"))
    run_distill(cfg)
    last = tmp_path / "full/checkpoints/checkpoint-00000008"
    state = json.loads((last / "state.json").read_text())
    assert state["groups"] == ["student", "critic"]
    optimizer_steps = load_file(str(last / "state.safetensors"))["optimizer.critic.state.0.step"]
    assert float(optimizer_steps) == 8 * 3  # three critic steps per student update
    rows = [json.loads(line) for line in open(tmp_path / "full/metrics.jsonl")]
    assert {"loss/critic", "grad_norm/critic", "lr/critic", "critic/mean_out"} <= set(rows[-1])
    assert rows[0]["lr/critic"] == pytest.approx(0.01 * (24 - 12) / 24)  # its own schedule, per its steps

    crash_and_resume(cfg, tmp_path / "broken", monkeypatch, 4)
    for name in ("student", "critic"):
        full = load_file(str(tmp_path / f"full/checkpoints/checkpoint-00000008/{name}.safetensors"))
        resumed = load_file(str(tmp_path / f"broken/checkpoints/checkpoint-00000008/{name}.safetensors"))
        assert all(torch.equal(full[k], resumed[k]) for k in full), name


def test_optimizer_state_round_trips_through_safetensors_and_json():
    from safetensors.torch import load as load_bytes, save as save_bytes

    from ddil_cli.train import _join_state, _split_state

    net = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3)
    net(torch.randn(4, 3)).sum().backward()
    opt.step()
    tensors, info = {}, {}
    _split_state(opt.state_dict(), "optimizer", tensors, info)
    restored = _join_state(json.loads(json.dumps(info))["optimizer"], load_bytes(save_bytes(tensors)))
    other = torch.optim.AdamW(torch.nn.Linear(3, 2).parameters(), lr=1e-3)
    other.load_state_dict(restored)
    for key, entry in opt.state_dict()["state"].items():
        for name, value in entry.items():
            assert torch.equal(torch.as_tensor(other.state_dict()["state"][key][name]), torch.as_tensor(value))
