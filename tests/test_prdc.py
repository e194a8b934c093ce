import numpy as np
import pytest
import torch

from ddil_cli.evaluate.prdc import compute_prdc, knn_radii


@pytest.mark.parametrize("k", [3, 5])
def test_matches_prdc_package(k, capsys):
    import prdc

    rng = np.random.default_rng(0)
    real = rng.standard_normal((500, 32)).astype(np.float32)
    fake = (0.8 * rng.standard_normal((450, 32)) + 0.3).astype(np.float32)
    expected = prdc.compute_prdc(real, fake, nearest_k=k)
    # a small chunk size forces many chunks, so the chunked path is what is tested
    ours = compute_prdc(real, fake, k=k, chunk_bytes=64 * 1024).as_dict()
    for name in ("precision", "recall", "density", "coverage"):
        assert ours[name] == pytest.approx(float(expected[name]), abs=1e-12), name


def test_identical_sets_are_perfect():
    x = np.random.default_rng(1).standard_normal((300, 8))
    out = compute_prdc(x, x.copy(), k=5)
    assert out.precision == 1.0 and out.recall == 1.0 and out.coverage == 1.0
    # each point's ball strictly holds itself and its k-1 nearest others: density = 1
    assert out.density == pytest.approx(1.0, abs=2 / 300)


def test_far_apart_sets_score_zero():
    rng = np.random.default_rng(2)
    real = rng.standard_normal((200, 8))
    fake = rng.standard_normal((200, 8)) + 100.0
    out = compute_prdc(real, fake, k=5)
    assert (out.precision, out.recall, out.density, out.coverage) == (0.0, 0.0, 0.0, 0.0)


def test_radii_match_brute_force():
    x = torch.randn(120, 6, dtype=torch.float64)
    d = torch.cdist(x, x)
    expected = d.sort(1).values[:, 4]  # self + 4 neighbours
    torch.testing.assert_close(knn_radii(x, 4, chunk_bytes=4096), expected)


def test_too_few_points_is_an_error():
    with pytest.raises(ValueError):
        compute_prdc(np.zeros((3, 2)), np.zeros((10, 2)), k=5)
