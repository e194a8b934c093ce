"""The quality bar of a pixel-space digits teacher, measured with the embedded classifier.

    python -m ddil_cli.scripts.measure_digits --teacher ddil_cli/assets/digits/teacher --data runs/data/digits \
        --num-per-digit 100 --steps 32 --guidance 3 --out docs/embedded-lab

For each digit d, `--num-per-digit` samples of the canonical prompt ("a handwritten digit
seven") by deterministic DDIM on the trailing grid with CFG, drawn through the sample stage (the
models layer's adapter and the one rollout), so they are the samples `ddil sample --teacher T
--teacher-steps STEPS --guidance W --seed S --num-per-prompt N` gives for the ten prompts (each
sample from its own seed, `(seed << 20) + index`). Reported:
- prompt alignment: the fraction the classifier reads as the prompted digit;
- Frechet distance in the classifier's penultimate feature space between the samples and the
  held-out split, next to the floor: the same distance between the train and held-out splits;
- precision / recall / density / coverage (k = 5) against the held-out split, and the floor's;
- one grid per digit (`grid-D.png`, 8 x 8 samples, 4x nearest-neighbour upscaling) and
  `grid.png` (a row per digit), plus `measure.json`.
Samples are clipped to [-1, 1] and quantised to uint8 before scoring, as saved images would be.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ddil_cli.atomic import atomic_file, write_text_atomic
from ddil_cli.data.digits import digit_prompt, split_source
from ddil_cli.data.shards import load_image_captions, to_model_tensor
from ddil_cli.diffusion.threshold import parse_threshold
from ddil_cli.models.digits import TEACHER_PATH, classify, load_digits_classifier, prompt_alignment
from ddil_cli.models import load_denoiser
from ddil_cli.sample_folder import SampleConfig, generate, plan_sampling, sample_seed


def save_grid(images: np.ndarray, columns: int, path: Path, upscale: int = 4) -> None:
    """uint8 (N, H, W, 3) -> one PNG, row-major, 1-pixel gaps."""
    n, h, w, _ = images.shape
    rows = -(-n // columns)
    canvas = np.full((rows * (h + 1) + 1, columns * (w + 1) + 1, 3), 96, dtype=np.uint8)
    for i, img in enumerate(images):
        r, c = divmod(i, columns)
        canvas[1 + r * (h + 1):1 + r * (h + 1) + h, 1 + c * (w + 1):1 + c * (w + 1) + w] = img
    with atomic_file(path) as tmp:
        Image.fromarray(canvas).resize((canvas.shape[1] * upscale, canvas.shape[0] * upscale),
                                       Image.NEAREST).save(tmp, format="PNG")


def sample_digits(teacher: str | Path, *, num_per_digit: int, steps: int, guidance: float, seed: int,
                  batch_size: int = 250) -> tuple[np.ndarray, list[str], float, tuple[int, ...]]:
    """The teacher's samples of the ten canonical prompts, digit-major, decoded to uint8 RGB
    (N, H, W, 3), through the sample stage. Returns (images, prompts, seconds, state shape)."""
    cfg = SampleConfig(teacher=str(teacher), teacher_steps=steps, guidance=guidance,
                       prompt=[digit_prompt(d) for d in range(10)], num_per_prompt=num_per_digit,
                       batch_size=batch_size, seed=seed)
    model = load_denoiser(cfg.teacher, device=cfg.device)
    plan = plan_sampling(cfg, model, None)
    prompts = [p for p in plan.prompts for _ in range(num_per_digit)]
    started = time.time()
    images = []
    for begin in range(0, len(prompts), batch_size):
        batch = prompts[begin:begin + batch_size]
        seeds = [sample_seed(seed, begin + j) for j in range(len(batch))]
        result = generate(plan, model, seeds, batch, parse_threshold(cfg.threshold), cfg.device)
        images.append(model.decode(result.final))
    return np.concatenate(images), prompts, time.time() - started, tuple(model.state_shape)


def measure_teacher(teacher: str | Path, data_dir: str | Path, *, num_per_digit: int = 100, steps: int = 32,
                    guidance: float = 3.0, seed: int = 0, out: str | Path | None = None) -> dict:
    from ddil_cli.evaluate.frechet import frechet_distance_features
    from ddil_cli.evaluate.prdc import compute_prdc

    classifier = load_digits_classifier()
    images, prompts, seconds, (channels, res, _) = sample_digits(teacher, num_per_digit=num_per_digit, steps=steps,
                                                                 guidance=guidance, seed=seed)
    train = load_image_captions(split_source(data_dir, "train"), resolution=res, channels=channels)
    held = load_image_captions(split_source(data_dir, "heldout"), resolution=res, channels=channels)
    samples = to_model_tensor(images[..., :channels])  # what a saved PNG holds, back in [-1, 1]

    with torch.no_grad():
        feats = {name: classifier.features(x).numpy().astype(np.float64)
                 for name, x in (("samples", samples), ("train", train.images), ("heldout", held.images))}
    predicted = classify(samples, classifier).numpy()
    targets = np.repeat(np.arange(10), num_per_digit)
    result = {
        "teacher": str(teacher), "samples": len(prompts), "steps": steps, "guidance": guidance, "seed": seed,
        "sampling_seconds": round(seconds, 2), "seconds_per_sample": seconds / len(prompts),
        "prompt_alignment": prompt_alignment(samples, prompts, classifier),
        "prompt_alignment_per_digit": [float((predicted[targets == d] == d).mean()) for d in range(10)],
        "fd_samples_vs_heldout": frechet_distance_features(feats["samples"], feats["heldout"]),
        "fd_train_vs_heldout_floor": frechet_distance_features(feats["train"], feats["heldout"]),
        "prdc_samples_vs_heldout": asdict(compute_prdc(feats["heldout"], feats["samples"], k=5)),
        "prdc_train_vs_heldout_floor": asdict(compute_prdc(feats["heldout"], feats["train"], k=5)),
        "feature_dim": int(feats["samples"].shape[1]), "heldout": len(held), "train": len(train),
    }
    result["fd_ratio_to_floor"] = result["fd_samples_vs_heldout"] / result["fd_train_vs_heldout_floor"]
    result = json.loads(json.dumps(result, default=float))
    if out is not None:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        per_digit = images.reshape(10, num_per_digit, *images.shape[1:])
        shown = min(64, num_per_digit)
        for d in range(10):
            save_grid(per_digit[d, :shown], 8, out / f"grid-{d}.png")
        save_grid(per_digit[:, :min(16, num_per_digit)].reshape(-1, *images.shape[1:]), min(16, num_per_digit),
                  out / "grid.png")
        write_text_atomic(out / "measure.json", json.dumps(result, indent=2) + "\n")
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Measure a digits teacher with the embedded classifier.")
    parser.add_argument("--teacher", default=str(TEACHER_PATH), help="pipeline folder (or embedded:digits)")
    parser.add_argument("--data", required=True, help="folder made by `python -m ddil_cli.data.digits`")
    parser.add_argument("--num-per-digit", type=int, default=100)
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--guidance", type=float, default=3.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="folder for grids and measure.json")
    args = parser.parse_args(argv)
    result = measure_teacher(args.teacher, args.data, num_per_digit=args.num_per_digit, steps=args.steps,
                             guidance=args.guidance, seed=args.seed, out=args.out)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
