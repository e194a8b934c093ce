import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest

from ddil_cli.buffer import BufferReader, BufferWriter, FIFOPolicy, load_manifest
from ddil_cli.buffer import manifest as mf
from ddil_cli.buffer.replay import shard_of_key
from ddil_cli.buffer.writer import prompt_id, sha256_file
from ddil_cli.errors import UserError

ROOT = Path(__file__).resolve().parent.parent
HEADER = {"state": {"shape": [3], "dtype": "float16", "encoding": "npy"},
          "teacher": {"spec": "test", "fingerprint": "text-sha256:test", "model": {}},
          "grid": {"steps": 2, "teacher_steps": 4, "timesteps": [999, 499], "num_train_timesteps": 1000}}


def write_samples(root, n, *, seed=0, shard_samples=4, **kwargs):
    """n samples with known states and metadata; returns {key: (state, meta)}."""
    rng = np.random.default_rng(seed)
    written = {}
    writer = BufferWriter(root, HEADER, run_info={"test": True}, shard_samples=shard_samples, **kwargs).open()
    for i in range(n):
        state = rng.standard_normal(3).astype(np.float16)
        prompt = f"class {i % 3}"
        meta = {"t": [999, 499][i % 2], "t_index": i % 2, "source": ["data", "student", "teacher"][i % 3],
                "rollout_id": i, "prompt": prompt, "prompt_id": prompt_id(prompt), "student_version": 5}
        written[writer.write(state, meta)] = (state, meta)
    writer.close()
    return written, writer


def test_round_trip_gives_identical_states_and_metadata(tmp_path):
    written, writer = write_samples(tmp_path, 10)
    for sample in assert_reads_back(tmp_path, written):
        state, meta = written[sample.key]
        assert (sample.t, sample.t_index, sample.source, sample.prompt) == \
            (meta["t"], meta["t_index"], meta["source"], meta["prompt"])
        assert sample.meta["collect_run"] == writer.run == 0
    manifest = load_manifest(tmp_path)
    assert [s["samples"] for s in manifest["shards"]] == [4, 4, 2]
    for shard in manifest["shards"]:
        assert shard["sha256"] == sha256_file(tmp_path / shard["name"])
    assert manifest["counts"]["total"] == 10
    assert manifest["counts"]["by_source"] == {"data": 4, "student": 3, "teacher": 3}
    assert manifest["counts"]["by_timestep"] == {"999": 5, "499": 5}
    assert json.loads((tmp_path / mf.PROMPTS_NAME).read_text()) == {prompt_id(p): p for p in
                                                                      ("class 0", "class 1", "class 2")}
    assert not list(tmp_path.glob(".*.partial"))


def _trajectory(rng, length, rollout_id):
    states = rng.standard_normal((length, 3)).astype(np.float16)
    metas = [{"t": 999 - 500 * (i % 2), "t_index": i % 2, "source": "student", "rollout_id": rollout_id,
              "prompt": "class 1", "prompt_id": prompt_id("class 1"), "student_version": 7} for i in range(length)]
    return states, metas


def write_trajectories(root, count, length, *, shard_samples, seed=0):
    """`count` trajectories of `length` states, one write_group each; returns {key: (state, meta)}."""
    rng = np.random.default_rng(seed)
    writer = BufferWriter(root, HEADER, run_info={}, shard_samples=shard_samples).open()
    written = {}
    for rollout in range(count):
        states, metas = _trajectory(rng, length, rollout)
        keys = writer.write_group(states, metas)
        assert len(keys) == length == len(set(keys))
        written.update({k: (st, m) for k, st, m in zip(keys, states, metas)})
    writer.close()
    return written


def assert_reads_back(root, written):
    samples = list(BufferReader(root, shuffle=0))
    assert sorted(s.key for s in samples) == sorted(written)
    for sample in samples:
        state, meta = written[sample.key]
        assert np.array_equal(sample.state.numpy(), state.astype(np.float32))
        assert {k: sample.meta[k] for k in meta} == meta
    return samples


def test_a_group_is_one_record_split_only_where_a_shard_fills(tmp_path):
    # 3 trajectories of 4 states: 12 states in shards of 5, 5, 2
    written = write_trajectories(tmp_path, 3, 4, shard_samples=5)
    manifest = load_manifest(tmp_path)
    assert manifest["version"] == mf.VERSION == 2
    assert [s["samples"] for s in manifest["shards"]] == [5, 5, 2]  # never more than shard_samples
    members = []
    for shard in manifest["shards"]:
        with tarfile.open(tmp_path / shard["name"]) as tar:
            members.append(len(tar.getnames()))
    # records: [4 + first 1 of the 2nd trajectory], [its other 3 + 2 of the 3rd], [its last 2]
    assert members == [4, 4, 2]
    for sample in assert_reads_back(tmp_path, written):
        assert sample.url == str(tmp_path / shard_of_key(sample.key))  # priorities find a state's shard


def test_an_orphaned_shard_of_group_records_is_adopted_with_its_state_counts(tmp_path):
    write_trajectories(tmp_path, 3, 4, shard_samples=6, seed=2)
    manifest = load_manifest(tmp_path)
    orphan = manifest["shards"].pop()  # killed between the rename and the manifest write
    manifest["counts"] = mf.recount(manifest["shards"])
    (tmp_path / mf.MANIFEST_NAME).write_text(json.dumps(manifest))
    BufferWriter(tmp_path, HEADER, run_info={}).open().close()
    adopted = next(s for s in load_manifest(tmp_path)["shards"] if s["name"] == orphan["name"])
    assert (adopted["samples"], adopted["counts"]) == (orphan["samples"], orphan["counts"]) == \
        (6, {"student": {"999": 3, "499": 3}})


def test_version_1_buffers_are_read_and_upgraded_by_an_append(tmp_path):
    import webdataset as wds

    from ddil_cli.buffer.writer import encode_state

    rng = np.random.default_rng(1)
    old = {}
    with wds.TarWriter(str(tmp_path / mf.shard_name(0, 0, 0)), mtime=0) as sink:  # one state per record
        for i in range(3):
            state = rng.standard_normal(3).astype(np.float16)
            meta = {"t": 999, "t_index": 0, "source": "teacher", "rollout_id": i, "prompt": "class 0",
                    "prompt_id": prompt_id("class 0"), "collect_run": 0, "rank": 0}
            key = f"0000-000-000000-{i:06d}"
            sink.write({"__key__": key, "state.npy": encode_state(state), "meta.json": json.dumps(meta).encode()})
            old[key] = state
    manifest = mf.new_manifest(HEADER)
    manifest["version"] = 1
    manifest["next_run"] = 1
    name = mf.shard_name(0, 0, 0)
    mf.add_shard(manifest, {"name": name, "samples": 3, "bytes": (tmp_path / name).stat().st_size,
                            "sha256": sha256_file(tmp_path / name), "run": 0, "rank": 0,
                            "counts": {"teacher": {"999": 3}}})
    (tmp_path / mf.MANIFEST_NAME).write_text(json.dumps(manifest))
    read = {s.key: s.state.numpy() for s in BufferReader(tmp_path, shuffle=0)}
    assert set(read) == set(old) and all(np.array_equal(read[k], old[k].astype(np.float32)) for k in old)
    written, _ = write_samples(tmp_path, 2)
    assert load_manifest(tmp_path)["version"] == 2
    assert {s.key for s in BufferReader(tmp_path, shuffle=0)} == set(old) | set(written)
    manifest = json.loads((tmp_path / mf.MANIFEST_NAME).read_text())
    manifest["version"] = 3
    (tmp_path / mf.MANIFEST_NAME).write_text(json.dumps(manifest))
    with pytest.raises(UserError, match="version 3"):
        load_manifest(tmp_path)


def test_rerun_appends_a_new_run_and_continues_numbering(tmp_path):
    first, _ = write_samples(tmp_path, 5, seed=0)
    second, writer = write_samples(tmp_path, 5, seed=1)
    assert writer.run == 1
    manifest = load_manifest(tmp_path)
    assert [r["run"] for r in manifest["runs"]] == [0, 1]
    assert manifest["counts"]["total"] == 10
    assert {s.key for s in BufferReader(tmp_path, shuffle=0)} == set(first) | set(second)


def test_incompatible_header_is_refused_before_anything_changes(tmp_path):
    write_samples(tmp_path, 3)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    other = json.loads(json.dumps(HEADER))
    other["state"]["shape"] = [4]
    with pytest.raises(UserError, match="shape"):
        BufferWriter(tmp_path, other, run_info={}).open()
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


def test_fifo_bound_holds_after_every_commit_and_keeps_the_newest(tmp_path):
    bound = 9
    seen_totals = []

    def fifo_and_record(manifest, root):
        dropped = FIFOPolicy(bound)(manifest, root)
        seen_totals.append(manifest["counts"]["total"])
        return dropped

    written, _ = write_samples(tmp_path, 30, shard_samples=4, on_commit=fifo_and_record)
    assert max(seen_totals) <= bound
    manifest = load_manifest(tmp_path)
    kept = {s.key for s in BufferReader(tmp_path, shuffle=0)}
    # 30 samples in shards of 4, 4, ..., 4, 2: the newest 4 + 2 fit; one more shard would make 10 > 9
    assert kept == set(sorted(written)[-6:])
    assert manifest["dropped"] == {"shards": 6, "samples": 24}
    assert sorted(p.name for p in tmp_path.glob("shard-*.tar")) == [s["name"] for s in manifest["shards"]]


def test_a_crash_between_rename_and_manifest_and_a_dead_partial_are_recovered(tmp_path):
    write_samples(tmp_path, 8)
    manifest = load_manifest(tmp_path)
    orphan = manifest["shards"].pop()  # as if killed after the rename, before the manifest write
    manifest["counts"] = mf.recount(manifest["shards"])
    (tmp_path / mf.MANIFEST_NAME).write_text(json.dumps(manifest))
    dead = tmp_path / ".shard-0000-000-000009.tar.partial"
    dead.write_bytes(b"half a shard")  # its writer is gone: nobody holds its lock
    _, writer = write_samples(tmp_path, 2, seed=3)
    recovered = load_manifest(tmp_path)
    assert orphan["name"] in [s["name"] for s in recovered["shards"]]
    adopted = next(s for s in recovered["shards"] if s["name"] == orphan["name"])
    assert (adopted["samples"], adopted["counts"], adopted["sha256"]) == \
        (orphan["samples"], orphan["counts"], orphan["sha256"])
    assert recovered["counts"]["total"] == 10
    assert not dead.exists()


def _shards_consistent(root: Path) -> dict:
    """Every visible shard is a complete tar; every manifest entry matches its file."""
    manifest = load_manifest(root)
    for path in root.glob("shard-*.tar"):
        with tarfile.open(path) as tar:  # a truncated tar raises here
            members = tar.getnames()
        assert len(members) % 2 == 0 and members
    for shard in manifest["shards"]:
        assert sha256_file(root / shard["name"]) == shard["sha256"]
    assert manifest["counts"]["total"] == sum(s["samples"] for s in manifest["shards"])
    return manifest


def _collect_cmd(out, *extra):
    return [sys.executable, "-m", "ddil_cli", "collect", "--teacher", "gmm:ring:8", "--prior", "data=0.5,teacher=0.5",
            "--steps", "2", "--teacher-steps", "4", "--batch-size", "8", "--shard-samples", "16", "--quiet",
            "--out", str(out), *extra]


def test_sigkill_mid_collect_leaves_complete_shards_and_a_rerun_appends(tmp_path):
    out = tmp_path / "buf"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen(_collect_cmd(out, "--rollouts", "100000"), cwd=ROOT, env=env)
    deadline = time.time() + 60
    try:
        while len(list(out.glob("shard-*.tar"))) < 3 and time.time() < deadline and proc.poll() is None:
            time.sleep(0.05)
        assert proc.poll() is None, "collect ended before it could be killed"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
    killed = _shards_consistent(out)
    assert killed["runs"][0]["ranks"]["0"]["finished"] is False
    rerun = subprocess.run(_collect_cmd(out, "--rollouts", "8"), cwd=ROOT, env=env, capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr
    after = _shards_consistent(out)
    assert [r["run"] for r in after["runs"]] == [0, 1]
    assert sorted(p.name for p in out.glob("shard-*.tar")) == sorted(s["name"] for s in after["shards"])
    assert not list(out.glob(".*.partial"))  # the killed writer's partial shard was cleaned up
    run1 = [s for s in after["shards"] if s["run"] == 1]
    assert sum(s["samples"] for s in run1) == 8 * 2 * 2  # 8 teacher rollouts x 2 steps, as many data states
    assert after["counts"]["total"] >= killed["counts"]["total"] + 32


def test_commit_makes_the_states_so_far_a_visible_shard_and_the_writer_goes_on(tmp_path):
    rng = np.random.default_rng(0)
    writer = BufferWriter(tmp_path, HEADER, run_info={}, shard_samples=100).open()
    first = writer.write_group(*_trajectory(rng, 3, 0))
    writer.commit()
    writer.commit()  # nothing in progress: no empty shard
    manifest = load_manifest(tmp_path)
    assert [s["samples"] for s in manifest["shards"]] == [3]
    assert not manifest["runs"][0]["ranks"]["0"]["finished"] and not list(tmp_path.glob(".*.partial"))
    second = writer.write_group(*_trajectory(rng, 2, 1))
    writer.close()
    manifest = load_manifest(tmp_path)
    assert [s["samples"] for s in manifest["shards"]] == [3, 2] and manifest["runs"][0]["ranks"]["0"]["finished"]
    assert {s.key for s in BufferReader(str(tmp_path), shuffle=0, split_by_node=False,
                                        split_by_worker=False)} == set(first + second)
