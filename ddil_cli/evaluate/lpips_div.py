"""LPIPS diversity: for each prompt with >= 2 seeds, the mean LPIPS over all pairs of its
images; reported as the mean and std over prompts (higher = more diverse).

LPIPS is the `lpips` package's AlexNet v0.1 model: its linear layers ship in the wheel; the
AlexNet trunk is torchvision's `alexnet-owt-7be5be79.pth`, read from `--lpips-backbone PATH` or
from the torch hub cache. The model is built with a random trunk (so torchvision never tries to
download) and the trunk weights are then loaded from that file.
"""

from __future__ import annotations

import itertools
import warnings
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from ddil_cli.evaluate.features import ExtractorOptions, WeightsUnavailable

ALEXNET_FILENAME = "alexnet-owt-7be5be79.pth"


def default_alexnet_path() -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints" / ALEXNET_FILENAME


class LpipsModel:
    def __init__(self, options: ExtractorOptions):
        import lpips

        path = Path(options.lpips_backbone) if options.lpips_backbone else default_alexnet_path()
        if not path.is_file():
            raise WeightsUnavailable(
                f"AlexNet trunk for LPIPS not found at {path}; pass --lpips-backbone PATH to torchvision's "
                f"{ALEXNET_FILENAME} (https://download.pytorch.org/models/{ALEXNET_FILENAME}) or place it "
                f"at {default_alexnet_path()}")
        self.path, self.device = path, options.device
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self.model = lpips.LPIPS(net="alex", version="0.1", pretrained=True, pnet_rand=True, verbose=False)
        state = torch.load(path, map_location="cpu", weights_only=True)
        trunk = {}
        # lpips splits torchvision's alexnet.features into slices that keep the layer indices
        for name, param in self.model.net.named_parameters():
            _, index, kind = name.split(".")
            source = f"features.{index}.{kind}"
            if source not in state:
                raise WeightsUnavailable(f"{path} is not a torchvision AlexNet state_dict (no {source}); "
                                         f"pass --lpips-backbone PATH to {ALEXNET_FILENAME}")
            trunk[name] = state[source]
        self.model.net.load_state_dict(trunk, strict=True)
        self.model = self.model.to(self.device).eval()

    @torch.no_grad()
    def distance(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        """LPIPS between uint8 image batches a[i], b[i] (B, H, W, 3) -> (B,)."""
        to_t = lambda x: (torch.from_numpy(np.ascontiguousarray(x)).permute(0, 3, 1, 2).float()
                          / 127.5 - 1.0).to(self.device)
        return self.model(to_t(a), to_t(b)).reshape(-1).double().cpu().numpy()


def lpips_diversity(model: LpipsModel, groups: dict[str, list[int]],
                    load: Callable[[list[int]], np.ndarray], batch_size: int = 32) -> dict:
    """`groups`: prompt -> sample indices; `load(indices)` -> their prepared uint8 images."""
    per_prompt: dict[str, float] = {}
    num_pairs = 0
    for prompt, indices in groups.items():
        if len(indices) < 2:
            continue
        images = load(list(indices))
        pairs = list(itertools.combinations(range(len(indices)), 2))
        dists = []
        for start in range(0, len(pairs), batch_size):
            chunk = pairs[start:start + batch_size]
            i, j = zip(*chunk)
            dists.append(model.distance(images[list(i)], images[list(j)]))
        per_prompt[prompt] = float(np.concatenate(dists).mean())
        num_pairs += len(pairs)
    if not per_prompt:
        return {"available": False,
                "reason": "no prompt has >= 2 samples; sample several seeds per prompt with ddil sample"}
    values = np.array(list(per_prompt.values()))
    return {"lpips_diversity": float(values.mean()), "std_over_prompts": float(values.std()),
            "num_prompts": len(per_prompt), "num_pairs": num_pairs,
            "seeds_per_prompt": sorted({len(v) for v in groups.values() if len(v) >= 2})}
