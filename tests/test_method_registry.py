"""A method is one file plus one registry line: a throwaway fourth method, registered at test
time, gets its own flag in `ddil distill --help` (built from its options' fields), has the flag
checked by the field's rule, refused by the other methods, and trains a few updates with DDIL."""

import importlib
import json
from dataclasses import dataclass

import pytest
import torch

from ddil_cli.diffusion.schedule import trailing_timesteps
from ddil_cli.methods import METHODS
from ddil_cli.methods.base import DistillMethod, MethodOptions, Phase, option
from ddil_cli.rollout import Grid
from ddil_cli.validate import Rule
from cli_runner import run_cli as cli


# ---- the whole method: what a new file in ddil_cli/methods/ would hold --------------------------
@dataclass
class ToyOptions(MethodOptions):
    pull: float = option(1.0, "weight of the toy regression on the teacher's x0.", Rule(above=0, high=10))


class ToyMethod(DistillMethod):
    """The student's x0 regressed on the teacher's at the same input, in one phase at --steps."""

    name = "toy"
    Options = ToyOptions

    @classmethod
    def plan(cls, request, teacher, options):
        num_train = teacher.schedule.num_train_timesteps
        grid = trailing_timesteps(request.steps, num_train)
        return [Phase(f"toy-{request.steps}", request.max_updates, grid, grid,
                      [Grid.make(request.steps, request.teacher_steps, num_train)], teacher="original")]

    def loss(self, group, nets, batch):
        with torch.no_grad():
            target = self.teacher.predict_x0(batch.x_t.float(), batch.t, batch.cond, batch.guidance,
                                             all_one=batch.guidance_all_one)
        x0 = self.student_x0(batch, nets["student"]).float()
        return self.options.pull * ((x0 - target) ** 2).reshape(len(batch), -1).mean(1)
# -------------------------------------------------------------------------------------------------


@pytest.fixture
def toy_registered(monkeypatch):
    """The registry line, added for this test; the CLI rebuilt so its flags come from the registry."""
    import ddil_cli.cli.app as app
    import ddil_cli.cli.distill as distill

    monkeypatch.setitem(METHODS, "toy", ToyMethod)
    importlib.reload(distill)
    importlib.reload(app)
    yield
    monkeypatch.undo()
    importlib.reload(distill)
    importlib.reload(app)


RUN = ["distill", "--method", "toy", "--teacher", "gmm:ring:8", "--teacher-steps", "8", "--steps", "4",
       "--max-updates", "4", "--batch-size", "8", "--lr", "1e-3", "--collect-every", "2",
       "--rollouts-per-collect", "4", "--quiet"]


def test_a_fourth_method_gets_its_flag_and_trains(toy_registered, tmp_path, capsys):
    code, out = cli(["distill", "--help"], capsys, with_stdout=True)
    assert code == 0 and "--pull" in out and "TOY: weight of the toy regression" in " ".join(out.split())
    code, err = cli([*RUN, "--pull", "0", "--out", str(tmp_path / "bad")], capsys)
    assert code == 2 and "--pull" in err and "Traceback" not in err
    code, err = cli(["distill", "--method", "pd", "--pull", "0.5", "--out", str(tmp_path / "pd")], capsys)
    assert code == 2 and "--pull is not an option of --method pd" in err
    code, err = cli([*RUN, "--pull", "0.5", "--out", str(tmp_path / "run")], capsys)
    assert code == 0, err
    manifest = json.loads((tmp_path / "run/manifest.json").read_text())
    assert manifest["method_options"]["pull"] == 0.5 and manifest["phases"][0]["name"] == "toy-4"
    summary = json.loads((tmp_path / "run/summary.json").read_text())
    assert summary["phases"][0]["updates"] == 4 and summary["phases"][0]["buffer_states"] > 0  # DDIL ran
    assert (tmp_path / "run/student/model.safetensors").is_file()


def test_without_the_registry_line_the_flag_is_gone(capsys):
    code, out = cli(["distill", "--help"], capsys, with_stdout=True)
    assert code == 0 and "--pull" not in out and "--critic-updates" in out
