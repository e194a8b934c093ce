"""CLIP score: mean cosine similarity between each image's and its caption's OpenCLIP embeddings.

Reported as the raw cosine (the paper's convention, ~0.30 for SD-class models with ViT-g-14)
and x100 alongside (torchmetrics' scale, without its clamp at 0). Images are the prepared
uint8 eval-res images; OpenCLIP's own eval transform (resize + center crop + normalise) follows.
"""

from __future__ import annotations

from typing import Iterable

import numpy as np

from ddil_cli.evaluate.features import ClipModel


def clip_cosines(clip: ClipModel, batches: Iterable[tuple[np.ndarray, list[str]]]) -> np.ndarray:
    """Per-sample cosine between image and caption embeddings, for (images, prompts) batches."""
    scores = []
    for images, prompts in batches:
        if len(images) != len(prompts):
            raise ValueError(f"{len(images)} images but {len(prompts)} prompts in a batch")
        img = clip.image_embeddings(images)
        txt = clip.text_embeddings(list(prompts))
        scores.append((img * txt).sum(-1).double().cpu().numpy())
    return np.concatenate(scores) if scores else np.zeros(0)


def cosines_with_prompts(clip: ClipModel, image_embeddings: np.ndarray, prompts: list[str],
                         batch_size: int = 64) -> np.ndarray:
    """Per-sample cosine between already-computed (normalised) image embeddings and their
    prompts' embeddings; each distinct prompt is encoded once."""
    import torch

    distinct = list(dict.fromkeys(prompts))
    text = torch.cat([clip.text_embeddings(distinct[b:b + batch_size]).cpu()
                      for b in range(0, len(distinct), batch_size)]).double().numpy()
    row = {p: i for i, p in enumerate(distinct)}
    return (image_embeddings.astype(np.float64) * text[[row[p] for p in prompts]]).sum(-1)


def summarize_clip_scores(cosines: np.ndarray) -> dict:
    mean = float(cosines.mean())
    return {"clip_score": mean, "clip_score_x100": 100 * mean, "std": float(cosines.std()),
            "num_samples": int(cosines.size)}
