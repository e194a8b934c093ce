"""Streaming a replay buffer: shuffled, split across processes and workers, robust to damage.

Sources: a buffer folder (its manifest's shards; `url_template` maps each shard name to a URL,
e.g. `pipe:aws s3 cp s3://bucket/buf/{name} -`), or shard URLs webdataset opens itself: local
paths, brace patterns (`buf/shard-0000-000-{000000..000009}.tar`), `pipe:COMMAND` or http(s).
Shards are split by node (`wds.split_by_node`, the torch.distributed rank) and by DataLoader
worker (`wds.split_by_worker`) before anything is read, so every process reads different shards.

Damage: a shard that cannot be opened or whose tar stream breaks (truncated, corrupt) is skipped
from that point with a warning and counted in `stats.corrupt_shards`; the samples read before the
damage are kept. A shard that ends early without a tar error (cut at a member boundary) is caught
by the manifest's sample count. A record missing its states or meta, or whose bytes do not
decode, is skipped and counted in `stats.bad_samples`. Counts are per process (and per worker).
Records (several states each, or one in version 1 buffers) are split into states before the
shuffle, so a trajectory's states do not arrive together.
"""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import torch

from ddil_cli.buffer import manifest as mf
from ddil_cli.buffer.sources import SOURCES, sources_for_batch
from ddil_cli.buffer.writer import META_KEY, STATE_KEY, STATES_KEY, decode_state, load_manifest, record_metas, \
    state_key
from ddil_cli.errors import UserError


@dataclass
class BufferSample:
    key: str
    state: torch.Tensor  # float32, the stored float16 values
    t: int
    t_index: int
    source: str
    prompt: str | None
    prompt_id: str | None
    meta: dict[str, Any]
    url: str = ""


@dataclass
class ReadStats:
    shards: int = 0
    samples: int = 0
    corrupt_shards: int = 0
    bad_samples: int = 0
    corrupt: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {"shards": self.shards, "samples": self.samples, "corrupt_shards": self.corrupt_shards,
                "bad_samples": self.bad_samples, "corrupt": list(self.corrupt)}


def resolve_buffer(source, url_template: str | None = None) -> tuple[list[str], dict[str, int], dict | None]:
    """Shard URLs, the expected sample count per URL (from a manifest), and the manifest."""
    import braceexpand

    if isinstance(source, (str, os.PathLike)):
        text = str(source)
        path = Path(text).expanduser()
        folder = path if path.is_dir() else (path.parent if path.name == mf.MANIFEST_NAME else None)
        if folder is not None and (folder / mf.MANIFEST_NAME).is_file():
            manifest = load_manifest(folder)
            urls, expected = [], {}
            for shard in manifest["shards"]:
                url = url_template.format(name=shard["name"]) if url_template else str(folder / shard["name"])
                urls.append(url)
                expected[url] = shard["samples"]
            if not urls:
                raise UserError(f"buffer {folder} holds no shards yet; run `ddil collect --out {folder}` first")
            return urls, expected, manifest
        if path.is_dir():
            raise UserError(f"{path} has no {mf.MANIFEST_NAME}; point at a buffer made by `ddil collect`")
        sources: Sequence[str] = [text]
    else:
        sources = [str(s) for s in source]
    urls = []
    for text in sources:
        expanded = [text] if text.startswith("pipe:") else list(braceexpand.braceexpand(text))
        for url in expanded:
            if not (url.startswith("pipe:") or "://" in url) and not Path(url).expanduser().is_file():
                raise UserError(f"buffer shard {url} does not exist; check the path or pattern")
            urls.append(url)
    if not urls:
        raise UserError("no buffer shards given; pass a buffer folder, shard paths or a pipe: URL")
    return urls, {}, None


def decode_record(raw: dict[str, Any], prompts: dict[str, str] | None = None) -> list[BufferSample]:
    """A raw webdataset record (bytes per key) to its BufferSamples; KeyError/ValueError if broken."""
    metas = record_metas(json.loads(raw[META_KEY]))
    if STATES_KEY in raw:
        states, keys = decode_state(raw[STATES_KEY]), [state_key(raw["__key__"], i) for i in range(len(metas))]
    else:  # format version 1: one state, keyed like its record
        states, keys = decode_state(raw[STATE_KEY])[None], [raw["__key__"]]
    if len(states) != len(metas):
        raise ValueError(f"{len(states)} states but {len(metas)} metadata entries")
    samples = []
    for key, state, meta in zip(keys, torch.from_numpy(states.astype("float32")), metas):
        prompt = meta.get("prompt")
        if prompt is None and prompts and meta.get("prompt_id") is not None:
            prompt = prompts.get(meta["prompt_id"])
        samples.append(BufferSample(key, state, int(meta["t"]), int(meta["t_index"]), meta["source"], prompt,
                                    meta.get("prompt_id"), meta, raw.get("__url__", "")))
    return samples


class BufferReader(torch.utils.data.IterableDataset):
    """Iterate BufferSamples, shuffled (shard order and a sample buffer of `shuffle`).

    `sources` keeps only those sources; `policy` (a PrioritizedPolicy) thins the stream so each
    sample's frequency is proportional to its priority ** alpha; `resampled=True` draws shards
    with replacement forever (for training by update count); `epoch` advances the shuffle seed
    each pass.
    """

    def __init__(self, source, *, shuffle: int = 1000, seed: int = 0, sources: Iterable[str] | None = None,
                 resampled: bool = False, split_by_node: bool = True, split_by_worker: bool = True,
                 policy=None, url_template: str | None = None):
        super().__init__()
        self.urls, self.expected, self.manifest = resolve_buffer(source, url_template)
        self.prompts = {}
        if self.manifest is not None and isinstance(source, (str, os.PathLike)):
            table = Path(source) if Path(source).is_dir() else Path(source).parent
            if (table / mf.PROMPTS_NAME).is_file():
                self.prompts = json.loads((table / mf.PROMPTS_NAME).read_text())
        self.sources = set(sources) if sources is not None else None
        if self.sources is not None and not self.sources <= set(SOURCES):
            raise UserError(f"unknown buffer source(s) {', '.join(sorted(self.sources - set(SOURCES)))}; "
                            f"use {', '.join(SOURCES)}")
        self.shuffle, self.seed, self.resampled = shuffle, seed, resampled
        self.split_by_node, self.split_by_worker = split_by_node, split_by_worker
        self.policy = policy
        self.epoch = 0
        self.stats = ReadStats()

    def _damaged(self, url: str, reason: str) -> None:
        self.stats.corrupt_shards += 1
        self.stats.corrupt.append(url)
        warnings.warn(f"buffer shard {url} is damaged ({reason}); skipping the rest of it", stacklevel=2)

    def _shard_samples(self, urls: Iterable[dict[str, Any]]) -> Iterator[BufferSample]:
        """The states of each shard, record by record; damage ends only the shard it is in."""
        import webdataset as wds
        from webdataset.tariterators import base_plus_ext, tar_file_iterator

        for item in urls:
            url = item["url"]
            self.stats.shards += 1
            seen = 0  # states, to compare with the manifest's count
            current: dict[str, Any] | None = None
            try:
                stream = wds.gopen(url)
                try:
                    for entry in tar_file_iterator(stream):
                        prefix, suffix = base_plus_ext(entry["fname"])
                        if prefix is None:
                            continue
                        if current is not None and current["__key__"] != prefix:
                            samples = self._decode(current)
                            seen += max(len(samples), 1)
                            yield from samples
                            current = None
                        if current is None:
                            current = {"__key__": prefix, "__url__": url}
                        current[suffix.lower()] = entry["data"]
                finally:
                    try:
                        stream.close()
                    except Exception:  # a pipe: closed before its end reports SIGPIPE; nothing lost
                        pass
            except Exception as exc:  # any tar or I/O failure: skip the shard, never the stream
                if current is not None:
                    self.stats.bad_samples += 1  # the record the damage cut through
                self._damaged(url, f"{type(exc).__name__}: {exc}")
                continue
            if current is not None:
                samples = self._decode(current)
                seen += max(len(samples), 1)
                yield from samples
            expected = self.expected.get(url)
            if expected is not None and seen < expected:
                self._damaged(url, f"{seen} of {expected} samples")

    def _decode(self, raw: dict[str, Any]) -> list[BufferSample]:
        """A record's states, or none (counted, with a warning) when it does not decode."""
        try:
            return decode_record(raw, self.prompts)
        except (KeyError, ValueError, TypeError) as exc:
            self.stats.bad_samples += 1
            warnings.warn(f"skipping unreadable buffer sample {raw.get('__key__')} in "
                          f"{raw.get('__url__')} ({type(exc).__name__}: {exc})", stacklevel=3)
            return []

    def _selected(self, samples: Iterable[BufferSample]) -> Iterator[BufferSample]:
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        for sample in samples:
            if self.sources is not None and sample.source not in self.sources:
                continue
            if self.policy is not None and not bool(self.policy.accept([sample.key], gen)[0]):
                continue
            self.stats.samples += 1
            yield sample

    def __iter__(self) -> Iterator[BufferSample]:
        import webdataset as wds

        stages: list[Any] = []
        if self.resampled:
            # seeded per rank and worker by webdataset, so processes draw different shards: no split
            stages.append(wds.ResampledShards(self.urls, seed=self.seed + self.epoch, deterministic=True))
        else:
            stages.append(wds.SimpleShardList(self.urls))
            if self.shuffle:
                # before the split and seeded alike everywhere: each epoch deals shards out afresh
                stages.append(wds.detshuffle(bufsize=len(self.urls), initial=len(self.urls), seed=self.seed,
                                             epoch=self.epoch - 1))
            if self.split_by_node:
                stages.append(wds.split_by_node)
            if self.split_by_worker:
                stages.append(wds.split_by_worker)
        stages.append(self._shard_samples)
        if self.shuffle:
            stages.append(wds.detshuffle(bufsize=self.shuffle, initial=self.shuffle, seed=self.seed + 1,
                                         epoch=self.epoch - 1))
        stages.append(self._selected)
        self.epoch += 1
        yield from wds.DataPipeline(*stages)


def mix_streams(streams: dict[str, Iterator], prior: dict[str, float],
                generator: torch.Generator | None = None, *, chunk: int = 256) -> Iterator[tuple[str, Any]]:
    """(source, item) pairs, each source drawn from `prior` per item (e.g. a buffer reader per
    source and a live forward-diffused data stream). A stream that runs dry ends the mix."""
    missing = [name for name, w in prior.items() if w > 0 and name not in streams]
    if missing:
        raise ValueError(f"no stream for source(s) {', '.join(missing)} with prior weight > 0")
    iterators = {name: iter(s) for name, s in streams.items()}
    while True:
        for name in sources_for_batch(chunk, prior, generator):
            try:
                item = next(iterators[name])
            except StopIteration:
                return
            yield name, item
