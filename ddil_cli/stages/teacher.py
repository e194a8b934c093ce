"""`ddil teacher`: train a small pixel-space text-to-image diffusion teacher on image-caption shards.

The teacher trains through the one loop every distillation method uses (`ddil_cli/train.py`):
its denoising loss is a method-like objective (`DenoisingObjective`), its checkpoints have the
loop's format (safetensors + JSON, exact resume), its EMA is the loop's.

The data set is read once through `ddil_cli.data.shards` (the reader all real data goes through)
and held in memory: this command is for small sets (the embedded digits, a few thousand images).
Everything random in step k (the batch, the noise, the timesteps, caption dropout) is drawn from a
generator seeded by (seed, k, process), so a run resumed from a checkpoint continues exactly as
the uninterrupted run would have.

The loss: x_t = a_t x0 + s_t eps at t ~ U{0..T-1}, MSE between the network output and eps
(epsilon prediction) or v = a_t eps - s_t x0 (v prediction), with a share of captions replaced by
"" so that CFG has an unconditional branch.

Output (a diffusers pipeline folder, see docs/embedded-lab.md): model_index.json, unet/,
text_encoder/, tokenizer/, scheduler/, plus train_config.json and train_log.jsonl. The weights
saved are the EMA weights when EMA is on. Checkpoints go to a separate folder so that they
survive a failed run: tokenizer/ (built once from the captions) and the loop's checkpoint-N/.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from ddil_cli.atomic import to_json, unreadable_file, write_json_atomic
from ddil_cli.data.shards import load_image_captions
from ddil_cli.diffusion.parameterization import to_v
from ddil_cli.diffusion.schedule import NoiseSchedule, bcast
from ddil_cli.errors import UserError
from ddil_cli.models.digits import (TeacherArch, build_clip_tokenizer, make_scheduler, make_text_encoder,
                                 make_unet, tokenize)
from ddil_cli.methods.base import TrainedGroup
from ddil_cli.models.diffusers_t2i import write_model_index, write_sampling_defaults
from ddil_cli.train import TrainConfig, Trainer, newest_readable_checkpoint

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


def training_target(x0: torch.Tensor, noise: torch.Tensor, a: torch.Tensor, s: torch.Tensor,
                    prediction_type: str) -> torch.Tensor:
    if prediction_type == "epsilon":
        return noise
    return to_v(x0, noise, a, s)


@dataclass
class DenoisingBatch:
    """A teacher training batch: noisy images, their timesteps, caption token ids, the target."""

    x_t: torch.Tensor
    t: torch.Tensor
    input_ids: torch.Tensor
    target: torch.Tensor
    source: list[str]
    t_index: torch.Tensor

    def __len__(self) -> int:
        return self.x_t.shape[0]


class DenoisingBatches:
    """Step k's batch, a function of (seed, k, process) only: resume replays the same batches."""

    def __init__(self, config: TeacherTrainConfig, images: torch.Tensor, input_ids: torch.Tensor,
                 null_ids: torch.Tensor, schedule: NoiseSchedule, process: int, device):
        self.config, self.images, self.input_ids, self.null_ids = config, images, input_ids, null_ids
        self.schedule, self.process, self.device = schedule, process, device
        self.steps_per_epoch = max(1, len(images) // config.batch_size)

    def __call__(self, step: int) -> DenoisingBatch:
        cfg, n, batch = self.config, len(self.images), self.config.batch_size
        gen = torch.Generator().manual_seed((cfg.seed * 1_000_003 + step) * 4099 + self.process)
        # epoch-style sampling without replacement: the epoch's permutation is a function of
        # (seed, epoch), so it too replays on resume
        epoch, offset = divmod(step, self.steps_per_epoch)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(cfg.seed * 7919 + epoch))
        index = perm[(offset * batch + torch.arange(batch)) % n]
        x0 = self.images[index]
        ids = self.input_ids[index].clone()
        ids[torch.rand(batch, generator=gen) < cfg.caption_dropout] = self.null_ids
        noise = torch.randn(x0.shape, generator=gen)
        t = torch.randint(0, self.schedule.num_train_timesteps, (batch,), generator=gen)
        a, s = self.schedule.alpha_sigma(t)
        x_t = bcast(a, x0) * x0 + bcast(s, x0) * noise
        target = training_target(x0, noise, bcast(a, x0), bcast(s, x0), cfg.prediction_type)
        device = self.device
        return DenoisingBatch(x_t.to(device), t.to(device), ids.to(device), target.to(device), ["data"] * batch,
                              torch.full((batch,), -1, dtype=torch.long))


class DenoisingObjective:
    """The teacher's loss for the one training loop (a train.Objective): one network, MSE to the
    denoising target."""

    def __init__(self, net: nn.Module):
        self.net = net

    def groups(self) -> list[TrainedGroup]:
        return [TrainedGroup("teacher", {"teacher": self.net})]

    def loss(self, group: str, nets: dict[str, nn.Module], batch: DenoisingBatch) -> torch.Tensor:
        output = nets["teacher"](batch.x_t, batch.t, batch.input_ids)
        return ((output.float() - batch.target) ** 2).reshape(len(batch), -1).mean(1)

    def after_update(self, nets) -> None:
        pass

    def extra_state(self):
        return {}, {}

    def load_extra_state(self, tensors, info) -> None:
        pass


class _TeacherRunState:
    """What the loop checkpoints besides the network: the teacher's settings, checked on resume."""

    def __init__(self, config: TeacherTrainConfig):
        self.config = config

    def state(self):
        return {}, {"teacher_config": json.loads(to_json(asdict(self.config)))}

    def load(self, tensors, info):
        pass  # checked before the loop starts (_check_resume_config), nothing to restore


def resolve_resume(resume: str | Path | None, checkpoint_dir: str | Path) -> Path | None:
    """'latest' (the newest readable checkpoint in checkpoint_dir, None if there is none; a damaged
    newer one is skipped with a warning) or a path."""
    if resume is None:
        return None
    if str(resume) == "latest":
        return newest_readable_checkpoint(Path(checkpoint_dir))
    path = Path(resume)
    if not (path / "state.json").is_file():
        raise UserError(f"{path} is not a teacher checkpoint (no state.json); pass a checkpoint-NNNNNNNN "
                        f"folder to --resume-from, or --resume for the newest one")
    problem = unreadable_file(path)
    if problem is not None:
        raise UserError(f"--resume-from {path}: {problem}; pass an older checkpoint-NNNNNNNN folder or --resume")
    return path


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
    write_model_index(out, index)


def write_teacher_defaults(out: Path, config: TeacherTrainConfig) -> None:
    """ddil_defaults.json: the guidance scale (and prompts) the models layer uses for this pipeline
    when a command is given none: a tiny CFG teacher wants a far lower scale than SD's 7.5."""
    from ddil_cli.specs import read_prompts

    defaults: dict[str, Any] = {"guidance": config.default_guidance}
    if config.default_prompts:
        defaults["prompts"] = read_prompts(None, config.default_prompts, None)
    write_sampling_defaults(out, defaults)


# ---- the run ----------------------------------------------------------------------------------
def train_teacher(config: TeacherTrainConfig, out: str | Path, checkpoint_dir: str | Path, *,
                  resume: str | Path | None = None, console=None, progress=None,
                  on_step: Callable[[int, float], None] | None = None) -> TrainResult:
    """Train through the one loop, checkpoint every `checkpoint_every` steps, and write the
    pipeline folder to `out`.

    `resume`: None, 'latest' (the newest checkpoint in `checkpoint_dir`, if any) or a checkpoint
    folder. `progress`: a started rich Progress to report on; `console`: where the data summary goes.
    `on_step(step, loss)` runs at every logged step."""
    from accelerate import Accelerator

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
    start_step = _resumed_step(resume_path, config)
    arch, tokenizer_dir = config.arch(), checkpoint_dir / "tokenizer"
    tokenizer = _tokenizer(accelerator, tokenizer_dir, data.captions, arch, fresh=resume_path is None)

    torch.manual_seed(config.seed)  # network initialisation
    net = TextToImageNet(make_unet(arch), make_text_encoder(arch, tokenizer))
    schedule = NoiseSchedule.from_scheduler_config(make_scheduler(config.prediction_type, config.beta_schedule).config)
    batches = DenoisingBatches(config, data.images, tokenize(tokenizer, data.captions), tokenize(tokenizer, [""])[0],
                               schedule, accelerator.process_index, accelerator.device)
    log = _StepLog(checkpoint_dir / "train_log.jsonl", on_step)
    if resume_path is None and accelerator.is_main_process:
        log.path.unlink(missing_ok=True)  # a fresh run starts a fresh log
    train_cfg = TrainConfig(max_updates=config.steps, lr=config.lr, warmup=config.warmup_steps,
                            weight_decay=config.weight_decay,
                            max_grad_norm=config.grad_clip if config.grad_clip > 0 else math.inf,
                            ema_decay=config.ema_decay, checkpoint_every=config.checkpoint_every,
                            keep_checkpoints=config.keep_checkpoints, log_every=config.log_every,
                            max_nonfinite=1, lr_schedule=config.lr_schedule)
    trainer = Trainer(accelerator=accelerator, method=DenoisingObjective(net), config=train_cfg, run_dir=out,
                      phase="teacher", make_batch=batches, extra_state=_TeacherRunState(config),
                      progress=progress, log=log.write, checkpoint_dir=checkpoint_dir)
    if resume_path is not None:
        trainer.load_checkpoint(resume_path)
    state = trainer.run()
    if start_step < config.steps:  # else: exporting the checkpoint resumed from, as it is
        trainer.save_checkpoint()
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        _export(trainer, out, config, tokenizer_dir, data.stats.as_dict(), log.path)
    return TrainResult(state.update, log.last_loss(), time.time() - log.started, data.stats.as_dict(),
                       str(resume_path) if resume_path else None, log.rows)


def _resumed_step(resume_path: Path | None, config: TeacherTrainConfig) -> int:
    """The step the checkpoint at `resume_path` reached (0 for a fresh run), once it is checked to
    be a teacher checkpoint trained with these settings and not past --steps."""
    if resume_path is None:
        return 0
    try:
        saved = json.loads((resume_path / "state.json").read_text())
        if not isinstance(saved, dict) or not isinstance(saved.get("train"), dict):
            raise ValueError("no training state")
    except ValueError:
        raise UserError(f"{resume_path / 'state.json'} is not a teacher checkpoint's state (checkpoints of "
                        "the earlier teacher loop do not resume in this one); pass another checkpoint to "
                        "--resume-from, or start fresh") from None
    _check_resume_config(saved.get("extra", {}).get("teacher_config", {}), config)
    start_step = int(saved["train"]["update"])
    if start_step > config.steps:
        raise UserError(f"the checkpoint {resume_path} is already at step {start_step} > --steps "
                        f"{config.steps}; raise --steps to train further (or equal it to export that checkpoint)")
    return start_step


def _tokenizer(accelerator, tokenizer_dir: Path, captions: list[str], arch: TeacherArch, *, fresh: bool):
    """The run's tokenizer, built from the captions by the main process (kept across resumes)."""
    from transformers import CLIPTokenizer

    if accelerator.is_main_process:
        tokenizer_dir.parent.mkdir(parents=True, exist_ok=True)
        if fresh or not tokenizer_dir.is_dir():
            shutil.rmtree(tokenizer_dir, ignore_errors=True)
            build_clip_tokenizer(captions, tokenizer_dir, arch.max_length)
    accelerator.wait_for_everyone()
    return CLIPTokenizer.from_pretrained(str(tokenizer_dir))


class _StepLog:
    """The logged steps: kept in memory, appended to train_log.jsonl, passed to `on_step`."""

    def __init__(self, path: Path, on_step: Callable[[int, float], None] | None):
        self.path, self.on_step, self.rows = path, on_step, []
        self.started = time.time()

    def write(self, row: dict) -> None:
        entry = {"step": row["update"], "loss": row["loss"], "lr": row["lr"],
                 "seconds": round(time.time() - self.started, 2)}
        self.rows.append(entry)
        with self.path.open("a") as fh:
            fh.write(to_json(entry) + "\n")
        if self.on_step is not None:
            self.on_step(entry["step"], entry["loss"])

    def last_loss(self) -> float:
        """This run's last logged loss; for an export (nothing logged now), the file's last."""
        if self.rows:
            return self.rows[-1]["loss"]
        lines = self.path.read_text().splitlines() if self.path.is_file() else []
        return json.loads(lines[-1])["loss"] if lines else float("nan")


def _export(trainer, out: Path, config: TeacherTrainConfig, tokenizer_dir: Path, data_stats: dict,
            log_file: Path) -> None:
    """The pipeline folder in `out`: the final (EMA) weights, defaults, config and the log."""
    with trainer.final_weights() as final_net:
        save_pipeline(out, final_net.unet, final_net.text_encoder, tokenizer_dir,
                      make_scheduler(config.prediction_type, config.beta_schedule))
    write_teacher_defaults(out, config)
    write_json_atomic(out / "train_config.json", {"config": asdict(config), "data": data_stats,
                                                  "weights": "ema" if config.ema_decay > 0 else "raw"})
    if log_file.is_file():
        shutil.copy(log_file, out / "train_log.jsonl")


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
