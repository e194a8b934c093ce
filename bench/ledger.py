"""The memory and FLOP ledger of one distillation update at full size, counted on the meta device.

For SD 1.5, SSD-1B and SDXL (their configs in bench/configs/, no weights, no download) and each
method x {full fine-tuning, LoRA} x {fp32, bf16 frozen networks} x {AdamW, 8-bit AdamW} x
{gradient checkpointing off, on}: the bytes per role and the FLOPs of one update, and which
totals fit 24, 80 and 141 GB.

Roles: trained weights (fp32 master copies), gradients (fp32, of one network at a time), optimizer (AdamW: two fp32 moments,
8 B a parameter; 8-bit AdamW: 2 B), EMA / target (LCM's target network: a copy of what is trained),
frozen (the teacher UNet, the text encoders and the VAE; a LoRA student, LCM's target and a LoRA
critic are adapters on the teacher's one base, so the base is counted once) and activations (the
tensors autograd saves in one trained forward at the update's batch, with GPU memory-efficient
attention; under bf16 autocast counted at half). A full-size student or critic is a second and
third UNet in fp32. Not counted: the allocator's slack, CUDA context, the replay pool, a GAN head.

FLOPs come from torch's FlopCounterMode on meta tensors: a UNet forward, a trained forward and
backward (full or LoRA; checkpointing recomputes the forward) and a text-encoder forward at the
update's batch, combined by how many network calls each method makes per update:
  PD   teacher 2 DDIM steps x CFG 2 = 4 forwards, student 1 forward + backward
  LCM  teacher 1 solver step x CFG 2 = 2 forwards, target 1 forward, student 1 forward + backward
  DMD2 generator 1 forward + backward, teacher CFG 2 forwards, critic 1 forward; then per critic
       update: generator 1 forward, critic 1 forward + backward

    python bench/ledger.py                       # all three sizes, table to stdout
    python bench/ledger.py --sizes sdxl --batch 7 --critic-updates 10 --lora-rank 64
    python bench/ledger.py --sizes tiny --json out.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

CONFIGS = Path(__file__).resolve().parent / "configs"
# the modules diffusers' LCM-LoRA script (train_lcm_distill_lora_sd_wds.py) puts adapters on
LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2", "conv1",
                "conv2", "conv_shortcut", "downsamplers.0.conv", "upsamplers.0.conv", "time_emb_proj")
OPTIMIZER_BYTES = {"adamw": 8, "adamw8bit": 2}
FROZEN_BYTES = {"fp32": 4, "bf16": 2}
FITS_GB = (24, 80, 141)
METHODS = ("pd", "lcm", "dmd2")
GB = 1e9


def load_config(size: str) -> dict:
    path = Path(size) if size.endswith(".json") else CONFIGS / f"{size}.json"
    return json.loads(path.read_text())


# ---- meta networks ------------------------------------------------------------------------------
def meta_unet(config: dict, lora_rank: int = 0, lora_alpha: int | None = None):
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel(**config["unet"])
    if lora_rank:
        from peft import LoraConfig

        unet.requires_grad_(False)
        unet.add_adapter(LoraConfig(r=lora_rank, lora_alpha=lora_alpha or lora_rank,
                                    target_modules=list(LORA_TARGETS), init_lora_weights="gaussian"))
    return unet


def meta_text_encoders(config: dict) -> list:
    import transformers

    encoders = []
    for entry in config["text_encoders"]:
        fields = {k: v for k, v in entry.items() if k != "class"}
        with torch.device("meta"):
            encoders.append(getattr(transformers, entry["class"])(transformers.CLIPTextConfig(**fields)))
    return encoders


def meta_vae(config: dict):
    from diffusers import AutoencoderKL

    with torch.device("meta"):
        return AutoencoderKL(**config["vae"])


def num_params(module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


class _EfficientAttention(torch.autograd.Function):
    """SDPA as a GPU runs it in training (memory-efficient kernel): saves q, k, v, the output and
    the log-sum-exp, not the attention matrix that the meta device's math fallback would keep."""

    @staticmethod
    def forward(ctx, q, k, v):
        out, lse, seed, offset = torch.ops.aten._scaled_dot_product_efficient_attention(q, k, v, None, True)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.rng = (seed, offset)
        return out

    @staticmethod
    def backward(ctx, grad):
        q, k, v, out, lse = ctx.saved_tensors
        grads = torch.ops.aten._scaled_dot_product_efficient_attention_backward(
            grad.contiguous(), q, k, v, None, out, lse, *ctx.rng, 0.0, [True, True, True, False])
        return grads[0], grads[1], grads[2]


@contextlib.contextmanager
def efficient_attention():
    original = F.scaled_dot_product_attention

    def sdpa(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **kwargs):
        if attn_mask is None and not dropout_p and not is_causal and scale is None and not kwargs:
            return _EfficientAttention.apply(q, k, v)
        return original(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale, **kwargs)

    F.scaled_dot_product_attention = sdpa
    try:
        yield
    finally:
        F.scaled_dot_product_attention = original


def _unet_inputs(unet, config: dict, batch: int) -> dict:
    size, channels = unet.config.sample_size, unet.config.in_channels
    meta = dict(device="meta")
    kwargs = {"sample": torch.randn(batch, channels, size, size, **meta), "timestep": torch.full((batch,), 500, **meta),
              "encoder_hidden_states": torch.randn(batch, 77, unet.config.cross_attention_dim, **meta)}
    if unet.config.addition_embed_type == "text_time":
        pooled = config["text_encoders"][-1]["projection_dim"]
        kwargs["added_cond_kwargs"] = {"text_embeds": torch.randn(batch, pooled, **meta),
                                       "time_ids": torch.randn(batch, 6, **meta)}
    return kwargs


@dataclass
class NetworkCount:
    """One UNet's numbers at batch 1 (FLOPs and activations are linear in the batch)."""

    params: int  # the base UNet's
    trained: int  # what the optimizer holds: all of it, or the adapters
    forward_flops: int  # a forward without gradient (the base alone for a frozen call)
    train_flops: int  # a forward and backward of the trained network, no checkpointing
    activation_bytes: int  # saved for backward in fp32, no checkpointing
    activation_bytes_checkpointed: int


def count_unet(config: dict, lora_rank: int = 0) -> NetworkCount:
    from torch.utils.flop_counter import FlopCounterMode

    unet = meta_unet(config, lora_rank)
    inputs = _unet_inputs(unet, config, 1)
    with efficient_attention():
        with torch.no_grad(), FlopCounterMode(display=False) as frozen:
            if lora_rank:
                unet.disable_adapters()
            unet(**inputs)
            if lora_rank:
                unet.enable_adapters()
        unet.train()
        with FlopCounterMode(display=False) as trained:
            with _saved_bytes(unet) as saved:
                out = unet(**inputs).sample
            out.sum().backward()
        full = saved.total
        unet.enable_gradient_checkpointing()
        with _saved_bytes(unet) as checkpointed:
            unet(**inputs)
    return NetworkCount(num_params(unet) - num_params(unet, True) if lora_rank else num_params(unet),
                        num_params(unet, True), frozen.get_total_flops(), trained.get_total_flops(), full,
                        checkpointed.total)


class _saved_bytes(contextlib.ContextDecorator):
    """Bytes of the activations autograd saves inside (parameters, and views of them, excluded)."""

    def __init__(self, module):
        self.params = {id(p) for p in module.parameters()}
        self.total = 0

    def _pack(self, tensor):
        base = tensor._base if tensor._base is not None else tensor
        if id(tensor) not in self.params and id(base) not in self.params:
            self.total += tensor.numel() * tensor.element_size()
        return tensor

    def __enter__(self):
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc):
        self._hooks.__exit__(*exc)
        return False


def text_forward_flops(config: dict, batch: int) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    ids = torch.zeros(batch, 77, dtype=torch.long, device="meta")
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        for encoder in meta_text_encoders(config):
            encoder(ids)
    return counter.get_total_flops()


# ---- the ledger ---------------------------------------------------------------------------------
@dataclass
class Row:
    size: str
    method: str
    mode: str  # full | lora
    frozen: str  # fp32 | bf16
    optimizer: str
    checkpointing: bool
    batch: int
    trained_gb: float
    gradients_gb: float
    optimizer_gb: float
    ema_gb: float
    frozen_gb: float
    activations_gb: float
    total_gb: float
    tflops: float

    @property
    def fits(self) -> str:
        return "/".join(str(g) for g in FITS_GB if self.total_gb <= g) or "-"


@dataclass
class Sizes:
    """Everything one size's rows are made from."""

    name: str
    full: NetworkCount
    lora: NetworkCount
    text_params: int
    vae_params: int
    text_flops_per_prompt: float


def count_size(size: str, lora_rank: int) -> Sizes:
    config = load_config(size)
    return Sizes(config["name"], count_unet(config), count_unet(config, lora_rank),
                 sum(num_params(e) for e in meta_text_encoders(config)), num_params(meta_vae(config)),
                 text_forward_flops(config, 1))


def trained_networks(method: str) -> int:
    return 2 if method == "dmd2" else 1  # DMD2 trains the generator and the fake critic


def update_flops(method: str, net: NetworkCount, base: NetworkCount, batch: int, checkpointing: bool,
                 critic_updates: int) -> float:
    """One update's FLOPs at `batch` (see the module docstring for the calls)."""
    train = net.train_flops + (net.forward_flops if checkpointing else 0)
    frozen, own = base.forward_flops, net.forward_flops
    per_example = {"pd": 4 * frozen + train,
                   "lcm": 2 * frozen + own + train,
                   "dmd2": train + 2 * frozen + own + critic_updates * (own + train)}[method]
    return per_example * batch


def make_row(sizes: Sizes, method: str, mode: str, frozen: str, optimizer: str, checkpointing: bool,
             batch: int, critic_updates: int) -> Row:
    net = sizes.lora if mode == "lora" else sizes.full
    networks = trained_networks(method)
    trained = net.trained * networks
    ema = trained if method == "lcm" else 0
    frozen_params = sizes.full.params + sizes.text_params + sizes.vae_params  # the teacher's base, held once
    activations = (net.activation_bytes_checkpointed if checkpointing else net.activation_bytes) * batch
    activations *= 0.5 if frozen == "bf16" else 1.0  # bf16 autocast: the frozen dtype names the run's precision
    # gradients: one network's at a time (each optimizer step ends with zero_grad(set_to_none=True))
    roles = dict(trained_gb=4 * trained / GB, gradients_gb=4 * net.trained / GB,
                 optimizer_gb=OPTIMIZER_BYTES[optimizer] * trained / GB, ema_gb=4 * ema / GB,
                 frozen_gb=FROZEN_BYTES[frozen] * frozen_params / GB, activations_gb=activations / GB)
    flops = update_flops(method, net, sizes.full, batch, checkpointing, critic_updates)
    flops += sizes.text_flops_per_prompt * (batch + 1)  # the prompts and the empty one
    return Row(sizes.name, method, mode, frozen, optimizer, checkpointing, batch, **roles,
               total_gb=sum(roles.values()), tflops=flops / 1e12)


def ledger(sizes: Sizes, batch: int, critic_updates: int) -> list[Row]:
    return [make_row(sizes, method, mode, frozen, optimizer, checkpointing, batch, critic_updates)
            for method in METHODS for mode in ("full", "lora") for frozen in FROZEN_BYTES
            for optimizer in OPTIMIZER_BYTES for checkpointing in (False, True)]


def format_table(rows: list[Row]) -> str:
    head = ("| size | method | mode | frozen | optimizer | ckpt | batch | trained | grads | optim | EMA | frozen "
            "| activ. | total GB | TFLOP/update | fits (GB) |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        lines.append(f"| {r.size} | {r.method} | {r.mode} | {r.frozen} | {r.optimizer} | {'on' if r.checkpointing else 'off'} "
                     f"| {r.batch} | {r.trained_gb:.2f} | {r.gradients_gb:.2f} | {r.optimizer_gb:.2f} | {r.ema_gb:.2f} "
                     f"| {r.frozen_gb:.2f} | {r.activations_gb:.2f} | {r.total_gb:.1f} | {r.tflops:.1f} | {r.fits} |")
    return "\n".join(lines)


def main(argv=None) -> list[Row]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="sd15,ssd1b,sdxl", help="configs in bench/configs/ (or .json paths)")
    parser.add_argument("--batch", type=int, default=None, help="the update's batch (default: the config's)")
    parser.add_argument("--critic-updates", type=int, default=10)
    parser.add_argument("--lora-rank", type=int, default=64)
    parser.add_argument("--json", default=None, help="also write the rows and per-size counts here")
    args = parser.parse_args(argv)
    rows, counts = [], {}
    for size in args.sizes.split(","):
        sizes = count_size(size, args.lora_rank)
        counts[size] = asdict(sizes)
        batch = args.batch or load_config(size)["batch"]
        rows += ledger(sizes, batch, args.critic_updates)
        print(f"{sizes.name}: UNet {sizes.full.params / 1e9:.3f} B parameters, LoRA rank {args.lora_rank} "
              f"{sizes.lora.trained / 1e6:.1f} M, text encoders {sizes.text_params / 1e9:.3f} B, "
              f"VAE {sizes.vae_params / 1e6:.1f} M; UNet forward {sizes.full.forward_flops / 1e12:.3f} TFLOP/example")
    print(f"\nDMD2 with {args.critic_updates} critic updates per generator update; LoRA rank {args.lora_rank}")
    print(format_table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps({"counts": counts, "rows": [asdict(r) for r in rows]}, indent=1))
    return rows


if __name__ == "__main__":
    main()
