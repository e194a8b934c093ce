"""DMD2 memory and step time: peak accelerator memory and seconds per generator update (each with
`--critic-updates` critic steps) for random-weight UNets at SD1.5 and SDXL size, batch 1 and 7.

The networks are what a real run trains and holds: the generator and the critic (fp32 master
weights, AdamW each) and the frozen teacher, built from the architectures' configs with random
weights (no download). The text encoders are one-layer CLIP models of the right widths (they
only encode prompts and are not what the table measures). Each case runs the real DMD2 loss
through the real Trainer (accelerate, --mixed-precision, --gradient-checkpointing as given):
one warm-up update, then --updates timed ones.

    python bench/dmd2_memory.py --device cuda --mixed-precision bf16 --gradient-checkpointing
    python bench/dmd2_memory.py --sizes tiny --batches 1,2 --critic-updates 2 --updates 1   # CPU check
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent

UNETS = {
    # runwayml/stable-diffusion-v1-5 unet/config.json (the fields that differ from the defaults)
    "sd15": dict(sample_size=64, cross_attention_dim=768, attention_head_dim=8,
                 block_out_channels=(320, 640, 1280, 1280), layers_per_block=2),
    # stabilityai/stable-diffusion-xl-base-1.0 unet/config.json
    "sdxl": dict(sample_size=128, cross_attention_dim=2048, attention_head_dim=(5, 10, 20),
                 block_out_channels=(320, 640, 1280), layers_per_block=2, transformer_layers_per_block=(1, 2, 10),
                 down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                 use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
                 projection_class_embeddings_input_dim=2816),
    # the tests' tiny SD layout: to check the script on a CPU in seconds
    "tiny": dict(sample_size=8, cross_attention_dim=16, attention_head_dim=2, block_out_channels=(8, 16),
                 layers_per_block=1, norm_num_groups=4, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                 up_block_types=("UpBlock2D", "CrossAttnUpBlock2D")),
}
SCHEDULE = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                prediction_type="epsilon")


def teacher_for(size: str, device: str):
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from ddil_cli.models.diffusers_t2i import DiffusersDenoiser

    sys.path.insert(0, str(ROOT))
    from tests.tiny_models import MAX_TOKENS, tiny_tokenizer

    unet = UNet2DConditionModel(**UNETS[size]).to(device)
    unet.requires_grad_(False).eval()
    width = UNETS[size]["cross_attention_dim"]
    tokenizer = tiny_tokenizer()

    def text_config(hidden: int, **extra) -> CLIPTextConfig:
        heads = max(h for h in (1, 2, 4, 8) if hidden % h == 0)
        return CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden,
                              num_hidden_layers=1, num_attention_heads=heads, max_position_embeddings=MAX_TOKENS,
                              bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                              pad_token_id=tokenizer.pad_token_id, **extra)
    if UNETS[size].get("addition_embed_type") == "text_time":  # SDXL: 768 + 1280 wide, the second pooled
        encoders = {"text_encoder": CLIPTextModel(text_config(768)),
                    "text_encoder_2": CLIPTextModelWithProjection(text_config(width - 768, projection_dim=1280))}
        tokenizers = {"tokenizer": tokenizer, "tokenizer_2": tiny_tokenizer()}
    else:
        encoders = {"text_encoder": CLIPTextModel(text_config(width))}
        tokenizers = {"tokenizer": tokenizer}
    for encoder in encoders.values():
        encoder.to(device).requires_grad_(False).eval()
    # no VAE: training never decodes, and the UNet's latent shape is the state shape
    return DiffusersDenoiser(unet, text_encoders=encoders, tokenizers=tokenizers, vae=None,
                             scheduler_config=SCHEDULE, source=f"random {size}")


def run_case(size: str, batch: int, args) -> dict:
    from accelerate import Accelerator

    from ddil_cli.diffusion.threshold import Threshold
    from ddil_cli.methods.base import Batch
    from ddil_cli.methods.dmd2 import DMD2Method, DMD2Options
    from ddil_cli.train import TrainConfig, Trainer

    device = args.device
    accelerator = Accelerator(mixed_precision=args.mixed_precision, cpu=device == "cpu")
    teacher = teacher_for(size, device)
    options = DMD2Options(critic_updates=args.critic_updates)
    phase = DMD2Method.plan(_request(), teacher, options)[0]
    student = DMD2Method.make_student(teacher, phase, options, guidance_embedding=args.real_guidance != 1)
    if args.gradient_checkpointing:
        student.network.enable_gradient_checkpointing()
    method = DMD2Method(teacher=teacher, student=student, phase=phase, options=options, threshold=Threshold())
    cond = teacher.encode(["a photograph of a cat"] * batch)
    generator = torch.Generator().manual_seed(0)

    def make_batch(_update):
        t = torch.tensor(phase.timesteps)[torch.randint(len(phase.timesteps), (batch,), generator=generator)]
        x_t = torch.randn((batch, *teacher.state_shape), generator=generator)
        return Batch(x_t=x_t.to(device), t=t.to(device), t_index=torch.zeros(batch, dtype=torch.long), cond=cond,
                     student_cond=cond, guidance=torch.full((batch,), float(args.real_guidance), device=device),
                     source=["student"] * batch, keys=[None] * batch)

    with tempfile.TemporaryDirectory() as tmp:
        trainer = Trainer(accelerator=accelerator, method=method, run_dir=Path(tmp), phase=phase.name,
                          make_batch=make_batch, config=TrainConfig(max_updates=1, lr=1e-6, max_grad_norm=10,
                                                                    log_every=10 ** 9))
        trainer.run()  # warm-up: allocator, kernels, optimiser state
        if device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        trainer.config.max_updates = 1 + args.updates
        start = time.perf_counter()
        trainer.run()
        if device == "cuda":
            torch.cuda.synchronize()
        seconds = (time.perf_counter() - start) / args.updates
    params = sum(p.numel() for p in teacher.network.parameters())
    peak = torch.cuda.max_memory_allocated() / 2 ** 30 if device == "cuda" else float("nan")
    return {"size": size, "unet_params_m": params / 1e6, "batch": batch, "peak_gib": peak, "s_per_update": seconds}


def _request():
    from ddil_cli.methods.base import PlanRequest

    return PlanRequest(steps=4, teacher_steps=32, max_updates=1)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="sd15,sdxl")
    parser.add_argument("--batches", default="1,7")
    parser.add_argument("--critic-updates", type=int, default=10)
    parser.add_argument("--updates", type=int, default=3)
    parser.add_argument("--real-guidance", type=float, default=8.0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--mixed-precision", default="no")
    parser.add_argument("--gradient-checkpointing", action="store_true")
    args = parser.parse_args(argv)
    rows = []
    for size in args.sizes.split(","):
        for batch in (int(b) for b in args.batches.split(",")):
            rows.append(run_case(size, batch, args))
            if args.device == "cuda":
                torch.cuda.empty_cache()
    print(f"DMD2 update = {args.critic_updates} critic steps + 1 generator step; device {args.device}, "
          f"mixed precision {args.mixed_precision}, gradient checkpointing {args.gradient_checkpointing}")
    print(f"{'size':<6} {'UNet M params':>13} {'batch':>5} {'peak GiB':>9} {'s/update':>9}")
    for r in rows:
        print(f"{r['size']:<6} {r['unet_params_m']:>13.1f} {r['batch']:>5} {r['peak_gib']:>9.2f} "
              f"{r['s_per_update']:>9.3f}")


if __name__ == "__main__":
    main()
