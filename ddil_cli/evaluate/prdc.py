"""Precision / recall (Kynkaanniemi et al. 2019) and density / coverage (Naeem et al. 2020).

Same definitions as the `prdc` package (Naeem et al.'s reference code), including its
conventions: a point's k-NN radius is the (k+1)-th smallest distance in its own set counting
itself, and every comparison is strict (`<`). Unlike it, we never hold an N x M distance
matrix: real rows are processed in chunks (each chunk sees all fake points, and all real points
for the radii), so memory is O(chunk * max(N, M)) and 30k x 30k fits in a few hundred MB.
Distances are computed in float64 (as sklearn does for float32 input) so decisions at the
k-NN boundary agree with the reference.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

DEFAULT_CHUNK_BYTES = 256 * 2**20


@dataclass
class PRDC:
    precision: float
    recall: float
    density: float
    coverage: float

    def as_dict(self) -> dict[str, float]:
        return {"precision": self.precision, "recall": self.recall,
                "density": self.density, "coverage": self.coverage}


def _as_tensor(x, device, dtype) -> torch.Tensor:
    t = torch.as_tensor(np.asarray(x) if not isinstance(x, torch.Tensor) else x)
    if t.ndim != 2:
        raise ValueError(f"features must be (N, D), got shape {tuple(t.shape)}")
    return t.to(device=device, dtype=dtype)


def _chunk_rows(num_cols: int, dtype: torch.dtype, chunk_bytes: int) -> int:
    per_row = num_cols * torch.finfo(dtype).bits // 8 * 3  # distances + a mask + topk scratch
    return max(1, chunk_bytes // max(per_row, 1))


def _distances(a: torch.Tensor, b: torch.Tensor, a_sq: torch.Tensor, b_sq: torch.Tensor) -> torch.Tensor:
    # |a|^2 + |b|^2 - 2 a.b with one (B, M) buffer: addmm writes it, the rest is in place
    d2 = torch.addmm(b_sq.unsqueeze(0), a, b.T, beta=1.0, alpha=-2.0)
    d2.add_(a_sq.unsqueeze(1))
    return d2.clamp_min_(0).sqrt_()


def knn_radii(x: torch.Tensor, k: int, chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> torch.Tensor:
    """Distance from each row of x to its k-th nearest other row (the (k+1)-th counting itself)."""
    n = x.shape[0]
    if n <= k:
        raise ValueError(f"need more than k = {k} points for k-NN radii, got {n}")
    sq = (x * x).sum(1)
    rows = _chunk_rows(n, x.dtype, chunk_bytes)
    radii = torch.empty(n, dtype=x.dtype, device=x.device)
    for start in range(0, n, rows):
        stop = min(start + rows, n)
        d = _distances(x[start:stop], x, sq[start:stop], sq)
        # the self-distance is 0 exactly (the formula leaves round-off), as sklearn sets it
        d[torch.arange(stop - start, device=x.device), torch.arange(start, stop, device=x.device)] = 0
        radii[start:stop] = torch.kthvalue(d, k + 1, dim=1).values
    return radii


def compute_prdc(real, fake, k: int = 5, *, device: str | torch.device = "cpu",
                 dtype: torch.dtype = torch.float64, chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> PRDC:
    """PR/DC of `fake` (generated) against `real` (reference) feature sets, k-NN radius k."""
    real_t, fake_t = _as_tensor(real, device, dtype), _as_tensor(fake, device, dtype)
    if real_t.shape[1] != fake_t.shape[1]:
        raise ValueError(f"feature dimensions differ: {real_t.shape[1]} vs {fake_t.shape[1]}")
    real_radii = knn_radii(real_t, k, chunk_bytes)
    fake_radii = knn_radii(fake_t, k, chunk_bytes)
    n_real, n_fake = real_t.shape[0], fake_t.shape[0]
    real_sq, fake_sq = (real_t * real_t).sum(1), (fake_t * fake_t).sum(1)

    fake_in_real_manifold = torch.zeros(n_fake, dtype=torch.bool, device=real_t.device)
    fake_ball_count = torch.zeros(n_fake, dtype=torch.float64, device=real_t.device)
    recalled = torch.zeros(n_real, dtype=torch.bool, device=real_t.device)
    covered = torch.zeros(n_real, dtype=torch.bool, device=real_t.device)
    rows = _chunk_rows(n_fake, dtype, chunk_bytes)
    for start in range(0, n_real, rows):
        stop = min(start + rows, n_real)
        d = _distances(real_t[start:stop], fake_t, real_sq[start:stop], fake_sq)
        inside_real_ball = d < real_radii[start:stop, None]
        fake_in_real_manifold |= inside_real_ball.any(0)
        fake_ball_count += inside_real_ball.sum(0, dtype=torch.float64)
        recalled[start:stop] = (d < fake_radii[None, :]).any(1)
        covered[start:stop] = d.min(1).values < real_radii[start:stop]
    return PRDC(precision=fake_in_real_manifold.double().mean().item(),
                recall=recalled.double().mean().item(),
                density=(fake_ball_count.mean() / k).item(),
                coverage=covered.double().mean().item())
