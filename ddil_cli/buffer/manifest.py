"""The buffer manifest (`manifest.json`): what a replay buffer holds and who added it.

Schema (format "ddil-buffer", version 2; docs/buffer.md has the prose). Version 2 stores a record
of several states per webdataset sample (version 1: one state per sample); the manifest itself
is the same, so version 1 buffers are read as they are and become version 2 on the next append.
    format, version
    header:  state {shape, dtype, encoding}, teacher {spec, fingerprint, model}, grid {steps,
             teacher_steps, timesteps, num_train_timesteps}: fixed when the buffer is created;
             an append must match it (`check_compatible`)
    shards:  [{name, samples, bytes, sha256, run, rank, counts {source: {t: n}}}], oldest first
    counts:  totals recomputed from `shards` (total, by_source, by_timestep, by_source_timestep)
    runs:    [{run, created, command, config, versions, student_version, world_size,
              ranks {rank: {samples, shards, finished}}}]: the collect runs that added to it
    launches: {launch key: run} for multi-process launches still in progress
    dropped: {shards, samples}: what the FIFO bound has removed so far
    next_run: the next collect run's number
"""

from __future__ import annotations

import copy
import re
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ddil_cli.errors import UserError

if TYPE_CHECKING:
    from ddil_cli.models.base import Denoiser
    from ddil_cli.rollout import Grid

FORMAT = "ddil-buffer"
VERSION = 2
READABLE_VERSIONS = (1, 2)  # 1: one state per record; a writer appending to it upgrades it to 2
MANIFEST_NAME = "manifest.json"
PROMPTS_NAME = "prompts.json"
LOCK_NAME = ".lock"
SHARD_PATTERN = re.compile(r"^shard-(\d{4,})-(\d{3,})-(\d{6,})\.tar$")


def teacher_fingerprint(spec: str, teacher: "Denoiser") -> str:
    """How a buffer names the teacher it was collected with: the lab's normalised spec (gmm:ring:8
    and gmm:ring:8:d2 are one teacher), else the files of the model `spec` names."""
    from ddil_cli.manifest import fingerprint
    from ddil_cli.models import EMBEDDED

    lab_spec = getattr(teacher, "spec", None)
    if getattr(teacher, "mixture", None) is not None and lab_spec is not None:
        return fingerprint(str(lab_spec))
    return fingerprint(str(EMBEDDED.get(spec, spec)))


def check_collected_with(header: dict[str, Any], spec: str, teacher: "Denoiser", where: str) -> None:
    """UserError unless a buffer's states come from `teacher` (or, for a lab student, its teacher):
    states of another model of the same shape would train the student on someone else's path."""
    from ddil_cli.manifest import fingerprint

    if getattr(teacher, "teacher_fingerprints", None):
        return  # a diffusers student as teacher: its record names UNets, a buffer whole folders
    source = str(getattr(getattr(teacher, "config", None), "source", "") or "")
    accepted = {teacher_fingerprint(spec, teacher), *([fingerprint(source)] if source else [])}
    if header["teacher"]["fingerprint"] not in accepted:
        raise UserError(f"--buffer {where} was collected with teacher {header['teacher']['spec']!r}, not with "
                        f"--teacher {spec}; collect it with this teacher, or distil from that one")


def buffer_header(teacher: "Denoiser", spec: str, teacher_fingerprint: str, grid: "Grid") -> dict[str, Any]:
    """What every state in a buffer shares; an append must match it (`check_compatible`)."""
    return {"state": {"shape": list(teacher.state_shape), "dtype": "float16", "encoding": "npy"},
            "teacher": {"spec": spec, "fingerprint": teacher_fingerprint, "model": teacher.describe()},
            "grid": {"steps": grid.num_transitions, "teacher_steps": len(grid.teacher),
                     "timesteps": list(grid.student), "num_train_timesteps": teacher.schedule.num_train_timesteps}}


def shard_name(run: int, rank: int, index: int) -> str:
    """Disjoint per (run, rank): concurrent writers never pick the same name."""
    return f"shard-{run:04d}-{rank:03d}-{index:06d}.tar"


def parse_shard_name(name: str) -> tuple[int, int, int] | None:
    match = SHARD_PATTERN.match(name)
    return tuple(int(g) for g in match.groups()) if match else None


def new_manifest(header: dict[str, Any]) -> dict[str, Any]:
    return {"format": FORMAT, "version": VERSION, "header": copy.deepcopy(header), "shards": [],
            "counts": recount([]), "runs": [], "launches": {}, "dropped": {"shards": 0, "samples": 0},
            "next_run": 0}


def recount(shards: list[dict[str, Any]]) -> dict[str, Any]:
    """Totals from the per-shard counts, so dropping a shard keeps every count exact."""
    by_source, by_timestep = Counter(), Counter()
    by_source_timestep: dict[str, Counter] = {}
    for shard in shards:
        for source, per_t in shard["counts"].items():
            for t, n in per_t.items():
                by_source[source] += n
                by_timestep[str(t)] += n
                by_source_timestep.setdefault(source, Counter())[str(t)] += n
    return {"total": sum(s["samples"] for s in shards), "by_source": dict(sorted(by_source.items())),
            "by_timestep": dict(sorted(by_timestep.items(), key=lambda kv: -int(kv[0]))),
            "by_source_timestep": {s: dict(sorted(c.items(), key=lambda kv: -int(kv[0])))
                                   for s, c in sorted(by_source_timestep.items())}}


def check_manifest(manifest: Any, path: Path) -> dict[str, Any]:
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise UserError(f"{path} is not a ddil buffer manifest; point --out at a buffer folder or a new folder")
    if manifest.get("version") not in READABLE_VERSIONS:
        raise UserError(f"{path} is buffer format version {manifest.get('version')}, this ddil-cli reads "
                        f"versions {', '.join(map(str, READABLE_VERSIONS))}; upgrade ddil-cli or collect "
                        "into a new folder")
    problem = _manifest_problem(manifest)
    if problem is not None:
        raise UserError(f"{path} is damaged: {problem}; restore it or collect into a new folder")
    return manifest


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _manifest_problem(manifest: dict[str, Any]) -> str | None:
    """What in a manifest's content breaks the schema above (the fields readers and writers use)."""
    header = manifest.get("header")
    if not isinstance(header, dict):
        return "it has no header"
    state, teacher, grid = header.get("state"), header.get("teacher"), header.get("grid")
    if not (isinstance(state, dict) and isinstance(state.get("shape"), list) and state["shape"]
            and all(_is_count(n) and n > 0 for n in state["shape"])):
        return "header.state.shape is not a list of positive sizes"
    if not (isinstance(teacher, dict) and isinstance(teacher.get("spec"), str)
            and isinstance(teacher.get("fingerprint"), str)):
        return "header.teacher lacks its spec or fingerprint"
    if not (isinstance(grid, dict) and _is_count(grid.get("steps")) and isinstance(grid.get("timesteps"), list)
            and all(_is_count(t) for t in grid["timesteps"])):
        return "header.grid lacks its steps or timesteps"
    shards = manifest.get("shards")
    if not isinstance(shards, list):
        return f"shards is {shards!r}, not a list"
    for shard in shards:
        if not (isinstance(shard, dict) and isinstance(shard.get("name"), str) and _is_count(shard.get("samples"))
                and isinstance(shard.get("counts"), dict)):
            return f"the shard entry {str(shard)[:80]} lacks its name, samples or counts"
    if not (isinstance(manifest.get("runs", []), list) and _is_count(manifest.get("next_run", 0))):
        return "runs or next_run are not a list and a count"
    return None


def check_compatible(existing: dict[str, Any], header: dict[str, Any], where: Path) -> None:
    """An append must produce states the buffer's readers can mix with the old ones."""
    old = existing["header"]
    fix = "collect into a new --out folder (or delete this buffer)"
    if list(old["state"]["shape"]) != list(header["state"]["shape"]):
        raise UserError(f"buffer {where} holds states of shape {tuple(old['state']['shape'])} but this teacher "
                        f"makes {tuple(header['state']['shape'])}; {fix}")
    if old["teacher"]["fingerprint"] != header["teacher"]["fingerprint"]:
        raise UserError(f"buffer {where} was collected with teacher {old['teacher']['spec']!r}, not "
                        f"{header['teacher']['spec']!r}; {fix}")
    if list(old["grid"]["timesteps"]) != list(header["grid"]["timesteps"]):
        raise UserError(f"buffer {where} is on the {old['grid']['steps']}-step student grid, not "
                        f"{header['grid']['steps']} steps; pass --steps {old['grid']['steps']} or {fix}")


def add_shard(manifest: dict[str, Any], entry: dict[str, Any]) -> None:
    manifest["shards"].append(entry)
    manifest["counts"] = recount(manifest["shards"])


def drop_shards(manifest: dict[str, Any], names: set[str]) -> list[dict[str, Any]]:
    dropped = [s for s in manifest["shards"] if s["name"] in names]
    manifest["shards"] = [s for s in manifest["shards"] if s["name"] not in names]
    manifest["dropped"]["shards"] += len(dropped)
    manifest["dropped"]["samples"] += sum(s["samples"] for s in dropped)
    manifest["counts"] = recount(manifest["shards"])
    return dropped


def run_entry(manifest: dict[str, Any], run: int) -> dict[str, Any]:
    for entry in manifest["runs"]:
        if entry["run"] == run:
            return entry
    raise KeyError(run)
