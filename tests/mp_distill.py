"""Launched by tests/test_train.py under torchrun / accelerate launch: runs `ddil distill ARGS`
and has every rank write its trained networks after each phase (RANK_DIR/rank{N}-{phase}-{module}.safetensors,
and -method.safetensors for a method's extra state such as LCM's EMA target),
so the test can compare what the ranks trained."""

import os
import sys
from pathlib import Path

from safetensors.torch import save_file

from ddil_cli.cli.app import main
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
    return state


Trainer.run = run_and_dump
out.mkdir(parents=True, exist_ok=True)
os.environ.setdefault("OMP_NUM_THREADS", "1")
main(sys.argv[2:])
