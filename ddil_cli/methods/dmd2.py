"""DMD2 (Yin et al. 2024): distribution matching with a fake critic, two-timescale updates and an
optional GAN head; docs/distill.md, "DMD2".

The generator G (the student) maps an input x_t at one of its few timesteps to a clean sample
x0_g = f(x_t, t), f the consistency boundary c_skip x_t + c_out x0_hat its LCMScheduler applies when
sampling (so training and sampling use the same function; c_skip is ~1e-7 at t >= 249, so f is
G's x0 prediction in effect). For x0_g, draw tau in [tau_min T, tau_max T], noise it to x_tau and
ask two scores:

    x0_real = the frozen teacher with CFG at the real guidance,
    x0_fake = the critic (a trainable copy of the teacher, guidance 1),
    grad    = (x0_fake - x0_real) / mean|x0_g - x0_real|      (mean per sample; non-finite -> 0),
    loss_G  = 0.5 ||x0_g - stopgrad(x0_g - grad)||^2          (gradient: grad, per element / D).

The critic follows G's distribution: `critic_updates` steps of its own optimiser per G update,
each on the eps-prediction denoising loss of G's detached outputs at t ~ U[0, T). With
`gan_weight` > 0 a small classifier on the critic's bottleneck features (a UNet's mid block, the
lab MLP's last hidden layer) tells forward-diffused real data from G's outputs: the critic side
minimises softplus(D(fake)) + softplus(-D(real)) (weight `critic_gan_weight`), G minimises
softplus(-D(G)) through the frozen critic (weight `gan_weight`).
Where G's inputs come from is the priors' business: `student` states are G's own (mixed)
rollouts (backward simulation), `teacher` states teacher rollouts, `data` forward-diffused data.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ddil_cli.buffer.sources import conditioning_with_stored
from ddil_cli.diffusion.consistency import consistency_output
from ddil_cli.diffusion.parameterization import to_eps
from ddil_cli.diffusion.schedule import bcast, trailing_timesteps
from ddil_cli.diffusion.threshold import apply_threshold
from ddil_cli.errors import UserError
from ddil_cli.methods.base import Batch, ConsistencyOptions, DistillMethod, Phase, PlanRequest, TrainedGroup, option
from ddil_cli.models.base import Conditioning, Denoiser
from ddil_cli.models.critic import GANHead, bottleneck, frozen_parameters
from ddil_cli.rollout import Grid
from ddil_cli.validate import GUIDANCE, Rule

CRITIC_ADAPTER = "critic"


@dataclass
class DMD2Options(ConsistencyOptions):
    generator_timesteps: str | None = option(None, "the generator's timesteps, e.g. 999,749,499,249 (default: "
                                                   "trailing spacing of --steps).")
    real_guidance: float | None = option(None, "CFG of the real score (default: --guidance or the teacher's).",
                                         GUIDANCE)
    critic_lr: float | None = option(None, "the critic's (and GAN head's) learning rate (default: --lr).",
                                     Rule(above=0, high=10))
    critic_updates: int = option(10, "critic steps per generator update (10).", Rule(low=1, high=1000))
    gan_weight: float = option(0.0, "weight of the generator's GAN term (0: no GAN head; DMD2 used 1e-3 SD1.5, "
                                    "5e-3 SDXL).", Rule(low=0, high=1000))
    critic_gan_weight: float = option(1e-2, "weight of the critic-side GAN term (1e-2).", Rule(low=0, high=1000))
    tau_min: float = option(0.02, "the DM timestep tau ~ U[MIN T, MAX T], MIN (0.02).")
    tau_max: float = option(0.98, "... MAX (0.98).")
    # a LoRA critic: alpha = rank, on the student's --lora-targets (generator, critic, teacher: one base)
    critic_lora_rank: int = option(0, "> 0 makes the fake critic a LoRA of this rank on the teacher's own frozen "
                                      "UNet (one base for generator, critic and teacher); 0: a full copy (default).")
    # lab_init_steps (every method's) fits the critic too, as DMD2 starts both from the teacher; 0 (fresh
    # MLPs) stays the default: on the lab the fitted start was not better (docs/distill.md, "DMD2")

    def validate(self) -> None:
        if not 0 <= self.tau_min < self.tau_max <= 1:
            raise UserError(f"--tau-min {self.tau_min} / --tau-max {self.tau_max}: need 0 <= MIN < MAX <= 1 "
                            "(fractions of the training timesteps, e.g. 0.02 and 0.98)")
        if self.real_guidance is not None and self.real_guidance < 1:
            raise UserError(f"--real-guidance must be >= 1 (1: no CFG), got {self.real_guidance}")
        if self.generator_timesteps is not None:
            parse_timesteps(self.generator_timesteps)
        if self.critic_lora_rank < 0:
            raise UserError(f"--critic-lora-rank must be >= 0 (0: a full critic), got {self.critic_lora_rank}")


def parse_timesteps(text: str) -> list[int]:
    try:
        values = [int(v) for v in str(text).split(",") if v.strip()]
    except ValueError:
        values = []
    if not values or any(b >= a for a, b in zip(values, values[1:])) or values[-1] < 0:
        raise UserError(f"--generator-timesteps {text!r}: give decreasing non-negative integers such as "
                        "999,749,499,249")
    return values


def dm_gradient(x0_g: torch.Tensor, x0_real: torch.Tensor, x0_fake: torch.Tensor) -> torch.Tensor:
    """DMD2's distribution-matching gradient on x0_g, normalised per sample by mean|x0_g - x0_real|."""
    towards_real = x0_g - x0_real
    towards_fake = x0_g - x0_fake
    scale = towards_real.abs().reshape(len(x0_g), -1).mean(1)
    # a sample already at the real score (scale 0) has no direction: 0, where DMD2's bare
    # nan_to_num would turn x/0 into +-3.4e38
    return torch.nan_to_num((towards_real - towards_fake) / bcast(scale, x0_g), nan=0.0, posinf=0.0, neginf=0.0)


def dm_loss(x0_g: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """0.5 ||x0_g - stopgrad(x0_g - grad)||^2, the mean over elements per example: (B,)."""
    target = (x0_g - grad).detach()
    return 0.5 * ((x0_g - target) ** 2).reshape(len(x0_g), -1).mean(1)


class DMD2Method(DistillMethod):
    """DMD2 on a few fixed timesteps; one phase against the original teacher."""

    name = "dmd2"
    Options = DMD2Options
    student_scheduler = "lcm"
    default_prior_schedule = "student=0.5,teacher=0.5"  # DMD2 + DDIL: backward simulation and teacher states

    @classmethod
    def plan(cls, request: PlanRequest, teacher: Denoiser, options: DMD2Options) -> list[Phase]:
        num_train = teacher.schedule.num_train_timesteps
        timesteps = parse_timesteps(options.generator_timesteps) if options.generator_timesteps \
            else trailing_timesteps(request.steps, num_train)
        if timesteps[0] >= num_train:
            raise UserError(f"--generator-timesteps {options.generator_timesteps}: the teacher's timesteps "
                            f"end at {num_train - 1}")
        grid = Grid.from_timesteps(timesteps, request.teacher_steps, num_train)
        return [Phase(f"dmd2-{len(timesteps)}", request.max_updates, timesteps, timesteps, [grid],
                      teacher="original")]

    @classmethod
    def guidance_range(cls, options: DMD2Options) -> tuple[float, float] | None:
        # the real score's CFG; the generator learns the guided distribution at this one w
        w = options.real_guidance
        return None if w is None else (float(w), float(w))

    @classmethod
    def needs_data(cls, options: DMD2Options) -> bool:
        return options.gan_weight > 0  # the GAN head tells real data from generated samples

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        from ddil_cli.models import make_student

        options: DMD2Options = self.options
        if self.teacher.kind == "gmm" and options.lab_init_steps and not self.student.guidance_conditioned:
            import copy

            # both start from the teacher, as in DMD2: here from the generator's teacher-fitted MLP
            self.critic = copy.deepcopy(self.student)
            self.critic.scheduler_config = dict(self.teacher.scheduler_config)
        else:
            self.critic = make_student(self.teacher, guidance_embedding=False,
                                       **self._critic_lora()).to(self.student.device)
            if self.teacher.kind == "gmm" and options.lab_init_steps:
                from ddil_cli.models.mlp import fit_to_teacher

                fit_to_teacher(self.critic, self.teacher, steps=options.lab_init_steps)
        if getattr(self.student.network, "is_gradient_checkpointing", False):
            self.critic.network.enable_gradient_checkpointing()
        self.critic_shares_cond = self.critic.shares_conditioning(self.teacher)
        num_train = self.teacher.schedule.num_train_timesteps
        self.tau_range = (int(options.tau_min * num_train), min(int(options.tau_max * num_train), num_train - 1))
        self.head = None
        self._features: list[torch.Tensor] = []
        self._capture = False  # the bottleneck hook keeps features only in the critic's passes (a shared base)
        if options.gan_weight > 0:
            if self.data is None:
                raise ValueError("DMD2's GAN head needs the stage's data source")
            module, channels, spatial = bottleneck(self.critic.network)
            self.head = GANHead(channels, spatial).to(self.student.device)
            module.register_forward_hook(lambda _m, _i, out: self._features.append(out) if self._capture else None)
            rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
            # real data for the GAN: its own stream, checkpointed; each process draws its own
            self.data_generator = torch.Generator().manual_seed(int(torch.randint(2 ** 62, ())) + rank)
            self.data_index = 0

    def _critic_lora(self) -> dict:
        """make_student's arguments for a LoRA critic (--critic-lora-rank), none for a full copy."""
        rank = self.options.critic_lora_rank
        if not rank:
            return {}
        if getattr(self.teacher, "kind", "") != "diffusers":
            raise UserError("--critic-lora-rank needs a diffusers teacher; use --critic-lora-rank 0 on the lab")
        from ddil_cli.models.lora import DEFAULT_TARGETS, LoraSpec

        targets = self.student.lora.targets if getattr(self.student, "lora", None) else DEFAULT_TARGETS
        return {"lora": LoraSpec(rank, float(rank), targets), "adapter": CRITIC_ADAPTER}

    # ---- networks -----------------------------------------------------------------------------
    def groups(self) -> list[TrainedGroup]:
        return [TrainedGroup.of("student", {"student": self.student}),
                TrainedGroup.of("critic", {"critic": self.critic}, {"gan_head": self.head} if self.head else None,
                                lr=self.options.critic_lr, steps_per_update=self.options.critic_updates)]

    def generator_x0(self, batch: Batch, network: torch.nn.Module | None) -> torch.Tensor:
        """x0_g = f(x_t, t): the thresholded x0 through the consistency boundary, as the saved
        generator's LCMScheduler and our re-noising rollouts compute it (the threshold passes the
        gradient straight through)."""
        x0_hat = self.student_x0(batch, network).float()
        # thresholded forward (what the sampler does), identity backward: a hard clamp would give
        # every output outside the bound a zero gradient, and the DM gradient could never pull it back
        x0_hat = x0_hat + (apply_threshold(x0_hat.detach(), self.threshold) - x0_hat.detach())
        return consistency_output(batch.x_t.float(), x0_hat, batch.t, timestep_scaling=self.student.timestep_scaling)

    def _critic_cond(self, cond: Conditioning) -> Conditioning:
        return cond if self.critic_shares_cond else self.critic.encode(cond.prompts)

    def critic_pass(self, x: torch.Tensor, t: torch.Tensor, cond: Conditioning, critic: torch.nn.Module,
                    head: torch.nn.Module | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The critic's raw output at (x, t) (guidance 1) and, with `head`, the GAN logits of its
        bottleneck features from the same pass."""
        self._features.clear()
        self._capture = True
        try:
            out = self.critic.forward(x, t, self._critic_cond(cond).cond, None, network=critic)
        finally:
            self._capture = False
        logits = head(self._features[-1]) if head is not None else None
        self._features.clear()
        return out, logits

    # ---- losses -------------------------------------------------------------------------------
    def loss(self, group: str, nets, batch: Batch):
        return self.generator_loss(nets, batch) if group == "student" else self.critic_loss(nets, batch)

    def generator_loss(self, nets, batch: Batch):
        options: DMD2Options = self.options
        x0_g = self.generator_x0(batch, nets["student"])
        low, high = self.tau_range
        tau = torch.randint(low, high + 1, (len(batch),), device=x0_g.device)
        noise = torch.randn_like(x0_g)
        schedule = self.teacher.schedule
        x_tau = schedule.add_noise(x0_g.detach(), noise, tau)
        with torch.no_grad():
            x0_real = apply_threshold(self.teacher.predict_x0(x_tau, tau, batch.cond, batch.guidance,
                                                              all_one=batch.guidance_all_one), self.threshold)
        critic = self.critic.network  # the raw module: no DDP sync for a network this step does not train
        if self.head is not None:
            with frozen_parameters(critic, self.head):
                out, logits = self.critic_pass(schedule.add_noise(x0_g, noise, tau), tau, batch.cond, critic, self.head)
            x0_fake = self.critic.x0_from_output(out.detach(), x_tau, tau)
        else:
            with torch.no_grad():
                out, logits = self.critic_pass(x_tau, tau, batch.cond, critic)
            x0_fake = self.critic.x0_from_output(out, x_tau, tau)
        grad = dm_gradient(x0_g.detach(), x0_real, apply_threshold(x0_fake, self.threshold))
        loss = dm_loss(x0_g, grad)
        metrics = {"dmd/dm_loss": loss.detach().mean(),
                   "dmd/grad_norm": grad.reshape(len(batch), -1).norm(dim=1).mean()}
        if logits is not None:
            gan = F.softplus(-logits.float())
            loss = loss + options.gan_weight * gan
            metrics["dmd/gan_g"] = gan.detach().mean()
        return loss, metrics

    def real_data(self, n: int) -> tuple[torch.Tensor, Conditioning]:
        """n real clean states and their conditioning, from the stage's (checkpointed) data stream."""
        x0, prompts, stored = self.data.draw(n, self.data_generator, self.data_index)
        self.data_index += n
        return x0.to(self.student.device), conditioning_with_stored(self.teacher, prompts, stored)

    def critic_loss(self, nets, batch: Batch):
        options: DMD2Options = self.options
        with torch.no_grad():
            x0_g = self.generator_x0(batch, None)
        n = len(batch)
        schedule = self.teacher.schedule
        t = torch.randint(0, schedule.num_train_timesteps, (n,), device=x0_g.device)
        noise = torch.randn_like(x0_g)
        x_t = schedule.add_noise(x0_g, noise, t)
        inputs, times, cond = x_t, t, batch.cond
        if self.head is not None:  # real data through the same pass, at the same times
            x0_data, real_cond = self.real_data(n)
            x_real = schedule.add_noise(x0_data.float(), torch.randn_like(x0_data.float()), t)
            inputs, times = torch.cat([x_t, x_real]), torch.cat([t, t])
            cond = Conditioning.cat([batch.cond, real_cond])
        out, logits = self.critic_pass(inputs, times, cond, nets["critic"],
                                       nets["gan_head"] if self.head is not None else None)
        a, s = schedule.alpha_sigma(t, dtype=torch.float32)
        eps = to_eps(out[:n].float(), x_t, bcast(a, x_t), bcast(s, x_t), self.critic.prediction_type)
        loss = ((eps - noise) ** 2).reshape(n, -1).mean(1)
        metrics = {"critic/denoise": loss.detach().mean()}
        if logits is not None:
            fake, real = logits.float()[:n], logits.float()[n:]
            gan = F.softplus(fake) + F.softplus(-real)
            loss = loss + options.critic_gan_weight * gan
            metrics.update({"critic/gan": gan.detach().mean(),
                            "critic/real_accuracy": (real > 0).float().mean(),
                            "critic/fake_accuracy": (fake < 0).float().mean()})
        return loss, metrics

    # ---- checkpoint ---------------------------------------------------------------------------
    def extra_state(self):
        if self.head is None:
            return {}, {}
        return {"data_generator": self.data_generator.get_state()}, {"data_index": self.data_index}

    def load_extra_state(self, tensors, info) -> None:
        if self.head is not None and "data_generator" in tensors:
            self.data_generator.set_state(tensors["data_generator"])
            self.data_index = int(info.get("data_index", 0))


__all__ = ["DMD2Method", "DMD2Options", "GANHead", "dm_gradient", "dm_loss"]
