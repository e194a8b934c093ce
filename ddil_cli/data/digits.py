"""The embedded image data: scikit-learn's handwritten digits as image-caption webdataset shards.

`sklearn.datasets.load_digits` ships 1797 real 8x8 scans (UCI optdigits; values 0..16, ink high)
of the digits 0-9 in the package itself, so this works offline. We write them exactly as users
bring real data (LAION/COCO layout, read back by `ddil_cli.data.shards`):

    OUT/train-000000.tar, train-000001.tar    1500 samples (stratified, seeded split)
    OUT/heldout-000000.tar                    297 samples
    OUT/digits.json                           split seed, counts, captions, shard checksums
    OUT/prompts.txt                           the ten canonical prompts, one per line

Each sample is `digits_NNNNN.png` (the original 8x8 image, 8-bit grayscale, value v -> round(v *
255 / 16), white ink on black), `digits_NNNNN.txt` (a caption such as "a handwritten digit seven",
phrasing picked by a seeded draw), and `digits_NNNNN.json` (label, source index, split, phrasing).
The shards keep the native 8x8 size; the model resolution (16x16) is the reader's documented
bilinear resize, the same transform any real data set goes through.

Recipe: `python -m ddil_cli.data.digits --out data/digits` (deterministic: same bytes every run).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
from pathlib import Path

import numpy as np

from ddil_cli.errors import UserError

DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
CAPTION_TEMPLATES = (
    "a handwritten digit {word}",
    "a handwritten {word}",
    "the digit {word}, written by hand",
    "a hand-drawn number {word}",
    "a handwritten {numeral}",
)
SPLIT_SEED = 0
HELDOUT_SIZE = 297
SHARD_SIZE = 1000
SOURCE_LEVELS = 16  # load_digits pixel values are counts 0..16 (4x4 blocks of a 32x32 bitmap)


def caption_for(label: int, template_index: int = 0) -> str:
    return CAPTION_TEMPLATES[template_index].format(word=DIGIT_WORDS[label], numeral=label)


def digit_prompt(label: int) -> str:
    """The canonical prompt for a digit, the one evaluation and `sample` use."""
    return caption_for(label, 0)


_DIGIT_PATTERN = re.compile(r"\b(" + "|".join(DIGIT_WORDS) + r"|[0-9])\b")


def digit_from_prompt(prompt: str) -> int | None:
    """The digit a prompt asks for (word or numeral), or None when it names none or several."""
    found = {m if m.isdigit() else str(DIGIT_WORDS.index(m)) for m in _DIGIT_PATTERN.findall(prompt.lower())}
    return int(found.pop()) if len(found) == 1 else None


def digits_split(seed: int = SPLIT_SEED, heldout_size: int = HELDOUT_SIZE):
    """(images uint8 (N, 8, 8), labels, source indices) for 'train' and 'heldout': stratified, seeded."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    images = np.rint(bunch.images * (255.0 / SOURCE_LEVELS)).clip(0, 255).astype(np.uint8)
    index = np.arange(len(images))
    train_idx, held_idx = train_test_split(index, test_size=heldout_size, random_state=seed,
                                           stratify=bunch.target)
    train_idx, held_idx = np.sort(train_idx), np.sort(held_idx)
    return {name: (images[idx], bunch.target[idx].astype(int), idx)
            for name, idx in (("train", train_idx), ("heldout", held_idx))}


def build_digits_shards(out: str | Path, *, seed: int = SPLIT_SEED, heldout_size: int = HELDOUT_SIZE,
                        shard_size: int = SHARD_SIZE) -> dict:
    """Write the digits shards into `out` (a new or empty folder, or an earlier digits folder,
    replaced); returns the description written to digits.json. The folder appears whole or not at
    all (built beside it and renamed)."""
    from ddil_cli.atomic import atomic_folder

    out = Path(out)
    if out.is_dir() and any(out.iterdir()) and not (out / "digits.json").is_file():
        raise UserError(f"--out {out} holds other files; choose a new or empty folder for the digits shards")
    rng = np.random.default_rng(seed)
    splits = digits_split(seed, heldout_size)
    description = {"source": "sklearn.datasets.load_digits", "split_seed": seed,
                   "pixel_transform": f"uint8 = round(v * 255 / {SOURCE_LEVELS}), 8x8 grayscale PNG",
                   "caption_templates": list(CAPTION_TEMPLATES), "splits": {}}
    with atomic_folder(out) as work:
        for name, (images, labels, source_index) in splits.items():
            shards = _write_split(work, name, images, labels, source_index,
                                  rng.integers(len(CAPTION_TEMPLATES), size=len(images)), shard_size)
            description["splits"][name] = {
                "count": int(len(images)),
                "pattern": f"{name}-{{000000..{len(shards) - 1:06d}}}.tar",
                "per_class": np.bincount(labels, minlength=10).tolist(),
                "sha256": {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in shards},
            }
        (work / "digits.json").write_text(json.dumps(description, indent=2) + "\n")
        # The canonical prompt of each digit: the default prompts of a teacher trained on these shards.
        (work / "prompts.txt").write_text("".join(digit_prompt(d) + "\n" for d in range(10)))
    return description


def _write_split(folder: Path, name: str, images, labels, source_index, templates, shard_size: int) -> list[Path]:
    """One split's image-caption shards `name-%06d.tar` in `folder`; returns their paths."""
    import io

    import webdataset as wds
    from PIL import Image

    # mtime fixed so the same data gives byte-identical shards.
    with wds.ShardWriter(str(folder / f"{name}-%06d.tar"), maxcount=shard_size, verbose=0, mtime=0) as sink:
        for image, label, src, template in zip(images, labels, source_index, templates):
            buf = io.BytesIO()
            Image.fromarray(image, mode="L").save(buf, format="PNG")
            meta = {"label": int(label), "source_index": int(src), "split": name,
                    "caption_template": int(template)}
            sink.write({"__key__": f"digits_{int(src):05d}", "png": buf.getvalue(),
                        "txt": caption_for(int(label), int(template)), "json": json.dumps(meta)})
    return sorted(folder.glob(f"{name}-*.tar"))


def split_source(data_dir: str | Path, split: str) -> str:
    """The brace pattern of one split's shards in a folder made by `build_digits_shards`."""
    info = json.loads((Path(data_dir) / "digits.json").read_text())
    return str(Path(data_dir) / info["splits"][split]["pattern"])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Write sklearn's digits as image-caption webdataset shards.")
    parser.add_argument("--out", required=True, help="output folder (created)")
    parser.add_argument("--seed", type=int, default=SPLIT_SEED, help="split and caption seed")
    parser.add_argument("--heldout", type=int, default=HELDOUT_SIZE, help="held-out split size")
    args = parser.parse_args(argv)
    info = build_digits_shards(args.out, seed=args.seed, heldout_size=args.heldout)
    for name, split in info["splits"].items():
        print(f"{name}: {split['count']} samples -> {Path(args.out) / split['pattern']}")


if __name__ == "__main__":
    main()
