"""The one training loop for every method, on accelerate (ALGORITHMS.md sections 4-7).

Mixed precision, gradient accumulation and checkpointing, AdamW with warmup and linear decay,
optional EMA of the student, checkpoints with exact resume (safetensors + JSON only, never
pickle), a non-finite-loss guard, metrics.jsonl and accelerate trackers, and hooks that run
every K updates (the DAgger collection). A method supplies the loss; `make_batch` supplies the
inputs; the loop knows neither where inputs come from nor what the loss means.
"""

from __future__ import annotations

import json
import math
import shutil
import time
import warnings
from collections import defaultdict
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import load_file, save_file

from ddil_cli.errors import UserError
from ddil_cli.methods.base import Batch, DistillMethod

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


def lr_lambda(warmup: int, total: int) -> Callable[[int], float]:
    """Linear warmup to the base rate, then linear decay to 0 at `total`."""
    def factor(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        return max(0.0, (total - step) / max(1, total - warmup))
    return factor


@dataclass
class TrainState:
    update: int = 0
    nonfinite_total: int = 0
    nonfinite_in_row: int = 0
    samples_seen: int = 0
    collect_seconds: float = 0.0
    train_seconds: float = 0.0


class Trainer:
    """Owns the student's optimisation for one training phase (one PD stage, one LCM run...)."""

    def __init__(self, *, accelerator, method: DistillMethod, config: TrainConfig, run_dir: Path,
                 phase: str, make_batch: Callable[[int], Batch], hooks=(), extra_state=None,
                 progress=None, log: Callable[[dict], None] | None = None, update_offset: int = 0):
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
        net = method.student.network
        net.requires_grad_(True)
        net.train()
        params = [p for p in net.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(config.warmup, config.max_updates))
        self.net, self.optimizer, self.scheduler = accelerator.prepare(net, optimizer, scheduler)
        self.ema = EMAModel(params, decay=config.ema_decay) if config.ema_decay > 0 else None
        self.state = TrainState()
        self._sums = defaultdict(float)
        self._counts = defaultdict(int)

    # ---- checkpoints ------------------------------------------------------------------------
    @property
    def checkpoint_dir(self) -> Path:
        return self.run_dir / "checkpoints"

    def save_checkpoint(self) -> Path:
        """Everything a resumed run needs to continue exactly, under a temp name, then renamed."""
        acc = self.accelerator
        final = self.checkpoint_dir / f"{CHECKPOINT_PREFIX}{self.update_offset + self.state.update:08d}"
        if not acc.is_main_process:
            acc.wait_for_everyone()
            return final
        tmp = final.with_name("." + final.name + ".partial")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        net = acc.unwrap_model(self.net)
        save_file({k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}, str(tmp / "student.safetensors"))
        tensors, info = {}, {}
        _split_state(self.optimizer.state_dict(), "optimizer", tensors, info)
        if self.ema is not None:
            _split_state(self.ema.state_dict(), "ema", tensors, info)
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
        save_file(tensors, str(tmp / "state.safetensors"))
        info.update(phase=self.phase, train=asdict(self.state), scheduler=self.scheduler.state_dict(),
                    config=asdict(self.config))
        (tmp / "state.json").write_text(json.dumps(info))
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
        self._prune()
        acc.wait_for_everyone()
        return final

    def _prune(self) -> None:
        done = sorted(p for p in self.checkpoint_dir.glob(f"{CHECKPOINT_PREFIX}*") if p.is_dir())
        for old in done[:-self.config.keep_checkpoints] if self.config.keep_checkpoints > 0 else []:
            shutil.rmtree(old, ignore_errors=True)

    def load_checkpoint(self, path: Path) -> None:
        try:
            info = json.loads((path / "state.json").read_text())
            if not isinstance(info, dict):
                raise ValueError("not a JSON object")
            tensors = load_file(str(path / "state.safetensors"))
            student = load_file(str(path / "student.safetensors"))
        except Exception as exc:  # json, OS and safetensors errors: the checkpoint is damaged
            raise CheckpointError(f"checkpoint {path} is unreadable ({' '.join(str(exc).split())[:160]}); "
                                  "resume from another one (--resume latest skips damaged ones)") from None
        if info.get("phase") != self.phase:
            raise CheckpointError(f"checkpoint {path} belongs to phase {info.get('phase')!r}, not {self.phase!r}")
        net = self.accelerator.unwrap_model(self.net)
        try:
            net.load_state_dict(student)
        except RuntimeError:  # missing/unexpected keys or other shapes: another model's checkpoint
            raise CheckpointError(f"checkpoint {path} holds a student of another shape than this run's; "
                                  "resume with the settings that made it, or use another --out") from None
        try:
            self.optimizer.load_state_dict(_join_state(info["optimizer"], tensors))
            self.scheduler.load_state_dict(info["scheduler"])
            if self.ema is not None and "ema" in info:
                self.ema.load_state_dict(_join_state(info["ema"], tensors))
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
            self.state = TrainState(**info["train"])
        except (KeyError, TypeError, ValueError, RuntimeError) as exc:  # a state.json of another format
            raise CheckpointError(f"checkpoint {path} does not fit this run ({type(exc).__name__}: "
                                  f"{' '.join(str(exc).split())[:120]}); resume from another one or use another --out") from None

    # ---- the loop ---------------------------------------------------------------------------
    def _record(self, batch: Batch, per_example: torch.Tensor) -> None:
        values = per_example.detach().float().cpu()
        for value, source, t_idx in zip(values.tolist(), batch.source, batch.t_index.tolist()):
            for key in (f"loss/{source}", f"loss/t{t_idx}"):
                self._sums[key] += value
                self._counts[key] += 1

    def run(self) -> TrainState:
        cfg, acc, state = self.config, self.accelerator, self.state
        task = None
        if self.progress is not None and acc.is_main_process:
            task = self.progress.add_task(self.phase, total=cfg.max_updates, completed=state.update)
        window_start, window_updates, window_samples = time.perf_counter(), 0, 0
        while state.update < cfg.max_updates:
            for every, hook in self.hooks:
                if every > 0 and state.update % every == 0:
                    state.collect_seconds += hook(state.update)
            step_start = time.perf_counter()
            finite = True
            total_loss = 0.0
            aux = self.method.auxiliary_update(lambda: self.make_batch(state.update))
            for micro in range(cfg.grad_accum):
                batch = self.make_batch(state.update)
                sync = micro == cfg.grad_accum - 1
                ctx = acc.no_sync(self.net) if not sync and acc.num_processes > 1 else nullcontext()
                with ctx, acc.autocast():
                    per_example = self.method.loss(batch)
                    loss = per_example.mean() / cfg.grad_accum
                finite = finite and bool(torch.isfinite(loss.detach()).item())
                if finite:
                    acc.backward(loss)
                    total_loss += float(loss.detach())
                    self._record(batch, per_example)
                state.samples_seen += len(batch) * acc.num_processes
                window_samples += len(batch) * acc.num_processes
            finite_all = acc.gather(torch.tensor([float(finite)], device=acc.device)).min().item() > 0
            grad_norm = float("nan")
            if finite_all:
                grad_norm = float(acc.clip_grad_norm_(self.net.parameters(), cfg.max_grad_norm))
                finite_all = math.isfinite(grad_norm)
            if finite_all:
                self.optimizer.step()
                self.scheduler.step()
                if self.ema is not None:
                    self.ema.step(acc.unwrap_model(self.net).parameters())
                self.method.after_update()
                state.nonfinite_in_row = 0
            else:
                state.nonfinite_total += 1
                state.nonfinite_in_row += 1
            self.optimizer.zero_grad(set_to_none=True)
            state.update += 1
            state.train_seconds += time.perf_counter() - step_start
            window_updates += 1
            if task is not None:
                self.progress.update(task, completed=state.update)
            if state.nonfinite_in_row >= cfg.max_nonfinite:
                raise NonFiniteLoss(
                    f"the loss was non-finite for {state.nonfinite_in_row} updates in a row (update "
                    f"{state.update}, phase {self.phase}); lower --lr, add --threshold, or use "
                    f"--mixed-precision no; the last checkpoint is in {self.checkpoint_dir}")
            if state.update % cfg.log_every == 0 or state.update == cfg.max_updates:
                elapsed = time.perf_counter() - window_start
                row = {"phase": self.phase, "update": state.update, "loss": total_loss,
                       "lr": self.scheduler.get_last_lr()[0], "grad_norm": grad_norm,
                       "updates_per_s": window_updates / elapsed, "samples_per_s": window_samples / elapsed,
                       "nonfinite_skipped": state.nonfinite_total,
                       "collect_share": state.collect_seconds / max(1e-9, state.collect_seconds + state.train_seconds),
                       **{k: self._sums[k] / self._counts[k] for k in sorted(self._sums)}, **aux}
                self._sums.clear()
                self._counts.clear()
                window_start, window_updates, window_samples = time.perf_counter(), 0, 0
                if self.log is not None and acc.is_main_process:
                    self.log(row)
                acc.log({k: v for k, v in row.items() if isinstance(v, (int, float))}, step=state.update)
            if cfg.checkpoint_every and state.update % cfg.checkpoint_every == 0 and state.update < cfg.max_updates:
                self.save_checkpoint()
        return state

    def final_weights(self):
        """The network to save: the EMA weights when EMA is on."""
        net = self.accelerator.unwrap_model(self.net)
        if self.ema is not None:
            self.ema.copy_to(net.parameters())
        return net


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest readable checkpoint; a damaged newer one is skipped with a warning."""
    from ddil_cli.atomic import unreadable_file

    found = sorted(p for p in (Path(run_dir) / "checkpoints").glob(f"{CHECKPOINT_PREFIX}*")
                   if p.is_dir() and (p / "state.json").is_file())
    for path in reversed(found):
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
            f.write(json.dumps(row) + "\n")


__all__ = ["CheckpointError", "MetricsLog", "NonFiniteLoss", "TrainConfig", "Trainer", "latest_checkpoint"]
