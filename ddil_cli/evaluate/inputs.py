"""What `ddil evaluate` reads: a `ddil sample` folder and a reference.

The sample folder's format is described in docs/architecture.md (`samples.jsonl` plus images or
the lab's `states.npy`). A reference is an image folder, webdataset shards, a statistics .npz
(clean-fid's `mu`/`sigma` or ours, which adds `features` and `meta`), or a Gaussian-mixture spec.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ddil_cli.errors import UserError
from ddil_cli.evaluate.images import ImageFolderSource, ShardSource, load_prepared, prepared_file_batches

@dataclass
class SampleSet:
    root: Path
    rows: list[dict]
    states: np.ndarray | None = None

    @property
    def kind(self) -> str:
        return "states" if self.states is not None else "images"

    @property
    def prompts(self) -> list[str]:
        return [r.get("prompt", "") for r in self.rows]

    def groups(self) -> dict[str, list[int]]:
        """Sample positions per prompt (ddil sample's prompt_index, else the prompt text)."""
        out: dict[str, list[int]] = {}
        for i, r in enumerate(self.rows):
            out.setdefault(str(r.get("prompt_index", r.get("prompt", ""))), []).append(i)
        return out

    def classes(self) -> np.ndarray | None:
        if not any("class" in r for r in self.rows):
            return None
        return np.array([int(r.get("class", -1)) for r in self.rows])

    def load(self, positions: list[int], res: int) -> np.ndarray:
        return np.stack([load_prepared(self.root / self.rows[i]["file"], res) for i in positions])

    def batches(self, res: int, batch_size: int):
        for positions, batch in self.prepared([res], batch_size):
            yield positions, batch[res]

    def prepared(self, resolutions, batch_size: int, workers: int = 0):
        """(positions, {resolution: images}) in order, each image file opened once."""
        return prepared_file_batches([self.root / r["file"] for r in self.rows], resolutions, batch_size, workers)

    def describe(self) -> dict:
        return {"path": str(self.root), "kind": self.kind, "num_samples": len(self.rows),
                "num_prompts": len(self.groups())}


def load_sample_set(folder: str) -> SampleSet:
    root = Path(folder)
    index = root / "samples.jsonl"
    if not index.is_file():
        raise UserError(f"--samples {root} has no samples.jsonl; pass a `ddil sample` output folder")
    from ddil_cli.atomic import from_json

    try:
        rows = [from_json(line) for line in index.read_text().splitlines() if line.strip()]
    except ValueError as exc:
        raise UserError(f"{index} is not valid JSON lines ({exc}); regenerate it with ddil sample") from None
    if not rows:
        raise UserError(f"{index} lists no samples")
    for number, row in enumerate(rows, 1):
        if not isinstance(row, dict):
            raise UserError(f"{index} line {number} is not a JSON object; regenerate it with ddil sample")
        if "file" in row and not isinstance(row["file"], str):
            raise UserError(f"{index} line {number}: its file must be text, got {row['file']!r}; regenerate it "
                            "with ddil sample")
        if "row" in row and (isinstance(row["row"], bool) or not isinstance(row["row"], int) or row["row"] < 0):
            raise UserError(f"{index} line {number}: its row must be a whole number >= 0, got {row['row']!r}; "
                            "regenerate it with ddil sample")
    if all(r.get("file") == "states.npy" for r in rows):
        try:
            states = np.load(root / "states.npy", allow_pickle=False)
            if states.ndim < 2:
                raise ValueError(f"an array of shape {states.shape}, not one state per row")
        except (OSError, ValueError, EOFError) as exc:
            raise UserError(f"{root / 'states.npy'} is unreadable ({' '.join(str(exc).split())}); "
                            "regenerate the folder with ddil sample") from None
        rows_idx = [int(r.get("row", i)) for i, r in enumerate(rows)]
        if max(rows_idx) >= len(states):
            raise UserError(f"{index} refers to row {max(rows_idx)} but states.npy has {len(states)} rows")
        picked = states[rows_idx]
        if not np.isfinite(picked).all():  # a diverged student's NaN states would score as 0.0
            raise UserError(f"{root / 'states.npy'} holds NaN or infinite states; they come from a diverged model: "
                            "sample again with a finite student")
        return SampleSet(root, rows, picked)
    missing = [r.get("file") for r in rows if not r.get("file") or not (root / r["file"]).is_file()]
    if missing:
        raise UserError(f"{len(missing)} sample image(s) listed in {index} are missing (first: {missing[0]}); "
                        "regenerate the folder with ddil sample")
    return SampleSet(root, rows)


class ImageReference:
    def __init__(self, source):
        self.source = source

    def describe(self) -> dict:
        return {**self.source.describe(), "manifest_hash": self.source.manifest_hash()}


def stats_problem(data) -> str | None:
    """What is wrong with the content of a statistics .npz (ours or clean-fid's), or None: mu a
    finite vector, sigma a finite square matrix of its size, features (ours) rows of that size,
    meta (ours) a JSON object."""
    mu, sigma = np.asarray(data["mu"]), np.asarray(data["sigma"])
    if mu.ndim != 1 or sigma.shape != (len(mu), len(mu)):
        return f"mu of shape {mu.shape} and sigma of shape {sigma.shape} are not a vector and its square matrix"
    if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
        return "mu or sigma hold NaN or infinite values"
    if "features" in data and (data["features"].ndim != 2 or data["features"].shape[1] != len(mu)):
        return f"features of shape {data['features'].shape} do not have mu's {len(mu)} columns"
    if "meta" in data:
        try:
            meta = json.loads(str(data["meta"]))
        except ValueError:
            meta = None
        if not isinstance(meta, dict):
            return "meta is not a JSON object"
    return None


class StatsReference:
    """A statistics .npz: clean-fid's (mu, sigma) or ours (+ features, + meta)."""

    def __init__(self, path: Path):
        self.path = path
        try:
            data = np.load(path, allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise UserError(f"--reference {path} is not a readable .npz ({exc})") from None
        if "mu" not in data or "sigma" not in data:
            raise UserError(f"--reference {path} holds no mu/sigma; pass statistics written by ddil evaluate "
                            "or clean-fid")
        problem = stats_problem(data)
        if problem is not None:
            raise UserError(f"--reference {path} is damaged: {problem}; pass statistics written by ddil evaluate "
                            "or clean-fid")
        self.mu, self.sigma = data["mu"], data["sigma"]
        self.features = data["features"] if "features" in data else None
        self.meta = json.loads(str(data["meta"])) if "meta" in data else {}

    @property
    def feature_space(self) -> str:
        return self.meta.get("feature_space", "inception")  # clean-fid files are Inception stats

    def describe(self) -> dict:
        return {"kind": "statistics", "path": str(self.path), "meta": self.meta or
                "clean-fid format (assumed clean-fid Inception; weights and resolution unverified)"}


class GMMReference:
    def __init__(self, spec: str):
        from ddil_cli.models.gmm import GaussianMixture, parse_gmm_spec

        try:
            self.spec = parse_gmm_spec(spec)
        except ValueError as exc:
            raise UserError(f"--reference: {exc}") from None
        self.mixture = GaussianMixture(self.spec)

    def describe(self) -> dict:
        return {"kind": "gaussian-mixture", "spec": str(self.spec)}


def resolve_reference(arg: str | None, limit: int | None):
    if arg is None:
        return None
    if arg.startswith("gmm:"):
        return GMMReference(arg)
    path = Path(arg)
    if path.suffix == ".npz" and path.is_file():
        return StatsReference(path)
    if path.suffix == ".tar" or any(ch in arg for ch in "*?[") or (path.is_dir() and any(path.glob("*.tar"))):
        return ImageReference(ShardSource.from_arg(arg, limit))
    if path.is_dir():
        return ImageReference(ImageFolderSource(path, limit))
    raise UserError(f"--reference {arg} not found; pass an image folder, webdataset .tar shards (file, folder "
                    "or glob), a statistics .npz, or a Gaussian-mixture spec such as gmm:ring:8")
