"""Full-size distillation on the CPU: the real SD 1.5 architecture (UNet, CLIP ViT-L text encoder,
VAE; bench/configs/sd15.json) with random weights, saved as a local pipeline folder, distilled
through the `ddil` CLI by each method, full fine-tuning and (when the CLI has `--lora-rank`) LoRA,
at a small resolution, batch 1, prompts only (`--prior teacher=1`), a few updates.

Each run is its own process; the table gives its peak resident memory (the process tree's RSS,
polled), seconds per update (the last logged `updates_per_s`), the size of its last checkpoint,
and whether plain diffusers loads the student and samples from it (the teacher's pipeline with
`load_lora_weights(student)` for a LoRA student; else the student folder in
StableDiffusionPipeline, or LatentConsistencyModelPipeline for LCM).

Full size needs ~17-22 GB for PD and LCM full fine-tuning and more for DMD2 (bench/ledger.py):

    python bench/fullsize_cpu.py --size sd15 --resolution 256 --updates 2 --methods pd,lcm --modes lora
    python bench/fullsize_cpu.py --size tiny --resolution 16 --updates 1   # the smoke in tests/
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = ROOT / "bench" / "configs"
GB = 1e9
SD_SCHEDULE = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                   steps_offset=1, clip_sample=False, set_alpha_to_one=False)
PROMPTS = ["a photograph of a cat", "a red car in the rain"]
PIPELINES = {"lcm": "LatentConsistencyModelPipeline"}  # else StableDiffusionPipeline


def build_pipeline(size: str, resolution: int, folder: Path) -> Path:
    """The config's architecture with random weights as a diffusers pipeline folder. The tokenizer
    is the tests' small offline one (its ids fall inside the real vocabulary)."""
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    sys.path.insert(0, str(ROOT))
    from tests.tiny_models import tiny_tokenizer

    config = json.loads((CONFIGS / f"{size}.json").read_text())
    scale = 2 ** (len(config["vae"]["block_out_channels"]) - 1)
    torch.manual_seed(0)
    tokenizer = tiny_tokenizer()
    (text,) = config["text_encoders"]  # SD 1.x: one encoder
    text = {k: v for k, v in text.items() if k != "class"}
    text["vocab_size"] = max(text["vocab_size"], len(tokenizer))
    ids = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
               pad_token_id=tokenizer.pad_token_id)
    pipe = StableDiffusionPipeline(
        unet=UNet2DConditionModel(**{**config["unet"], "sample_size": resolution // scale}),
        vae=AutoencoderKL(**{**config["vae"], "sample_size": resolution}),
        text_encoder=CLIPTextModel(CLIPTextConfig(**text, **ids)), tokenizer=tokenizer,
        scheduler=DDIMScheduler(**SD_SCHEDULE), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False)
    pipe.save_pretrained(folder)
    return folder


def cli_has_lora() -> bool:
    help_text = subprocess.run([sys.executable, "-m", "ddil_cli", "distill", "--help"], capture_output=True,
                               text=True, env={"COLUMNS": "200", **_env()}).stdout
    return "--lora-rank" in help_text


def _env() -> dict:
    import os

    return {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def run_peak_rss(cmd: list[str], log: Path) -> tuple[int, float, float]:
    """(exit code, peak RSS of the process tree in bytes, wall seconds)."""
    import psutil

    start = time.perf_counter()
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=_env(), cwd=ROOT)
        parent, peak = psutil.Process(proc.pid), 0
        while proc.poll() is None:
            try:
                tree = [parent, *parent.children(recursive=True)]
                peak = max(peak, sum(p.memory_info().rss for p in tree))
            except psutil.Error:
                pass
            time.sleep(0.2)
    return proc.returncode, peak, time.perf_counter() - start


def distill_command(method: str, mode: str, args, teacher: Path, prompts: Path, out: Path) -> list[str]:
    cmd = [sys.executable, "-m", "ddil_cli", "distill", "--method", method, "--teacher", str(teacher),
           "--prompts", str(prompts), "--prior", "teacher=1", "--steps", "4", "--teacher-steps", "8",
           "--batch-size", "1", "--log-every", "1", "--collect-every", str(args.updates),
           "--rollouts-per-collect", "1", "--quiet", "--overwrite", "--out", str(out)]
    cmd += ["--stage-updates", str(args.updates)] if method == "pd" else ["--max-updates", str(args.updates)]
    if method == "dmd2":
        cmd += ["--critic-updates", str(args.critic_updates)]
    if mode == "lora":
        cmd += ["--lora-rank", str(args.lora_rank)]
        cmd += ["--critic-lora-rank", str(args.lora_rank)] if method == "dmd2" else []
    return cmd + ["--frozen-dtype", args.frozen_dtype]


LOAD_SNIPPET = """
import json, sys, torch, diffusers
from pathlib import Path
method, mode, teacher, student, size = sys.argv[1:6]
kw = dict(safety_checker=None, requires_safety_checker=False)
if mode == "lora":  # the teacher's pipeline, the adapters and the student's scheduler
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(teacher, **kw)
    config = Path(student) / "scheduler" / "scheduler_config.json"
    if config.is_file():
        name = json.loads(config.read_text())["_class_name"]
        pipe.scheduler = getattr(diffusers, name).from_pretrained(student, subfolder="scheduler")
    pipe.load_lora_weights(student)
else:
    pipe = getattr(diffusers, {pipelines!r}.get(method, "StableDiffusionPipeline")).from_pretrained(student, **kw)
pipe.set_progress_bar_config(disable=True)
image = pipe("a cat", num_inference_steps=4, guidance_scale=1.0, output_type="np",
             generator=torch.Generator().manual_seed(0)).images[0]
assert image.shape[0] == int(size) and bool((image == image).all())
print("loaded", type(pipe).__name__)
"""


def loads_in_diffusers(method: str, mode: str, teacher: Path, student: Path, resolution: int) -> str:
    code = LOAD_SNIPPET.format(pipelines=PIPELINES)
    done = subprocess.run([sys.executable, "-c", code, method, mode, str(teacher), str(student), str(resolution)],
                          capture_output=True, text=True, env=_env(), cwd=ROOT)
    if done.returncode == 0:
        return "yes"
    lines = [line for line in done.stderr.strip().splitlines() if line.strip()]
    return "no: " + (lines[-1][:120] if lines else f"exit {done.returncode}")


@dataclass
class Result:
    size: str
    method: str
    mode: str
    exit_code: int
    peak_rss_gb: float
    s_per_update: float
    wall_s: float
    checkpoint_gb: float
    diffusers: str


def _s_per_update(run: Path) -> float:
    rows = [json.loads(line) for line in open(run / "metrics.jsonl")] if (run / "metrics.jsonl").exists() else []
    rates = [r["updates_per_s"] for r in rows if r.get("updates_per_s")]
    return 1.0 / rates[-1] if rates else float("nan")


def _checkpoint_bytes(run: Path) -> int:
    checkpoints = sorted((run / "checkpoints").glob("checkpoint-*")) if (run / "checkpoints").is_dir() else []
    return sum(f.stat().st_size for f in checkpoints[-1].rglob("*") if f.is_file()) if checkpoints else 0


def run_case(method: str, mode: str, args, teacher: Path, work: Path) -> Result:
    prompts = work / "prompts.txt"
    run = work / f"{method}-{mode}"
    code, peak, wall = run_peak_rss(distill_command(method, mode, args, teacher, prompts, run),
                                    work / f"{method}-{mode}.log")
    loads = loads_in_diffusers(method, mode, teacher, run / "student", args.resolution) if code == 0 else \
        f"no: distill exited {code} (log {work / f'{method}-{mode}.log'})"
    return Result(args.size, method, mode, code, peak / GB, _s_per_update(run), wall,
                  _checkpoint_bytes(run) / GB, loads)


def format_table(results: list[Result]) -> str:
    lines = ["| size | method | mode | peak RSS GB | s/update | checkpoint GB | loads in diffusers |",
             "|---|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r.size} | {r.method} | {r.mode} | {r.peak_rss_gb:.2f} | {r.s_per_update:.2f} "
                     f"| {r.checkpoint_gb:.3f} | {r.diffusers} |")
    return "\n".join(lines)


def main(argv=None) -> list[Result]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="sd15", help="a config in bench/configs/ with one text encoder")
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--updates", type=int, default=2)
    parser.add_argument("--methods", default="pd,lcm,dmd2")
    parser.add_argument("--modes", default="full,lora", help="full and/or lora (lora only where the CLI has it)")
    parser.add_argument("--critic-updates", type=int, default=2)
    parser.add_argument("--lora-rank", type=int, default=64)
    parser.add_argument("--frozen-dtype", default="auto", help="distill's --frozen-dtype (bf16 halves the teacher)")
    parser.add_argument("--work", default="runs/fullsize-cpu", help="the pipeline folder and the runs go here")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    work = Path(args.work)
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    (work / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    teacher = build_pipeline(args.size, args.resolution, work / "teacher")
    modes = args.modes.split(",")
    if "lora" in modes and not cli_has_lora():
        print("this ddil has no --lora-rank: LoRA runs skipped")
        modes = [m for m in modes if m != "lora"]
    results = []
    for method in args.methods.split(","):
        for mode in modes:
            results.append(run_case(method, mode, args, teacher, work))
            print(format_table(results[-1:]).splitlines()[-1], flush=True)
    print(f"\n{args.size} at {args.resolution} px, batch 1, --prior teacher=1, {args.updates} updates"
          f" (DMD2: {args.critic_updates} critic updates each; LoRA rank {args.lora_rank}, DMD2's critic"
          f" a LoRA of the same rank), --frozen-dtype {args.frozen_dtype}")
    print(format_table(results))
    if args.json:
        Path(args.json).write_text(json.dumps([asdict(r) for r in results], indent=1))
    return results


if __name__ == "__main__":
    main()
