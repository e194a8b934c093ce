"""The training data stream: a torch DataLoader over image-caption or encoded shards.

How the data are split (docs/scale.md, section 2):

- A process's stream is read in LANES (16) lanes; the `processes x 16` lanes of a launch are the
  data's consumers. With at least as many shards as consumers, consumer g (process r, lane l,
  g = 16 r + l) reads the shards i with i % consumers == g, whole. With fewer shards, each shard
  is shared by the consumers g with g % shards == i, each keeping every m-th record of it (a
  disjoint slice; every consumer then reads the whole shard, which is cheap only because such a
  data set is small). Either way every record is in exactly one consumer's pass.
- A lane's passes (epochs) repeat without end; its shard order is reshuffled for each pass from
  the seed (records keep their order inside a shard: shards should be shuffled when made, as
  img2dataset makes them).
- The process's stream takes a chunk of records from each of its lanes in turn (CHUNK, more
  from a lane holding more of the data, so that lanes finish their passes together). `workers` (0, or a
  divisor of 16) DataLoader workers split the lanes between them, worker w producing the
  stream's chunks w, w + workers, ...; the DataLoader hands them back in that order. So the
  stream, and every batch drawn from it, depends on the seed and the number of processes only,
  never on the number of workers (0 reads the same stream in the training process).
- Its position is (chunk, samples taken from it): a resume starts the lanes at that chunk
  (skipping records without decoding them) and continues with the very next sample.

Workers decode (JPEG and resize for raw shards, safetensors for encoded ones); the VAE of raw
data runs in the training process on the device. Tensors come pinned when the device is CUDA.
"""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass, replace
from itertools import islice
from typing import Any, Iterator

import torch

from ddil_cli.data.shards import ShardStats, decode_sample, read_records
from ddil_cli.errors import UserError

LANES = 16
CHUNK = 8  # records per chunk: the unit a worker hands over
WORKER_COUNTS = tuple(w for w in range(LANES + 1) if w == 0 or LANES % w == 0)


@dataclass(frozen=True)
class Lane:
    """What one consumer reads: shards (indices into the source's urls) and, for a shard shared
    with other consumers, its records with index % of == part; `chunk` records at a time."""

    shards: tuple[int, ...]
    part: int = 0
    of: int = 1
    chunk: int = CHUNK


def plan_lanes(num_shards: int, consumers: int) -> list[Lane]:
    """Every consumer's lane: whole shards when there are enough, else slices of shared shards.
    A lane's chunk grows with its share (shards held / consumers sharing them), so that lanes of
    equal-sized shards finish their passes together and no sample is drawn more often than another
    (40 shards over 32 lanes: 16-record chunks from the lanes holding two shards)."""
    if num_shards >= consumers:
        lanes = [Lane(tuple(range(g, num_shards, consumers))) for g in range(consumers)]
    else:
        lanes = [Lane((g % num_shards,), g // num_shards, len(range(g % num_shards, consumers, num_shards)))
                 for g in range(consumers)]
    share = [len(lane.shards) / lane.of for lane in lanes]
    return [replace(lane, chunk=max(1, round(CHUNK * s / min(share)))) for lane, s in zip(lanes, share)]


@dataclass(frozen=True)
class ShardSource:
    """Shards and how a record becomes a sample: raw image-caption records decoded to tensors in
    [-1, 1] at `resolution`, or `ddil encode`'s records (a clean state and prompt encodings)."""

    urls: tuple[str, ...]
    encoded: bool = False
    resolution: int | None = None
    channels: int = 3
    where: str = "--data"  # named in errors

    def decode(self, raw: dict[str, Any]):
        """(key, tensor, caption, cond) of a record, or the reason it is skipped."""
        if self.encoded:
            from ddil_cli.data.encoded import decode_encoded

            sample = decode_encoded(raw)
            return sample.key, sample.latent, sample.caption, sample.cond
        sample = decode_sample(raw, resolution=self.resolution, channels=self.channels, output="tensor")
        return sample if isinstance(sample, str) else (sample.key, sample.image, sample.caption, {})


class _LaneReader:
    """One lane's records, pass after pass, chunk by chunk, from chunk `start` on."""

    def __init__(self, source: ShardSource, lane: Lane, lane_id: int, seed: int, start: int):
        self.source, self.lane, self.lane_id, self.seed = source, lane, lane_id, seed
        self.epoch, self.barren = 0, False  # barren: a whole pass found no record
        self._records = self._forever()
        for _ in islice(self._records, start * lane.chunk):  # a resume: skipped, not decoded
            pass

    def _forever(self) -> Iterator[tuple[int, dict]]:
        while True:
            order = list(self.lane.shards)
            random.Random(f"{self.seed}/{self.lane_id}/{self.epoch}").shuffle(order)
            found = 0
            for k, raw in enumerate(read_records([self.source.urls[i] for i in order])):
                if k % self.lane.of == self.lane.part:
                    found += 1
                    yield self.epoch, raw
            self.epoch += 1
            if not found:
                self.barren = True
                return

    def chunk(self, index: int) -> dict[str, Any]:
        records = list(islice(self._records, self.lane.chunk))
        if self.barren:
            self.epoch += 1  # counts as a pass, so a stream of barren lanes is noticed
        keys, tensors, captions, conds, epochs, skipped = [], [], [], [], [], Counter()
        for epoch, raw in records:
            decoded = self.source.decode(raw)
            if isinstance(decoded, str):
                skipped[decoded] += epoch == 0  # the counts are of the data, not of every pass
                continue
            keys.append(decoded[0])
            tensors.append(decoded[1])
            captions.append(decoded[2])
            conds.append(decoded[3])
            epochs.append(epoch)
        cond = {k: torch.stack([c[k] for c in conds]) for k in conds[0]} if conds else {}
        return {"index": index, "x": torch.stack(tensors) if tensors else None, "captions": captions,
                "keys": keys, "cond": cond, "epochs": epochs, "lane_epoch": self.epoch,
                "read": sum(epoch == 0 for epoch, _ in records),
                "skipped": dict(skipped), "error": None}


def first_chunk_of_lane(start: int, lane: int, lanes: int = LANES) -> int:
    """How many of the stream's chunks before `start` came from `lane` (chunk q is lane q % lanes's)."""
    return max(0, -(-(start - lane) // lanes))


class _Chunks(torch.utils.data.IterableDataset):
    """The stream's chunks from `start` on; in a DataLoader worker, that worker's share of them."""

    def __init__(self, source: ShardSource, lanes: list[Lane], first_lane_id: int, seed: int, start: int):
        super().__init__()
        self.source, self.lanes, self.first_lane_id = source, lanes, first_lane_id
        self.seed, self.start = seed, start

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        readers: dict[int, _LaneReader] = {}
        index = self.start + worker
        try:
            while True:
                lane = index % len(self.lanes)
                if lane not in readers:
                    readers[lane] = _LaneReader(self.source, self.lanes[lane], self.first_lane_id + lane, self.seed,
                                                first_chunk_of_lane(self.start, lane, len(self.lanes)))
                yield readers[lane].chunk(index)
                index += workers
        except UserError as exc:  # one line in the training process, not a worker's traceback
            yield {"index": index, "error": str(exc)}


@dataclass
class Taken:
    """Samples taken from the stream: x (n, ...), their captions, keys, passes and, for encoded
    shards, their prompt encodings (n, ...) by name."""

    x: torch.Tensor
    captions: list[str]
    keys: list[str]
    epochs: list[int]
    cond: dict[str, torch.Tensor]


def check_workers(workers: int) -> None:
    if workers not in WORKER_COUNTS:
        raise UserError(f"--data-workers {workers}: use 0 or a divisor of {LANES} "
                        f"({', '.join(map(str, WORKER_COUNTS[1:]))}); the stream is read in {LANES} lanes")


class DataStream:
    """This process's share of the shards as one endless, resumable stream of samples."""

    def __init__(self, source: ShardSource, *, rank: int = 0, ranks: int = 1, seed: int = 0, workers: int = 0,
                 prefetch: int = 2, pin: bool = False):
        check_workers(workers)
        self.source, self.seed, self.workers, self.prefetch, self.pin = source, seed, workers, prefetch, pin
        self.lanes = plan_lanes(len(source.urls), ranks * LANES)[rank * LANES:(rank + 1) * LANES]
        self.first_lane_id = rank * LANES
        self.stats = ShardStats(shards=len(source.urls))
        self.chunk, self.offset = 0, 0  # the position: the next sample is chunk `chunk`'s `offset`-th
        self._iter: Iterator | None = None
        self._head: dict[str, Any] | None = None
        self._lane_pass: dict[int, int] = {}  # lane -> its pass at its latest chunk
        self._idle_from: dict[int, int] = {}  # lane -> its pass at its first chunk since the last sample

    # ---- position -------------------------------------------------------------------------------
    def state(self) -> dict[str, int]:
        return {"chunk": self.chunk, "offset": self.offset}

    def load_state(self, state: dict[str, int] | None) -> None:
        self.close()
        self.chunk, self.offset = (int(state["chunk"]), int(state["offset"])) if state else (0, 0)

    def close(self) -> None:
        """Stop the workers (a later take starts them again at the position)."""
        self._iter, self._head = None, None

    # ---- reading --------------------------------------------------------------------------------
    def _chunks(self) -> Iterator[dict[str, Any]]:
        dataset = _Chunks(self.source, self.lanes, self.first_lane_id, self.seed, self.chunk)
        loader = torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=self.workers, pin_memory=self.pin,
                                             prefetch_factor=self.prefetch if self.workers else None)
        return iter(loader)

    def _no_samples(self) -> UserError:
        if self.source.encoded:
            return UserError(f"the encoded data {self.source.where} holds no samples for this process; encode more "
                             "data (ddil encode)")
        return UserError(f"no usable image-caption samples in {self.source.where} ({self.stats.summary()}); each "
                         "sample needs an image and a non-empty .txt caption")

    def _next_chunk(self) -> dict[str, Any]:
        if self._iter is None:
            self._iter = self._chunks()
        chunk = next(self._iter)
        if chunk["error"]:
            self.close()
            raise UserError(chunk["error"])
        assert chunk["index"] == self.chunk, (chunk["index"], self.chunk)  # the DataLoader keeps the order
        self.stats.read += chunk["read"]
        self.stats.used += chunk["epochs"].count(0)
        self.stats.skipped.update(chunk["skipped"])
        lane = chunk["index"] % len(self.lanes)
        self._lane_pass[lane] = chunk["lane_epoch"]
        if chunk["captions"]:
            self._idle_from.clear()
        else:  # every lane a whole pass on without a usable sample: there is none to come
            self._idle_from.setdefault(lane, chunk["lane_epoch"])
            if len(self._idle_from) == len(self.lanes) and \
                    all(self._lane_pass[lane] - since >= 2 for lane, since in self._idle_from.items()):
                self.close()
                raise self._no_samples()
        return chunk

    def take(self, n: int, device=None) -> Taken:
        """The next n (> 0) samples, their tensors on `device` (the host when None)."""
        if n < 1:
            raise ValueError(f"take needs n >= 1, got {n}")
        parts: list[tuple[dict[str, Any], int, int]] = []
        while n > 0:
            if self._head is None:
                self._head = self._next_chunk()
            size = len(self._head["captions"])
            end = min(size, self.offset + n)
            if end > self.offset:
                parts.append((self._head, self.offset, end))
                n -= end - self.offset
            self.offset = end
            if self.offset == size:
                self._head, self.chunk, self.offset = None, self.chunk + 1, 0
        rows = lambda name: [v for chunk, a, b in parts for v in chunk[name][a:b]]
        # each chunk's rows to the device before they are joined: a chunk is pinned, a joined copy not
        cat = lambda pick: torch.cat([pick(chunk)[a:b].to(device or "cpu", non_blocking=True) for chunk, a, b in parts])
        return Taken(cat(lambda c: c["x"]), rows("captions"), rows("keys"), rows("epochs"),
                     {k: cat(lambda c, k=k: c["cond"][k]) for k in parts[0][0]["cond"]})
