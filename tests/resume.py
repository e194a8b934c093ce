"""A crash right after a checkpoint, then `--resume latest`: the exact-resume tests' one recipe."""

from dataclasses import replace
from pathlib import Path

import pytest

from ddil_cli.stages.distill import run_distill
from ddil_cli.train import Trainer


class Crash(Exception):
    pass


def crash_and_resume(cfg, out: Path, monkeypatch, crash_update: int) -> Path:
    """Run `cfg` into `out`, stop it right after the checkpoint at `crash_update` (updates over all
    phases), check it published no student, resume it to the end; returns `out`."""
    save = Trainer.save_checkpoint

    def crash_after_checkpoint(self):
        path = save(self)
        if self.update_offset + self.state.update == crash_update:
            raise Crash()
        return path
    monkeypatch.setattr(Trainer, "save_checkpoint", crash_after_checkpoint)
    broken = replace(cfg, out=str(out))
    with pytest.raises(Crash):
        run_distill(broken)
    monkeypatch.setattr(Trainer, "save_checkpoint", save)
    assert not (out / "student").exists()
    run_distill(replace(broken, resume="latest"))
    return out
