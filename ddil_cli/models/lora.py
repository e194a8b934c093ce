"""LoRA students on one shared frozen base (peft, the library diffusers' own LoRA scripts use).

A LoRA student, LCM's EMA target and DMD2's fake critic are named adapters on the teacher's own
UNet: the frozen base is held once, and each Denoiser says which adapter it runs with
(`DiffusersDenoiser.adapter`; None: the base alone, i.e. the teacher). Which adapter a layer
applies is chosen per call (`active_adapters`) rather than with peft's `set_adapter` /
`disable_adapters`, which also flip `requires_grad` and would unfreeze or freeze the wrong weights.

A student is saved as diffusers saves one (pytorch_lora_weights.safetensors with its LoraConfig
in the metadata), so `pipe.load_lora_weights(folder)` on the teacher's pipeline loads it. A LoRA
cannot add layers: a LoRA student takes no guidance embedding, it learns the guided teacher in
one pass (at the run's w, or LCM-LoRA's average over --w-min..--w-max) and samples at guidance 1.
"""

from __future__ import annotations

import warnings
import weakref
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from ddil_cli.errors import UserError

LORA_FILE = "pytorch_lora_weights.safetensors"  # diffusers' LORA_WEIGHT_NAME_SAFE
# diffusers' LCM-LoRA script's targets (examples/consistency_distillation/train_lcm_distill_lora_sd_wds.py):
# attention projections, feed-forward, the ResNet convolutions, resamplers and time projections
DEFAULT_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2",
                   "conv1", "conv2", "conv_shortcut", "downsamplers.0.conv", "upsamplers.0.conv", "time_emb_proj")


@dataclass(frozen=True)
class LoraSpec:
    """--lora-rank, --lora-alpha (default: the rank, scale alpha / rank = 1) and --lora-targets."""

    rank: int
    alpha: float
    targets: tuple[str, ...] = DEFAULT_TARGETS

    @classmethod
    def parse(cls, rank: int, alpha: float | None, targets: str | None) -> "LoraSpec | None":
        if rank < 0:
            raise UserError(f"--lora-rank must be >= 0 (0: full fine-tuning), got {rank}")
        if alpha is not None and not alpha > 0:
            raise UserError(f"--lora-alpha must be > 0, got {alpha}")
        names = tuple(t.strip() for t in str(targets).split(",") if t.strip()) if targets else DEFAULT_TARGETS
        if not names:
            raise UserError(f"--lora-targets {targets!r}: give module names such as to_q,to_k,to_v,to_out.0")
        if rank == 0:
            if alpha is not None or targets:
                raise UserError("--lora-alpha and --lora-targets shape a LoRA student; add --lora-rank R (> 0)")
            return None
        return cls(int(rank), float(rank if alpha is None else alpha), names)

    def config(self):
        from peft import LoraConfig

        # gaussian A, zero B: the student starts equal to its base, as in diffusers' LoRA scripts
        return LoraConfig(r=self.rank, lora_alpha=self.alpha, target_modules=list(self.targets),
                          init_lora_weights="gaussian")

    def describe(self) -> dict:
        return {"rank": self.rank, "alpha": self.alpha, "targets": list(self.targets)}


_LAYERS: "weakref.WeakKeyDictionary[torch.nn.Module, tuple]" = weakref.WeakKeyDictionary()


def tuner_layers(module: torch.nn.Module) -> list:
    """The LoRA layers of `module`, found once per set of adapters (a walk of SD's UNet costs ~5 ms)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    key = tuple(adapter_names(module))
    cached = _LAYERS.get(module)
    if cached is None or cached[0] != key:
        cached = _LAYERS[module] = (key, [m for m in module.modules() if isinstance(m, BaseTunerLayer)])
    return cached[1]


def adapter_names(module: torch.nn.Module) -> list[str]:
    return list(getattr(module, "peft_config", {}) or {})


@contextmanager
def active_adapters(module: torch.nn.Module, names: list[str]):
    """Every LoRA layer of `module` applies exactly the adapters `names` inside (none: the base);
    the previous choice is put back after. requires_grad is left alone."""
    layers = tuner_layers(module) if adapter_names(module) else []
    saved = [(layer._active_adapter, layer._disable_adapters) for layer in layers]
    for layer in layers:
        layer._active_adapter, layer._disable_adapters = list(names), False
    try:
        yield
    finally:
        for layer, (active, disabled) in zip(layers, saved):
            layer._active_adapter, layer._disable_adapters = active, disabled


def adapter_parameters(module: torch.nn.Module, name: str) -> dict[str, torch.nn.Parameter]:
    """The parameters of adapter `name` (lora_A / lora_B ... of every layer), by full name."""
    params = {}
    for key, param in module.named_parameters():
        parts = key.split(".")
        if name in parts and any(p.startswith("lora_") for p in parts):
            params[key] = param
    return params


def trained_parameters(module: torch.nn.Module, adapter: str | None) -> dict[str, torch.nn.Parameter]:
    """What an optimiser trains in `module`: adapter `adapter`'s parameters, or all of them."""
    return adapter_parameters(module, adapter) if adapter else dict(module.named_parameters())


def trained_state(module: torch.nn.Module, adapter: str | None) -> dict[str, torch.Tensor]:
    """What a checkpoint keeps of `module`: the adapter's weights (no frozen base), or the state dict."""
    state = trained_parameters(module, adapter) if adapter else module.state_dict()
    return {k: v.detach().cpu().contiguous() for k, v in state.items()}


@torch.no_grad()
def load_trained_state(module: torch.nn.Module, adapter: str | None, state: dict[str, torch.Tensor]) -> None:
    """The inverse of trained_state; RuntimeError on other names or shapes (another run's checkpoint)."""
    if not adapter:
        module.load_state_dict(state)
        return
    params = adapter_parameters(module, adapter)
    if params.keys() != state.keys() or any(params[k].shape != state[k].shape for k in params):
        raise RuntimeError(f"adapter {adapter!r}: the checkpoint holds other LoRA weights")
    for key, param in params.items():
        param.copy_(state[key])


@contextmanager
def _several_adapters():
    """peft warns at every adapter after the first; several on one base is the point here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Already found a `peft_config`")
        yield


def add_adapter(module: torch.nn.Module, name: str, spec: LoraSpec, *, copy_from: str | None = None,
                trainable: bool = True) -> None:
    """Adapter `name` on `module` (replacing one of that name), its weights copied from adapter
    `copy_from` when given (the previous PD stage's student). Other adapters keep their flags."""
    if name in adapter_names(module):
        module.delete_adapters(name)
    flags = {k: p.requires_grad for k, p in module.named_parameters()}
    with _several_adapters():
        module.add_adapter(spec.config(), adapter_name=name)
    for key, param in module.named_parameters():  # peft's set_adapter flipped the others' flags
        if key in flags:
            param.requires_grad_(flags[key])
    new = adapter_parameters(module, name)
    for param in new.values():  # peft gives them the base's dtype: a bf16 base trains fp32 adapters
        param.data = param.data.float()
    if copy_from is not None:
        source = adapter_parameters(module, copy_from)
        swap = lambda key: ".".join(copy_from if p == name else p for p in key.split("."))
        with torch.no_grad():
            for key, param in new.items():
                param.copy_(source[swap(key)])
    for param in new.values():
        param.requires_grad_(trainable)


def ema_pairs(target: torch.nn.Module, target_adapter: str | None, online: torch.nn.Module,
              online_adapter: str | None) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(target, online) parameter pairs for an EMA: two adapters on one base, or two whole networks."""
    if not target_adapter:
        return list(zip(target.parameters(), online.parameters()))
    theirs = adapter_parameters(online, online_adapter)
    swap = lambda key: ".".join(online_adapter if p == target_adapter else p for p in key.split("."))
    return [(param, theirs[swap(key)]) for key, param in adapter_parameters(target, target_adapter).items()]


def save_lora(module: torch.nn.Module, adapter: str, path: Path) -> None:
    """pytorch_lora_weights.safetensors as diffusers' LoRA scripts write it (keys `unet.*`, the
    LoraConfig in the metadata, so alpha and targets load with it)."""
    from diffusers.loaders import StableDiffusionLoraLoaderMixin
    from peft.utils import get_peft_model_state_dict

    layers = get_peft_model_state_dict(module, adapter_name=adapter)
    StableDiffusionLoraLoaderMixin.save_lora_weights(
        str(path), unet_lora_layers={k: v.detach().float().cpu().contiguous() for k, v in layers.items()},
        unet_lora_adapter_metadata=module.peft_config[adapter].to_dict(), weight_name=LORA_FILE)


def load_lora(module: torch.nn.Module, folder: Path, adapter: str) -> None:
    """A saved LoRA student's weights as adapter `adapter` of `module` (frozen), through diffusers'
    own loader: what diffusers reads is what we run."""
    if adapter in adapter_names(module):
        module.delete_adapters(adapter)
    flags = {k: p.requires_grad for k, p in module.named_parameters()}
    with _several_adapters():
        module.load_lora_adapter(str(folder), prefix="unet", adapter_name=adapter, weight_name=LORA_FILE)
    for key, param in module.named_parameters():
        param.requires_grad_(flags.get(key, False))


def merged_copy(module: torch.nn.Module, adapter: str) -> torch.nn.Module:
    """A plain copy of `module` with adapter `adapter` folded into its weights (--merge-lora); the
    shared base itself is left as it is."""
    import copy

    merged = copy.deepcopy(module)
    others = [n for n in adapter_names(merged) if n != adapter]
    if others:
        merged.delete_adapters(others)
    merged.fuse_lora(adapter_names=[adapter])
    merged.unload_lora()
    return merged


def is_lora_folder(path: Path) -> bool:
    return (Path(path) / LORA_FILE).is_file() and not (Path(path) / "unet").is_dir()


__all__ = ["DEFAULT_TARGETS", "LORA_FILE", "LoraSpec", "active_adapters", "adapter_parameters", "add_adapter",
           "ema_pairs", "is_lora_folder", "load_lora", "load_trained_state", "merged_copy", "save_lora",
           "trained_parameters", "trained_state", "tuner_layers"]
