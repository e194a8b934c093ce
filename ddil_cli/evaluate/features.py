"""Feature extractors for `ddil evaluate`, all loaded from local files only.

Every extractor takes prepared uint8 images (B, H, W, 3) (see images.py) and returns float32
features (B, D). Weights never download: a missing file raises `WeightsUnavailable`, a
UserError whose message names the flag or path that enables the feature space, so the caller
can report the metric as unavailable and run the others.

Feature spaces (the registry maps a name to a factory `options -> FeatureExtractor`):
- `inception`: clean-fid's TorchScript InceptionV3 (pool3, 2048-d) behind its clean resize
  (PIL bicubic to 299 in float, no quantisation).
- `dinov2`: DINOv2 ViT-L/14 CLS token after the final norm (1024-d), input 224x224 PIL bicubic,
  ImageNet normalisation; through timm with a local file, or through a local torch.hub
  DINOv2 checkout. timm's route takes DINOv2's own position-embedding interpolation, so both
  routes give the same features.
- `clip`: OpenCLIP image embeddings (normalised), also used for the CLIP score.
- `embedded:NAME`: registered by the embedded lab's module (e.g. `embedded:digits`), see
  `register_feature_space`.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import math
import os
import platform
import tempfile
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image

from ddil_cli.atomic import to_json, write_text_atomic
from ddil_cli.errors import UserError

INCEPTION_FILENAME = "inception-2015-12-05.pt"
DINOV2_FILENAME = "dinov2_vitl14_pretrain.pth"
DINOV2_HUB_ENTRY = "dinov2_vitl14"
DINOV2_TIMM_NAME = "vit_large_patch14_dinov2"
DINOV2_RES = 224
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DEFAULT_CLIP_ARCH = "ViT-g-14"
# where open_clip's own download of the paper's ViT-g-14 weights would land in the HF cache
CLIP_HF_REPOS = {"ViT-g-14": "laion/CLIP-ViT-g-14-laion2B-s12B-b42K"}
CLIP_HF_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")


class WeightsUnavailable(UserError):
    """A feature space's weights are not on this machine; the message says how to provide them."""


@dataclass
class ExtractorOptions:
    device: str = "cpu"
    batch_size: int = 32
    inception: str | None = None        # file or folder holding inception-2015-12-05.pt
    dinov2: str | None = None           # DINOv2 checkpoint (original .pth or timm file)
    dinov2_repo: str | None = None      # local torch.hub DINOv2 checkout: use the hub route
    clip: str | None = None             # OpenCLIP checkpoint file for clip_arch
    clip_arch: str = DEFAULT_CLIP_ARCH
    lpips_backbone: str | None = None   # torchvision AlexNet state_dict
    digits_classifier: str | None = None  # embedded:digits classifier (default: the shipped one)
    cache_dir: str | None = None        # weights-hash memo and reference statistics
    # for tests and unusual checkpoints: extra timm kwargs for the DINOv2 model (e.g. tiny dims)
    dinov2_model_kwargs: dict = field(default_factory=dict)


def default_cache_dir() -> Path:
    root = os.environ.get("DDIL_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "ddil")
    return Path(root) / "evaluate"


def file_sha256(path: str | Path, cache_dir: str | Path | None = None) -> str:
    """sha256 of a weights file, memoised on disk by (path, size, mtime) since files are GBs."""
    path = Path(path).resolve()
    st = path.stat()
    key = f"{path}\t{st.st_size}\t{st.st_mtime_ns}"
    memo_file = Path(cache_dir or default_cache_dir()) / "weights_sha256.json"
    try:
        memo = json.loads(memo_file.read_text())
    except (OSError, ValueError):
        memo = {}
    if key in memo:
        return memo[key]
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    memo[key] = h.hexdigest()
    try:
        memo_file.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(memo_file, to_json(memo, indent=1))
    except OSError:
        pass  # a read-only cache only costs a re-hash next time
    return memo[key]


class FeatureExtractor(ABC):
    """Prepared uint8 images (B, H, W, 3) -> float32 features (B, D)."""

    name: str
    description: str
    input_kind: str = "images"  # or "states": the lab's raw samples (states.npy rows)
    eval_res: int | None = None  # a resolution the extractor needs (None: the run's --eval-res)

    def __init__(self, weights_path: str | Path | None, options: ExtractorOptions):
        self.options = options
        self.weights_path = str(weights_path) if weights_path is not None else None
        self._sha: str | None = None

    @property
    def weights_sha256(self) -> str | None:
        if self._sha is None and self.weights_path is not None and Path(self.weights_path).is_file():
            self._sha = file_sha256(self.weights_path, self.options.cache_dir)
        return self._sha

    def describe(self) -> dict:
        return {"feature_space": self.name, "description": self.description,
                "weights": self.weights_path, "weights_sha256": self.weights_sha256}

    @abstractmethod
    def features(self, batch: np.ndarray) -> np.ndarray:
        ...

    def features_of(self, batches) -> np.ndarray:
        return np.concatenate([self.features(b) for b in batches], 0)


def _to_nchw(batch: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(batch)).permute(0, 3, 1, 2)


# ------------------------------------------------------------------------------------------------
# clean-fid Inception

def default_inception_path() -> Path:
    # clean-fid's own download location (cleanfid.features.feature_extractor)
    return Path("./" if platform.system() == "Windows" else "/tmp") / INCEPTION_FILENAME


class InceptionExtractor(FeatureExtractor):
    name = "inception"
    description = "clean-fid InceptionV3 (TorchScript, pool3 2048-d), clean bicubic resize to 299"

    def __init__(self, options: ExtractorOptions):
        from cleanfid.inception_torchscript import InceptionV3W
        from cleanfid.resize import build_resizer

        path = Path(options.inception) if options.inception else default_inception_path()
        if path.is_dir():
            path = path / INCEPTION_FILENAME
        if not path.is_file():
            raise WeightsUnavailable(
                f"Inception weights not found at {path}; pass --inception PATH to a local "
                f"{INCEPTION_FILENAME} (https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/"
                f"metrics/{INCEPTION_FILENAME}) or place it at {default_inception_path()}")
        super().__init__(path, options)
        if path.name == INCEPTION_FILENAME:
            folder = str(path.parent)
        else:
            # InceptionV3W loads <folder>/inception-2015-12-05.pt: link a renamed file under that name
            folder = tempfile.mkdtemp(prefix="ddil-inception-")
            os.symlink(path.resolve(), os.path.join(folder, INCEPTION_FILENAME))
        self.model = InceptionV3W(folder, download=False).to(options.device).eval()
        self.resize = build_resizer("clean")

    @torch.no_grad()
    def features(self, batch: np.ndarray) -> np.ndarray:
        resized = np.stack([self.resize(img) for img in batch])  # float32 [0, 255], 299x299
        x = _to_nchw(resized).float().to(self.options.device)
        return self.model(x).double().cpu().numpy().astype(np.float32)


# ------------------------------------------------------------------------------------------------
# DINOv2

def default_dinov2_path() -> Path:
    # where torch.hub's own DINOv2 download would land
    return Path(torch.hub.get_dir()) / "checkpoints" / DINOV2_FILENAME


def dinov2_interpolate_pos_embed(pos_embed: torch.Tensor, grid: int) -> torch.Tensor:
    """DINOv2's interpolate_pos_encoding: bicubic, scale factor (grid + 0.1) / M, no antialias.

    The +0.1 offset and the scale-factor form (not an output size) decide the sampling
    positions, so features match the hub model only with exactly this call."""
    cls_pos, patch_pos = pos_embed[:, :1], pos_embed[:, 1:]
    m = int(math.isqrt(patch_pos.shape[1]))
    if m * m != patch_pos.shape[1]:
        raise ValueError(f"position embedding of {patch_pos.shape[1]} patches is not a square grid")
    if m == grid:
        return pos_embed
    dim = pos_embed.shape[-1]
    scale = (grid + 0.1) / m
    patch = torch.nn.functional.interpolate(
        patch_pos.float().reshape(1, m, m, dim).permute(0, 3, 1, 2), scale_factor=(scale, scale),
        mode="bicubic", antialias=False)
    if patch.shape[-2:] != (grid, grid):
        raise ValueError(f"interpolated grid {tuple(patch.shape[-2:])} != ({grid}, {grid})")
    patch = patch.permute(0, 2, 3, 1).reshape(1, grid * grid, dim)
    return torch.cat([cls_pos.float(), patch], 1).to(pos_embed.dtype)


def dinov2_preprocess(batch: np.ndarray) -> torch.Tensor:
    """uint8 (B, H, W, 3) -> normalised float (B, 3, 224, 224): PIL bicubic, no crop."""
    resized = np.stack([np.asarray(Image.fromarray(img).resize((DINOV2_RES, DINOV2_RES), Image.BICUBIC))
                        if img.shape[:2] != (DINOV2_RES, DINOV2_RES) else img for img in batch])
    x = _to_nchw(resized).float() / 255.0
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (x - mean) / std


class Dinov2Extractor(FeatureExtractor):
    name = "dinov2"

    def __init__(self, options: ExtractorOptions):
        path = Path(options.dinov2) if options.dinov2 else default_dinov2_path()
        if not path.is_file():
            raise WeightsUnavailable(
                f"DINOv2 weights not found at {path}; pass --dinov2 PATH to a local {DINOV2_FILENAME} "
                f"(https://dl.fbaipublicfiles.com/dinov2/dinov2_vitl14/{DINOV2_FILENAME}) "
                f"or place it at {default_dinov2_path()}")
        super().__init__(path, options)
        if options.dinov2_repo:
            self.route = "torch.hub"
            self.model = self._load_hub(Path(options.dinov2_repo), path)
        else:
            self.route = "timm"
            self.model = self._load_timm(path, options.dinov2_model_kwargs)
        self.model = self.model.to(options.device).eval()
        self.description = (f"DINOv2 ViT-L/14 CLS after final norm, {DINOV2_RES} bicubic, "
                            f"ImageNet normalisation ({self.route})")

    @staticmethod
    def _load_timm(path: Path, model_kwargs: dict) -> torch.nn.Module:
        import timm

        # loaded at its native 518 grid (no timm resampling), then resampled DINOv2's way
        model = timm.create_model(DINOV2_TIMM_NAME, pretrained=True, num_classes=0,
                                  pretrained_cfg_overlay=dict(file=str(path)), **model_kwargs)
        grid = DINOV2_RES // model.patch_embed.patch_size[0]
        with torch.no_grad():
            model.pos_embed = torch.nn.Parameter(dinov2_interpolate_pos_embed(model.pos_embed.data, grid))
        model.patch_embed.img_size = (DINOV2_RES, DINOV2_RES)
        model.patch_embed.grid_size = (grid, grid)
        model.patch_embed.num_patches = grid * grid
        return model

    @staticmethod
    def _load_hub(repo: Path, path: Path) -> torch.nn.Module:
        if not (repo / "hubconf.py").is_file():
            raise UserError(f"--dinov2-repo {repo} has no hubconf.py; pass a local clone of "
                            "facebookresearch/dinov2 or leave it out to use timm")
        model = torch.hub.load(str(repo), DINOV2_HUB_ENTRY, source="local", pretrained=False)
        state = torch.load(path, map_location="cpu", weights_only=True)
        model.load_state_dict(state.get("model", state) if isinstance(state, dict) else state)
        return model

    def describe(self) -> dict:
        return {**super().describe(), "route": self.route}

    @torch.no_grad()
    def features(self, batch: np.ndarray) -> np.ndarray:
        x = dinov2_preprocess(batch).to(self.options.device)
        return self.model(x).float().cpu().numpy()


# ------------------------------------------------------------------------------------------------
# OpenCLIP

def default_clip_path(arch: str) -> Path | None:
    """The paper's ViT-g-14 weights if open_clip's HF download already sits in the HF cache."""
    repo = CLIP_HF_REPOS.get(arch)
    if repo is None:
        return None
    from huggingface_hub import try_to_load_from_cache

    for filename in CLIP_HF_FILES:
        hit = try_to_load_from_cache(repo, filename)
        if isinstance(hit, str) and os.path.isfile(hit):
            return Path(hit)
    return None


class ClipModel:
    """OpenCLIP model + its eval transform + tokenizer, from a local checkpoint."""

    def __init__(self, options: ExtractorOptions):
        import open_clip

        arch = options.clip_arch
        path = Path(options.clip) if options.clip else default_clip_path(arch)
        if path is None or not path.is_file():
            raise WeightsUnavailable(
                f"OpenCLIP {arch} weights not found{f' at {path}' if path else ''}; pass --clip PATH "
                f"to a local checkpoint for --clip-arch {arch} (the paper uses ViT-g-14 "
                f"laion2b_s12b_b42k: open_clip_pytorch_model.bin from "
                f"huggingface.co/{CLIP_HF_REPOS[DEFAULT_CLIP_ARCH]})")
        if arch not in open_clip.list_models():
            raise UserError(f"unknown OpenCLIP architecture {arch!r}; pick one of open_clip.list_models()")
        self.arch, self.path, self.options = arch, path, options
        self.model, _, self.preprocess = open_clip.create_model_and_transforms(arch, pretrained=str(path),
                                                                              device=options.device)
        self.model.eval()
        self.tokenizer = open_clip.get_tokenizer(arch)

    @torch.no_grad()
    def image_embeddings(self, batch: np.ndarray) -> torch.Tensor:
        x = torch.stack([self.preprocess(Image.fromarray(img)) for img in batch]).to(self.options.device)
        return torch.nn.functional.normalize(self.model.encode_image(x).float(), dim=-1)

    @torch.no_grad()
    def text_embeddings(self, prompts: list[str]) -> torch.Tensor:
        tokens = self.tokenizer(prompts).to(self.options.device)
        return torch.nn.functional.normalize(self.model.encode_text(tokens).float(), dim=-1)


class ClipExtractor(FeatureExtractor):
    name = "clip"

    def __init__(self, options: ExtractorOptions, clip: ClipModel | None = None):
        self.clip = clip or ClipModel(options)
        super().__init__(self.clip.path, options)
        self.description = f"OpenCLIP {self.clip.arch} normalised image embedding"

    def describe(self) -> dict:
        return {**super().describe(), "arch": self.clip.arch}

    def features(self, batch: np.ndarray) -> np.ndarray:
        return self.clip.image_embeddings(batch).cpu().numpy()


# ------------------------------------------------------------------------------------------------
# registry

FeatureFactory = Callable[[ExtractorOptions], FeatureExtractor]
_FEATURE_SPACES: dict[str, FeatureFactory] = {
    "inception": InceptionExtractor,
    "dinov2": Dinov2Extractor,
    "clip": ClipExtractor,
}
# modules that register an embedded feature space when imported
EMBEDDED_PROVIDERS: dict[str, tuple[str, ...]] = {
    "embedded:digits": ("ddil_cli.evaluate.embedded",),
}


def register_feature_space(name: str, factory: FeatureFactory, *, replace: bool = False) -> None:
    """Make `--features NAME` available. `factory(options)` returns a FeatureExtractor (raise
    WeightsUnavailable when its weights are missing). An extractor may also define
    `prompt_alignment(batch, prompts) -> np.ndarray` (per-sample scores), the CLIP-score analogue,
    and `input_kind = "states"` to receive the lab's raw states instead of images."""
    if name in _FEATURE_SPACES and not replace:
        raise ValueError(f"feature space {name!r} is already registered")
    _FEATURE_SPACES[name] = factory


def feature_space_names() -> list[str]:
    return sorted(_FEATURE_SPACES)


def build_feature_extractor(name: str, options: ExtractorOptions) -> FeatureExtractor:
    if name not in _FEATURE_SPACES and name in EMBEDDED_PROVIDERS:
        for module in EMBEDDED_PROVIDERS[name]:
            try:
                importlib.import_module(module)
            except ModuleNotFoundError as exc:
                if exc.name and not module.startswith(exc.name) and exc.name != module:
                    raise  # the provider exists but one of its own imports is missing: a bug
                continue
            if name in _FEATURE_SPACES:
                break
    if name not in _FEATURE_SPACES:
        if name in EMBEDDED_PROVIDERS:
            raise WeightsUnavailable(
                f"feature space {name} is not available: no installed module registers it "
                f"(looked for {', '.join(EMBEDDED_PROVIDERS[name])}); it appears once the embedded lab's "
                f"module calls ddil_cli.evaluate.features.register_feature_space({name!r}, factory)")
        raise UserError(f"unknown feature space {name!r}; choose from {', '.join(feature_space_names())}")
    return _FEATURE_SPACES[name](options)
