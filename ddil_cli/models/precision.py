"""The dtype networks that are not trained are held and run in, and the GPU's matmul precision.

A teacher, a target and the text encoders are only ever run forward: on a GPU they are held in
bf16 (half the memory of fp32; bf16 has fp32's exponent range, so nothing overflows). On the CPU
they stay fp32: bf16 matmuls are slower there, and every recorded CPU result used fp32. The VAE
stays fp32 unless asked (a decoder in half precision shifts pixels; SDXL's overflows in fp16).
"""

from __future__ import annotations

from contextlib import nullcontext

import torch

from ddil_cli.errors import UserError

FROZEN_DTYPES = {"auto": None, "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def frozen_dtype(name: str, device) -> torch.dtype:
    """--frozen-dtype NAME on `device`: auto = bf16 on CUDA, fp32 elsewhere."""
    if name not in FROZEN_DTYPES:
        raise UserError(f"--frozen-dtype {name!r}: use {', '.join(FROZEN_DTYPES)}")
    dtype = FROZEN_DTYPES[name]
    if dtype is None:
        return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    return dtype


def enable_tf32(device) -> None:
    """TF32 matmuls and convolutions on CUDA (Ampere and later): fp32 training at tensor-core
    speed; torch leaves matmul TF32 off by default."""
    if torch.device(device).type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


def held_dtype(model) -> torch.dtype:
    """The dtype a Denoiser's network is held in (fp32 for one without weights: the lab teacher)."""
    network = getattr(model, "network", None)
    first = next(network.parameters(), None) if network is not None else None
    return first.dtype if first is not None else torch.float32


def frozen_autocast(device, dtype: torch.dtype):
    """Autocast for forward-only work (rollouts, sampling) when frozen networks are held below
    fp32, so a trained fp32 student taking rollout steps beside a bf16 teacher runs in bf16 too;
    nothing at fp32 (every CPU run: results unchanged)."""
    if dtype == torch.float32:
        return nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=dtype)
