import hashlib

import numpy as np
import pytest
import torch
from scipy import stats
from scipy.special import logsumexp

from pyro_slots.data import GaussianMixturePoints, sample_point_sets, true_log_likelihood


def test_oracle_log_likelihood_matches_scipy():
    sets = sample_point_sets(3, 50, num_components=4, dim=2, seed=1)
    got = true_log_likelihood(sets.x, sets.means, sets.scales, sets.weights)
    assert got.shape == (3, 50)
    x, mu = sets.x.double().numpy(), sets.means.double().numpy()
    sd, w = sets.scales.double().numpy(), sets.weights.double().numpy()
    for s in range(3):
        per_component = np.stack(
            [
                np.log(w[s, k])
                + stats.multivariate_normal(mu[s, k], np.diag(sd[s, k] ** 2)).logpdf(x[s])
                for k in range(4)
            ]
        )
        np.testing.assert_allclose(got[s].numpy(), logsumexp(per_component, axis=0), rtol=1e-5)


def test_points_follow_the_true_mixture():
    sets = sample_point_sets(1, 40_000, num_components=3, dim=2, seed=2)
    x, z = sets.x[0].double(), sets.assignments[0]
    freq = torch.bincount(z, minlength=3).double() / z.numel()
    # Binomial standard error of a frequency, 5 sigma.
    w = sets.weights[0].double()
    assert (freq - w).abs().max() < 5 * (w * (1 - w) / z.numel()).sqrt().max()
    for k in range(3):
        xk = x[z == k]
        se = sets.scales[0, k].double() / xk.shape[0] ** 0.5
        assert ((xk.mean(0) - sets.means[0, k]).abs() < 5 * se).all()
        # Standard error of a normal sample's std: sigma / sqrt(2 n).
        assert (
            (xk.std(0) - sets.scales[0, k]).abs() < 5 * sets.scales[0, k] / (2 * xk.shape[0]) ** 0.5
        ).all()
        assert (
            stats.kstest(((xk - sets.means[0, k]) / sets.scales[0, k])[:, 0].numpy(), "norm").pvalue
            > 1e-3
        )


def test_parameters_follow_their_priors():
    sets = sample_point_sets(2000, 1, num_components=4, dim=2, seed=3, concentration=5)
    w = sets.weights.double()
    np.testing.assert_allclose(w.sum(1).numpy(), 1.0, rtol=1e-6)
    # Dirichlet(5, 5, 5, 5): mean 1/4, variance a (a0 - a) / (a0^2 (a0 + 1)) = 75 / 8400.
    np.testing.assert_allclose(w.mean(0).numpy(), 0.25, atol=0.01)
    np.testing.assert_allclose(w.var(0).numpy(), 75 / 8400, rtol=0.15)
    means, scales = sets.means.numpy(), sets.scales.numpy()
    assert stats.kstest(means.ravel(), stats.uniform(-4, 8).cdf).pvalue > 1e-3
    assert stats.kstest(scales.ravel(), stats.uniform(0.3, 0.7).cdf).pvalue > 1e-3


POINTS_CHECKSUM = "c58132ee098fc7e25ab8126a945d3164f6a6b031521cd62c424e0d241d85d8ce"


def test_same_seed_same_sets():
    sets = sample_point_sets(3, 100, seed=0)
    h = hashlib.sha256()
    for value in sets:
        h.update(np.round(value.double().numpy(), 5).tobytes())
    assert h.hexdigest() == POINTS_CHECKSUM
    data = GaussianMixturePoints(5, 100, seed=0)
    later = sample_point_sets(2, 100, seed=0, start=1)
    for key, value in sets._asdict().items():
        assert torch.equal(data[2][key], value[2])
        assert torch.equal(later._asdict()[key][:2], value[1:])
    assert not torch.equal(sample_point_sets(3, 100, seed=1).x, sets.x)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(scale_range=(1.0, 0.5)), "scale_range"),
        (dict(num_components=0), "num_components"),
        (dict(concentration=0), "concentration"),
        (dict(mean_range=-1.0), "mean_range"),
    ],
)
def test_bad_arguments_are_named(kwargs, match):
    with pytest.raises(ValueError, match=match):
        sample_point_sets(2, 10, **kwargs)


def test_oracle_rejects_mismatched_shapes():
    sets = sample_point_sets(2, 10, seed=0)
    with pytest.raises(ValueError, match="weights"):
        true_log_likelihood(sets.x, sets.means, sets.scales, sets.weights[:1])
    with pytest.raises(ValueError, match="scales"):
        true_log_likelihood(sets.x, sets.means, sets.scales[..., :1], sets.weights)
