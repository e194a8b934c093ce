"""Frechet distance between Gaussians fitted to two feature sets, in float64.

    FD = |mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr( (S1 S2)^(1/2) )

tr((S1 S2)^(1/2)) is the sum of square roots of the eigenvalues of S1 S2. Those equal the
eigenvalues of the symmetric PSD matrix R S2 R with R = S1^(1/2), so two symmetric
eigendecompositions (`eigh`) give it without `scipy.linalg.sqrtm` (wrong on scipy 1.11-1.12,
signature changed in 1.18) and without complex round-off: tiny negative eigenvalues from
round-off are clipped to 0.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class GaussianStats:
    """Mean and covariance (float64) of `num` feature vectors."""

    mu: np.ndarray
    sigma: np.ndarray
    num: int

    @staticmethod
    def from_features(features: np.ndarray) -> "GaussianStats":
        x = np.asarray(features, dtype=np.float64)
        if x.ndim != 2 or x.shape[0] < 2:
            raise ValueError(f"need a (N >= 2, D) feature array, got shape {x.shape}")
        # rowvar=False, ddof=1: the unbiased covariance, as clean-fid and pytorch-fid use
        return GaussianStats(x.mean(0), np.cov(x, rowvar=False), int(x.shape[0]))


def _psd_sqrt(matrix: np.ndarray) -> np.ndarray:
    vals, vecs = np.linalg.eigh((matrix + matrix.T) / 2)
    return (vecs * np.sqrt(np.clip(vals, 0, None))) @ vecs.T


def trace_sqrt_product(sigma1: np.ndarray, sigma2: np.ndarray) -> float:
    """tr((S1 S2)^(1/2)) for symmetric PSD S1, S2."""
    root1 = _psd_sqrt(np.asarray(sigma1, dtype=np.float64))
    middle = root1 @ np.asarray(sigma2, dtype=np.float64) @ root1
    vals = np.linalg.eigvalsh((middle + middle.T) / 2)
    return float(np.sqrt(np.clip(vals, 0, None)).sum())


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1 = np.atleast_2d(np.asarray(sigma1, np.float64))
    sigma2 = np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise ValueError(f"feature dimensions differ: {mu1.shape} vs {mu2.shape}")
    diff = mu1 - mu2
    value = float(diff @ diff + np.trace(sigma1) + np.trace(sigma2)
                  - 2 * trace_sqrt_product(sigma1, sigma2))
    # the exact value is >= 0; round-off can leave a tiny negative for identical inputs
    return max(value, 0.0)


def trace_sqrt_product_lowrank(features: np.ndarray, sigma2: np.ndarray) -> float:
    """tr((S1 S2)^(1/2)) with S1 the covariance of `features` (N, D), for N <= D.

    S1 = A^T A with A the centred features / sqrt(N - 1); the nonzero eigenvalues of S1 S2 are
    those of A S2 A^T (N x N, symmetric PSD), so one small eigendecomposition replaces two
    D x D ones: exact, and much faster when there are fewer samples than dimensions."""
    x = np.asarray(features, dtype=np.float64)
    a = (x - x.mean(0)) / np.sqrt(x.shape[0] - 1)
    middle = a @ np.asarray(sigma2, dtype=np.float64) @ a.T
    vals = np.linalg.eigvalsh((middle + middle.T) / 2)
    return float(np.sqrt(np.clip(vals, 0, None)).sum())


def frechet_distance_to_stats(features: np.ndarray, ref: GaussianStats) -> float:
    """FD between the Gaussian fitted to `features` and `ref`, taking the low-rank route when
    there are fewer samples than dimensions."""
    x = np.asarray(features, dtype=np.float64)
    own = GaussianStats.from_features(x)
    if x.shape[0] > x.shape[1]:
        return frechet_distance_stats(own, ref)
    diff = own.mu - np.asarray(ref.mu, np.float64)
    value = float(diff @ diff + np.trace(own.sigma) + np.trace(ref.sigma)
                  - 2 * trace_sqrt_product_lowrank(x, ref.sigma))
    return max(value, 0.0)


def frechet_distance_stats(a: GaussianStats, b: GaussianStats) -> float:
    return frechet_distance(a.mu, a.sigma, b.mu, b.sigma)


def frechet_distance_features(x: np.ndarray, y: np.ndarray) -> float:
    return frechet_distance_stats(GaussianStats.from_features(x), GaussianStats.from_features(y))
