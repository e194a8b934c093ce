"""Train the embedded digits classifier (the lab's evaluator) on the digits train split.

    python -m ddil_cli.data.digits --out runs/data/digits
    python -m ddil_cli.scripts.train_digits_classifier --data runs/data/digits \
        --out ddil_cli/assets/digits/classifier.safetensors

Both splits are read through the shard reader at the teacher's resolution (16x16, 1 channel,
[-1, 1]), so the classifier sees exactly what the teacher generates. Augmentation: random
translations of up to one pixel and small random affine jitter (rotation, scale), so that the
features do not hinge on exact pixel alignment. The held-out accuracy is measured on the 297
held-out images and written next to the weights (classifier.json).
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F

from ddil_cli.data.digits import digit_from_prompt, split_source
from ddil_cli.data.shards import load_image_captions
from ddil_cli.errors import UserError
from ddil_cli.models.digits import CLASSIFIER_PATH, ClassifierConfig, DigitsClassifier, classify, save_classifier


def labels_of(data) -> torch.Tensor:
    """Labels from the metadata ('label'), else from the digit the caption names."""
    labels = []
    for meta, caption in zip(data.metadata, data.captions):
        label = meta.get("label", digit_from_prompt(caption))
        if label is None:
            raise UserError(f"sample with caption {caption!r} has no 'label' in its .json and names no digit")
        labels.append(int(label))
    return torch.tensor(labels)


def augment(x: torch.Tensor, generator: torch.Generator, max_shift_px: float = 1.0,
            max_rotation_deg: float = 10.0, max_scale: float = 0.1) -> torch.Tensor:
    b, _, h, _ = x.shape
    angle = (torch.rand(b, generator=generator) * 2 - 1) * math.radians(max_rotation_deg)
    scale = 1 + (torch.rand(b, generator=generator) * 2 - 1) * max_scale
    shift = (torch.rand(b, 2, generator=generator) * 2 - 1) * (2 * max_shift_px / h)
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    # Background is -1 (black): pad with it rather than with zeros (mid-grey).
    return F.grid_sample(x + 1, grid, align_corners=False, padding_mode="zeros") - 1


def train_classifier(train_source, heldout_source, *, epochs: int = 40, batch_size: int = 64, lr: float = 2e-3,
                     seed: int = 0, config: ClassifierConfig = ClassifierConfig()):
    """Returns (model, held-out accuracy, details)."""
    train = load_image_captions(train_source, resolution=config.resolution, channels=config.channels)
    held = load_image_captions(heldout_source, resolution=config.resolution, channels=config.channels)
    y_train, y_held = labels_of(train), labels_of(held)
    torch.manual_seed(seed)
    model = DigitsClassifier(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    steps = epochs * math.ceil(len(train) / batch_size)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        model.train()
        order = torch.randperm(len(train), generator=generator)
        for start in range(0, len(train), batch_size):
            idx = order[start:start + batch_size]
            x = augment(train.images[idx], generator)
            loss = F.cross_entropy(model.logits(x), y_train[idx], label_smoothing=0.05)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
    model.eval()
    accuracy = float((classify(held.images, model) == y_held).float().mean())
    train_accuracy = float((classify(train.images, model) == y_train).float().mean())
    details = {"heldout_accuracy": accuracy, "heldout_count": len(held), "train_accuracy": train_accuracy,
               "train_count": len(train), "epochs": epochs, "batch_size": batch_size, "lr": lr, "seed": seed,
               "parameters": sum(p.numel() for p in model.parameters())}
    return model, accuracy, details


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Train the embedded digits classifier.")
    parser.add_argument("--data", required=True, help="folder made by `python -m ddil_cli.data.digits`")
    parser.add_argument("--out", default=str(CLASSIFIER_PATH), help="weights path (.safetensors; config beside it)")
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    model, accuracy, details = train_classifier(split_source(args.data, "train"), split_source(args.data, "heldout"),
                                                epochs=args.epochs, seed=args.seed)
    details["command"] = f"python -m ddil_cli.scripts.train_digits_classifier --data {args.data} --out {args.out} " \
                         f"--epochs {args.epochs} --seed {args.seed}"
    save_classifier(model, args.out, details)
    print(json.dumps(details, indent=2))
    print(f"held-out accuracy {accuracy:.4f}; wrote {args.out} ({Path(args.out).stat().st_size / 1e6:.2f} MB)")


if __name__ == "__main__":
    main()
