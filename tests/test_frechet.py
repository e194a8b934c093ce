import warnings

import numpy as np
import pytest

from ddil_cli.evaluate.frechet import GaussianStats, frechet_distance, frechet_distance_features


def _random_cov(rng, dim, rank=None):
    a = rng.standard_normal((dim, rank or dim))
    return a @ a.T / (rank or dim) + (0 if rank else 0.1 * np.eye(dim))


def test_identical_features_give_zero():
    x = np.random.default_rng(0).standard_normal((300, 16))
    assert frechet_distance_features(x, x) == pytest.approx(0.0, abs=1e-9)


def test_closed_form_commuting_gaussians():
    # diagonal covariances: FD = |dmu|^2 + sum (sqrt a - sqrt b)^2
    rng = np.random.default_rng(1)
    a, b = rng.uniform(0.1, 3, 10), rng.uniform(0.1, 3, 10)
    mu1, mu2 = rng.standard_normal(10), rng.standard_normal(10)
    expected = ((mu1 - mu2) ** 2).sum() + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum()
    assert frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, rel=1e-10)


def test_closed_form_non_commuting_2x2():
    # for 2x2 M with nonnegative eigenvalues, tr sqrt(M) = sqrt(tr M + 2 sqrt(det M))
    s1 = np.array([[2.0, 0.9], [0.9, 1.0]])
    s2 = np.array([[0.5, -0.3], [-0.3, 1.5]])
    assert not np.allclose(s1 @ s2, s2 @ s1)
    tr_sqrt = np.sqrt(np.trace(s1 @ s2) + 2 * np.sqrt(np.linalg.det(s1) * np.linalg.det(s2)))
    mu1, mu2 = np.array([0.3, -1.0]), np.array([1.0, 0.5])
    expected = ((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * tr_sqrt
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-12)


def test_sample_estimate_approaches_population_value():
    # FD of samples converges to the FD of the generating Gaussians
    rng = np.random.default_rng(2)
    s1, s2 = _random_cov(rng, 4), _random_cov(rng, 4)
    mu2 = np.full(4, 0.5)
    x = rng.multivariate_normal(np.zeros(4), s1, size=200_000)
    y = rng.multivariate_normal(mu2, s2, size=200_000)
    assert frechet_distance_features(x, y) == pytest.approx(frechet_distance(np.zeros(4), s1, mu2, s2), rel=0.02)


@pytest.mark.parametrize("dim,rank", [(64, None), (64, 20)])
def test_matches_clean_fid(dim, rank):
    from cleanfid.fid import frechet_distance as cleanfid_fd

    rng = np.random.default_rng(3)
    s1, s2 = _random_cov(rng, dim, rank), _random_cov(rng, dim, rank)
    mu1, mu2 = rng.standard_normal(dim), rng.standard_normal(dim)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference = float(np.real(cleanfid_fd(mu1, s1, mu2, s2)))
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(reference, rel=1e-6, abs=1e-6)


def test_stats_use_unbiased_covariance():
    x = np.random.default_rng(4).standard_normal((50, 3))
    stats = GaussianStats.from_features(x)
    np.testing.assert_allclose(stats.sigma, np.cov(x.T, ddof=1))
    assert stats.num == 50


@pytest.mark.parametrize("n", [10, 40])
def test_low_rank_route_equals_full_route(n):
    from ddil_cli.evaluate.frechet import frechet_distance_stats, frechet_distance_to_stats

    rng = np.random.default_rng(5)
    x = rng.standard_normal((n, 64)) * rng.uniform(0.5, 2, 64)
    ref = GaussianStats.from_features(rng.standard_normal((500, 64)) + 0.2)
    full = frechet_distance_stats(GaussianStats.from_features(x), ref)
    # the full route takes sqrt of the round-off in S1's D - N + 1 zero eigenvalues (~1e-7 each)
    assert frechet_distance_to_stats(x, ref) == pytest.approx(full, rel=1e-6)
