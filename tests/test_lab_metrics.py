import numpy as np
import pytest
import torch

from ddil_cli.evaluate.lab import THREE_SIGMA_MASS, lab_metrics, quality_radius, sliced_wasserstein
from ddil_cli.models.gmm import GaussianMixture, parse_gmm_spec


@pytest.mark.parametrize("spec", ["gmm:ring:8", "gmm:grid:9:d6:std0.03"])
def test_true_mixture_samples_score_perfectly(spec):
    mixture = GaussianMixture(parse_gmm_spec(spec))
    x, _ = mixture.sample(10000, torch.Generator().manual_seed(0))
    out = lab_metrics(x.numpy(), mixture, seed=1)
    assert out["mode_coverage"] == 1.0
    # 3 std in D dims = the radius that holds 99.73% of the mass; modes are well separated here
    assert out["quality"] == pytest.approx(THREE_SIGMA_MASS, abs=0.002)
    # exact samples are as close to fresh truth as fresh truth is to itself
    assert out["sliced_wasserstein"] < 2 * out["sliced_wasserstein_floor"]


def test_collapsed_sampler_covers_one_mode():
    mixture = GaussianMixture(parse_gmm_spec("gmm:ring:8"))
    gen = torch.Generator().manual_seed(0)
    x = mixture.means[3] + mixture.std * torch.randn(4000, 2, generator=gen, dtype=torch.float64)
    out = lab_metrics(x.numpy(), mixture)
    assert out["mode_coverage"] == pytest.approx(1 / 8)
    assert out["quality"] > 0.99  # collapsed, but every sample is a good one
    assert out["sliced_wasserstein"] > 10 * out["sliced_wasserstein_floor"]


def test_off_manifold_samples_have_no_quality():
    mixture = GaussianMixture(parse_gmm_spec("gmm:ring:8"))
    x = np.zeros((500, 2))  # the ring's centre, 0.8 away from every mode
    out = lab_metrics(x, mixture)
    assert out["quality"] == 0.0 and out["mode_coverage"] == 0.0


def test_per_class_mode_recall():
    mixture = GaussianMixture(parse_gmm_spec("gmm:ring:8"))  # 4 classes of 2 modes
    gen = torch.Generator().manual_seed(0)
    classes = torch.arange(4).repeat_interleave(1000)
    exact, _ = mixture.sample(4000, gen, classes=classes)
    out = lab_metrics(exact.numpy(), mixture, classes=classes.numpy())
    assert out["class_mode_recall"] == 1.0 and out["class_accuracy"] == 1.0
    # a guided sampler that always lands on the first mode of each class recalls half the modes
    first_mode = torch.stack([(mixture.class_of_mode == c).nonzero()[0, 0] for c in range(4)])
    collapsed = mixture.means[first_mode[classes]] + mixture.std * torch.randn(4000, 2, generator=gen,
                                                                               dtype=torch.float64)
    out = lab_metrics(collapsed.numpy(), mixture, classes=classes.numpy())
    assert out["class_mode_recall"] == pytest.approx(0.5)
    assert out["class_accuracy"] == 1.0
    assert out["mode_coverage"] == pytest.approx(0.5)


def test_sliced_wasserstein_of_a_shift():
    # every 1-D projection of a shift by v moves by <v, u>; E[<v,u>^2] = |v|^2 / D
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(5000, 4, generator=gen, dtype=torch.float64)
    v = torch.tensor([1.0, 0.0, 0.0, 0.0], dtype=torch.float64)
    value = sliced_wasserstein(x, x + v, 2000, gen)
    assert value == pytest.approx(0.5, rel=0.05)
    assert sliced_wasserstein(x, x[:3000] + v, 2000, gen) == pytest.approx(0.5, rel=0.1)


def test_quality_radius_is_three_std_in_one_dimension():
    assert quality_radius(0.1, 1) == pytest.approx(0.3, rel=1e-6)
