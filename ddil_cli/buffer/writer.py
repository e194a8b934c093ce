"""Atomic shard writing into a replay buffer folder, safe for concurrent writers.

Layout of a buffer folder:
    shard-RRRR-KKK-NNNNNN.tar   complete shards (run R, rank K, shard N of that writer)
    .shard-....tar.partial      a shard being written (hidden; renamed when complete)
    manifest.json               see buffer/manifest.py
    prompts.json                prompt table {prompt_id: text}
    .lock                       the lock every manifest update holds (fcntl.flock)

Each webdataset sample is a *record* of states written together (whole rollout trajectories
up to RECORD_BYTES of states, or one batch of data states): `KEY.states.npy` (float16 .npy
bytes, shape (n, *state)) and `KEY.meta.json` ({"states": [one dict per state: t, t_index,
source, rollout_id, prompt_id, prompt, student_version, collect_run, ...]}). State i of record
KEY has the key `KEY-III`. Two tar members per record instead of per state: tar headers were
most of the cost of storing a lab state, and a lab collection (64 trajectories) is one record.
Buffers of format version 1 hold one state per record (`KEY.state.npy` and a `KEY.meta.json`
dict); readers take both. A crash at any point leaves
only complete shards visible: a shard is renamed from its hidden partial name under the lock,
together with the manifest update; a partial file whose writer died (its flock is free) is
removed by the next writer, and a complete shard the manifest missed (a kill between rename and
manifest write) is adopted from its own contents.
"""

from __future__ import annotations

import fcntl
import hashlib
import io
import json
import os
import tarfile
import time
import warnings
from collections import Counter
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from ddil_cli.buffer import manifest as mf
from ddil_cli.errors import UserError
from ddil_cli.atomic import to_json, write_json_atomic

STATE_KEY = "state.npy"  # format version 1: one state per record
STATES_KEY = "states.npy"
META_KEY = "meta.json"
STATE_DTYPE = np.float16
DEFAULT_SHARD_SAMPLES = 10_000
DEFAULT_SHARD_BYTES = 1 << 30  # 1 GiB: webdataset's usual ceiling for streaming shards
# the most stored-state bytes one record gathers (whole trajectories; `sources.record_spans`):
# a lab collection is one record, an SD-latent one a few trajectories per record
RECORD_BYTES = 4 << 20


def prompt_id(text: str) -> str:
    """A content id: every process derives the same id for the same prompt without coordination."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def encode_state(state) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(np.asarray(state, dtype=STATE_DTYPE)), allow_pickle=False)
    return buf.getvalue()


def decode_state(data: bytes) -> np.ndarray:
    return np.load(io.BytesIO(data), allow_pickle=False)


def state_key(record_key: str, index: int) -> str:
    """The key of state `index` of a record: 'RRRR-KKK-NNNNNN-IIIIII' -> 'RRRR-KKK-NNNNNN-IIIIII-SSS'."""
    return f"{record_key}-{index:03d}"


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


@contextmanager
def buffer_lock(root: Path) -> Iterator[None]:
    """Exclusive lock on the buffer's manifest and prompt table (blocks until free)."""
    with open(Path(root) / mf.LOCK_NAME, "a+") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def read_json(path: Path, default):
    return json.loads(path.read_text()) if path.is_file() else default


def load_manifest(root: Path) -> dict[str, Any] | None:
    path = Path(root) / mf.MANIFEST_NAME
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except ValueError:
        raise UserError(f"{path} is not valid JSON; restore it or collect into a new folder") from None
    return mf.check_manifest(data, path)


def check_writable(root: Path) -> None:
    """UserError unless `root` is (or can be created as) a writable folder; creates nothing."""
    root = Path(root)
    if root.exists() and not root.is_dir():
        raise UserError(f"--out {root} is a file; give a buffer folder path")
    probe = root
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir() or not os.access(probe, os.W_OK | os.X_OK):
        raise UserError(f"cannot write to {probe}; choose a writable --out folder")
    # a buffer another process is creating holds only its lock, partial shards and shards its
    # manifest write will list (or the next writer adopts): that folder is a buffer, not foreign
    own = lambda p: p.name.startswith(".") or (p.name.startswith("shard-") and p.name.endswith(".tar"))
    if root.exists() and not (root / mf.MANIFEST_NAME).is_file() and not all(own(p) for p in root.iterdir()):
        raise UserError(f"--out {root} is a non-empty folder without a buffer manifest; give a new folder "
                        "or an existing buffer")


def record_metas(meta: dict[str, Any]) -> list[dict[str, Any]]:
    """The per-state metadata of a record's meta.json (format 2: a list; format 1: one dict)."""
    metas = meta.get("states") if isinstance(meta, dict) and "states" in meta else [meta]
    if not isinstance(metas, list) or not all(isinstance(m, dict) and "source" in m and "t" in m for m in metas):
        raise ValueError("its meta.json is not a list of states each with a source and a t")
    return metas


def shard_counts(root: Path, name: str) -> tuple[int, dict[str, dict[str, int]]]:
    """States and per-source/timestep counts of a complete shard, read from its meta.json files."""
    counts: dict[str, Counter] = {}
    samples = 0
    with tarfile.open(Path(root) / name) as tar:
        for member in tar:
            if member.name.endswith("." + META_KEY):
                for meta in record_metas(json.loads(tar.extractfile(member).read())):
                    counts.setdefault(meta["source"], Counter())[str(meta["t"])] += 1
                    samples += 1
    return samples, {s: dict(c) for s, c in counts.items()}


def _remove_dead_partials(root: Path) -> None:
    """Delete partial shards whose writer is gone: a live writer holds an flock on its file."""
    for path in root.glob(".shard-*.partial"):
        try:
            with open(path, "rb") as handle:
                fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                path.unlink()
        except (BlockingIOError, FileNotFoundError):
            continue


def _adopt_orphans(root: Path, manifest: dict[str, Any]) -> list[str]:
    """Complete shards on disk the manifest lacks (killed between rename and manifest write)."""
    listed = {s["name"] for s in manifest["shards"]}
    adopted = []
    for path in sorted(root.glob("shard-*.tar")):
        parsed = mf.parse_shard_name(path.name)
        if path.name in listed or parsed is None:
            continue
        try:
            samples, counts = shard_counts(root, path.name)
        except (tarfile.TarError, OSError, ValueError, KeyError) as exc:
            warnings.warn(f"buffer {root}: {path.name} is not in the manifest and unreadable ({exc}); left as is")
            continue
        run, rank, _ = parsed
        mf.add_shard(manifest, {"name": path.name, "samples": samples, "bytes": path.stat().st_size,
                                "sha256": sha256_file(path), "run": run, "rank": rank, "counts": counts,
                                "adopted": True})
        adopted.append(path.name)
    return adopted


class BufferWriter:
    """Writes one process's samples into shards of a buffer folder.

    `open()` (under the lock) creates or checks the manifest, allocates this collect run's number
    (shared by every rank of one multi-process launch, through `launch_key`), and recovers from
    earlier crashes. `write()` adds a sample; a shard is committed when it holds `shard_samples`
    samples or `shard_bytes` bytes, by `commit()` and by `close()`. `on_commit(manifest, root)`
    runs under the lock after each commit (the FIFO bound). `write_group()` stores several
    states as one record, which is what makes writing cheap; a group is split where a shard
    fills, so no shard holds more than `shard_samples` states.
    """

    def __init__(self, root: str | Path, header: dict[str, Any], *, run_info: dict[str, Any],
                 rank: int = 0, world_size: int = 1, launch_key: str | None = None,
                 shard_samples: int = DEFAULT_SHARD_SAMPLES, shard_bytes: int = DEFAULT_SHARD_BYTES,
                 on_commit=None):
        if shard_samples < 1 or shard_bytes < 1:
            raise ValueError("shard limits must be positive")
        self.root = Path(root)
        self.header = header
        self.run_info = run_info
        self.rank, self.world_size, self.launch_key = rank, world_size, launch_key
        self.shard_samples, self.shard_bytes = shard_samples, shard_bytes
        self.on_commit = on_commit
        self.run: int | None = None
        self.written = 0
        self.committed: list[str] = []
        self._next_index = 0
        self._tar = None
        self._handle = None
        self._partial: Path | None = None
        self._count = 0  # states in the shard in progress
        self._records = 0  # records in the shard in progress (names the next record)
        self._counts: dict[str, Counter] = {}
        self._prompts: dict[str, str] = {}

    # ---- lifecycle ----------------------------------------------------------------------------
    def open(self) -> "BufferWriter":
        self.root.mkdir(parents=True, exist_ok=True)
        with buffer_lock(self.root):
            manifest = load_manifest(self.root)
            if manifest is None:
                manifest = mf.new_manifest(self.header)
            else:
                mf.check_compatible(manifest, self.header, self.root)
                manifest["version"] = mf.VERSION  # this writer's records are multi-state ones
            _remove_dead_partials(self.root)
            _adopt_orphans(self.root, manifest)
            self.run = self._allocate_run(manifest)
            mine = [p for p in (mf.parse_shard_name(s["name"]) for s in manifest["shards"])
                    if p and p[0] == self.run and p[1] == self.rank]
            on_disk = [p for p in (mf.parse_shard_name(x.name) for x in self.root.glob("shard-*.tar"))
                       if p and p[0] == self.run and p[1] == self.rank]
            self._next_index = max((p[2] for p in mine + on_disk), default=-1) + 1
            self._save(manifest)
        return self

    def _allocate_run(self, manifest: dict[str, Any]) -> int:
        launches = manifest.setdefault("launches", {})
        if self.launch_key is not None and self.launch_key in launches:
            run = launches[self.launch_key]
        else:
            run = manifest["next_run"]
            manifest["next_run"] = run + 1
            if self.launch_key is not None:
                launches[self.launch_key] = run
            manifest["runs"].append({"run": run, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                                     "world_size": self.world_size, "ranks": {}, **self.run_info})
        entry = mf.run_entry(manifest, run)
        entry["ranks"][str(self.rank)] = {"samples": 0, "shards": 0, "finished": False}
        return run

    def write(self, state, meta: dict[str, Any]) -> str:
        """Add one state (stored as float16). Returns its key."""
        return self.write_group([state], [meta])[0]

    def write_group(self, states, metas: list[dict[str, Any]]) -> list[str]:
        """Add states that belong together (whole trajectories) as one record; returns their keys."""
        if self.run is None:
            raise RuntimeError("BufferWriter.open() first")
        states = np.asarray(states, dtype=STATE_DTYPE)
        if len(states) != len(metas):
            raise ValueError(f"{len(states)} states but {len(metas)} metadata dicts")
        keys: list[str] = []
        begin = 0
        while begin < len(metas):
            if self._tar is None:
                self._start_shard()
            end = min(len(metas), begin + self.shard_samples - self._count)
            keys += self._write_record(states[begin:end], metas[begin:end])
            begin = end
            if self._count >= self.shard_samples or self._handle.tell() >= self.shard_bytes:
                self._commit()
        return keys

    def _write_record(self, states: np.ndarray, metas: list[dict[str, Any]]) -> list[str]:
        stem = Path(mf.shard_name(self.run, self.rank, self._next_index)).stem
        key = f"{stem.removeprefix('shard-')}-{self._records:06d}"
        metas = [{**meta, "collect_run": self.run, "rank": self.rank} for meta in metas]
        for meta in metas:
            if meta.get("prompt") is not None:
                self._prompts[meta["prompt_id"]] = meta["prompt"]
            self._counts.setdefault(meta["source"], Counter())[str(meta["t"])] += 1
        self._tar.write({"__key__": key, STATES_KEY: encode_state(states),
                         META_KEY: to_json({"states": metas}, sort_keys=True).encode("utf-8")})
        self._records += 1
        self._count += len(metas)
        self.written += len(metas)
        return [state_key(key, i) for i in range(len(metas))]

    def commit(self) -> None:
        """Commit the shard in progress now, however full (a DAgger collection is durable before
        training goes on; the writer stays open for the next one)."""
        if self._tar is not None and self._count:
            self._commit()

    def close(self, *, finished: bool = True) -> list[str]:
        """Commit the last shard and mark this rank finished. Returns the committed shard names."""
        if self._tar is not None and self._count:
            self._commit()
        elif self._tar is not None:
            self._discard()
        if self.run is not None:
            with buffer_lock(self.root):
                manifest = load_manifest(self.root)
                entry = mf.run_entry(manifest, self.run)
                entry["ranks"][str(self.rank)]["finished"] = finished
                if self.launch_key is not None and all(r["finished"] for r in entry["ranks"].values()) \
                        and len(entry["ranks"]) >= self.world_size:
                    manifest["launches"].pop(self.launch_key, None)
                self._save(manifest)
        return list(self.committed)

    def abort(self) -> None:
        """Drop the shard in progress (an exception in the caller); committed shards stay."""
        if self._tar is not None:
            self._discard()

    def __enter__(self) -> "BufferWriter":
        return self.open() if self.run is None else self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    # ---- shards -------------------------------------------------------------------------------
    def _start_shard(self) -> None:
        import webdataset as wds

        name = mf.shard_name(self.run, self.rank, self._next_index)
        self._partial = self.root / f".{name}.partial"
        self._handle = open(self._partial, "wb")
        # held until the shard is committed: tells other writers this partial file is alive
        fcntl.flock(self._handle.fileno(), fcntl.LOCK_EX)
        # a fixed mtime: the same seed gives byte-identical shards
        self._tar = wds.TarWriter(self._handle, mtime=0)
        self._count = self._records = 0
        self._counts = {}

    def _discard(self) -> None:
        try:  # closing writes the tar's end blocks, which fails on a full disk: drop the file anyway
            self._tar.close()
        except OSError:
            pass
        finally:
            try:
                self._handle.close()
            except OSError:
                pass
            self._partial.unlink(missing_ok=True)
            self._tar = self._handle = None

    def _commit(self) -> None:
        name = mf.shard_name(self.run, self.rank, self._next_index)
        self._tar.close()  # writes the end-of-archive blocks; our file object stays open
        self._handle.flush()
        os.fsync(self._handle.fileno())
        entry = {"name": name, "samples": self._count, "bytes": self._handle.tell(),
                 "sha256": sha256_file(self._partial), "run": self.run, "rank": self.rank,
                 "counts": {s: dict(c) for s, c in self._counts.items()}}
        with buffer_lock(self.root):
            manifest = load_manifest(self.root)
            if self._prompts:
                table = read_json(self.root / mf.PROMPTS_NAME, {})
                if not set(self._prompts) <= set(table):
                    write_json_atomic(self.root / mf.PROMPTS_NAME, {**table, **self._prompts})
            os.replace(self._partial, self.root / name)
            mf.add_shard(manifest, entry)
            rank_entry = mf.run_entry(manifest, self.run)["ranks"][str(self.rank)]
            rank_entry["samples"] += self._count
            rank_entry["shards"] += 1
            if self.on_commit is not None:
                self.on_commit(manifest, self.root)
            self._save(manifest)
        self._handle.close()  # releases the partial's flock only after the rename
        self._tar = self._handle = None
        self._prompts = {}
        self.committed.append(name)
        self._next_index += 1

    def _save(self, manifest: dict[str, Any]) -> None:
        write_json_atomic(self.root / mf.MANIFEST_NAME, manifest)
