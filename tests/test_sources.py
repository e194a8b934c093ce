"""The buffer's rollout records: every state a full mixed rollout visits on the student grid,
with its timestep, position, source and row, from a rollout that skips the unstored last step."""

import pytest
import torch

from ddil_cli.buffer.sources import rollout_records
from ddil_cli.models.gmm import GMMDenoiser
from ddil_cli.models.mlp import mlp_student_for
from ddil_cli.rollout import Grid, rollout_seeds


@pytest.mark.parametrize("steps,teacher_prob", [(4, 0.5), (4, 1.0), (1, 0.5), (2, 0.0)])
def test_records_are_the_states_of_the_full_rollout(steps, teacher_prob):
    teacher = GMMDenoiser("gmm:ring:8")
    student = mlp_student_for(teacher, hidden=32, layers=2)
    grid = Grid.make(steps, 32)
    seeds, prompts = list(range(7)), [f"class {i % 4}" for i in range(7)]
    full = rollout_seeds(seeds, prompts, grid, teacher=teacher, student=student, teacher_prob=teacher_prob,
                         guidance=1.5, record=True)
    records = rollout_records(teacher, student, grid, prompts, seeds, teacher_prob=teacher_prob, guidance=1.5,
                              threshold=None, device="cpu")
    assert len(records) == len(seeds) * steps
    for state, t, t_index, source, row in records:
        assert t == grid.student[t_index]
        assert torch.equal(state, full.states[t_index][row])
        driven_by_teacher = bool(full.teacher_mask[row].all())
        assert source == ("teacher" if driven_by_teacher else "student")
