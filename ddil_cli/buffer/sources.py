"""The `data` source: clean states of real data, forward-diffused to a student timestep.

For the Gaussian-mixture lab the data are exact samples of the true mixture; for a diffusers
teacher they are image-caption shards (ddil_cli.data.shards) brought into the model's state
space by the adapter's `encode_images` (pixel models: the image at the UNet's size in [-1, 1];
latent models: the VAE latent times the scaling factor). `collect` stores these inputs;
`distill` can draw them live through `DataStates.stream`.
"""

from __future__ import annotations

from typing import Iterator

import torch

from ddil_cli.diffusion.schedule import NoiseSchedule
from ddil_cli.errors import UserError
from ddil_cli.models.base import Denoiser


def forward_diffuse(x0: torch.Tensor, schedule: NoiseSchedule, timesteps: list[int],
                    generator: torch.Generator | None = None):
    """x_t = a_t x0 + s_t eps at a uniformly drawn grid timestep per example: (x_t, t, t_index)."""
    t_index = torch.randint(len(timesteps), (x0.shape[0],), generator=generator)
    t = torch.tensor(timesteps, dtype=torch.long)[t_index]
    noise = torch.randn(x0.shape, generator=generator, dtype=torch.float32)
    x_t = schedule.add_noise(x0.float().cpu(), noise, t)
    return x_t, t, t_index


def is_lab(teacher: Denoiser) -> bool:
    return getattr(teacher, "mixture", None) is not None


class DataStates:
    """Clean states and their prompts, batch by batch, from the lab mixture or image shards.

    `prompts` are the lab's conditioning (cycled over the examples); image data bring their own
    captions. `part`/`parts` read every parts-th shard (one process's share of the data).
    """

    def __init__(self, teacher: Denoiser, *, data=None, prompts: list[str] | None = None,
                 part: int = 0, parts: int = 1):
        self.teacher = teacher
        self.prompts = list(prompts or [])
        self._reader = None
        self._iter: Iterator | None = None
        if is_lab(teacher):
            if data:
                raise UserError("the Gaussian-mixture lab draws exact samples of its mixture as data; "
                                "drop --data")
            if not self.prompts:
                raise ValueError("lab data need prompts")
            return
        if not data:
            raise UserError("the data source needs real images; pass --data SHARDS (image-caption webdataset)")
        from ddil_cli.data.shards import ImageCaptionShards, resolve_shards

        height, width = getattr(teacher, "image_hw", teacher.state_shape[-2:])
        if height != width:
            raise UserError(f"the teacher's images are {height}x{width}; --data needs a square image size")
        channels = teacher.image_channels
        urls = resolve_shards(data)
        mine = urls[part::parts] if len(urls) >= parts else urls
        self._reader = ImageCaptionShards(mine, resolution=height, channels=channels, output="tensor")

    def _next_image(self):
        if self._iter is not None:
            try:
                return next(self._iter)
            except StopIteration:
                pass
        self._iter = iter(self._reader)  # the first pass, or the next one once the data ran out
        try:
            return next(self._iter)
        except StopIteration:
            raise UserError(f"no usable image-caption samples in --data ({self._reader.stats.summary()}); "
                            "each sample needs an image and a non-empty .txt caption") from None

    def captions(self, n: int) -> list[str]:
        """The next n captions (used as rollout prompts when no --prompts is given)."""
        return [self._next_image().caption for _ in range(n)]

    def batch(self, n: int, generator: torch.Generator, first_index: int = 0):
        """n clean states (float32, CPU) and their prompts."""
        if self._reader is None:
            from ddil_cli.models.gmm import class_ids_from_prompts

            prompts = [self.prompts[(first_index + i) % len(self.prompts)] for i in range(n)]
            classes = class_ids_from_prompts(prompts, self.teacher.mixture.num_classes)
            x0, _ = self.teacher.mixture.sample(n, generator, classes)
            return x0.float(), prompts
        samples = [self._next_image() for _ in range(n)]
        images = torch.stack([s.image for s in samples])
        return self.teacher.encode_images(images).cpu(), [s.caption for s in samples]

    def stream(self, schedule: NoiseSchedule, timesteps: list[int], batch_size: int,
               generator: torch.Generator) -> Iterator[tuple[torch.Tensor, int, int, str]]:
        """Endless live (x_t, t, t_index, prompt) examples, for mixing with a buffer by the priors."""
        index = 0
        while True:
            x0, prompts = self.batch(batch_size, generator, index)
            x_t, t, t_index = forward_diffuse(x0, schedule, timesteps, generator)
            for row in range(batch_size):
                yield x_t[row], int(t[row]), int(t_index[row]), prompts[row]
            index += batch_size
