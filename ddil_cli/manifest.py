"""Manifests: what made an output folder (command, resolved config, versions, input fingerprints)."""

from __future__ import annotations

import dataclasses
import hashlib
import os
import platform
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Any

from ddil_cli.atomic import write_json_atomic

_PACKAGES = ("ddil-cli", "torch", "diffusers", "transformers", "accelerate", "webdataset",
             "safetensors", "numpy", "clean-fid", "open_clip_torch", "lpips")
_HEAD_BYTES = 1 << 20


def versions() -> dict[str, str]:
    found = {"python": platform.python_version()}
    for name in _PACKAGES:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return found


def _file_digest(path: Path) -> str:
    """sha256 of a file; of its size and first/last MiB when larger than 64 MiB, so fingerprinting
    a multi-GB checkpoint stays fast (recorded as 'sha256-sampled')."""
    size = path.stat().st_size
    h = hashlib.sha256()
    with open(path, "rb") as f:
        if size <= 64 * _HEAD_BYTES:
            for block in iter(lambda: f.read(_HEAD_BYTES), b""):
                h.update(block)
            return "sha256:" + h.hexdigest()
        h.update(str(size).encode())
        h.update(f.read(_HEAD_BYTES))
        f.seek(-_HEAD_BYTES, os.SEEK_END)
        h.update(f.read(_HEAD_BYTES))
    return "sha256-sampled:" + h.hexdigest()


def fingerprint(source: str | os.PathLike | None) -> str | None:
    """A stable fingerprint of an input: a file, a folder (every file, by relative path), or a
    spec string (gmm:..., a hub id) hashed as text."""
    if source is None:
        return None
    path = Path(source)
    if path.is_file():
        return _file_digest(path)
    if path.is_dir():
        h = hashlib.sha256()
        for file in sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith(".")):
            h.update(str(file.relative_to(path)).encode())
            h.update(_file_digest(file).encode())
        return "dir-sha256:" + h.hexdigest()
    return "text-sha256:" + hashlib.sha256(str(source).encode()).hexdigest()


def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {k: _plain(v) for k, v in dataclasses.asdict(value).items()}
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    return value


def build_manifest(stage: str, config: Any, inputs: dict[str, Any] | None = None,
                   extra: dict[str, Any] | None = None) -> dict[str, Any]:
    return {
        "stage": stage,
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "config": _plain(config),
        "inputs": {name: {"source": _plain(src), "fingerprint": fingerprint(src)}
                   for name, src in (inputs or {}).items() if src is not None},
        "versions": versions(),
        **_plain(extra or {}),
    }


def write_manifest(folder: Path, stage: str, config: Any, inputs: dict[str, Any] | None = None,
                   extra: dict[str, Any] | None = None) -> dict[str, Any]:
    manifest = build_manifest(stage, config, inputs, extra)
    write_json_atomic(Path(folder) / "manifest.json", manifest)
    return manifest
