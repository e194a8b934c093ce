"""The run folder: resume checks, what a checkpoint keeps besides the networks, one writer at a
time, and a fresh run built beside --out, published (replacing an old run with --overwrite) at its
first checkpoint."""

from __future__ import annotations

import json
import os
import warnings
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, fields
from pathlib import Path

import torch

from ddil_cli.atomic import (build_beside, kept_if_interrupted, output_lock, recover_beside, unreadable_file,
                             write_json_atomic)
from ddil_cli.buffer.pool import ReplayPool
from ddil_cli.buffer.replay import FIFOPolicy, shard_of_key
from ddil_cli.errors import UserError
from ddil_cli.manifest import build_manifest, fingerprint
from ddil_cli.methods import METHODS
from ddil_cli.models.base import Denoiser
from ddil_cli.stages.distill.batches import InputAssembler
from ddil_cli.stages.distill.plan import DistillConfig, Plan
from ddil_cli.train import CheckpointError, latest_checkpoint


COMPATIBLE_KEYS = ("method", "teacher", "steps", "teacher_steps", "student_prediction", "options",
                   "lora_rank", "lora_alpha", "lora_targets")


def _run_config(run: Path) -> dict:
    """The config a distill run folder was started with (its manifest), checked to be one."""
    manifest_path = run / "manifest.json"
    if not manifest_path.is_file():
        raise UserError(f"--resume: {run} is not a ddil distill run (no manifest.json); check --out")
    try:
        manifest = json.loads(manifest_path.read_text())
        old = manifest["config"]
        if not isinstance(old, dict):
            raise TypeError("config is not a table")
        if manifest.get("stage") != "distill":
            raise UserError(f"--resume: {run} is not a ddil distill run (its manifest is a "
                            f"{manifest.get('stage')!r} output's); check --out")
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise UserError(f"--resume: {manifest_path} is damaged ({exc}); restore it, or start again with "
                        "--overwrite or another --out") from None
    return old


def _check_same_settings(cfg: DistillConfig, run: Path) -> None:
    old = _run_config(run)
    for key in COMPATIBLE_KEYS:
        then, now = old.get(key, {"options": {}, "lora_rank": 0}.get(key)), getattr(cfg, key)
        if key == "options":  # a method's budget options (PD's --stage-updates) may change
            then, now = _fixed_options(cfg.method, then), _fixed_options(cfg.method, now)
        if then != now:
            raise UserError(f"--resume: the run in {run} has {key}={then!r}, this command "
                            f"{now!r}; resume with the same settings or use another --out")
    _check_same_teacher_files(cfg, run)


def _fixed_options(method: str, options: dict | None) -> dict:
    """The method options a resumed run must keep: all but those its method marks resumable."""
    free = {f.name for f in fields(METHODS[method].Options) if f.metadata.get("resumable")} \
        if method in METHODS else set()
    return {k: v for k, v in (options or {}).items() if k not in free}


def _check_same_teacher_files(cfg: DistillConfig, run: Path) -> None:
    """The same --teacher by content too: another model put at the same path is another teacher."""
    try:
        recorded = json.loads((run / "manifest.json").read_text())["inputs"]["teacher"]["fingerprint"]
    except (OSError, ValueError, KeyError, TypeError):
        return  # an older manifest: the name check above is all there is
    if isinstance(recorded, str) and recorded != fingerprint(cfg.teacher):
        raise UserError(f"--resume: the files of --teacher {cfg.teacher} changed since the run in {run} started "
                        "(their fingerprint is not the one its manifest.json records); resume with the teacher "
                        "the run started with, or start a new --out")


def _check_checkpoint_fits(path: Path, plan: Plan) -> None:
    """A checkpoint resumes only a phase of this plan, within that phase's updates."""
    try:
        info = json.loads((path / "state.json").read_text())
        phase_name, update = info["phase"], int(info["train"]["update"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise UserError(f"--resume {path}: {path / 'state.json'} is not a checkpoint's state ({exc}); use "
                        "--resume latest or another checkpoint") from None
    phases = {p.name: p for p in plan.phases}
    if phase_name not in phases:
        raise UserError(f"--resume {path}: its phase {phase_name!r} is not one of this run's "
                        f"({', '.join(phases)}); it comes from another method or step layout: resume with the "
                        "flags that made it or start a new --out")
    if update > phases[phase_name].updates:
        raise UserError(f"--resume {path}: the checkpoint is at update {update} of phase {phase_name}, past this "
                        f"run's {phases[phase_name].updates} for it; raise --max-updates (or --stage-updates) "
                        "to at least the checkpoint's")


def check_resume(cfg: DistillConfig, run: Path, plan: Plan | None = None) -> Path | None:
    """The checkpoint to resume from (None: start fresh), after checking the run matches."""
    if cfg.resume is None:
        if run.is_dir() and any(run.iterdir()) and not cfg.overwrite:  # a file: refused as not writable
            raise UserError(f"run folder {run} already exists; pass --resume latest to continue it, "
                            "another --out, or --overwrite to start again")
        return None
    _check_same_settings(cfg, run)
    if cfg.resume == "latest":
        path = latest_checkpoint(run)
    else:
        path = Path(cfg.resume)
        if not (path / "state.json").is_file():
            raise UserError(f"--resume {path}: not a checkpoint folder (no state.json); use latest or "
                            f"a folder under {run / 'checkpoints'}")
        problem = unreadable_file(path)
        if problem is not None:
            raise UserError(f"--resume {path}: {problem}; use --resume latest (it skips damaged checkpoints) "
                            f"or another folder under {run / 'checkpoints'}")
        origin = path.absolute().parent.parent  # RUN/checkpoints/checkpoint-N
        if origin != run.absolute() and (origin / "manifest.json").is_file():
            _check_same_settings(cfg, origin)  # a checkpoint of another run: the same method and teacher
    if path is not None and plan is not None:
        _check_checkpoint_fits(path, plan)
    return path



class RunState:
    """What the Trainer checkpoints besides the networks: the pool, the batch RNG, data position.

    With `buffer_dir` (one process) the pool's states stay out of the checkpoint: each is in the
    run's own buffer shards or among the --buffer states the phase loads before it resumes, so a
    resume reads them back by key. The disk FIFO keeps every shard the pool or the latest
    checkpoint reads (the run's buffer/ may then hold up to about twice --buffer-size)."""

    def __init__(self, pool: ReplayPool, assembler: InputAssembler, timesteps: list[int], *,
                 buffer_dir: Path | None = None, fifo: FIFOPolicy | None = None):
        self.pool, self.assembler, self.timesteps = pool, assembler, timesteps
        self.buffer_dir = buffer_dir
        self._checkpointed: set[str] = set()  # the shards the latest checkpoint reads
        if buffer_dir is not None and fifo is not None:
            fifo.pinned = lambda: self._checkpointed | self._shards(self.pool.keys)

    def state(self):
        tensors, info = self.pool.state()
        if self.buffer_dir is not None:
            tensors.pop("states", None)
            info["states"] = "shards"
            self._checkpointed = self._shards(self.pool.keys)
        tensors = {f"pool.{k}": v for k, v in tensors.items()}
        tensors["generator"] = self.assembler.generator.get_state()
        data = self.assembler.data
        return tensors, {"pool": info, "data_index": self.assembler.data_index,
                         "data_stream": data.state() if data is not None else None}

    def load(self, tensors, info):
        pool = {k[5:]: v for k, v in tensors.items() if k.startswith("pool.")}
        if info["pool"].get("states") == "shards" and info["pool"]["keys"]:
            pool["states"] = self._states_by_key(info["pool"]["keys"])
        self.pool.load(pool, info["pool"], timesteps=self.timesteps)
        self.assembler.generator.set_state(tensors["generator"])
        self.assembler.data_index = info["data_index"]
        if self.assembler.data is not None:
            self.assembler.data.load_state(info.get("data_stream"))

    @staticmethod
    def _shards(keys) -> set[str]:
        """Shard names of pool keys ('steps-N/KEY' in a multi-grid phase; the FIFO sees bare names)."""
        return {shard_of_key(k.rpartition("/")[2]) for k in keys}

    def _states_by_key(self, keys: list[str]) -> torch.Tensor:
        """The states of `keys`, in order: the pool's own (--buffer's), the rest from the run's shards."""
        from ddil_cli.buffer.reader import BufferReader

        found = dict(zip(self.pool.keys, self.pool.states)) if self.pool.states is not None else {}
        by_folder: dict[str, dict[str, str]] = {}  # subfolder -> bare key -> pool key
        for key in keys:
            if key not in found:
                folder, _, bare = key.rpartition("/")
                by_folder.setdefault(folder, {})[bare] = key
        for folder, wanted in by_folder.items():
            paths = [str(self.buffer_dir / folder / name) for name in sorted(self._shards(wanted))
                     if (self.buffer_dir / folder / name).is_file()]
            for sample in BufferReader(paths, shuffle=0, split_by_node=False, split_by_worker=False) if paths else ():
                if sample.key in wanted:
                    found[wanted[sample.key]] = sample.state.to(torch.float16)
        missing = [k for k in keys if k not in found]
        if missing:
            raise CheckpointError(f"{len(missing)} replay states this checkpoint reads (e.g. {missing[0]}) are no "
                                  f"longer in {self.buffer_dir}; resume from the latest checkpoint, or start again")
        return torch.stack([found[k] for k in keys])


def _what_a_run_kept(run: Path, published: bool = True) -> str:
    checkpoint = latest_checkpoint(run) if published and run.is_dir() else None
    if checkpoint is None:
        return f"no checkpoint yet, so {run} is as it was before this command"
    return f"the checkpoint {checkpoint}; continue with the same flags plus --resume latest"


@contextmanager
def one_writer(run: Path, accelerator):
    """The run's output lock (main process; every command takes it on its --out), after cleaning
    what a killed run left beside it (a resume, too, may find an old run to put back). The other
    processes of a launch wait for that before they look at the run."""
    main = accelerator.is_main_process
    with output_lock(run, "ddil distill") if main else nullcontext():
        for done in recover_beside(run) if main else []:
            warnings.warn(done)
        accelerator.wait_for_everyone()
        yield


@contextmanager
def run_folder(run: Path, *, fresh: bool, overwrite: bool, accelerator, progress=None):
    """(the folder the run writes, what to call at each checkpoint). A fresh run builds beside --out
    and appears there (replacing an old run with --overwrite) at its first checkpoint, so a failed
    or interrupted start leaves --out as it was (atomic.build_beside); a resume trains in place."""
    if not fresh:
        with kept_if_interrupted(lambda: _what_a_run_kept(run)):
            yield run, None
        return
    with build_beside(run, replace=overwrite, main=accelerator.is_main_process,
                      barrier=accelerator.wait_for_everyone) as building, \
            kept_if_interrupted(lambda: _what_a_run_kept(run, building.published)):
        if progress is not None and not progress.disable and accelerator.is_main_process:
            progress.console.print(f"building the run in {building.path}; it appears at {run} at its first "
                                   "checkpoint", markup=False, highlight=False)
        yield building.path, building.publish


def check_writable(run: Path) -> None:
    existing = next((p for p in [run, *run.absolute().parents] if p.exists()), Path("/"))
    if not os.access(existing, os.W_OK | os.X_OK) or (existing == run and not run.is_dir()):
        raise UserError(f"cannot write to {run} ({existing} is not a writable folder); choose a writable --out")


def checkpoint_phase(checkpoint: Path | None) -> str | None:
    """The phase a checkpoint resumes (None: no checkpoint, or not a checkpoint's state, whose
    problem load_checkpoint names)."""
    if checkpoint is None:
        return None
    info = json.loads((checkpoint / "state.json").read_text())
    return info.get("phase") if isinstance(info, dict) else None


def write_run_manifest(cfg: DistillConfig, run: Path, plan: Plan, teacher: Denoiser) -> None:
    write_json_atomic(run / "manifest.json", build_manifest(
        "distill", cfg, inputs={"teacher": cfg.teacher, "data": cfg.data, "prompts": cfg.prompts},
        extra={"phases": [p.describe() for p in plan.phases], "method_options": asdict(plan.options),
               "teacher_model": teacher.describe(),
               # resolved: the method's or the stage's defaults when the flags were not given
               "prior_schedule": plan.schedule.describe(),
               "student_prob": [{"start": s, "prob": v} for s, v in zip(plan.student_prob.starts,
                                                                       plan.student_prob.values)]}))
