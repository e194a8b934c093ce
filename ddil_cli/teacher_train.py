"""`ddil teacher`: train a small pixel-space text-to-image diffusion teacher on image-caption shards.

The data set is read once through `ddil_cli.data.shards` (the reader all real data goes through)
and held in memory: this command is for small sets (the embedded digits, a few thousand images).
Everything random in step k (the batch, the noise, the timesteps, caption dropout) is drawn from a
generator seeded by (seed, k, process), so a run resumed from a checkpoint continues exactly as
the uninterrupted run would have.

Output (a diffusers pipeline folder, see docs/embedded-lab.md): model_index.json, unet/,
text_encoder/, tokenizer/, scheduler/, plus train_config.json and train_log.jsonl. The weights
saved are the EMA weights when EMA is on. Checkpoints (all safetensors + json) go to a separate
folder so that they survive a failed run: checkpoint-NNNNNN/{model,ema,optimizer}.safetensors,
optimizer.json, state.json, tokenizer/.
"""

from __future__ import annotations

import json
import math
import shutil
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from ddil_cli.atomic import atomic_folder, one_line, to_json, unreadable_file
from ddil_cli.data.shards import load_image_captions
from ddil_cli.diffusion.parameterization import PREDICTION_TYPES, eps_from_x0, to_v  # noqa: F401
from ddil_cli.diffusion.schedule import NoiseSchedule, bcast
from ddil_cli.errors import UserError
from ddil_cli.lab.digits import (TeacherArch, build_clip_tokenizer, make_scheduler, make_text_encoder,
                                 make_unet, tokenize)

CHECKPOINT_PREFIX = "checkpoint-"
TRAINABLE_PREDICTIONS = ("epsilon", "v_prediction")


@dataclass
class TeacherTrainConfig:
    data: str = ""
    resolution: int = 16
    channels: int = 1
    block_out_channels: tuple[int, ...] = (32, 64, 64)
    layers_per_block: int = 2
    attention_heads: int = 4
    text_width: int = 64
    text_layers: int = 2
    max_length: int = 16
    prediction_type: str = "v_prediction"
    beta_schedule: str = "squaredcos_cap_v2"
    steps: int = 5000
    batch_size: int = 64
    lr: float = 1e-3
    # constant (after linear warmup; EMA does the averaging): a run to N steps is exactly the first
    # N steps of any longer run, so training can be extended with --resume. cosine decays to 10%.
    lr_schedule: str = "constant"
    warmup_steps: int = 200
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    caption_dropout: float = 0.1  # fraction of captions replaced by "" so CFG has a null branch
    ema_decay: float = 0.999  # 0 turns EMA off
    checkpoint_every: int = 500
    keep_checkpoints: int = 2
    log_every: int = 50
    seed: int = 0
    max_samples: int | None = None
    default_guidance: float = 1.5  # written to ddil_defaults.json: the CFG scale commands use unless told
    default_prompts: str | None = None  # a text file, one prompt per line, also written there
    mixed_precision: str = "no"  # no | fp16 | bf16 (accelerate)
    device: str = "auto"  # auto | cpu (accelerate picks the GPU when there is one)

    def arch(self) -> TeacherArch:
        return TeacherArch(resolution=self.resolution, channels=self.channels,
                           block_out_channels=tuple(self.block_out_channels),
                           layers_per_block=self.layers_per_block, attention_heads=self.attention_heads,
                           text_width=self.text_width, text_layers=self.text_layers,
                           text_heads=max(1, self.text_width // 16), max_length=self.max_length)

    def validate(self) -> None:
        if self.prediction_type not in TRAINABLE_PREDICTIONS:
            raise UserError(f"prediction type {self.prediction_type!r} is not supported; use one of "
                            f"{', '.join(TRAINABLE_PREDICTIONS)}")
        if self.lr_schedule not in ("cosine", "constant"):
            raise UserError(f"lr schedule {self.lr_schedule!r} is unknown; use cosine or constant")
        for name in ("steps", "batch_size", "checkpoint_every", "log_every", "keep_checkpoints"):
            if getattr(self, name) < 1:
                raise UserError(f"{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if not 0 <= self.caption_dropout < 1:
            raise UserError(f"caption dropout must be in [0, 1), got {self.caption_dropout}")
        if not 0 <= self.ema_decay < 1:
            raise UserError(f"ema decay must be in [0, 1) (0 = off), got {self.ema_decay}")
        if self.mixed_precision not in ("no", "fp16", "bf16"):
            raise UserError(f"mixed precision {self.mixed_precision!r} is unknown; use no, fp16 or bf16")
        if self.device not in ("auto", "cpu", "cuda"):
            raise UserError(f"device {self.device!r} is unknown; use auto, cpu or cuda")
        if self.default_guidance < 1:
            raise UserError(f"default guidance must be >= 1 (1 = no CFG), got {self.default_guidance}")
        if self.lr <= 0:
            raise UserError(f"lr must be > 0, got {self.lr}")
        self.arch()


class TextToImageNet(nn.Module):
    """UNet + text encoder as one module, so accelerate prepares (and DDP wraps) a single model."""

    def __init__(self, unet: nn.Module, text_encoder: nn.Module):
        super().__init__()
        self.unet, self.text_encoder = unet, text_encoder

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        hidden = self.text_encoder(input_ids)[0]
        return self.unet(x_t, t, encoder_hidden_states=hidden).sample


@dataclass
class TrainResult:
    step: int
    final_loss: float
    seconds: float
    data: dict[str, Any]
    resumed_from: str | None = None
    log: list[dict[str, Any]] = field(default_factory=list)


# ---- small helpers --------------------------------------------------------------------------
def _step_generator(seed: int, step: int, process: int) -> torch.Generator:
    # Distinct, reproducible streams per (seed, step, process): resume replays the same batches.
    return torch.Generator().manual_seed((seed * 1_000_003 + step) * 4099 + process)


def lr_at(config: TeacherTrainConfig, step: int) -> float:
    warm = min(1.0, (step + 1) / max(1, config.warmup_steps))
    if config.lr_schedule == "constant":
        return config.lr * warm
    progress = min(1.0, step / max(1, config.steps))
    return config.lr * warm * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def training_target(x0: torch.Tensor, noise: torch.Tensor, a: torch.Tensor, s: torch.Tensor,
                    prediction_type: str) -> torch.Tensor:
    if prediction_type == "epsilon":
        return noise
    return to_v(x0, noise, a, s)


class EMA:
    """Exponential moving average of a module's float tensors, decay warmed up as (1+k)/(10+k)."""

    def __init__(self, module: nn.Module, decay: float):
        self.decay = decay
        self.shadow = {k: v.detach().clone().float() for k, v in module.state_dict().items()}

    @torch.no_grad()
    def update(self, module: nn.Module, step: int) -> None:
        decay = min(self.decay, (1 + step) / (10 + step))
        for k, v in module.state_dict().items():
            if v.dtype.is_floating_point:
                self.shadow[k].lerp_(v.float(), 1 - decay)
            else:
                self.shadow[k].copy_(v)

    def copy_to(self, module: nn.Module) -> None:
        module.load_state_dict({k: v.to(module.state_dict()[k].dtype) for k, v in self.shadow.items()})


# ---- checkpoints (safetensors only) -----------------------------------------------------------
def _optimizer_to_safetensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    state = optimizer.state_dict()
    tensors = {f"{index}.{name}": value.detach().cpu().contiguous().reshape(value.shape)
               for index, entry in state["state"].items() for name, value in entry.items()
               if torch.is_tensor(value)}
    scalars = {f"{index}.{name}": value for index, entry in state["state"].items()
               for name, value in entry.items() if not torch.is_tensor(value)}
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def _optimizer_from_safetensors(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[int, dict[str, Any]] = {}
    for key, value in list(tensors.items()) + list(meta["scalars"].items()):
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = value
    return {"state": state, "param_groups": meta["param_groups"]}


def list_checkpoints(checkpoint_dir: str | Path) -> list[Path]:
    folder = Path(checkpoint_dir)
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir() if p.is_dir() and p.name.startswith(CHECKPOINT_PREFIX)
             and (p / "state.json").is_file()]
    return sorted(found, key=lambda p: int(p.name[len(CHECKPOINT_PREFIX):]))


def resolve_resume(resume: str | Path | None, checkpoint_dir: str | Path) -> Path | None:
    """'latest' (the newest readable checkpoint in checkpoint_dir, None if there is none; a damaged
    newer one is skipped with a warning) or a path."""
    if resume is None:
        return None
    if str(resume) == "latest":
        for path in reversed(list_checkpoints(checkpoint_dir)):
            problem = unreadable_file(path)
            if problem is None:
                return path
            warnings.warn(f"skipping checkpoint {path}: {problem}")
        return None
    path = Path(resume)
    if not (path / "state.json").is_file():
        raise UserError(f"{path} is not a teacher checkpoint (no state.json); pass a checkpoint-NNNNNN "
                        f"folder to --resume-from, or --resume for the newest one")
    problem = unreadable_file(path)
    if problem is not None:
        raise UserError(f"--resume-from {path}: {problem}; pass an older checkpoint-NNNNNN folder or --resume")
    return path


def save_checkpoint(folder: Path, step: int, net: nn.Module, ema: EMA | None, optimizer, config,
                    tokenizer_dir: Path, keep: int) -> Path:
    from safetensors.torch import save_file

    final = folder / f"{CHECKPOINT_PREFIX}{step:06d}"
    with atomic_folder(final) as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()},
                  str(tmp / "model.safetensors"))
        if ema is not None:
            save_file({k: v.contiguous() for k, v in ema.shadow.items()}, str(tmp / "ema.safetensors"))
        tensors, meta = _optimizer_to_safetensors(optimizer)
        save_file(tensors, str(tmp / "optimizer.safetensors"))
        (tmp / "optimizer.json").write_text(to_json(meta))
        shutil.copytree(tokenizer_dir, tmp / "tokenizer")
        (tmp / "state.json").write_text(to_json({"step": step, "config": asdict(config)}, indent=2))
    for old in list_checkpoints(folder)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _check_resume_config(saved: dict, config: TeacherTrainConfig) -> None:
    # Everything that shapes the network or the noise must match; steps, lr, logging may change.
    fixed = ("resolution", "channels", "block_out_channels", "layers_per_block", "attention_heads",
             "text_width", "text_layers", "max_length", "prediction_type", "beta_schedule")
    diff = [k for k in fixed if json.dumps(saved.get(k)) != json.dumps(asdict(config)[k])]
    if diff:
        raise UserError(f"cannot resume: the checkpoint was trained with different {', '.join(diff)} "
                        f"({', '.join(f'{k}={saved.get(k)}' for k in diff)}); use the same settings or start fresh")


# ---- the pipeline folder ----------------------------------------------------------------------
def save_pipeline(out: Path, unet, text_encoder, tokenizer_dir: Path, scheduler) -> None:
    """A standard diffusers folder: model_index.json + unet/ text_encoder/ tokenizer/ scheduler/.

    `_class_name` is StableDiffusionPipeline with `vae: [null, null]` (pixel space): diffusers
    loads the folder like any SD folder, each component also loads alone with
    `<Class>.from_pretrained(out, subfolder=...)`.
    """
    import diffusers

    out.mkdir(parents=True, exist_ok=True)
    unet.save_pretrained(out / "unet", safe_serialization=True)
    text_encoder.save_pretrained(out / "text_encoder", safe_serialization=True)
    shutil.copytree(tokenizer_dir, out / "tokenizer", dirs_exist_ok=True)
    scheduler.save_pretrained(out / "scheduler")
    index = {
        "_class_name": "StableDiffusionPipeline",
        "_diffusers_version": diffusers.__version__,
        "feature_extractor": [None, None],
        "image_encoder": [None, None],
        "requires_safety_checker": False,
        "safety_checker": [None, None],
        "scheduler": ["diffusers", type(scheduler).__name__],
        "text_encoder": ["transformers", type(text_encoder).__name__],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", type(unet).__name__],
        "vae": [None, None],
    }
    (out / "model_index.json").write_text(to_json(index, indent=2) + "\n")


def write_sampling_defaults(out: Path, config: TeacherTrainConfig) -> None:
    """ddil_defaults.json: the guidance scale (and prompts) the models layer uses for this pipeline
    when a command is given none: a tiny CFG teacher wants a far lower scale than SD's 7.5."""
    from ddil_cli.specs import read_prompts

    defaults: dict[str, Any] = {"guidance": config.default_guidance}
    if config.default_prompts:
        defaults["prompts"] = read_prompts(None, config.default_prompts, None)
    (out / "ddil_defaults.json").write_text(to_json(defaults, indent=2) + "\n")


# ---- the loop ---------------------------------------------------------------------------------
def train_teacher(config: TeacherTrainConfig, out: str | Path, checkpoint_dir: str | Path, *,
                  resume: str | Path | None = None, console=None, progress=None,
                  on_step: Callable[[int, float], None] | None = None) -> TrainResult:
    """Train, checkpoint every `checkpoint_every` steps, and write the pipeline folder to `out`.

    `resume`: None, 'latest' (the newest checkpoint in `checkpoint_dir`, if any) or a checkpoint
    folder. `progress`: a started rich Progress to report on; `console`: where the data summary goes.
    `on_step(step, loss)` runs after each step (and its checkpoint)."""
    from accelerate import Accelerator
    from safetensors.torch import load_file

    config.validate()
    if config.default_prompts:
        from ddil_cli.specs import read_prompts

        read_prompts(None, config.default_prompts, None)  # a bad file fails now, not after training
    out, checkpoint_dir = Path(out), Path(checkpoint_dir)
    accelerator = Accelerator(mixed_precision=config.mixed_precision, cpu=config.device == "cpu")
    data = load_image_captions(config.data, resolution=config.resolution, channels=config.channels,
                               output="tensor", limit=config.max_samples)
    if console is not None and accelerator.is_main_process:
        console.print(f"data: {data.stats.summary()}", markup=False)
    resume_path = resolve_resume(resume, checkpoint_dir)

    arch = config.arch()
    work = checkpoint_dir / ".tokenizer"
    start_step = 0
    if resume_path is not None:
        saved = json.loads((resume_path / "state.json").read_text())
        if not isinstance(saved, dict) or not isinstance(saved.get("config"), dict) or "step" not in saved:
            raise UserError(f"{resume_path / 'state.json'} is not a teacher checkpoint's state; pass another "
                            "checkpoint to --resume-from, or start fresh")
        _check_resume_config(saved["config"], config)
        start_step = int(saved["step"])
    tokenizer_dir = work
    if accelerator.is_main_process:
        shutil.rmtree(work, ignore_errors=True)
        if resume_path is not None:
            # A copy: pruning old checkpoints may delete the one we resumed from.
            shutil.copytree(resume_path / "tokenizer", work)
        else:
            build_clip_tokenizer(data.captions, work, arch.max_length)
    accelerator.wait_for_everyone()
    from transformers import CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(str(work))

    torch.manual_seed(config.seed)  # network initialisation
    net = TextToImageNet(make_unet(arch), make_text_encoder(arch, tokenizer))
    optimizer = torch.optim.AdamW(net.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    ema = EMA(net, config.ema_decay) if config.ema_decay > 0 else None
    if resume_path is not None:
        try:
            net.load_state_dict(load_file(str(resume_path / "model.safetensors")))
            optimizer.load_state_dict(_optimizer_from_safetensors(
                load_file(str(resume_path / "optimizer.safetensors")),
                json.loads((resume_path / "optimizer.json").read_text())))
            if ema is not None and (resume_path / "ema.safetensors").is_file():
                ema.shadow = load_file(str(resume_path / "ema.safetensors"))
        except (OSError, ValueError, KeyError, RuntimeError) as exc:  # missing file, wrong shapes
            raise UserError(f"cannot resume from {resume_path} ({one_line(exc)}); it does not match this "
                            "model or is damaged: pass another checkpoint to --resume-from, or start fresh") from None
    if start_step > config.steps:
        raise UserError(f"the checkpoint {resume_path} is already at step {start_step} > --steps "
                        f"{config.steps}; raise --steps to train further (or equal it to export that checkpoint)")

    schedule = NoiseSchedule.from_scheduler_config(make_scheduler(config.prediction_type, config.beta_schedule).config)
    images = data.images
    all_ids = tokenize(tokenizer, data.captions)
    null_ids = tokenize(tokenizer, [""])[0]
    net, optimizer = accelerator.prepare(net, optimizer)
    device = accelerator.device
    n, batch = len(data), config.batch_size
    steps_per_epoch = max(1, n // batch)

    log: list[dict[str, Any]] = []
    log_file = checkpoint_dir / "train_log.jsonl"
    checkpoint_dir.mkdir(parents=True, exist_ok=True)
    if resume_path is None and accelerator.is_main_process:
        log_file.unlink(missing_ok=True)  # a fresh run starts a fresh log
    started, loss_sum, loss_count, last_loss = time.time(), 0.0, 0, float("nan")
    show = progress is not None and accelerator.is_main_process
    task = progress.add_task("teacher", total=config.steps, completed=start_step) if show else None
    net.train()
    for step in range(start_step, config.steps):
        gen = _step_generator(config.seed, step, accelerator.process_index)
        # Epoch-style sampling without replacement: the epoch's permutation is a function of
        # (seed, epoch), so it too replays on resume.
        epoch, offset = divmod(step, steps_per_epoch)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(config.seed * 7919 + epoch))
        index = perm[(offset * batch + torch.arange(batch)) % n]
        x0 = images[index]
        ids = all_ids[index].clone()
        drop = torch.rand(batch, generator=gen) < config.caption_dropout
        ids[drop] = null_ids
        noise = torch.randn(x0.shape, generator=gen)
        t = torch.randint(0, schedule.num_train_timesteps, (batch,), generator=gen)
        x0, ids, noise, t = x0.to(device), ids.to(device), noise.to(device), t.to(device)
        a, s = schedule.alpha_sigma(t)
        x_t = bcast(a, x0) * x0 + bcast(s, x0) * noise
        target = training_target(x0, noise, bcast(a, x0), bcast(s, x0), config.prediction_type)
        for group in optimizer.param_groups:
            group["lr"] = lr_at(config, step)
        with accelerator.autocast():
            output = net(x_t, t, ids)
        loss = torch.nn.functional.mse_loss(output.float(), target)
        optimizer.zero_grad(set_to_none=True)
        accelerator.backward(loss)
        if config.grad_clip > 0:
            accelerator.clip_grad_norm_(net.parameters(), config.grad_clip)
        optimizer.step()
        if ema is not None:
            ema.update(accelerator.unwrap_model(net), step)
        last_loss = float(loss.detach())
        if not math.isfinite(last_loss):
            raise UserError(f"the loss became non-finite at step {step}; lower --lr (now {config.lr}) and "
                            f"resume from the last checkpoint with --resume")
        loss_sum, loss_count = loss_sum + last_loss, loss_count + 1
        done = step + 1
        if done % config.log_every == 0 or done == config.steps:
            elapsed = time.time() - started
            entry = {"step": done, "loss": loss_sum / loss_count, "lr": lr_at(config, step),
                     "seconds": round(elapsed, 2)}
            log.append(entry)
            if accelerator.is_main_process:
                with log_file.open("a") as fh:
                    fh.write(to_json(entry) + "\n")
            if show:
                progress.update(task, description=f"teacher (loss {entry['loss']:.4f})")
            loss_sum, loss_count = 0.0, 0
        if show:
            progress.update(task, completed=done)
        if done % config.checkpoint_every == 0 and done < config.steps and accelerator.is_main_process:
            save_checkpoint(checkpoint_dir, done, accelerator.unwrap_model(net), ema, optimizer, config,
                            tokenizer_dir, config.keep_checkpoints)
        if on_step is not None:
            on_step(done, last_loss)

    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        final_net = accelerator.unwrap_model(net)
        if start_step < config.steps:  # else: exporting the checkpoint resumed from, as it is
            save_checkpoint(checkpoint_dir, config.steps, final_net, ema, optimizer, config, tokenizer_dir,
                            config.keep_checkpoints)
        if ema is not None:
            ema.copy_to(final_net)
        save_pipeline(out, final_net.unet, final_net.text_encoder, tokenizer_dir,
                      make_scheduler(config.prediction_type, config.beta_schedule))
        write_sampling_defaults(out, config)
        (out / "train_config.json").write_text(to_json(
            {"config": asdict(config), "data": data.stats.as_dict(), "weights": "ema" if ema else "raw"},
            indent=2) + "\n")
        if log_file.is_file():
            shutil.copy(log_file, out / "train_log.jsonl")
    if start_step == config.steps and log_file.is_file():  # an export: report the run's last logged loss
        lines = log_file.read_text().splitlines()
        last_loss = json.loads(lines[-1])["loss"] if lines else last_loss
    return TrainResult(config.steps, last_loss, time.time() - started, data.stats.as_dict(),
                       str(resume_path) if resume_path else None, log)


# ---- the command ------------------------------------------------------------------------------
@dataclass
class TeacherCommandConfig(TeacherTrainConfig):
    """`ddil teacher`'s options: the training settings plus where things go."""

    out: str = "teacher"
    checkpoints: str | None = None  # default: OUT-checkpoints beside --out (outlives a failed run)
    resume: bool = False
    resume_from: str | None = None
    threads: int | None = None  # torch CPU threads (None: torch's default)
    quiet: bool = False
    overwrite: bool = False

    def checkpoint_dir(self) -> Path:
        out = Path(self.out)
        return Path(self.checkpoints) if self.checkpoints else out.with_name(out.name + "-checkpoints")


def parse_channels(value) -> tuple[int, ...]:
    """'32,64,64' (flag) or [32, 64, 64] (config file) -> (32, 64, 64)."""
    items = value.replace(" ", "").split(",") if isinstance(value, str) else list(value)
    try:
        channels = tuple(int(v) for v in items if str(v) != "")
    except ValueError:
        channels = ()
    if not channels or any(c < 1 for c in channels):
        raise UserError(f"block channels {value!r} must be positive integers separated by commas, e.g. 32,64,64")
    return channels


def run_teacher(cfg: TeacherCommandConfig, work: Path, *, progress=None, console=None) -> dict[str, Any]:
    """Train into `work` (the output folder being written) and describe the run in its manifest."""
    from ddil_cli.data.shards import resolve_shards
    from ddil_cli.manifest import fingerprint, write_manifest

    if cfg.threads is not None:
        # On shared cores one thread can be many times faster than two (spinning OpenMP workers).
        torch.set_num_threads(cfg.threads)
    resume = cfg.resume_from or ("latest" if cfg.resume else None)
    checkpoint_dir = cfg.checkpoint_dir()
    resumed = resolve_resume(resume, checkpoint_dir)
    if resume == "latest" and resumed is None and console is not None:
        console.print(f"no checkpoint in {checkpoint_dir} to resume from: starting at step 0", markup=False)
    result = train_teacher(cfg, work, checkpoint_dir, resume=resumed, progress=progress, console=console)
    shards = {url: fingerprint(url) for url in resolve_shards(cfg.data) if Path(url).is_file()}
    summary = {"steps": result.step, "final_loss": result.final_loss, "seconds": round(result.seconds, 2),
               "data": result.data, "resumed_from": result.resumed_from, "checkpoints": str(checkpoint_dir)}
    write_manifest(work, "teacher", cfg, inputs={"data": cfg.data}, extra={"data_shards": shards, "summary": summary})
    return summary
