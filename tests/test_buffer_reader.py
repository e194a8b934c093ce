import tarfile
from collections import Counter

import pytest
import torch

from ddil_cli.buffer import BufferReader, load_manifest, mix_streams
from ddil_cli.errors import UserError
from tests.test_buffer_writer import write_samples


@pytest.fixture
def buffer(tmp_path):
    written, _ = write_samples(tmp_path, 24, shard_samples=6)
    return tmp_path, written


def shard_paths(root):
    return [root / s["name"] for s in load_manifest(root)["shards"]]


def test_shuffle_changes_order_but_not_content_and_is_seeded(buffer):
    root, written = buffer
    plain = [s.key for s in BufferReader(root, shuffle=0)]
    shuffled = [s.key for s in BufferReader(root, shuffle=100, seed=1)]
    assert sorted(shuffled) == sorted(plain) == sorted(written)
    assert shuffled != plain
    assert shuffled == [s.key for s in BufferReader(root, shuffle=100, seed=1)]
    reader = BufferReader(root, shuffle=100, seed=1)
    first, second = [s.key for s in reader], [s.key for s in reader]
    assert first != second and sorted(first) == sorted(second)  # each epoch reshuffles


def test_truncated_shard_is_skipped_with_a_warning_and_a_count(buffer):
    root, written = buffer
    victim = shard_paths(root)[1]
    data = victim.read_bytes()
    victim.write_bytes(data[:len(data) // 2 + 100])  # cut inside a member
    reader = BufferReader(root, shuffle=0)
    with pytest.warns(UserWarning, match="damaged"):
        keys = [s.key for s in reader]
    assert reader.stats.corrupt_shards == 1 and reader.stats.corrupt == [str(victim)]
    others = {k for k in written if not k.startswith(victim.stem.removeprefix("shard-"))}
    assert others <= set(keys)  # every other shard read in full
    assert len(keys) < len(written)


def test_shard_cut_at_a_member_boundary_is_caught_by_the_manifest_count(buffer):
    root, _ = buffer
    victim = shard_paths(root)[0]
    with tarfile.open(victim) as tar:
        members = tar.getmembers()
    victim.write_bytes(victim.read_bytes()[:members[4].offset])  # the first two samples only
    reader = BufferReader(root, shuffle=0)
    with pytest.warns(UserWarning, match="2 of 6 samples"):
        keys = [s.key for s in reader]
    assert len(keys) == 20 and reader.stats.corrupt_shards == 1


def test_garbage_and_missing_shards_are_skipped(buffer):
    root, _ = buffer
    paths = shard_paths(root)
    paths[0].write_bytes(b"\x13" * 3000)
    paths[2].unlink()
    reader = BufferReader(root, shuffle=0)
    with pytest.warns(UserWarning):
        keys = [s.key for s in reader]
    assert reader.stats.corrupt_shards == 2 and len(keys) == 12


def test_shards_split_by_node_are_disjoint_and_complete(buffer, monkeypatch):
    root, written = buffer
    parts = []
    for rank in range(2):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        parts.append({s.key for s in BufferReader(root, shuffle=10, seed=3)})
    assert parts[0] and parts[1] and not parts[0] & parts[1]
    assert parts[0] | parts[1] == set(written)


def test_dataloader_workers_each_read_their_own_shards(buffer):
    root, written = buffer
    loader = torch.utils.data.DataLoader(BufferReader(root, shuffle=0), batch_size=None, num_workers=2,
                                         collate_fn=lambda s: s)
    keys = [s.key for s in loader]
    assert sorted(keys) == sorted(written)  # no sample twice, none missing


def test_pipe_urls_and_url_templates_read_like_local_paths(buffer):
    root, written = buffer
    templated = BufferReader(root, shuffle=0, url_template=f"pipe:cat {root}/{{name}}")
    assert templated.urls[0].startswith("pipe:cat ")
    assert sorted(s.key for s in templated) == sorted(written)
    direct = BufferReader([f"pipe:cat {p}" for p in shard_paths(root)], shuffle=0)
    assert sorted(s.key for s in direct) == sorted(written)
    brace = BufferReader(str(root / "shard-0000-000-{000000..000003}.tar"), shuffle=0)
    assert sorted(s.key for s in brace) == sorted(written)


def test_source_filter_and_resampling(buffer):
    root, written = buffer
    students = [s for s in BufferReader(root, shuffle=0, sources={"student"})]
    assert {s.source for s in students} == {"student"}
    assert len(students) == sum(m["source"] == "student" for _, m in written.values())
    stream = iter(BufferReader(root, shuffle=8, resampled=True))
    assert len([next(stream) for _ in range(3 * len(written))]) == 3 * len(written)
    with pytest.raises(UserError, match="unknown buffer source"):
        BufferReader(root, sources={"buffer"})


def test_bad_sources_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        BufferReader(str(tmp_path / "nope-{0..1}.tar"))
    with pytest.raises(UserError, match="manifest"):
        BufferReader(tmp_path)


def test_mix_streams_follows_the_prior(buffer):
    root, _ = buffer
    prior = {"data": 0.25, "student": 0.75, "teacher": 0.0}
    streams = {"data": iter(range(10**9)), "student": BufferReader(root, resampled=True, sources={"student"})}
    gen = torch.Generator().manual_seed(0)
    n = 4000
    counts = Counter(pair[0] for _, pair in zip(range(n), mix_streams(streams, prior, gen)))
    assert abs(counts["data"] / n - 0.25) < 0.03  # binomial std 0.007
    assert counts["teacher"] == 0
    with pytest.raises(ValueError, match="no stream for source"):
        next(mix_streams({"data": iter([1])}, {"data": 0.5, "student": 0.5}, gen))


def test_states_of_one_record_are_shuffled_apart(tmp_path):
    from tests.test_buffer_writer import write_trajectories

    write_trajectories(tmp_path, 6, 8, shard_samples=100)
    plain = [s.meta["rollout_id"] for s in BufferReader(tmp_path, shuffle=0)]
    assert plain == sorted(plain)  # one record after the other, as written
    shuffled = [s.meta["rollout_id"] for s in BufferReader(tmp_path, shuffle=48, seed=1)]
    assert sorted(shuffled) == plain
    runs = 1 + sum(a != b for a, b in zip(shuffled, shuffled[1:]))
    assert runs > 24  # a record-level shuffle would give 6 runs of 8
