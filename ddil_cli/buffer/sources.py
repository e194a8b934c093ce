"""Where a student's training inputs come from: the three sources and their states.

    data     clean states of real data forward-diffused to a student timestep (`DataStates`,
             `forward_diffuse`)
    student  states on the student's own (mixed) backward trajectories (`rollout_records`)
    teacher  states on the teacher's backward trajectories (`rollout_records`, teacher_prob 1)

For the Gaussian-mixture lab the data are exact samples of the true mixture; for a diffusers
teacher they are image-caption shards (ddil_cli.data.shards) brought into the model's state
space by the adapter's `encode_images` (pixel models: the image at the UNet's size in [-1, 1];
latent models: the VAE latent times the scaling factor). `collect` writes these states into a
buffer; `distill` draws a batch's sources from its prior (`sources_for_batch`) and forward-diffuses
data batches itself, and its DAgger hook stores `rollout_records` as collect does.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from ddil_cli.diffusion.schedule import NoiseSchedule
from ddil_cli.errors import UserError
from ddil_cli.models.base import Conditioning, Denoiser
from ddil_cli.rollout import Grid, rollout_seeds

SOURCES = ("data", "student", "teacher")


def sources_for_batch(batch_size: int, prior: dict[str, float],
                      generator: torch.Generator | None = None) -> list[str]:
    """Draw each example's source independently from the prior (a weight per source, summing to 1)."""
    weights = torch.tensor([prior.get(name, 0.0) for name in SOURCES], dtype=torch.float64)
    picks = torch.multinomial(weights, batch_size, replacement=True, generator=generator)
    return [SOURCES[i] for i in picks.tolist()]


def forward_diffuse(x0: torch.Tensor, schedule: NoiseSchedule, timesteps: list[int],
                    generator: torch.Generator | None = None, t: torch.Tensor | None = None):
    """x_t = a_t x0 + s_t eps at a uniformly drawn grid timestep per example (or at the given
    timesteps `t`, each on the grid): (x_t on x0's device, t, t_index on the host)."""
    grid = torch.tensor(timesteps, dtype=torch.long)
    if t is None:
        t_index = torch.randint(len(timesteps), (x0.shape[0],), generator=generator)
    else:
        match = t.reshape(-1, 1).cpu() == grid
        if not bool(match.any(1).all()):
            raise ValueError(f"timesteps {sorted(set(t.tolist()) - set(timesteps))} are off the grid")
        t_index = match.long().argmax(1)
    t = grid[t_index]
    x_t = schedule.add_noise(x0.float(), noise_like(x0, generator), t)
    return x_t, t, t_index


def noise_like(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Standard normal noise of x's shape drawn on x's device (float32). On a CUDA device its own
    generator is seeded from `generator` (one draw), so the noise is never made on the host and
    moved, and a checkpointed host generator still fixes it; on the host, `generator` draws it."""
    if x.device.type == "cpu":
        return torch.randn(x.shape, generator=generator, dtype=torch.float32)
    seed = int(torch.randint(2 ** 62, (), generator=generator))
    return torch.randn(x.shape, generator=torch.Generator(x.device).manual_seed(seed), dtype=torch.float32,
                       device=x.device)


def is_mixture_teacher(teacher: Denoiser) -> bool:
    """The teacher is the analytic Gaussian mixture (`gmm:...`): states are points, not images."""
    return getattr(teacher, "mixture", None) is not None


class DataBatch(NamedTuple):
    x0: torch.Tensor  # clean states, float32, on the data source's device
    prompts: list[str]
    cond: Conditioning | None  # the prompts' stored encodings (data from `ddil encode`), else None


class DataStates:
    """Clean states and their prompts, batch by batch, from the lab mixture or image shards.

    `prompts` are the lab's conditioning (cycled over the examples); image data bring their own
    captions and are read by a DataLoader (ddil_cli.data.loader: `workers` processes, process
    `part` of `parts` reading its own share, in an order set by `seed`, resumable with
    `state`/`load_state`). Data encoded by `ddil encode` (a folder with encoded.json) are read as
    stored, prompt encodings included. States come on `device` (the host when None).
    """

    def __init__(self, teacher: Denoiser, *, data=None, prompts: list[str] | None = None,
                 part: int = 0, parts: int = 1, seed: int = 0, workers: int = 0, device=None):
        self.teacher = teacher
        self.prompts = list(prompts or [])
        self.device = torch.device(device or "cpu")
        self._stream = None
        self._uncond: Conditioning | None = None
        self.encoded = False
        if is_mixture_teacher(teacher):
            if data:
                raise UserError("the Gaussian-mixture lab draws exact samples of its mixture as data; "
                                "drop --data")
            if not self.prompts:
                raise ValueError("lab data need prompts")
            return
        if not data:
            raise UserError("the data source needs real images; pass --data SHARDS (image-caption webdataset)")
        from ddil_cli.data.encoded import EncodedShards, is_encoded
        from ddil_cli.data.loader import DataStream, ShardSource
        from ddil_cli.data.shards import resolve_shards

        self.encoded = is_encoded(data)
        if self.encoded:  # `ddil encode`'s output: clean states already, no VAE in the step
            encoded = EncodedShards(data, teacher)  # checks the encoder and that the encoding is finished
            source = ShardSource(tuple(encoded.urls), encoded=True, where=str(encoded.folder))
        else:
            height, width = getattr(teacher, "image_hw", teacher.state_shape[-2:])
            if height != width:
                raise UserError(f"the teacher's images are {height}x{width}; --data needs a square image size")
            source = ShardSource(tuple(resolve_shards(data)), resolution=height, channels=teacher.image_channels)
        self._stream = DataStream(source, rank=part, ranks=parts, seed=seed, workers=workers,
                                  pin=self.device.type == "cuda")

    def captions(self, n: int) -> list[str]:
        """The next n captions (used as rollout prompts when no --prompts is given)."""
        return self._stream.take(n).captions

    def draw(self, n: int, generator: torch.Generator, first_index: int = 0) -> DataBatch:
        """n clean states and their prompts (and stored encodings)."""
        if self._stream is None:
            from ddil_cli.models.gmm import class_ids_from_prompts

            prompts = [self.prompts[(first_index + i) % len(self.prompts)] for i in range(n)]
            classes = class_ids_from_prompts(prompts, self.teacher.mixture.num_classes)
            x0, _ = self.teacher.mixture.sample(n, generator, classes)
            return DataBatch(x0.float().to(self.device), prompts, None)
        taken = self._stream.take(n, self.device)
        x = taken.x
        if not self.encoded:
            return DataBatch(self.teacher.encode_images(x).to(self.device), taken.captions, None)
        return DataBatch(x.float(), taken.captions, self._stored_conditioning(taken.captions, taken.cond))

    def batch(self, n: int, generator: torch.Generator, first_index: int = 0) -> tuple[torch.Tensor, list[str]]:
        """n clean states and their prompts."""
        return tuple(self.draw(n, generator, first_index)[:2])

    def _stored_conditioning(self, prompts: list[str], cond: dict[str, torch.Tensor]) -> Conditioning:
        """The stored encodings as the teacher's `encode` gives them (its device and dtype); the
        unconditional rows are the empty prompt's, as for every prompt (SDXL's zeroed ones too)."""
        if self._uncond is None:
            self._uncond = self.teacher.encode([""])
        like = self._uncond.cond
        rows = {k: v.to(like[k].device, like[k].dtype) for k, v in cond.items()}
        uncond = None if self._uncond.uncond is None else \
            {k: v.expand(len(prompts), *v.shape[1:]).clone() for k, v in self._uncond.uncond.items()}
        return Conditioning(list(prompts), rows, uncond, dict(self._uncond.extra))

    def state(self) -> dict | None:
        """Where the image stream stands (None for the lab's exact samples, drawn from the generator)."""
        return None if self._stream is None else self._stream.state()

    def load_state(self, state: dict | None) -> None:
        if self._stream is not None:
            self._stream.load_state(state)

    def close(self) -> None:
        """Stop the loader's workers."""
        if self._stream is not None:
            self._stream.close()


def conditioning_with_stored(teacher: Denoiser, prompts: list[str], stored: Conditioning | None) -> Conditioning:
    """The teacher's conditioning of `prompts`, whose first len(stored) rows come encoded already
    (a data batch's stored encodings); only the rest go through the text encoders."""
    if stored is None:
        return teacher.encode(prompts)
    rest = prompts[len(stored):]
    return Conditioning.cat([stored, teacher.encode(rest)]) if rest else stored


def without_vae_on_device(model: Denoiser, data: DataStates | None) -> Denoiser:
    """`model` with its VAE (if any) on the CPU when nothing in training encodes images (no data,
    or data encoded by `ddil encode`): rollouts and losses live in latent space, and an SD VAE is
    ~330 MB of device memory a run would otherwise hold for nothing. Saving still finds it."""
    vae = getattr(model, "vae", None)
    if vae is not None and (data is None or data.encoded):
        vae.to("cpu")
    return model


def rollout_records(teacher: Denoiser, student: Denoiser | None, grid: Grid, prompts: list[str],
                    seeds: list[int], *, teacher_prob: float, guidance, threshold, device,
                    batch_size: int | None = None, dtype: torch.dtype = torch.float32):
    """Roll out one trajectory per seed and list the states it visits on the student grid, as
    (state, t, t_index, source, row): the row indexes `prompts`/`seeds`; the source is 'teacher'
    for a trajectory the teacher drove throughout, else 'student'. Used by `collect` and by
    distill's DAgger hook, so both store the same thing. `batch_size` rollouts go through the
    networks at once (every draw is per seed, so it changes memory, not states); `dtype` is the
    frozen networks' (autocast below fp32)."""
    from ddil_cli.models.precision import frozen_autocast

    batch_size = batch_size or len(seeds)
    records = []
    for begin in range(0, len(seeds), batch_size):
        end = min(begin + batch_size, len(seeds))
        rows_guidance = guidance if torch.as_tensor(guidance).ndim == 0 else guidance[begin:end]
        # the last transition's landing point is clean and never stored: stopping before it saves
        # 1/S of the rollout (a quarter at 4 steps); the result's `final` is then the last stored state
        with frozen_autocast(device, dtype):
            result = rollout_seeds(seeds[begin:end], prompts[begin:end], grid, teacher=teacher,
                                   student=student if teacher_prob < 1 else None, teacher_prob=teacher_prob,
                                   guidance=rows_guidance, threshold=threshold, record=True,
                                   stop_at=grid.num_transitions - 1, device=device)
        # one transfer per grid point, not per row
        states_cpu = [s.float().cpu() for s in [*result.states, result.final]]
        for row in range(end - begin):
            source = "teacher" if bool(result.teacher_mask[row].all()) else "student"
            for t_index, (t, states) in enumerate(zip(grid.student, states_cpu)):
                records.append((states[row], t, t_index, source, begin + row))
    return records


def record_spans(rows: list, state_size: int, max_bytes: int | None = None) -> list[tuple[int, int]]:
    """(begin, end) of the states stored as one buffer record: whole trajectories (runs of equal
    consecutive `rows`; records are listed trajectory by trajectory), as many as fit in
    `max_bytes` (default RECORD_BYTES) of stored states of `state_size` elements, at least one.
    A record is one tar member pair however many states it holds, and those members were most
    of the cost of storing a lab collection."""
    from itertools import groupby

    from ddil_cli.buffer.writer import RECORD_BYTES, STATE_DTYPE

    state_bytes = max(1, state_size * STATE_DTYPE().itemsize)
    limit = max(1, (RECORD_BYTES if max_bytes is None else max_bytes) // state_bytes)
    spans: list[tuple[int, int]] = []
    begin = end = 0
    for _, group in groupby(rows):
        length = len(list(group))
        if end > begin and end + length - begin > limit:
            spans.append((begin, end))
            begin = end
        end += length
    if end > begin:
        spans.append((begin, end))
    return spans
