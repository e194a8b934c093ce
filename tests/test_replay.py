from collections import Counter

import numpy as np
import pytest
import torch
from scipy.stats import chisquare

from ddil_cli.buffer import BufferReader, FIFOPolicy, PrioritizedPolicy, load_manifest
from ddil_cli.buffer.replay import shard_of_key
from ddil_cli.errors import UserError
from tests.test_buffer_writer import write_samples

PRIORITIES = [0.5, 1.0, 2.0, 4.0, 8.0]


def expected_shares(priorities, alpha):
    w = np.array(priorities) ** alpha
    return w / w.sum()


@pytest.mark.parametrize("alpha", [1.0, 0.6])
def test_prioritised_draws_match_priority_to_the_alpha(alpha):
    policy = PrioritizedPolicy(alpha, epsilon=0.0)
    keys = [f"0000-000-000000-{i:06d}" for i in range(len(PRIORITIES))]
    policy.update(keys, PRIORITIES)
    n = 20000
    drawn = Counter(policy.sample(n, torch.Generator().manual_seed(0)))
    observed = [drawn[k] for k in keys]
    expected = n * expected_shares(PRIORITIES, alpha)
    assert chisquare(observed, expected).pvalue > 1e-3
    # the same test rejects uniform draws, so it can tell the difference
    assert chisquare(observed, [n / len(keys)] * len(keys)).pvalue < 1e-6


def test_alpha_zero_is_uniform_and_unscored_keys_get_the_top_priority():
    policy = PrioritizedPolicy(0.0)
    policy.update(["a-000000", "b-000000"], [0.1, 10.0])
    assert torch.allclose(policy.weights(["a-000000", "b-000000"]), torch.ones(2, dtype=torch.float64))
    policy = PrioritizedPolicy(1.0, epsilon=0.0)
    policy.update(["a-000000", "b-000000"], torch.tensor([0.1, -3.0]))  # a loss's magnitude counts
    assert policy.weights(["new-000000"]).item() == pytest.approx(3.0)
    assert PrioritizedPolicy(1.0).default_priority == 1.0
    with pytest.raises(ValueError, match="2 keys but 1"):
        policy.update(["a", "b"], [1.0])
    with pytest.raises(UserError, match="alpha"):
        PrioritizedPolicy(-1)


def test_streaming_reader_with_priorities_replays_in_proportion(tmp_path):
    written, _ = write_samples(tmp_path, 5, shard_samples=5)
    keys = sorted(written)
    policy = PrioritizedPolicy(1.0, epsilon=0.0)
    policy.update(keys, PRIORITIES)
    reader = BufferReader(tmp_path, shuffle=0, policy=policy, seed=4)
    counts = Counter()
    for _ in range(600):
        counts.update(s.key for s in reader)
    observed = [counts[k] for k in keys]
    expected = sum(observed) * expected_shares(PRIORITIES, 1.0)
    assert chisquare(observed, expected).pvalue > 1e-3
    # the highest priority passes every time: its stream is never thinned
    assert counts[keys[-1]] == 600


def test_fifo_apply_to_drops_the_oldest_shard_from_disk_and_manifest(tmp_path):
    written, _ = write_samples(tmp_path, 12, shard_samples=4)
    keys = sorted(written)
    dropped = FIFOPolicy(8).apply_to(tmp_path)
    assert dropped == [shard_of_key(keys[0])]
    assert load_manifest(tmp_path)["counts"]["total"] == 8
    assert not (tmp_path / dropped[0]).exists()


def test_fifo_select_drops_the_oldest_until_the_bound_holds():
    manifest = {"shards": [{"name": f"s{i}", "samples": n} for i, n in enumerate([5, 5, 3, 4])],
                "counts": {"total": 17}}
    assert FIFOPolicy(None).select(manifest) == set()
    assert FIFOPolicy(17).select(manifest) == set()
    assert FIFOPolicy(12).select(manifest) == {"s0"}
    assert FIFOPolicy(6).select(manifest) == {"s0", "s1", "s2"}
    with pytest.raises(UserError, match="max-samples"):
        FIFOPolicy(0)
