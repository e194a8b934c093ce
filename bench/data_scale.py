"""Bench for data and evaluation at scale (docs/scale.md), on the CPU. Three parts, each a table:

  data      training states per second per process from raw image-caption shards vs shards made
            by `ddil encode`: the tiny SD pipeline of the tests (16 px images) and a 256 px
            pipeline with the real SD VAE architecture (random weights: the cost does not depend
            on the values). The encoded path runs no VAE: the table counts VAE calls.
  sample    `ddil sample` of --many (10,000) vs --few (1,000) images from the tiny SD pipeline,
            each in a fresh process: peak resident memory; then 1 vs 2 processes (torchrun)
            write byte-identical images and samples.jsonl.
  evaluate  `ddil evaluate` over --images (10,000) samples with three feature spaces (tiny
            Inception, DINOv2 and OpenCLIP weights in the real formats) vs one: wall time, and
            how often each image file is opened.

    python bench/data_scale.py data --vae-images 4
    python bench/data_scale.py sample --many 10000 --few 1000
    python bench/data_scale.py evaluate --images 10000
"""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]


def _shards(folder: Path, count: int, size: tuple[int, int], per_shard: int = 64) -> Path:
    """Random JPEG images (a crawl's format) with captions."""
    import webdataset as wds
    from PIL import Image

    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    for s in range(0, count, per_shard):
        with wds.TarWriter(str(folder / f"data-{s // per_shard:06d}.tar")) as sink:
            for k in range(s, min(s + per_shard, count)):
                buf = io.BytesIO()
                Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(buf, format="JPEG", quality=90)
                sink.write({"__key__": f"k{k:06d}", "jpg": buf.getvalue(), "txt": f"caption {k % 97}"})
    return folder


def _sd_vae_pipeline(path: Path) -> Path:
    """A pipeline whose VAE is SD's architecture (4 blocks, 128-512 channels, 8x) at 256 px images;
    a tiny UNet and text encoder (their cost is not what this bench measures)."""
    import torch
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline
    from transformers import CLIPTextModel

    from tiny_models import _text_config, _unet, tiny_tokenizer

    torch.manual_seed(0)
    tokenizer = tiny_tokenizer()
    vae = AutoencoderKL(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
                        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                        sample_size=256, scaling_factor=0.18215)
    pipe = StableDiffusionPipeline(unet=_unet(sample_size=32), vae=vae, text_encoder=CLIPTextModel(_text_config(tokenizer)),
                                   tokenizer=tokenizer, scheduler=PNDMScheduler(beta_schedule="scaled_linear",
                                                                                beta_start=0.00085, beta_end=0.012),
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(path)
    return path


def _states_per_second(teacher, data: str, n: int, batch: int) -> tuple[float, int]:
    """(states/s, VAE encoder calls) for `n` forward-diffused data states, as distill draws them."""
    import torch

    from ddil_cli.buffer.sources import DataStates, forward_diffuse

    calls = []
    if teacher.vae is not None:
        teacher.vae.encoder.register_forward_hook(lambda *a: calls.append(1))
    states = DataStates(teacher, data=data)
    gen = torch.Generator().manual_seed(0)
    states.batch(1, gen)  # open the shards and warm up
    calls.clear()
    start = time.perf_counter()
    for _ in range(n // batch):
        x0, _prompts = states.batch(batch, gen)
        forward_diffuse(x0, teacher.schedule, [999, 749, 499, 249], gen)
    return (n // batch) * batch / (time.perf_counter() - start), len(calls)


def bench_data(args) -> None:
    from ddil_cli.models import load_denoiser
    from ddil_cli.stages.encode import EncodeConfig, run_encode
    from tiny_models import build_tiny_sd

    work = Path(tempfile.mkdtemp(prefix="ddil-bench-data-"))
    cases = [("tiny SD (16 px)", build_tiny_sd(work / "tiny"), (24, 20), args.tiny_images),
             ("SD VAE architecture (256 px)", _sd_vae_pipeline(work / "sd256"), (320, 256), args.vae_images)]
    print("| pipeline | data | states/s per process | VAE encoder calls in the step | encode (s/image, once) |")
    print("|---|---|---|---|---|")
    for name, folder, size, n in cases:
        raw = _shards(work / f"raw-{folder.name}", n + 1, size)
        teacher = load_denoiser(str(folder))
        start = time.perf_counter()
        run_encode(EncodeConfig(teacher=str(folder), data=str(raw), out=str(work / f"enc-{folder.name}"),
                                batch_size=4, quiet=True), teacher)
        encode_seconds = (time.perf_counter() - start) / (n + 1)
        for kind, source in (("raw shards", str(raw)), ("encoded shards", str(work / f"enc-{folder.name}"))):
            rate, calls = _states_per_second(load_denoiser(str(folder)), source, n, min(n, 4))
            print(f"| {name} | {kind} | {rate:.1f} | {calls} | {encode_seconds:.3f} |")


# ---- sample -------------------------------------------------------------------------------------
_RSS_WRAPPER = ("import resource, sys; from ddil_cli.cli.app import main\n"
                "try:\n    main(sys.argv[1:])\nexcept SystemExit as e:\n    assert not e.code, e.code\n"
                "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, file=sys.stderr)")


def _sample_args(teacher: Path, n: int, out: Path) -> list[str]:
    prompts = out.parent / f"prompts-{n}.txt"
    prompts.write_text("".join(f"prompt number {i}\n" for i in range(n // 10)))
    return ["sample", "--quiet", "--teacher", str(teacher), "--teacher-steps", "2", "--prompts", str(prompts),
            "--num-per-prompt", "10", "--batch-size", "250", "--out", str(out)]


def _peak_rss(args: list[str]) -> tuple[float, float]:
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", _RSS_WRAPPER, *args], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    if done.returncode:
        raise SystemExit(done.stderr)
    return float(done.stderr.strip().splitlines()[-1]), time.perf_counter() - start


def _folder_digest(folder: Path) -> dict:
    import hashlib

    files = {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
             for p in sorted(folder.rglob("*")) if p.is_file() and p.name not in ("manifest.json", "samples.jsonl")}
    rows = sorted(json.loads(line)["index"] for line in (folder / "samples.jsonl").read_text().splitlines())
    files["samples.jsonl"] = sorted((folder / "samples.jsonl").read_text().splitlines())
    return {"files": files, "rows": rows}


def bench_sample(args) -> None:
    from tiny_models import build_tiny_sd

    work = Path(tempfile.mkdtemp(prefix="ddil-bench-sample-"))
    teacher = build_tiny_sd(work / "teacher")
    print("| samples | peak RSS (MB) | wall (s) |")
    print("|---|---|---|")
    peaks = {}
    for n in (args.few, args.many):
        peaks[n], seconds = _peak_rss(_sample_args(teacher, n, work / f"s{n}"))
        print(f"| {n} | {peaks[n]:.0f} | {seconds:.1f} |")
    print(f"\npeak RSS difference, {args.many} vs {args.few} samples: {peaks[args.many] - peaks[args.few]:+.0f} MB")
    one = _sample_args(teacher, args.few, work / "one")
    subprocess.run([sys.executable, "-m", "ddil_cli", *one], check=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    two = _sample_args(teacher, args.few, work / "two")
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                    "-m", "ddil_cli", *two], check=True, capture_output=True,
                   env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"})
    a, b = _folder_digest(work / "one"), _folder_digest(work / "two")
    images = sum(name.startswith("images/") for name in a["files"])
    print(f"1 vs 2 processes (torchrun), {args.few} samples: {images} images + grid.png byte-identical: "
          f"{a['files'] == b['files']}; samples.jsonl identical (order aside): {a == b}")


# ---- evaluate -----------------------------------------------------------------------------------
def bench_evaluate(args) -> None:
    import dataclasses

    import open_clip
    import torch
    from PIL import Image

    from ddil_cli.evaluate import features as F
    from ddil_cli.evaluate.config import EvaluateConfig
    from ddil_cli.evaluate.run import score
    from test_clip_score import TINY_ARCH, TINY_CONFIG
    from test_features import TINY_DINO, save_tiny_dinov2, save_tiny_inception

    work = Path(tempfile.mkdtemp(prefix="ddil-bench-eval-"))
    w = work / "weights"
    save_tiny_inception(w)
    save_tiny_dinov2(w / "dino.pth")
    (w / "cfg").mkdir()
    (w / "cfg" / f"{TINY_ARCH}.json").write_text(json.dumps(TINY_CONFIG))
    open_clip.add_model_config(w / "cfg")
    torch.save(open_clip.create_model(TINY_ARCH).state_dict(), w / "clip.pt")
    F._FEATURE_SPACES["dinov2"] = lambda o: F.Dinov2Extractor(dataclasses.replace(o, dinov2_model_kwargs=TINY_DINO))
    rng = np.random.default_rng(0)
    for side in ("s/images", "ref"):
        (work / side).mkdir(parents=True)
    with open(work / "s/samples.jsonl", "w") as rows:
        for i in range(args.images):
            Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(work / f"s/images/{i:06d}.png")
            rows.write(json.dumps({"index": i, "prompt": f"prompt {i // 10}", "prompt_index": i // 10,
                                   "file": f"images/{i:06d}.png"}) + "\n")
    for i in range(args.reference):
        Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(work / f"ref/{i:06d}.png")
    opened, real_open = [], Image.open
    Image.open = lambda fp, *a, **k: opened.append(str(fp)) or real_open(fp, *a, **k)
    print("| metrics (feature spaces) | images | wall (s) | opens per sample image | opens per reference image |")
    print("|---|---|---|---|---|")
    walls = {}
    for metrics, spaces in (("fid", "inception"), ("fid,pr,clip", "inception, dinov2, clip")):
        opened.clear()
        start = time.perf_counter()
        result = score(EvaluateConfig(samples=str(work / "s"), reference=str(work / "ref"), metrics=[metrics],
                                      eval_res=64, batch_size=100, no_cache=True, inception=str(w),
                                      dinov2=str(w / "dino.pth"), clip=str(w / "clip.pt"), clip_arch=TINY_ARCH,
                                      workers=args.workers, quiet=True))
        walls[metrics] = time.perf_counter() - start
        assert not result["unavailable"], result["unavailable"]
        per_sample = sum("/s/images/" in p for p in opened) / args.images
        per_ref = sum("/ref/" in p for p in opened) / args.reference
        print(f"| {metrics} ({spaces}) | {args.images} | {walls[metrics]:.1f} | {per_sample:g} | {per_ref:g} |")
    print(f"\nthree spaces / one space wall time: {walls['fid,pr,clip'] / walls['fid']:.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="part", required=True)
    data = sub.add_parser("data")
    data.add_argument("--tiny-images", type=int, default=256)
    data.add_argument("--vae-images", type=int, default=4)
    sample = sub.add_parser("sample")
    sample.add_argument("--few", type=int, default=1000)
    sample.add_argument("--many", type=int, default=10000)
    evaluate = sub.add_parser("evaluate")
    evaluate.add_argument("--images", type=int, default=10000)
    evaluate.add_argument("--reference", type=int, default=2000)
    evaluate.add_argument("--workers", type=int, default=0)
    args = parser.parse_args()
    {"data": bench_data, "sample": bench_sample, "evaluate": bench_evaluate}[args.part](args)


if __name__ == "__main__":
    main()
