"""The one training loop for every method, on accelerate (docs/distill.md).

Every network a method trains (the student; DMD2's critic and GAN head) has its own AdamW with
warmup and linear decay, its own number of optimiser steps per student update, gradient
clipping, and is prepared by accelerate and called through its wrapped module in the loss, so
gradients are all-reduced under several processes. Mixed precision, gradient accumulation,
optional EMA of the student (published without overwriting the online weights), checkpoints
with exact resume (safetensors + JSON only, never pickle), a non-finite-loss guard,
metrics.jsonl averaged over each logging window, accelerate trackers, and hooks that run every K
updates (the DAgger collection). A method supplies the losses; `make_batch` the inputs; the loop
knows neither where inputs come from nor what a loss means.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
import warnings
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Protocol

import torch
from safetensors.torch import load_file, save_file

from ddil_cli.atomic import atomic_folder, to_json, write_json_atomic
from ddil_cli.errors import UserError
from ddil_cli.methods.base import Batch, TrainedGroup
from ddil_cli.models.lora import load_trained_state, trained_parameters, trained_state

CHECKPOINT_PREFIX = "checkpoint-"


@dataclass
class TrainConfig:
    max_updates: int = 400
    lr: float = 1e-4
    warmup: int = 0
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    grad_accum: int = 1
    ema_decay: float = 0.0  # 0: no EMA
    checkpoint_every: int = 0  # 0: only at the end
    keep_checkpoints: int = 2
    log_every: int = 10
    max_nonfinite: int = 5
    lr_schedule: str = "linear"  # after warmup: linear decay to 0, constant, or cosine to 10%
    optimizer: str = "adamw"  # adamw | adamw8bit (bitsandbytes: 8-bit moments, ~1/4 of AdamW's state)


# every setting that can make the loss diverge, for the message that stops a diverged run
NONFINITE_FIX = ("lower --lr (or a method's --critic-lr), --weight-decay, --max-grad-norm or --timestep-scaling, "
                 "add --threshold, or use --mixed-precision no")


class NonFiniteLoss(UserError):
    pass


class CheckpointError(UserError):
    """A checkpoint that cannot be resumed from (damaged, or made by another model)."""


# ---- flat safetensors for optimiser / EMA / RNG state ----------------------------------------
def _split_state(state: dict, prefix: str, tensors: dict, info: dict) -> None:
    """Nested dict/list state -> flat tensors {prefix.path: tensor} and a JSON tree for the rest."""
    def walk(value, path):
        if isinstance(value, torch.Tensor):
            tensors[path] = value.detach().cpu().contiguous()
            return {"__tensor__": path}
        if isinstance(value, dict):
            return {"__dict__": [[k, walk(v, f"{path}.{k}")] for k, v in value.items()]}
        if isinstance(value, (list, tuple)):
            return {"__list__": [walk(v, f"{path}.{i}") for i, v in enumerate(value)]}
        return value
    info[prefix] = walk(state, prefix)


def _join_state(info_tree, tensors: dict):
    if isinstance(info_tree, dict):
        if "__tensor__" in info_tree:
            return tensors[info_tree["__tensor__"]]
        if "__dict__" in info_tree:
            return {k: _join_state(v, tensors) for k, v in info_tree["__dict__"]}
        if "__list__" in info_tree:
            return [_join_state(v, tensors) for v in info_tree["__list__"]]
    return info_tree


OPTIMIZERS = ("adamw", "adamw8bit")


def check_optimizer(name: str, device: str | torch.device) -> None:
    """One line naming the fix when --optimizer cannot run here: an unknown name, bitsandbytes
    missing, or no bitsandbytes backend for the device (one 8-bit step on it tells)."""
    if name not in OPTIMIZERS:
        raise UserError(f"--optimizer {name!r}: use {' or '.join(OPTIMIZERS)}")
    if name == "adamw":
        return
    try:
        import bitsandbytes as bnb
    except Exception as exc:  # not installed, or its native library failed to load
        raise UserError(f"--optimizer adamw8bit needs bitsandbytes ({type(exc).__name__}: "
                        f"{' '.join(str(exc).split())[:100]}); pip install 'ddil-cli[lean]', or use --optimizer adamw") from None
    try:
        probe = torch.nn.Parameter(torch.zeros(4096, device=device))  # 4096: bitsandbytes' smallest 8-bit tensor
        probe.grad = torch.ones_like(probe)
        bnb.optim.AdamW8bit([probe], lr=1e-3).step()
    except Exception as exc:
        raise UserError(f"--optimizer adamw8bit: bitsandbytes {getattr(bnb, '__version__', '')} has no 8-bit AdamW "
                        f"for {torch.device(device).type} ({type(exc).__name__}: {' '.join(str(exc).split())[:100]}); "
                        "use --optimizer adamw or another device") from None


def make_optimizer(name: str, params: list, *, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    if name == "adamw8bit":
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(params, lr=lr, weight_decay=weight_decay)
    if name != "adamw":
        raise ValueError(f"unknown optimizer {name!r}")
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)


def lr_lambda(warmup: int, total: int, schedule: str = "linear") -> Callable[[int], float]:
    """Linear warmup to the base rate, then `linear` decay to 0 at `total`, `constant` (a run to N
    steps is then the first N steps of any longer run, so it can be extended by resuming), or
    `cosine` decay to 10% of the base rate at `total`."""
    if schedule not in ("linear", "constant", "cosine"):
        raise ValueError(f"unknown LR schedule {schedule!r}")

    def factor(step: int) -> float:
        if warmup and step < warmup:
            warm = (step + 1) / warmup
            if schedule != "cosine":
                return warm
        else:
            warm = 1.0
        if schedule == "constant":
            return 1.0
        if schedule == "cosine":
            return warm * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, step / max(1, total)))))
        return max(0.0, (total - step) / max(1, total - warmup))
    return factor


@dataclass
class TrainState:
    update: int = 0
    nonfinite_total: int = 0
    nonfinite_in_row: int = 0
    collect_seconds: float = 0.0
    train_seconds: float = 0.0
    # fp16 steps the GradScaler skipped on an overflowing gradient: a normal event (it lowers its
    # scale and goes on), counted apart from non-finite losses and never toward --max-nonfinite
    scaler_skipped: int = 0


class _Group:
    """One optimiser's networks at run time: raw modules (checkpoints) and wrapped ones (losses)."""

    def __init__(self, spec: TrainedGroup, accelerator, config: TrainConfig, *, primary: bool = False):
        self.name, self.primary = spec.name, primary
        self.steps_per_update = max(1, int(spec.steps_per_update))
        self.raw = dict(spec.modules)
        self.adapters = dict(spec.adapters)  # a LoRA module trains its adapter; its base stays frozen
        self.params = []
        for name, module in self.raw.items():
            module.train()
            trained = list(trained_parameters(module, self.adapters.get(name)).values())
            for param in trained:
                param.requires_grad_(True)
            self.params += trained
        lr = spec.lr if spec.lr is not None else config.lr
        optimizer = make_optimizer(config.optimizer, self.params, lr=lr, weight_decay=config.weight_decay)
        names = list(self.raw)
        *wrapped, self.optimizer = accelerator.prepare(*[self.raw[n] for n in names], optimizer)
        self.wrapped = dict(zip(names, wrapped))
        # not prepared: accelerate's scheduler wrapper steps once per process per update, which
        # decayed the LR num_processes times too fast; ours steps once per optimiser step
        steps = config.max_updates * self.steps_per_update
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer.optimizer if hasattr(self.optimizer, "optimizer") else self.optimizer,
            lr_lambda(config.warmup * self.steps_per_update, steps, config.lr_schedule))

    def trained(self, name: str) -> list[torch.nn.Parameter]:
        return list(trained_parameters(self.raw[name], self.adapters.get(name)).values())

    @property
    def key(self) -> str:
        """Checkpoint key prefix: the primary group's keep the names of one-network checkpoints."""
        return "" if self.primary else f".{self.name}"


# per-position loss metrics: a phase's training grid has at most 16 positions or bins (distill's batches)
T_BINS = 64


@dataclass
class StepResult:
    stepped: bool  # the optimiser changed the weights
    nonfinite: bool  # skipped for a non-finite loss or gradient (an fp16 scaler skip is neither)
    grad_norm: torch.Tensor  # before clipping; on the device


def _loss_and_metrics(output) -> tuple[torch.Tensor, dict[str, float]]:
    if isinstance(output, tuple):
        per_example, metrics = output
        return per_example, dict(metrics)
    return output, {}


class Objective(Protocol):
    """What the loop calls: a distill method (methods.base.DistillMethod) or the teacher trainer's
    denoising objective. `groups()[0]` is the primary group: its loss is logged as `loss`, its
    first module is the network the loop EMAs and publishes (`final_weights`)."""

    def groups(self) -> list[TrainedGroup]: ...

    def loss(self, group: str, nets: dict[str, torch.nn.Module], batch: Any) -> Any:
        """Per-example loss (B,) for the optimiser of `group`, or (loss, metrics)."""

    def after_update(self, nets: dict[str, torch.nn.Module]) -> None: ...

    def extra_state(self) -> tuple[dict[str, torch.Tensor], dict]: ...

    def load_extra_state(self, tensors: dict[str, torch.Tensor], info: dict) -> None: ...


class Trainer:
    """Owns one training phase's optimisation (one PD stage, one LCM run...): every network the
    method trains, each through its own optimiser, all prepared by accelerate."""

    def __init__(self, *, accelerator, method: Objective, config: TrainConfig, run_dir: Path,
                 phase: str, make_batch: Callable[[int], Batch], hooks=(), extra_state=None,
                 progress=None, log: Callable[[dict], None] | None = None, update_offset: int = 0,
                 loss_observers=(), checkpoint_dir: Path | None = None,
                 on_checkpoint: Callable[[Path], None] | None = None):
        from diffusers.training_utils import EMAModel

        self.accelerator = accelerator
        self.method = method
        self.config = config
        self.run_dir = Path(run_dir)
        self.phase = phase
        self.make_batch = make_batch
        self.hooks = list(hooks)  # (every, fn(update) -> seconds spent) pairs
        self.extra_state = extra_state  # object with state() -> (tensors, info) and load(tensors, info)
        self.progress = progress
        self.log = log
        self.update_offset = update_offset  # updates of earlier phases: checkpoint names stay ordered
        self.loss_observers = list(loss_observers)  # fn(batch, per_example) after each student loss
        self._checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir is not None else self.run_dir / "checkpoints"
        # main process, after each checkpoint, while the others wait (distill publishes its run at the first)
        self.on_checkpoint = on_checkpoint
        specs = method.groups()
        if not specs or not specs[0].modules:
            raise ValueError(f"{type(method).__name__}.groups() must start with the primary group")
        names = [n for spec in specs for n in spec.modules]
        if len(set(names)) != len(names) or len({s.name for s in specs}) != len(specs):
            raise ValueError(f"{type(method).__name__}.groups(): group and module names must be unique")
        self.groups = [_Group(spec, accelerator, config, primary=i == 0) for i, spec in enumerate(specs)]
        self.primary = self.groups[0]
        self.published = next(iter(specs[0].modules))  # the primary group's first module: EMA'd and published
        self.nets = {n: m for g in self.groups for n, m in g.wrapped.items()}
        published = self.primary.trained(self.published)  # a LoRA student: the EMA of its adapter
        self.ema = EMAModel(published, decay=config.ema_decay) if config.ema_decay > 0 else None
        self.state = TrainState()
        self._sums: dict[str, torch.Tensor] = {}  # the logging window's sums and counts, on the device
        self._counts: dict[str, torch.Tensor] = {}
        self._t_sums = torch.zeros(T_BINS, device=accelerator.device)
        self._t_counts = torch.zeros(T_BINS, device=accelerator.device)

    # ---- checkpoints ------------------------------------------------------------------------
    @property
    def checkpoint_dir(self) -> Path:
        return self._checkpoint_dir

    def _rank_state(self) -> tuple[dict, dict]:
        """What differs between processes: the RNG, the method's and the run's own state (replay
        pool, batch generator, data position). Each rank's is checkpointed, so a resume with the
        same number of processes continues every rank exactly."""
        tensors, info = {}, {}
        method_tensors, method_info = self.method.extra_state()
        tensors.update({f"method.{k}": v.detach().cpu().contiguous() for k, v in method_tensors.items()})
        info["method"] = method_info
        rng = {"torch_cpu": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng.update({f"torch_cuda_{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
        _split_state(rng, "rng", tensors, info)
        if self.extra_state is not None:
            extra_tensors, extra_info = self.extra_state.state()
            tensors.update({f"extra.{k}": v.detach().cpu().contiguous() for k, v in extra_tensors.items()})
            info["extra"] = extra_info
        return tensors, info

    def _last_checkpoint_words(self) -> str:
        last = newest_readable_checkpoint(self.checkpoint_dir) if self.checkpoint_dir.is_dir() else None
        return f"the last checkpoint is {last}" if last is not None else "no checkpoint was written yet"

    def save_checkpoint(self) -> Path:
        """Everything a resumed run needs to continue exactly, under a temp name, then renamed.
        The main process writes the networks and optimisers (equal on every rank) and its own
        rank state; every other rank stages its rank state first (rank-R.*), moved in before the
        checkpoint is published."""
        acc = self.accelerator
        final = self.checkpoint_dir / f"{CHECKPOINT_PREFIX}{self.update_offset + self.state.update:08d}"
        staging = self.checkpoint_dir / f".ranks-{final.name}"
        if not acc.is_main_process:
            tensors, info = self._rank_state()
            staging.mkdir(parents=True, exist_ok=True)
            save_file(tensors, str(staging / f"rank-{acc.process_index}.safetensors"))
            write_json_atomic(staging / f"rank-{acc.process_index}.json", info)
            acc.wait_for_everyone()  # staged
            acc.wait_for_everyone()  # published
            return final
        acc.wait_for_everyone()  # every rank has staged its state
        with atomic_folder(final) as tmp:  # temp name, fsync, rename: a crash never shows half a checkpoint
            tensors, info = self._rank_state()
            info["schedulers"] = {}
            for group in self.groups:
                for name, module in group.raw.items():  # trained weights only: a LoRA's adapter, never its base
                    save_file(trained_state(module, group.adapters.get(name)), str(tmp / f"{name}.safetensors"))
                _split_state(group.optimizer.state_dict(), f"optimizer{group.key}", tensors, info)
                info["schedulers"][group.name] = group.scheduler.state_dict()
            if self.ema is not None:
                _split_state(self.ema.state_dict(), "ema", tensors, info)
            save_file(tensors, str(tmp / "state.safetensors"))
            for staged in sorted(staging.glob("rank-*")) if staging.is_dir() else []:
                os.replace(staged, tmp / staged.name)
            scaler = acc.scaler.state_dict() if acc.scaler is not None else None
            info.update(phase=self.phase, train=asdict(self.state),
                        config=asdict(self.config), groups=[g.name for g in self.groups],
                        num_processes=acc.num_processes, grad_scaler=scaler)
            (tmp / "state.json").write_text(to_json(info))  # last: its presence marks a complete checkpoint
        shutil.rmtree(staging, ignore_errors=True)
        self._prune()
        if self.on_checkpoint is not None:
            self.on_checkpoint(final)
        acc.wait_for_everyone()
        return final

    def _prune(self) -> None:
        done = sorted(p for p in self.checkpoint_dir.glob(f"{CHECKPOINT_PREFIX}*") if p.is_dir())
        for old in done[:-self.config.keep_checkpoints] if self.config.keep_checkpoints > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
        for stale in self.checkpoint_dir.glob(".ranks-*"):  # staged by a run that died before publishing
            shutil.rmtree(stale, ignore_errors=True)

    def load_checkpoint(self, path: Path) -> None:
        try:
            info = json.loads((path / "state.json").read_text())
            if not isinstance(info, dict):
                raise ValueError("not a JSON object")
            tensors = load_file(str(path / "state.safetensors"))
            weights = {name: load_file(str(path / f"{name}.safetensors"))
                       for group in self.groups for name in group.raw}
        except Exception as exc:  # json, OS and safetensors errors: the checkpoint is damaged
            raise CheckpointError(f"checkpoint {path} is unreadable ({' '.join(str(exc).split())[:160]}); "
                                  "resume from another one (--resume latest skips damaged ones)") from None
        if info.get("phase") != self.phase:
            raise CheckpointError(f"checkpoint {path} belongs to phase {info.get('phase')!r}, not {self.phase!r}")
        saved_groups = info.get("groups")
        if saved_groups != [g.name for g in self.groups]:
            raise CheckpointError(f"checkpoint {path} trains {', '.join(map(str, saved_groups or ['nothing']))}, this method "
                                  f"{', '.join(g.name for g in self.groups)}; resume with the same --method")
        for group in self.groups:
            for name, module in group.raw.items():
                try:
                    load_trained_state(module, group.adapters.get(name), weights[name])
                except RuntimeError:  # missing/unexpected keys or other shapes: another model's checkpoint
                    raise CheckpointError(f"checkpoint {path} holds a {name} of another shape than this run's; "
                                          "resume with the settings that made it, or use another --out") from None
        try:
            schedulers = info["schedulers"]
            for group in self.groups:
                group.optimizer.load_state_dict(_join_state(info[f"optimizer{group.key}"], tensors))
                group.scheduler.load_state_dict(schedulers[group.name])
            if self.ema is not None and "ema" in info:
                self.ema.load_state_dict(_join_state(info["ema"], tensors))
            if info.get("grad_scaler") and self.accelerator.scaler is not None:
                self.accelerator.scaler.load_state_dict(info["grad_scaler"])
            self._load_rank_state(path, tensors, info)
            self.state = TrainState(**info["train"])
        except (KeyError, TypeError, ValueError, RuntimeError) as exc:  # a state.json of another format
            raise CheckpointError(f"checkpoint {path} does not fit this run ({type(exc).__name__}: "
                                  f"{' '.join(str(exc).split())[:120]}); resume from another one or use another --out") from None

    def _load_rank_state(self, path: Path, tensors: dict, info: dict) -> None:
        rank = self.accelerator.process_index
        if rank > 0:
            if (path / f"rank-{rank}.json").is_file():
                info = json.loads((path / f"rank-{rank}.json").read_text())
                tensors = load_file(str(path / f"rank-{rank}.safetensors"))
            else:
                warnings.warn(f"checkpoint {path.name} was written by {info.get('num_processes', 1)} process(es), "
                              f"this run has {self.accelerator.num_processes}: rank {rank} starts from rank 0's "
                              "RNG and replay pool, so the resumed run is not exactly the uninterrupted one")
        self.method.load_extra_state({k[7:]: v for k, v in tensors.items() if k.startswith("method.")},
                                     info.get("method", {}))
        rng = _join_state(info["rng"], tensors)
        torch.set_rng_state(rng["torch_cpu"])
        if torch.cuda.is_available():
            states = [rng[k] for k in sorted(rng) if k.startswith("torch_cuda_")]
            if states:
                torch.cuda.set_rng_state_all(states)
        if self.extra_state is not None:
            self.extra_state.load({k[6:]: v for k, v in tensors.items() if k.startswith("extra.")},
                                  info.get("extra", {}))

    # ---- the loop ---------------------------------------------------------------------------
    def _average(self, key: str, value, weight: torch.Tensor) -> None:
        """Add `value` (weight 1, or 0 to leave it out) to the window's mean of `key`, on the device:
        read only when a row is logged, so the step never waits for the GPU to report a number."""
        value = torch.as_tensor(value, dtype=torch.float32, device=weight.device).detach().float()
        self._sums[key] = self._sums.get(key, 0.0) + torch.where(weight > 0, value, torch.zeros_like(value))
        self._counts[key] = self._counts.get(key, 0.0) + weight

    def _record(self, batch: Batch, per_example: torch.Tensor, weight: torch.Tensor) -> None:
        """The loss by source and by training-grid position, summed on the device."""
        values = torch.where(weight > 0, per_example.detach().float(), torch.zeros((), device=per_example.device))
        for source in sorted(set(batch.source)):  # the sources are host lists: no device read
            mask = torch.tensor([s == source for s in batch.source], device=values.device)
            self._sums[f"loss/{source}"] = self._sums.get(f"loss/{source}", 0.0) + (values * mask).sum()
            self._counts[f"loss/{source}"] = self._counts.get(f"loss/{source}", 0.0) + mask.sum() * weight
        t_index = batch.t_index.to(values.device)
        on_grid = (t_index >= 0) & (t_index < T_BINS)
        where = t_index.clamp(0, T_BINS - 1)
        self._t_sums = self._t_sums.index_add(0, where, values * on_grid)
        self._t_counts = self._t_counts.index_add(0, where, on_grid.float() * weight)

    def _window_means(self) -> dict[str, float]:
        """The window's means, read from the device once per logged row; then cleared."""
        means = {k: float(self._sums[k] / self._counts[k]) for k in sorted(self._sums)
                 if float(self._counts[k]) > 0}
        means.update({f"loss/t{i}": float(s / c) for i, (s, c) in
                      enumerate(zip(self._t_sums.tolist(), self._t_counts.tolist())) if c > 0})
        self._sums.clear()
        self._counts.clear()
        self._t_sums.zero_()
        self._t_counts.zero_()
        return means

    def _step(self, group: _Group, update: int) -> "StepResult":
        """One optimiser step of `group` over grad_accum micro-batches.

        Every rank runs backward on every micro-batch, a non-finite loss included: DDP's
        all-reduce then carries the NaN into every rank's gradients, so every rank sees the same
        non-finite norm and skips the same update (a rank that skipped backward alone left the
        others waiting in the all-reduce). Whether the loss was finite is reduced across ranks
        on the device; the step reads one flag from the device, once."""
        cfg, acc = self.config, self.accelerator
        is_primary = group.primary
        group.optimizer.zero_grad(set_to_none=True)  # also drops what another group's loss left here
        loss_ok = torch.ones((), device=acc.device)
        for micro in range(cfg.grad_accum):
            batch = self.make_batch(update)
            sync = micro == cfg.grad_accum - 1
            contexts = [acc.no_sync(m) for m in group.wrapped.values()] \
                if not sync and acc.num_processes > 1 else []
            with ExitStack() as stack:
                for ctx in contexts:
                    stack.enter_context(ctx)
                with acc.autocast():
                    per_example, metrics = _loss_and_metrics(self.method.loss(group.name, self.nets, batch))
                    loss = per_example.mean() / cfg.grad_accum
                finite = torch.isfinite(loss.detach()).float()
                loss_ok = loss_ok * finite
                acc.backward(loss)
            self._average("loss" if is_primary else f"loss/{group.name}", per_example.detach().float().mean(), finite)
            for key, value in metrics.items():
                self._average(key, value, finite)
            if is_primary:
                self._record(batch, per_example, finite)
                for observe in self.loss_observers:
                    observe(batch, per_example.detach())
                self._window_samples += len(batch) * acc.num_processes
        if acc.num_processes > 1:
            loss_ok = acc.reduce(loss_ok, reduction="sum") == acc.num_processes
        grad_norm = acc.clip_grad_norm_(group.params, cfg.max_grad_norm)
        ok = torch.as_tensor(grad_norm, device=acc.device).isfinite() & (loss_ok > 0)
        loss_ok, stepped = torch.stack([loss_ok > 0, ok]).tolist()  # the step's one read from the device
        if stepped or acc.scaler is not None:
            # with fp16's GradScaler always: it skips an overflowing step itself, and only its
            # update() (inside step()) lets the next clip unscale again
            group.optimizer.step()
        if stepped:
            group.scheduler.step()
        scaler_skip = not stepped and loss_ok and acc.scaler is not None
        self.state.scaler_skipped += int(scaler_skip)
        group.optimizer.zero_grad(set_to_none=True)
        if not is_primary:
            self._average(f"grad_norm/{group.name}", grad_norm, ok.float())
        return StepResult(stepped, not stepped and not scaler_skip, grad_norm)

    def run(self) -> TrainState:
        cfg, acc, state = self.config, self.accelerator, self.state
        task = None
        if self.progress is not None and acc.is_main_process:
            task = self.progress.add_task(self.phase, total=cfg.max_updates, completed=state.update)
        window_start, window_updates = time.perf_counter(), 0
        self._window_samples = 0
        while state.update < cfg.max_updates:
            for every, hook in self.hooks:
                if every > 0 and state.update % every == 0:
                    state.collect_seconds += hook(state.update)
            step_start = time.perf_counter()
            nonfinite = False
            for group in self.groups[1:]:  # auxiliary networks first (DMD2's critic follows the generator)
                for _ in range(group.steps_per_update):
                    nonfinite = self._step(group, state.update).nonfinite or nonfinite
            primary = self._step(self.primary, state.update)
            grad_norm = primary.grad_norm
            if primary.stepped:
                if self.ema is not None:
                    self.ema.step(self.primary.trained(self.published))
                self.method.after_update(self.nets)
            if primary.nonfinite or nonfinite:
                state.nonfinite_total += 1
                state.nonfinite_in_row += 1
            else:
                state.nonfinite_in_row = 0
            state.update += 1
            state.train_seconds += time.perf_counter() - step_start
            window_updates += 1
            if task is not None:
                self.progress.update(task, completed=state.update)
            if state.nonfinite_in_row >= cfg.max_nonfinite:
                raise NonFiniteLoss(
                    f"the loss was non-finite for {state.nonfinite_in_row} updates in a row (update "
                    f"{state.update}, phase {self.phase}); {NONFINITE_FIX}; {self._last_checkpoint_words()}")
            if state.update % cfg.log_every == 0 or state.update == cfg.max_updates:
                elapsed = time.perf_counter() - window_start
                row = {"phase": self.phase, "update": state.update,
                       "lr": self.primary.scheduler.get_last_lr()[0], "grad_norm": float(grad_norm),
                       "updates_per_s": window_updates / elapsed, "samples_per_s": self._window_samples / elapsed,
                       "nonfinite_skipped": state.nonfinite_total, "scaler_skipped": state.scaler_skipped,
                       "collect_share": state.collect_seconds / max(1e-9, state.collect_seconds + state.train_seconds),
                       **{f"lr/{g.name}": g.scheduler.get_last_lr()[0] for g in self.groups[1:]},
                       **self._window_means()}
                row.setdefault("loss", float("nan"))
                window_start, window_updates, self._window_samples = time.perf_counter(), 0, 0
                if self.log is not None and acc.is_main_process:
                    self.log(row)
                acc.log({k: v for k, v in row.items() if isinstance(v, (int, float))}, step=state.update)
            if cfg.checkpoint_every and state.update % cfg.checkpoint_every == 0 and state.update < cfg.max_updates:
                self.save_checkpoint()
        return state

    @contextmanager
    def final_weights(self):
        """The published network (the student) with the weights to publish (the EMA's when EMA is
        on); the online weights are put back on exit, so a checkpoint taken later still holds them."""
        net = self.primary.raw[self.published]
        if self.ema is None:
            yield net
            return
        params = self.primary.trained(self.published)
        self.ema.store(params)
        self.ema.copy_to(params)
        try:
            yield net
        finally:
            self.ema.restore(params)


def list_checkpoints(checkpoint_dir: Path) -> list[Path]:
    """Complete checkpoints (state.json is written last), oldest first."""
    return sorted(p for p in Path(checkpoint_dir).glob(f"{CHECKPOINT_PREFIX}*")
                  if p.is_dir() and (p / "state.json").is_file())


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest readable checkpoint of a run folder (see newest_readable_checkpoint)."""
    return newest_readable_checkpoint(Path(run_dir) / "checkpoints")


def newest_readable_checkpoint(checkpoint_dir: Path) -> Path | None:
    """The newest readable checkpoint; a damaged newer one is skipped with a warning."""
    from ddil_cli.atomic import unreadable_file

    for path in reversed(list_checkpoints(checkpoint_dir)):
        problem = unreadable_file(path)
        if problem is None:
            return path
        warnings.warn(f"skipping checkpoint {path.name}: {problem}; resuming from an older one")
    return None


class MetricsLog:
    """metrics.jsonl, one JSON object per logging step, appended and flushed."""

    def __init__(self, path: Path):
        self.path = Path(path)

    def __call__(self, row: dict) -> None:
        with open(self.path, "a") as f:
            f.write(to_json(row) + "\n")  # strict JSON: a NaN loss is written as null


__all__ = ["CheckpointError", "MetricsLog", "NonFiniteLoss", "TrainConfig", "Trainer", "latest_checkpoint",
           "list_checkpoints", "newest_readable_checkpoint"]
