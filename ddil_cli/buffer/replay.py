"""Replay policies: which buffered states stay (FIFO) and how often each is replayed (prioritised).

FIFO keeps the newest `max_samples` states by dropping whole shards, oldest first (shards are
the unit a streaming reader sees). `collect --max-samples` applies it after every shard commit;
`distill` calls `FIFOPolicy(max_samples).apply_to(buffer)` after each DAgger collection.

Prioritised replay keeps one priority per sample key (e.g. the last training loss on it; in
memory, checkpointed with the run by `ddil distill`) and replays a sample with probability
proportional to priority ** alpha. States never scored get the largest priority seen so far
(1 in an empty table), so new states are replayed soon, as in prioritised experience replay.
Two ways to draw: `sample(n)` over the scored keys (random access), and `accept()` as a filter on
a stream (a sample passes with probability (p / p_max) ** alpha, so the passing frequencies are
proportional to p ** alpha while the reader keeps streaming shards).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Iterable

import torch

from ddil_cli.buffer import manifest as mf
from ddil_cli.buffer.writer import buffer_lock, load_manifest
from ddil_cli.errors import UserError
from ddil_cli.atomic import write_json_atomic


def shard_of_key(key: str) -> str:
    """The shard a state key lives in: its first three fields are run, rank and shard
    ('0003-000-000012-000042-002', or '0003-000-000012-000042' in version 1 buffers, ->
    'shard-0003-000-000012.tar')."""
    return f"shard-{'-'.join(key.split('-')[:3])}.tar"


class FIFOPolicy:
    def __init__(self, max_samples: int | None):
        if max_samples is not None and max_samples < 1:
            raise UserError(f"--max-samples {max_samples} must be >= 1")
        self.max_samples = max_samples
        # shards to keep whatever their age (a set, or a function giving one): ddil distill's replay
        # pool and the latest checkpoint read their states from them
        self.pinned: set[str] | Callable[[], set[str]] = set()

    def select(self, manifest: dict[str, Any]) -> set[str]:
        """The oldest shards (not pinned) to drop so that at most max_samples remain."""
        if self.max_samples is None:
            return set()
        total, drop = manifest["counts"]["total"], set()
        pinned = self.pinned() if callable(self.pinned) else self.pinned
        for shard in manifest["shards"]:  # oldest first
            if total <= self.max_samples:
                break
            if shard["name"] in pinned:
                continue
            drop.add(shard["name"])
            total -= shard["samples"]
        return drop

    def __call__(self, manifest: dict[str, Any], root: Path) -> list[str]:
        """Drop from `manifest` and delete from disk (the caller holds the lock and saves)."""
        dropped = mf.drop_shards(manifest, self.select(manifest))
        for shard in dropped:
            (Path(root) / shard["name"]).unlink(missing_ok=True)
        return [s["name"] for s in dropped]

    def apply_to(self, root: str | Path) -> list[str]:
        """Apply to a buffer folder on disk, under its lock."""
        root = Path(root)
        with buffer_lock(root):
            manifest = load_manifest(root)
            if manifest is None:
                raise UserError(f"{root} has no buffer manifest; run `ddil collect --out {root}` first")
            dropped = self(manifest, root)
            write_json_atomic(root / mf.MANIFEST_NAME, manifest)
        return dropped


class PrioritizedPolicy:
    """Per-sample priorities; draws proportional to priority ** alpha."""

    def __init__(self, alpha: float = 0.6, *, epsilon: float = 1e-6):
        if not alpha >= 0:
            raise UserError(f"priority exponent alpha {alpha} must be >= 0")
        self.alpha, self.epsilon = float(alpha), float(epsilon)
        self.priorities: dict[str, float] = {}

    # ---- priorities ---------------------------------------------------------------------------
    @property
    def default_priority(self) -> float:
        return max(self.priorities.values(), default=1.0)

    def update(self, keys: Iterable[str], priorities) -> None:
        """Set each key's priority (e.g. its last loss); |p| + epsilon keeps every sample drawable."""
        values = torch.as_tensor(priorities, dtype=torch.float64).detach().abs().cpu().reshape(-1).tolist()
        keys = list(keys)
        if len(keys) != len(values):
            raise ValueError(f"{len(keys)} keys but {len(values)} priorities")
        for key, value in zip(keys, values):
            self.priorities[key] = value + self.epsilon

    def weights(self, keys: list[str]) -> torch.Tensor:
        default = self.default_priority
        p = torch.tensor([self.priorities.get(k, default) for k in keys], dtype=torch.float64)
        return p ** self.alpha

    def forget(self, keys: Iterable[str]) -> None:
        """Drop these keys' priorities (states evicted from an in-memory pool)."""
        for key in keys:
            self.priorities.pop(key, None)

    # ---- drawing ------------------------------------------------------------------------------
    def sample(self, n: int, generator: torch.Generator | None = None,
               keys: list[str] | None = None) -> list[str]:
        """n keys drawn with replacement, P(key) proportional to priority ** alpha."""
        keys = list(self.priorities) if keys is None else list(keys)
        if not keys:
            raise ValueError("no keys to sample from")
        picks = torch.multinomial(self.weights(keys), n, replacement=True, generator=generator)
        return [keys[i] for i in picks.tolist()]

    def accept(self, keys: list[str], generator: torch.Generator | None = None) -> torch.Tensor:
        """(B,) bool: which streamed samples to keep, each with probability (p / p_max) ** alpha."""
        # unscored keys get default_priority, the table's maximum, so it bounds every weight
        top = self.default_priority ** self.alpha
        return torch.rand(len(keys), generator=generator, dtype=torch.float64) < self.weights(keys) / top
