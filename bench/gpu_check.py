"""The full-size GPU check (run by bench/gpu_check.sh): seconds per update, model FLOP utilisation
from bench/ledger.py's FLOPs, and peak GPU memory, for random-weight networks at full size built
straight on the device from bench/configs/ (no download, no pipeline folder: training never
decodes, so there is no VAE; the text encoders are the real architectures and encode prompts once).

Each case runs the real method through the real Trainer (accelerate, bf16 autocast, gradient
checkpointing, the frozen teacher in bf16): one warm-up update, then --updates timed ones.
Cases: PD and LCM at SD 1.5 size (batch 8, 512 px), DMD2 at SSD-1B size (batch 7, 10 critic
updates) and DMD2 at SDXL size with a LoRA generator and critic (the `--lora-rank` path: both
adapters on the teacher's UNet).

    python bench/gpu_check.py                                  # on the GPU machine
    python bench/gpu_check.py --tiny --device cpu              # the CPU dry run
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
_spec = importlib.util.spec_from_file_location("ledger", ROOT / "bench" / "ledger.py")
ledger = importlib.util.module_from_spec(_spec)
sys.modules["ledger"] = ledger
_spec.loader.exec_module(ledger)

# (label, method, size, batch, mode); --tiny swaps every size for the tiny config at batch 2
CASES = [("PD SD 1.5", "pd", "sd15", 8, "full"), ("LCM SD 1.5", "lcm", "sd15", 8, "full"),
         ("DMD2 SSD-1B", "dmd2", "ssd1b", 7, "full"), ("DMD2 SDXL LoRA", "dmd2", "sdxl", 7, "lora")]
SCHEDULE = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                prediction_type="epsilon")
# dense bf16 tensor-core peak of one H100 / H200 SXM (the same chip), for MFU
PEAK_BF16_TFLOPS = 989.0


def teacher_for(size: str, device: str):
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig

    import transformers
    from ddil_cli.models.diffusers_t2i import DiffusersDenoiser
    from tests.tiny_models import tiny_tokenizer

    config = ledger.load_config(size)
    with torch.device(device):
        unet = UNet2DConditionModel(**config["unet"])
        encoders, tokenizers = {}, {}
        for i, entry in enumerate(config["text_encoders"]):
            tokenizer = tiny_tokenizer()
            fields = {k: v for k, v in entry.items() if k != "class"}
            fields.update(vocab_size=max(fields["vocab_size"], len(tokenizer)), bos_token_id=tokenizer.bos_token_id,
                          eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
            suffix = "" if i == 0 else f"_{i + 1}"
            encoders[f"text_encoder{suffix}"] = getattr(transformers, entry["class"])(CLIPTextConfig(**fields))
            tokenizers[f"tokenizer{suffix}"] = tokenizer
    for module in [unet, *encoders.values()]:
        module.requires_grad_(False).eval()
    return DiffusersDenoiser(unet, text_encoders=encoders, tokenizers=tokenizers, vae=None,
                             scheduler_config=SCHEDULE, source=f"random {size}")


def build_method(name: str, teacher, mode: str, critic_updates: int, lora_rank: int):
    """The method as the distill stage builds it (LoRA through its options' lora_rank fields)."""
    from ddil_cli.diffusion.threshold import Threshold
    from ddil_cli.methods import METHODS, PlanRequest

    from ddil_cli.models.lora import LoraSpec

    cls = METHODS[name]
    fields = {f.name for f in dataclasses.fields(cls.Options)}
    overrides = {"critic_updates": critic_updates} if "critic_updates" in fields else {}
    lora = {}
    if mode == "lora":  # as `ddil distill --lora-rank R` (and DMD2's --critic-lora-rank R): one shared base
        overrides.update({"critic_lora_rank": lora_rank} if "critic_lora_rank" in fields else {})
        lora = {"lora": LoraSpec.parse(lora_rank, None, None)}
    options = cls.Options(**overrides)
    options.validate()
    phase = cls.plan(PlanRequest(steps=4, teacher_steps=8, max_updates=1), teacher, options)[0]
    # a LoRA student takes no guidance embedding (it folds the guided teacher into one pass)
    embedding = (cls.needs_guidance_embedding or name == "pd") and not lora
    student = cls.make_student(teacher, phase, options, guidance_embedding=embedding, **lora)
    return cls(teacher=teacher, student=student, phase=phase, options=options, threshold=Threshold())


def _make_batch(method, teacher, batch: int, device: str, guidance: float):
    from ddil_cli.methods.base import Batch

    cond = teacher.encode(["a photograph of a cat"] * batch)
    generator = torch.Generator().manual_seed(0)
    timesteps = torch.tensor(method.phase.timesteps)

    def make(_update):
        t = timesteps[torch.randint(len(timesteps), (batch,), generator=generator)]
        x_t = torch.randn((batch, *teacher.state_shape), generator=generator)
        return Batch(x_t=x_t.to(device), t=t.to(device), t_index=torch.zeros(batch, dtype=torch.long), cond=cond,
                     student_cond=cond, guidance=torch.full((batch,), guidance, device=device),
                     source=["student"] * batch, keys=[None] * batch)
    return make


def run_case(label: str, name: str, size: str, batch: int, mode: str, args) -> dict:
    from accelerate import Accelerator

    from ddil_cli.train import TrainConfig, Trainer

    row = {"case": label, "size": size, "batch": batch, "mode": mode}
    accelerator = Accelerator(mixed_precision=args.mixed_precision, cpu=args.device == "cpu")
    teacher = teacher_for(size, args.device)
    method = build_method(name, teacher, mode, args.critic_updates, args.lora_rank)
    if args.device == "cuda" and args.mixed_precision == "bf16":
        teacher.network.to(torch.bfloat16)  # frozen networks in bf16, as a GPU run holds them
    method.student.network.enable_gradient_checkpointing()
    with tempfile.TemporaryDirectory() as tmp:
        trainer = Trainer(accelerator=accelerator, method=method, run_dir=Path(tmp), phase=method.phase.name,
                          make_batch=_make_batch(method, teacher, batch, args.device, args.guidance),
                          config=TrainConfig(max_updates=1, lr=1e-6, max_grad_norm=10, log_every=10 ** 9))
        trainer.run()  # warm-up: allocator, kernels, optimizer state
        if args.device == "cuda":
            torch.cuda.synchronize()
        trainer.config.max_updates = 1 + args.updates
        start = time.perf_counter()
        trainer.run()
        if args.device == "cuda":
            torch.cuda.synchronize()
        seconds = (time.perf_counter() - start) / args.updates
    peak = torch.cuda.max_memory_allocated() / 2 ** 30 if args.device == "cuda" else float("nan")
    flops = update_tflops(name, size, batch, mode, args)
    return {**row, "status": "ran", "s_per_update": seconds, "peak_gib": peak, "tflop_per_update": flops,
            "mfu": flops / seconds / PEAK_BF16_TFLOPS}


def update_tflops(name: str, size: str, batch: int, mode: str, args) -> float:
    """The ledger's count of this update, checkpointing on: from a `bench/ledger.py --json` file
    when given (counting SDXL on the meta device takes a minute), else counted here."""
    counts = json.loads(Path(args.ledger_json).read_text())["counts"] if args.ledger_json else {}
    if size in counts:
        c = counts[size]
        sizes = ledger.Sizes(c["name"], ledger.NetworkCount(**c["full"]), ledger.NetworkCount(**c["lora"]),
                             c["text_params"], c["vae_params"], c["text_flops_per_prompt"])
    else:
        sizes = ledger.count_size(size, args.lora_rank)
    row = ledger.make_row(sizes, name, mode, "bf16", "adamw", True, batch, args.critic_updates)
    return row.tflops


def format_table(rows: list[dict]) -> str:
    lines = ["| case | batch | s/update | TFLOP/update | MFU | peak GiB | status |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["status"] != "ran":
            lines.append(f"| {r['case']} | {r['batch']} | | | | | {r['status']} |")
            continue
        lines.append(f"| {r['case']} | {r['batch']} | {r['s_per_update']:.2f} | {r['tflop_per_update']:.1f} "
                     f"| {100 * r['mfu']:.1f}% | {r['peak_gib']:.1f} | ran |")
    return "\n".join(lines)


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--mixed-precision", default=None, help="default: bf16 on a GPU, no on the CPU")
    parser.add_argument("--updates", type=int, default=3)
    parser.add_argument("--critic-updates", type=int, default=10)
    parser.add_argument("--lora-rank", type=int, default=64)
    parser.add_argument("--guidance", type=float, default=4.5)
    parser.add_argument("--tiny", action="store_true", help="every case at the tiny size, batch 2 (a dry run)")
    parser.add_argument("--cases", default=None, help="comma-separated case numbers (1-based) to run")
    parser.add_argument("--ledger-json", default=None, help="counts from `bench/ledger.py --json` (same LoRA rank)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    args.mixed_precision = args.mixed_precision or ("bf16" if args.device == "cuda" else "no")
    chosen = [CASES[int(i) - 1] for i in args.cases.split(",")] if args.cases else CASES
    rows = []
    for label, name, size, batch, mode in chosen:
        if args.tiny:
            size, batch = "tiny", 2
        rows.append(run_case(label, name, size, batch, mode, args))
        print(format_table(rows[-1:]).splitlines()[-1], flush=True)
        if args.device == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
    device = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    print(f"\n{device}; {args.mixed_precision} autocast, frozen bf16 on a GPU, gradient checkpointing; "
          f"{args.updates} timed updates; DMD2 {args.critic_updates} critic updates; MFU against "
          f"{PEAK_BF16_TFLOPS:.0f} TFLOP/s")
    print(format_table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return rows


if __name__ == "__main__":
    main()
