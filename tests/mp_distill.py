"""Launched by the multi-process tests under torchrun / accelerate launch: runs `ddil distill ARGS`
and has every rank write its trained networks after each phase (RANK_DIR/rank{N}-{phase}-{module}.safetensors,
and -method.safetensors for a method's extra state such as LCM's EMA target) and its global RNG
state (rank{N}-{phase}-rng.safetensors), so the test can compare what the ranks trained and drew.

Faults for the GPU-path tests, from the environment:
- DDIL_TEST_NAN_AT=RANK:CALL: that rank's student loss is NaN at its CALL-th student loss (1-based);
- DDIL_TEST_CRASH_AT=UPDATE: every rank stops (exit 3) right after the checkpoint at UPDATE."""

import os
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from ddil_cli.cli.app import main
from ddil_cli.methods import METHODS
from ddil_cli.train import Trainer

out = Path(sys.argv[1])
run = Trainer.run


def run_and_dump(self):
    state = run(self)
    rank = self.accelerator.process_index
    for group in self.groups:
        for name, module in group.raw.items():
            save_file({k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()},
                      str(out / f"rank{rank}-{self.phase}-{name}.safetensors"))
    method_tensors, _info = self.method.extra_state()  # an EMA target network, say
    if method_tensors:
        save_file({k: v.detach().cpu().contiguous() for k, v in method_tensors.items()},
                  str(out / f"rank{rank}-{self.phase}-method.safetensors"))
    save_file({"torch_cpu": torch.get_rng_state()}, str(out / f"rank{rank}-{self.phase}-rng.safetensors"))
    return state


Trainer.run = run_and_dump

if os.environ.get("DDIL_TEST_NAN_AT"):
    nan_rank, nan_call = (int(v) for v in os.environ["DDIL_TEST_NAN_AT"].split(":"))
    calls = {"n": 0}

    def with_nan(loss):
        def loss_once_nan(self, group, nets, batch):
            value = loss(self, group, nets, batch)
            if group != "student" or int(os.environ.get("RANK", "0")) != nan_rank:
                return value
            calls["n"] += 1
            if calls["n"] != nan_call:
                return value
            return (value[0] * float("nan"), value[1]) if isinstance(value, tuple) else value * float("nan")
        return loss_once_nan
    for method in METHODS.values():
        method.loss = with_nan(method.loss)

if os.environ.get("DDIL_TEST_CRASH_AT"):
    crash_at = int(os.environ["DDIL_TEST_CRASH_AT"])
    save = Trainer.save_checkpoint

    def save_then_crash(self):
        path = save(self)
        if self.update_offset + self.state.update == crash_at:
            os._exit(3)  # a killed job: no clean-up, no atexit
        return path
    Trainer.save_checkpoint = save_then_crash

out.mkdir(parents=True, exist_ok=True)
os.environ.setdefault("OMP_NUM_THREADS", "1")
main(sys.argv[2:])
