"""The in-memory side of the replay buffer: the states a training run draws `student` and
`teacher` inputs from, mirroring the shards it wrote (or read) on disk.

Training draws random rows many times per second; streaming tar shards for each would cost more
than the update. The pool holds the states (float16, as on disk) and their metadata, applies the
same FIFO bound as the disk buffer, and is saved whole inside each checkpoint so that a resumed
run continues from exactly the same pool.
"""

from __future__ import annotations

import torch

from ddil_cli.buffer.replay import PrioritizedPolicy

SOURCE_CODES = ("data", "student", "teacher")


class ReplayPool:
    def __init__(self, max_samples: int | None = None, policy: PrioritizedPolicy | None = None):
        self.max_samples = max_samples
        self.policy = policy
        self.states: torch.Tensor | None = None  # (N, *state) float16
        self.t = torch.zeros(0, dtype=torch.long)  # each state's training timestep
        self.guidance = torch.zeros(0)
        self.keys: list[str] = []
        self.prompts: list[str] = []
        self.sources: list[str] = []
        self._source_code = torch.zeros(0, dtype=torch.long)  # index into SOURCE_CODES, for fast draws

    def __len__(self) -> int:
        return len(self.keys)

    def count(self, source: str) -> int:
        return int((self._source_code == SOURCE_CODES.index(source)).sum())

    def add(self, states: torch.Tensor, t, guidance, prompts: list[str], sources: list[str],
            keys: list[str]) -> None:
        """Append states with their timesteps `t` (not a grid index: a method may train on any grid)."""
        states = states.detach().to("cpu", torch.float16)
        self.states = states if self.states is None else torch.cat([self.states, states])
        self.t = torch.cat([self.t, torch.as_tensor(t, dtype=torch.long).reshape(-1)])
        self.guidance = torch.cat([self.guidance, torch.as_tensor(guidance, dtype=torch.float32).reshape(-1)])
        self.prompts += list(prompts)
        self.sources += list(sources)
        self._source_code = torch.cat([self._source_code,
                                       torch.tensor([SOURCE_CODES.index(s) for s in sources], dtype=torch.long)])
        self.keys += list(keys)
        if self.max_samples is not None and len(self) > self.max_samples:
            self._keep(slice(len(self) - self.max_samples, None))  # FIFO: oldest rows go

    def _keep(self, rows) -> None:
        self.states, self.t, self.guidance = self.states[rows], self.t[rows], self.guidance[rows]
        self._source_code = self._source_code[rows]
        index = range(len(self.keys))[rows]
        if self.policy is not None:  # evicted states leave the priority table: memory stays bounded
            kept = set(index)
            self.policy.forget(self.keys[i] for i in range(len(self.keys)) if i not in kept)
        self.keys = [self.keys[i] for i in index]
        self.prompts = [self.prompts[i] for i in index]
        self.sources = [self.sources[i] for i in index]

    def timesteps_of(self, source: str) -> set[int]:
        """The timesteps at which the pool holds `source` states."""
        return set(self.t[self._source_code == SOURCE_CODES.index(source)].unique().tolist())

    def draw_at(self, t: torch.Tensor, source: str, generator: torch.Generator) -> torch.Tensor:
        """One row index of `source` per entry of `t`, each a state at that timestep (as `draw`)."""
        picked = torch.empty(len(t), dtype=torch.long)
        for value in t.unique().tolist():
            where = (t == value).nonzero().squeeze(1)
            picked[where] = self.draw(len(where), source, generator, at=int(value))
        return picked

    def draw(self, n: int, source: str, generator: torch.Generator, at: int | None = None) -> torch.Tensor:
        """n row indices of `source` (at timestep `at` if given) with replacement: uniform, or by
        priority ** alpha."""
        mask = self._source_code == SOURCE_CODES.index(source)
        if at is not None:
            mask &= self.t == at
        rows = mask.nonzero().squeeze(1)
        if rows.numel() == 0:
            where = "" if at is None else f" at t = {at}"
            raise RuntimeError(f"the replay pool holds no {source!r} states{where} yet")
        if self.policy is None:
            pick = torch.randint(rows.numel(), (n,), generator=generator)
        else:
            weights = self.policy.weights([self.keys[i] for i in rows.tolist()])
            pick = torch.multinomial(weights, n, replacement=True, generator=generator)
        return rows[pick]

    # ---- checkpoints --------------------------------------------------------------------------
    def state(self) -> tuple[dict[str, torch.Tensor], dict]:
        tensors = {"t": self.t, "guidance": self.guidance}
        if self.states is not None:
            tensors["states"] = self.states
        info = {"keys": self.keys, "prompts": self.prompts, "sources": self.sources}
        if self.policy is not None:
            info["priorities"] = dict(self.policy.priorities)
        return tensors, info

    def load(self, tensors: dict[str, torch.Tensor], info: dict, *, timesteps: list[int] | None = None) -> None:
        """`timesteps`: the grid that checkpoints older than per-state timesteps indexed into."""
        self.states = tensors.get("states")
        self.guidance = tensors["guidance"]
        if "t" in tensors:
            self.t = tensors["t"]
        elif timesteps is not None:
            self.t = torch.tensor(timesteps, dtype=torch.long)[tensors["t_index"]]
        else:
            raise ValueError("this pool state indexes a timestep grid; pass `timesteps` to load it")
        self.keys, self.prompts, self.sources = list(info["keys"]), list(info["prompts"]), list(info["sources"])
        self._source_code = torch.tensor([SOURCE_CODES.index(s) for s in self.sources], dtype=torch.long)
        if self.policy is not None:
            self.policy.priorities = dict(info.get("priorities", {}))
