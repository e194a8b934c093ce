"""Training batches: each assembled from data / student / teacher sources by the prior in force."""

from __future__ import annotations

import torch

from ddil_cli.buffer.pool import ReplayPool
from ddil_cli.buffer.sources import DataStates, conditioning_with_stored, forward_diffuse, sources_for_batch
from ddil_cli.methods import Batch
from ddil_cli.models.base import Denoiser
from ddil_cli.stages.distill.plan import Plan


class InputAssembler:
    """Builds each training batch from data / student / teacher sources by the prior in force."""

    def __init__(self, *, teacher: Denoiser, student: Denoiser, timesteps: list[int], plan: Plan, pool: ReplayPool,
                 data: DataStates | None, batch_size: int, total_updates: int, generator: torch.Generator,
                 device: str):
        # timesteps: where data inputs are forward-diffused (the phase's training grid)
        self.teacher, self.student, self.timesteps, self.plan = teacher, student, list(timesteps), plan
        # per-timestep metrics: each grid position, or 8 equal bins of a long grid (LCM's 50 points)
        bins = len(self.timesteps) if len(self.timesteps) <= 16 else 8
        self._position = {t: i * bins // len(self.timesteps) for i, t in enumerate(self.timesteps)}
        self.pool, self.data, self.batch_size = pool, data, batch_size
        self.total_updates, self.generator, self.device = total_updates, generator, device
        self.data_index = 0

    def prior(self, update: int) -> dict[str, float]:
        return self.plan.schedule.at(update, self.total_updates)

    def guidance(self, n: int) -> torch.Tensor:
        low, high = self.plan.guidance_range
        return low + (high - low) * torch.rand(n, generator=self.generator)

    def __call__(self, update: int) -> Batch:
        prior = self.prior(update)
        sources = sources_for_batch(self.batch_size, prior, self.generator)
        timesteps = None  # each example's timestep when the method's mix draws it first
        if prior.get("data", 0.0) > 0:
            sources, timesteps = self.plan.method.mix_sources(self.plan.options, sources, self.timesteps,
                                                              self.pool.timesteps_of, self.generator)
        parts = []  # (x_t, t, guidance, prompts, sources, keys)
        n_data, data_cond = sources.count("data"), None
        if n_data:  # data come first: their stored encodings (if any) are the batch's first rows
            x0, prompts, data_cond = self.data.draw(n_data, self.generator, self.data_index)
            self.data_index += n_data
            at = None if timesteps is None else timesteps[[s == "data" for s in sources]]
            x_t, t, _t_index = forward_diffuse(x0, self.teacher.schedule, self.timesteps, self.generator, t=at)
            parts.append((x_t, t, self.guidance(n_data), prompts, ["data"] * n_data, [None] * n_data))
        for source in ("student", "teacher"):
            n = sources.count(source)
            if n:
                rows = (self.pool.draw(n, source, self.generator) if timesteps is None else
                        self.pool.draw_at(timesteps[[s == source for s in sources]], source, self.generator))
                picked = rows.tolist()  # iterating the tensor itself cost ~0.1 ms a draw (lab profile)
                parts.append((self.pool.states[rows].float(), self.pool.t[rows], self.pool.guidance[rows],
                              [self.pool.prompts[i] for i in picked], [source] * n,
                              [self.pool.keys[i] for i in picked]))
        x_t = torch.cat([p[0].to(self.device) for p in parts])
        t = torch.cat([p[1] for p in parts])
        t_index = torch.tensor([self._position.get(int(v), -1) for v in t.tolist()], dtype=torch.long)
        prompts = [q for p in parts for q in p[3]]
        cond = conditioning_with_stored(self.teacher, prompts, data_cond)
        student_cond = cond if self.student.shares_conditioning(self.teacher) else self.student.encode(prompts)
        guidance = torch.cat([p[2] for p in parts])  # on the host still: its shared value is read here
        shared = guidance[0].item() if bool((guidance == guidance[0]).all()) else None
        return Batch(x_t=x_t, t=t.to(self.device), t_index=t_index.to(self.device), cond=cond,
                     student_cond=student_cond, guidance=guidance.to(self.device),
                     source=[s for p in parts for s in p[4]], keys=[k for p in parts for k in p[5]],
                     guidance_value=shared)

