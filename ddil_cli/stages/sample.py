"""`ddil sample`: teacher, student and mixed generations on a shared grid, into one folder.

Samples are generated into a hidden work folder beside --out (`.NAME.sampling`), shared by every
process of a launch: whole batches of global indices are dealt round-robin to the processes, and
each sample's seed comes from its global index, so 1 and 8 processes write the same files. The
last process to finish turns the folder into the `ddil sample` format and renames it to --out;
until then --out is untouched. An interrupted run leaves the work folder: `--resume` finishes it,
generating only the samples not yet written.
"""

from __future__ import annotations

import fcntl
import json
import os
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Iterator

from ddil_cli.atomic import (disk_full_error, kept_if_interrupted, publish_folder, remove_path, writable_parent,
                             write_json_atomic)
from ddil_cli.errors import UserError
from ddil_cli.manifest import fingerprint
from ddil_cli.sample_folder import (SampleConfig, finish_folder, generate_part, is_complete, load_models, plan_sampling,
                               read_rows, sample_threshold, write_sample_folder)

LAUNCH_NAME = "launch.json"
# settings a resumed run may change: they do not change a single written file
RESUMABLE = ("device", "out", "quiet", "overwrite", "resume")


def run_sample(cfg: SampleConfig, work: Path, *, progress=None, models=None) -> dict:
    """Generate into the (empty, private) folder `work` in this one process. Returns a summary."""
    sample_threshold(cfg)  # a bad --threshold fails before any model is loaded
    teacher, student = models if models is not None else load_models(cfg, cfg.device)
    return write_sample_folder(cfg, work, teacher, student, progress=progress)


def work_folder(out: Path) -> Path:
    return out.absolute().parent / f".{out.name}.sampling"


@contextmanager
def folder_lock(folder: Path) -> Iterator[None]:
    """Exclusive lock on a folder (flock on the folder itself: no lock file left behind). The
    processes of one launch prepare and publish the shared work folder under it, one at a time."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def signature(cfg: SampleConfig, prompts: list[str]) -> dict:
    """What decides every file of the folder: a resumed run must agree on all of it."""
    values = {k: v for k, v in asdict(cfg).items() if k not in RESUMABLE and k not in ("prompt", "prompts")}
    return {**values, "prompts": prompts, "teacher_fingerprint": fingerprint(cfg.teacher),
            "student_fingerprint": fingerprint(cfg.student)}


def _check_out(out: Path, cfg: SampleConfig) -> Path:
    """The folder the work folder goes in, checked writable; --out checked free (or --overwrite)."""
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file; give a folder path")
    if out.exists() and any(out.iterdir()) and not cfg.overwrite:
        hint = "it is finished; nothing to resume" if (out / "samples.jsonl").is_file() and cfg.resume else \
            "choose another folder or pass --overwrite"
        raise UserError(f"--out {out} already exists and is not empty; {hint}")
    return writable_parent(out)


def _prepare(cfg: SampleConfig, out: Path, work: Path, wanted: dict, launch_key: str | None) -> None:
    """Create the work folder, join it (another process of this launch made it), or take up an
    interrupted run's (--resume); under the folder lock."""
    if work.is_dir():
        try:
            launch = json.loads((work / LAUNCH_NAME).read_text())
        except (OSError, ValueError):
            launch = {}
        if launch_key is not None and launch.get("launch") == launch_key:
            return
        if cfg.resume:
            had = launch.get("signature", {})
            changed = [k for k in wanted if had.get(k) != wanted[k]]
            if changed:
                raise UserError(f"--resume: the interrupted run into {out} had another {changed[0]} "
                                f"({str(had.get(changed[0]))[:80]}); resume with its settings, or pass --overwrite")
            write_json_atomic(work / LAUNCH_NAME, {**launch, "launch": launch_key})
            return
        if not cfg.overwrite:
            raise UserError(f"an interrupted ddil sample into {out} left {work}; pass --resume to finish it, "
                            "or --overwrite to start again")
        remove_path(work)
    elif cfg.resume:
        raise UserError(f"--resume: no interrupted ddil sample into {out} ({work} is absent); run without --resume")
    work.mkdir()
    try:
        write_json_atomic(work / LAUNCH_NAME, {"launch": launch_key, "signature": wanted})
    except BaseException:
        remove_path(work)
        raise


def sample_to_folder(cfg: SampleConfig, *, models=None, progress=None, rank: int = 0, world_size: int = 1,
                     launch_key: str | None = None) -> dict:
    """This process's share of `ddil sample` into `cfg.out` (see the module docstring). Returns
    {'written', 'seconds', 'published'} and, from the process that published, the folder's summary."""
    sample_threshold(cfg)
    teacher, student = models if models is not None else load_models(cfg, cfg.device)
    plan = plan_sampling(cfg, teacher, student)  # every check before anything is written
    out = Path(cfg.out)
    parent = _check_out(out, cfg)
    work = work_folder(out)
    with folder_lock(parent):
        _prepare(cfg, out, work, signature(cfg, plan.prompts), launch_key)
    def what_is_kept() -> str:  # what an interrupt leaves: the samples written, for --resume
        written = len(read_rows(work)) if work.is_dir() else 0
        return (f"the {written} samples written, in {work}; finish with the same command and --resume"
                if written else "nothing was written")
    try:
        with kept_if_interrupted(what_is_kept):
            generated = generate_part(cfg, work, teacher, student, part=rank, parts=world_size, progress=progress)
    except BaseException as exc:
        # a run that wrote nothing (bad input the models find, a full disk at the first file)
        # leaves nothing; one that wrote samples keeps its folder for --resume
        with folder_lock(parent):
            kept = len(read_rows(work)) if work.is_dir() else 0
            if work.is_dir() and not kept:
                remove_path(work)
        full = disk_full_error(exc)
        if full is not None and kept:
            raise UserError(f"{str(full).split(';')[0]}; free space, then finish with the same command and --resume "
                            f"(the {kept} samples written are kept in {work})") from None
        raise
    with folder_lock(parent):
        # the last process to finish publishes; one that finds --out published has nothing to do
        if not work.is_dir() or not is_complete(cfg, work, len(plan.prompts)):
            return {**generated, "published": False}
        summary = finish_folder(cfg, work, teacher, student, generated["seconds"])
        remove_path(work / LAUNCH_NAME)
        publish_folder(work, out, replace=True)
    return {**generated, **summary, "published": True}
