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


def test_record_spans_hold_whole_trajectories_up_to_the_byte_cap():
    from ddil_cli.buffer.sources import record_spans
    from ddil_cli.buffer.writer import STATE_DTYPE

    rows = [0] * 4 + [1] * 4 + [2] * 4 + [None] * 3  # three 4-state trajectories, then a data block
    state_size = 8
    per_state = state_size * STATE_DTYPE().itemsize
    assert record_spans(rows, state_size) == [(0, 15)]  # far under the default cap: one record
    spans = record_spans(rows, state_size, max_bytes=9 * per_state)  # room for two trajectories
    assert spans == [(0, 8), (8, 15)]
    # a trajectory larger than the cap is still one record, never cut
    assert record_spans(rows, state_size, max_bytes=per_state) == [(0, 4), (4, 8), (8, 12), (12, 15)]
    # the spans tile the list, and no record mixes part of a trajectory with another
    for cap in range(1, 20):
        spans = record_spans(rows, state_size, max_bytes=cap * per_state)
        assert [b for b, _ in spans] == [0, *[e for _, e in spans[:-1]]] and spans[-1][1] == len(rows)
        for begin, end in spans:
            assert (begin == 0 or rows[begin] != rows[begin - 1]) and (end == len(rows) or rows[end] != rows[end - 1])
            assert end - begin <= max(cap, 4)
    assert record_spans([], state_size) == []


def test_forward_diffusion_at_given_timesteps():
    from ddil_cli.buffer.sources import forward_diffuse

    teacher = GMMDenoiser("gmm:ring:8")
    x0 = torch.ones(3, 2)
    given = torch.tensor([249, 999, 249])
    x_t, t, t_index = forward_diffuse(x0, teacher.schedule, [999, 749, 499, 249], torch.Generator().manual_seed(0),
                                      t=given)
    assert torch.equal(t, given) and t_index.tolist() == [3, 0, 3]
    # given timesteps draw no index: the generator's first draw is the noise, a_t x0 + s_t eps
    eps = torch.randn(3, 2, generator=torch.Generator().manual_seed(0))
    a, s = teacher.schedule.alpha_sigma(given)
    assert torch.allclose(x_t, a[:, None] * x0 + s[:, None] * eps)
    with pytest.raises(ValueError, match="off the grid"):
        forward_diffuse(x0, teacher.schedule, [999, 749], t=given)
