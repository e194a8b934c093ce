"""The embedded digits teacher (tiny pixel-space text-to-image models) and the digits classifier.

Teacher architecture (`make_unet`, `make_text_encoder`, `build_clip_tokenizer`, `make_scheduler`;
what `ddil teacher` trains):
- a diffusers `UNet2DConditionModel` in pixel space (no VAE), default 16x16, 1 channel
  (grayscale: the digits have no colour; decoding repeats the channel to RGB), cross-attention
  only in the lowest-resolution block and the mid block, where it is cheap on a CPU;
- a CLIP text encoder (`CLIPTextModel` from a small `CLIPTextConfig`, trained from scratch with
  the UNet) whose last hidden states are the UNet's `encoder_hidden_states`, as in Stable
  Diffusion;
- a real `CLIPTokenizer` built offline (`build_clip_tokenizer`): CLIP's byte-level BPE with a
  vocabulary of the 512 byte symbols plus BPE merges that spell every word of the training
  captions as one token; any other word falls back to characters, so no text is ever unknown.

The classifier (`DigitsClassifier`) is the lab's evaluator: its penultimate features are the
feature space for Frechet distance and precision/recall/density/coverage, and its agreement with
the digit a prompt names is the lab's prompt alignment (the analogue of CLIP score). It takes the
teacher's own tensors: (B, 1, 16, 16) in [-1, 1].
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable, Sequence

import torch
from torch import nn

from ddil_cli.atomic import save_tensors_atomic, write_bytes_atomic, write_text_atomic
from ddil_cli.data.digits import DIGIT_WORDS, digit_from_prompt, digit_prompt  # noqa: F401 (re-exported)
from ddil_cli.errors import UserError

ASSETS = Path(__file__).resolve().parent.parent / "assets" / "digits"
TEACHER_PATH = ASSETS / "teacher"
CLASSIFIER_PATH = ASSETS / "classifier.safetensors"
CLASSIFIER_CONFIG_PATH = ASSETS / "classifier.json"
BOS, EOS = "<|startoftext|>", "<|endoftext|>"


# ---- tokenizer ------------------------------------------------------------------------------
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte -> printable unicode map (transformers 5 no longer exports it)."""
    printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("\u00a1"), ord("\u00ac") + 1))
                 + list(range(ord("\u00ae"), ord("\u00ff") + 1)))
    codes, extra = printable[:], 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            codes.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, codes)))


# Words as CLIP's pre-tokenizer sees them: runs of letters (lower-cased); digits are single tokens.
_WORD = re.compile(r"[^\W\d_]+")


def caption_words(captions: Iterable[str]) -> list[str]:
    """The distinct words of the captions, sorted (the tokenizer's whole-word vocabulary)."""
    return sorted({w for c in captions for w in _WORD.findall(c.lower())})


def write_clip_bpe_files(words: Sequence[str], folder: str | Path) -> tuple[Path, Path]:
    """vocab.json + merges.txt of a byte-level BPE in which every word in `words` is one token."""
    byte_map = bytes_to_unicode()
    symbols = list(byte_map.values())
    vocab: list[str] = symbols + [s + "</w>" for s in symbols]
    known, merges = set(vocab), []
    for word in words:
        pieces = [byte_map[b] for b in word.encode("utf-8")]
        pieces[-1] += "</w>"
        merged = pieces[0]
        for piece in pieces[1:]:
            rule = f"{merged} {piece}"
            merged += piece
            if merged not in known:
                known.add(merged)
                vocab.append(merged)
                merges.append(rule)
    vocab += [BOS, EOS]
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vocab_file, merges_file = folder / "vocab.json", folder / "merges.txt"
    write_bytes_atomic(vocab_file, json.dumps({tok: i for i, tok in enumerate(vocab)}, ensure_ascii=False).encode())
    write_bytes_atomic(merges_file, ("#version: 0.2\n" + "".join(m + "\n" for m in merges)).encode())
    return vocab_file, merges_file


def build_clip_tokenizer(captions: Iterable[str], folder: str | Path, max_length: int = 16):
    """A CLIPTokenizer whose vocabulary covers the captions' words, saved in `folder`.

    `model_max_length` must be set: pipelines pad to it (without it they overflow)."""
    from transformers import CLIPTokenizer

    vocab_file, merges_file = write_clip_bpe_files(caption_words(captions), folder)
    tokenizer = CLIPTokenizer(str(vocab_file), str(merges_file), model_max_length=max_length)
    tokenizer.save_pretrained(str(folder))
    return tokenizer


# ---- teacher ----------------------------------------------------------------------------------
@dataclass
class TeacherArch:
    """The knobs of a tiny pixel-space teacher (all written to the saved configs)."""

    resolution: int = 16
    channels: int = 1
    block_out_channels: tuple[int, ...] = (32, 64)
    layers_per_block: int = 2
    attention_heads: int = 4
    text_width: int = 64
    text_layers: int = 2
    text_heads: int = 4
    max_length: int = 16

    def __post_init__(self):
        self.block_out_channels = tuple(int(c) for c in self.block_out_channels)
        downsample = 2 ** (len(self.block_out_channels) - 1)
        if self.resolution % downsample:
            raise UserError(f"resolution {self.resolution} is not divisible by {downsample} "
                            f"({len(self.block_out_channels)} UNet levels); pick a multiple of {downsample}")
        if self.channels not in (1, 3):
            raise UserError(f"channels must be 1 (grayscale) or 3 (RGB), got {self.channels}")
        groups = min(32, *self.block_out_channels)
        if any(c % groups for c in self.block_out_channels):
            raise UserError(f"block channels {self.block_out_channels} must all be multiples of {groups}")


def make_unet(arch: TeacherArch):
    from diffusers import UNet2DConditionModel

    levels = len(arch.block_out_channels)
    # Cross-attention only at the lowest resolution (and the mid block): attention dominates CPU time.
    down = ["DownBlock2D"] * (levels - 1) + ["CrossAttnDownBlock2D"]
    up = ["CrossAttnUpBlock2D"] + ["UpBlock2D"] * (levels - 1)
    return UNet2DConditionModel(
        sample_size=arch.resolution, in_channels=arch.channels, out_channels=arch.channels,
        block_out_channels=arch.block_out_channels, down_block_types=tuple(down), up_block_types=tuple(up),
        layers_per_block=arch.layers_per_block, cross_attention_dim=arch.text_width,
        attention_head_dim=arch.attention_heads,  # diffusers' legacy name: the number of heads
        norm_num_groups=min(32, *arch.block_out_channels),
    )


def make_text_encoder(arch: TeacherArch, tokenizer):
    from transformers import CLIPTextConfig, CLIPTextModel

    config = CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=arch.text_width, intermediate_size=2 * arch.text_width,
        num_hidden_layers=arch.text_layers, num_attention_heads=arch.text_heads,
        max_position_embeddings=arch.max_length, projection_dim=arch.text_width,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return CLIPTextModel(config)


def make_scheduler(prediction_type: str = "v_prediction", beta_schedule: str = "squaredcos_cap_v2",
                   num_train_timesteps: int = 1000):
    """The teacher's DDIM config: no clipping (thresholding is ours to choose), trailing spacing
    (nested grids reach t = T-1), final step to clean data."""
    from diffusers import DDIMScheduler

    return DDIMScheduler(num_train_timesteps=num_train_timesteps, beta_schedule=beta_schedule,
                         prediction_type=prediction_type, clip_sample=False, set_alpha_to_one=True,
                         timestep_spacing="trailing", steps_offset=0)


def tokenize(tokenizer, prompts: Sequence[str]) -> torch.Tensor:
    return tokenizer(list(prompts), padding="max_length", max_length=tokenizer.model_max_length,
                     truncation=True, return_tensors="pt").input_ids


# ---- classifier -------------------------------------------------------------------------------
@dataclass
class ClassifierConfig:
    resolution: int = 16
    channels: int = 1
    widths: tuple[int, ...] = (32, 64)
    feature_dim: int = 128
    num_classes: int = 10


class DigitsClassifier(nn.Module):
    """Two conv stages (two 3x3 convs + 2x2 max-pool each), then the penultimate feature layer."""

    def __init__(self, config: ClassifierConfig = ClassifierConfig()):
        super().__init__()
        self.config = config
        layers, cin = [], config.channels
        for width in config.widths:
            layers += [nn.Conv2d(cin, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
                       nn.Conv2d(width, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(), nn.MaxPool2d(2)]
            cin = width
        self.trunk = nn.Sequential(*layers)
        side = config.resolution // 2 ** len(config.widths)
        self.feature = nn.Sequential(nn.Flatten(), nn.Dropout(0.3), nn.Linear(cin * side * side, config.feature_dim),
                                     nn.ReLU())
        self.head = nn.Linear(config.feature_dim, config.num_classes)

    def _check(self, x: torch.Tensor) -> torch.Tensor:
        c, r = self.config.channels, self.config.resolution
        if x.ndim != 4 or x.shape[2:] != (r, r):
            raise ValueError(f"classifier expects (B, C, {r}, {r}) in [-1, 1], got {tuple(x.shape)}")
        if x.shape[1] != c:
            # RGB renderings of grayscale states (or the reverse): average / repeat channels.
            x = x.mean(1, keepdim=True) if c == 1 else x.expand(-1, c, -1, -1)
        return x.float()

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate-layer features (B, feature_dim): the lab's feature space."""
        return self.feature(self.trunk(self._check(x)))

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))

    forward = logits


def save_classifier(model: DigitsClassifier, path: str | Path = CLASSIFIER_PATH, extra: dict | None = None) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_tensors_atomic({k: v.contiguous() for k, v in model.state_dict().items()}, path)
    config = {"config": asdict(model.config), **(extra or {})}
    write_text_atomic(path.with_suffix(".json"), json.dumps(config, indent=2) + "\n")


def load_digits_classifier(path: str | Path = CLASSIFIER_PATH, device: str | torch.device = "cpu") -> DigitsClassifier:
    """The shipped (or a given) classifier, in eval mode."""
    from safetensors.torch import load_file

    path = Path(path)
    config_path = path.with_suffix(".json")
    if not path.is_file() or not config_path.is_file():
        raise UserError(f"digits classifier not found at {path} (+ .json); reinstall the package or train one "
                        f"with `python -m ddil_cli.scripts.train_digits_classifier`")
    raw = json.loads(config_path.read_text())["config"]
    raw["widths"] = tuple(raw["widths"])
    model = DigitsClassifier(ClassifierConfig(**raw))
    model.load_state_dict(load_file(str(path)))
    return model.to(device).eval()


@torch.no_grad()
def classify(images: torch.Tensor, classifier: DigitsClassifier | None = None, batch_size: int = 512) -> torch.Tensor:
    """Predicted digit per image ((B, C, 16, 16) in [-1, 1])."""
    classifier = classifier or load_digits_classifier()
    device = next(classifier.parameters()).device
    return torch.cat([classifier.logits(images[i:i + batch_size].to(device)).argmax(1).cpu()
                      for i in range(0, len(images), batch_size)])


def prompt_alignment(images: torch.Tensor, prompts: Sequence[str], classifier: DigitsClassifier | None = None) -> float:
    """Fraction of images the classifier reads as the digit their prompt names (the lab's CLIP score)."""
    if len(images) != len(prompts):
        raise ValueError(f"{len(images)} images but {len(prompts)} prompts")
    targets = [digit_from_prompt(p) for p in prompts]
    missing = [p for p, d in zip(prompts, targets) if d is None]
    if missing:
        raise UserError(f"prompt {missing[0]!r} names no single digit; prompt alignment needs prompts such as "
                        f"{digit_prompt(3)!r}")
    predicted = classify(images, classifier)
    return float((predicted == torch.tensor(targets)).float().mean())
