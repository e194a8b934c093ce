"""The in-memory replay pool: per-state timesteps, the FIFO bound, priorities that leave with
evicted states, and checkpoints of the older grid-index format."""

import pytest
import torch

from ddil_cli.buffer.pool import ReplayPool
from ddil_cli.buffer.replay import PrioritizedPolicy


def _add(pool, first, n, t=749):
    pool.add(torch.randn(n, 2), torch.full((n,), t), torch.ones(n), ["class 0"] * n, ["student"] * n,
             [f"k{first + i}" for i in range(n)])


def test_fifo_eviction_drops_priorities_of_evicted_states():
    policy = PrioritizedPolicy(0.6)
    pool = ReplayPool(10, policy)
    for start in range(0, 100, 5):
        _add(pool, start, 5)
        policy.update(pool.keys, torch.rand(len(pool)))
    assert len(pool) == 10 and pool.keys == [f"k{i}" for i in range(90, 100)]
    assert set(policy.priorities) == set(pool.keys)  # bounded: nothing evicted is remembered


def test_states_keep_their_own_timesteps_and_old_checkpoints_load():
    pool = ReplayPool()
    _add(pool, 0, 3, t=999)
    _add(pool, 3, 2, t=259)  # off any trailing grid, as an LCM sampler visits
    assert pool.t.tolist() == [999, 999, 999, 259, 259]
    tensors, info = pool.state()
    again = ReplayPool()
    again.load(tensors, info)
    assert torch.equal(again.t, pool.t) and torch.equal(again.states, pool.states)
    # a checkpoint written before per-state timesteps indexed the student's grid
    old = {k: v for k, v in tensors.items() if k != "t"} | {"t_index": torch.tensor([0, 0, 1, 3, 2])}
    legacy = ReplayPool()
    legacy.load(old, info, timesteps=[999, 749, 499, 249])
    assert legacy.t.tolist() == [999, 999, 749, 249, 499]


def test_draws_at_given_timesteps_come_from_those_timesteps():
    pool = ReplayPool()
    t = torch.tensor([999, 499, 499, 249, 999, 249])
    pool.add(t.float().reshape(-1, 1).expand(-1, 2), t, torch.ones(6), ["p"] * 6,
             ["student", "student", "teacher", "student", "student", "teacher"], [f"k{i}" for i in range(6)])
    assert pool.timesteps_of("student") == {999, 499, 249} and pool.timesteps_of("teacher") == {499, 249}
    want = torch.tensor([249, 999, 999, 499, 249])
    rows = pool.draw_at(want, "student", torch.Generator().manual_seed(0))
    assert torch.equal(pool.t[rows], want) and all(pool.sources[i] == "student" for i in rows.tolist())
    with pytest.raises(RuntimeError, match="no 'teacher' states at t = 999"):
        pool.draw_at(torch.tensor([999]), "teacher", torch.Generator())
