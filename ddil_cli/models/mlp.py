"""Small MLP students for the Gaussian-mixture lab, saved as safetensors + JSON config."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from diffusers.models.embeddings import get_timestep_embedding
from safetensors.torch import load_file, save_file

from ddil_cli.atomic import to_json
from ddil_cli.diffusion.schedule import NoiseSchedule
from ddil_cli.models.base import Conditioning, Denoiser
from ddil_cli.models.gmm import class_ids_from_prompts, class_prompts

CONFIG_NAME = "ddil_mlp.json"
WEIGHTS_NAME = "model.safetensors"


@dataclass
class MLPConfig:
    dim: int
    num_classes: int
    hidden: int = 256
    layers: int = 4
    embed_dim: int = 64
    prediction_type: str = "v_prediction"
    guidance_conditioned: bool = False
    scheduler_config: dict = field(default_factory=dict)
    source: str = ""  # the teacher spec it was made for
    timesteps: list[int] | None = None  # the student's sampling grid once distilled


class MLPNet(torch.nn.Module):
    def __init__(self, config: MLPConfig):
        super().__init__()
        self.config = config
        e = config.embed_dim
        # index num_classes is the null (unconditional) class, as CFG needs
        self.class_embed = torch.nn.Embedding(config.num_classes + 1, e)
        in_dim = config.dim + 2 * e + (e if config.guidance_conditioned else 0)
        blocks, width = [], in_dim
        for _ in range(config.layers):
            blocks += [torch.nn.Linear(width, config.hidden), torch.nn.SiLU()]
            width = config.hidden
        self.body = torch.nn.Sequential(*blocks, torch.nn.Linear(width, config.dim))

    def forward(self, x_t, t, classes, guidance=None):
        e = self.config.embed_dim
        classes = torch.where(classes < 0, torch.full_like(classes, self.config.num_classes), classes)
        parts = [x_t, get_timestep_embedding(t.float(), e).to(x_t.dtype), self.class_embed(classes)]
        if self.config.guidance_conditioned:
            # w spans ~1..10; scale it as diffusers scales guidance embeddings (x1000 over w in 0..1)
            parts.append(get_timestep_embedding(guidance.float() * 100, e).to(x_t.dtype))
        return self.body(torch.cat(parts, 1))


class MLPDenoiser(Denoiser):
    kind = "mlp"

    def __init__(self, config: MLPConfig, net: MLPNet | None = None):
        self.config = config
        self.net = net if net is not None else MLPNet(config)
        self.prediction_type = config.prediction_type
        self.guidance_conditioned = config.guidance_conditioned
        self.schedule = NoiseSchedule.from_scheduler_config(config.scheduler_config)
        self.scheduler_config = dict(config.scheduler_config)
        self.state_shape = (config.dim,)

    @property
    def network(self):
        return self.net

    @property
    def student_timesteps(self) -> list[int] | None:
        return self.config.timesteps

    @property
    def num_classes(self) -> int:
        return self.config.num_classes

    def default_prompts(self) -> list[str]:
        return class_prompts(self.num_classes)

    def encode(self, prompts):
        ids = class_ids_from_prompts(prompts, self.num_classes).to(self.device)
        return Conditioning(list(prompts), {"class": ids}, {"class": torch.full_like(ids, -1)})

    def forward(self, x_t, t, cond, guidance=None, *, network=None):
        if self.guidance_conditioned and guidance is None:
            guidance = torch.ones(x_t.shape[0], device=x_t.device)
        net = self.net if network is None else network
        return net(x_t, t, cond["class"].to(x_t.device), guidance)

    def shares_conditioning(self, other) -> bool:
        return other.kind in ("gmm", "mlp") and getattr(other, "num_classes", None) == self.num_classes

    def describe(self):
        return {**super().describe(), "source": self.config.source, "hidden": self.config.hidden,
                "layers": self.config.layers}

    def save_pretrained(self, path, *, timesteps=None, scheduler: str = "ddim"):
        """Weights and config; `scheduler="lcm"` marks a consistency student (re-noising sampler),
        as diffusers folders do with an LCMScheduler config."""
        if scheduler not in ("ddim", "lcm"):
            raise ValueError(f"unknown student scheduler {scheduler!r}; expected 'ddim' or 'lcm'")
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        if timesteps is not None:
            self.config.timesteps = list(timesteps)
        config = asdict(self.config)
        if scheduler == "lcm":
            config["scheduler_config"] = {**config["scheduler_config"], "_class_name": "LCMScheduler",
                                          "timestep_scaling": self.timestep_scaling,
                                          **{k: self.scheduler_config[k] for k in ("original_inference_steps",)
                                             if k in self.scheduler_config}}
        save_file({k: v.detach().cpu().contiguous() for k, v in self.net.state_dict().items()},
                  str(path / WEIGHTS_NAME))
        (path / CONFIG_NAME).write_text(to_json(config, indent=2))
        from ddil_cli.atomic import follow_umask

        follow_umask(path)  # safetensors writes private files; a saved model is an ordinary output

    @classmethod
    def from_pretrained(cls, path) -> "MLPDenoiser":
        path = Path(path)
        config = MLPConfig(**json.loads((path / CONFIG_NAME).read_text()))
        model = cls(config)
        model.net.load_state_dict(load_file(str(path / WEIGHTS_NAME)))
        return model


def mlp_student_for(teacher: Denoiser, *, guidance_conditioned: bool = False,
                    prediction_type: str = "v_prediction", hidden: int = 256, layers: int = 4,
                    seed: int | None = 0) -> MLPDenoiser:
    """A fresh MLP student for a lab teacher (an analytic teacher has no weights to copy).
    `seed=None` draws the initialisation from torch's global stream, which the caller seeded
    (distill seeds it with --seed, so each seed starts from its own weights)."""
    if seed is not None:
        torch.manual_seed(seed)
    config = MLPConfig(dim=teacher.state_shape[0], num_classes=teacher.num_classes, hidden=hidden,
                       layers=layers, prediction_type=prediction_type,
                       guidance_conditioned=guidance_conditioned,
                       scheduler_config=dict(teacher.scheduler_config),
                       source=getattr(teacher, "spec", "") and str(teacher.spec))
    return MLPDenoiser(config)


def fit_to_teacher(student: MLPDenoiser, teacher: Denoiser, *, steps: int = 2000, batch_size: int = 256,
                   lr: float = 1e-3, uncond_share: float = 0.1) -> float:
    """Train a fresh lab MLP to reproduce an analytic teacher's denoiser: a regression of its
    output on the teacher's (converted to the MLP's prediction type) at exact mixture samples
    forward-diffused to t ~ U[0, T), a share of them unconditional so that CFG works. The lab's
    stand-in for "a copy of the teacher's weights", which methods that start from the teacher
    (DMD2's generator and critic) need. Draws from torch's global stream (seeded by the caller).
    Returns the last step's loss."""
    from ddil_cli.diffusion.parameterization import from_x0
    from ddil_cli.diffusion.schedule import bcast

    net, mixture, schedule = student.network, teacher.mixture, teacher.schedule
    optimizer = torch.optim.Adam(net.parameters(), lr=lr)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    device = next(net.parameters()).device
    loss = torch.zeros(())
    for _ in range(steps):
        classes = torch.randint(mixture.num_classes, (batch_size,))
        x0, _ = mixture.sample(batch_size, None, classes)
        classes = torch.where(torch.rand(batch_size) < uncond_share, torch.full_like(classes, -1), classes)
        t = torch.randint(schedule.num_train_timesteps, (batch_size,))
        x_t = schedule.add_noise(x0.float(), torch.randn(x0.shape), t).to(device)
        t, classes = t.to(device), classes.to(device)
        cond = {"class": classes}
        with torch.no_grad():
            target_x0 = teacher.x0_from_output(teacher.forward(x_t, t, cond), x_t, t)
            a, s = schedule.alpha_sigma(t, dtype=torch.float32)
            target = from_x0(target_x0, x_t, bcast(a, x_t), bcast(s, x_t), student.prediction_type)
        loss = torch.nn.functional.mse_loss(student.forward(x_t, t, cond).float(), target)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
    return float(loss.detach())
