"""SlotAutoencoder(mixture="diagonal"): a Gaussian mixture over the encoder's features whose EM is
the slot update of Probabilistic Slot Attention (a fixed rule inside a learned encoder/decoder)."""

import numpy as np
import pytest
import torch
from scipy.special import logsumexp
from scipy.stats import norm
from sklearn.mixture._gaussian_mixture import _estimate_gaussian_parameters

from pyro_slots import per_datapoint_elbo
from pyro_slots.inner import EM, SoftKMeans
from pyro_slots.refine import run_inner
from tests.conftest import tiny_autoencoder

F = 16


def _slots(batch=2, num_slots=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    loc = torch.randn(batch, num_slots, F, generator=g)
    log_scale = 0.3 * torch.randn(batch, num_slots, F, generator=g)
    logit = torch.randn(batch, num_slots, generator=g)
    return torch.cat([loc, log_scale, logit.unsqueeze(-1)], -1)


def test_diagonal_mixture_elbo_is_the_brute_force_log_likelihood(float64):
    """Every slot is (loc, log_scale, logit): the ELBO is Σ_m log Σ_k π_k Π_f N(x_mf; μ_kf, σ_kf)
    computed with scipy."""
    model = tiny_autoencoder(mixture="diagonal")
    assert model.slot_dim == 2 * F + 1
    x = torch.randn(2, 10, F, generator=torch.Generator().manual_seed(1))
    slots = _slots()
    elbo = per_datapoint_elbo(model, x, slots)
    s = slots.numpy()
    loc, scale, logit = s[..., :F], np.exp(s[..., F : 2 * F]), s[..., -1]
    log_pi = logit - logsumexp(logit, -1, keepdims=True)
    for n in range(2):
        comp = norm.logpdf(x[n].numpy()[:, None, :], loc[n][None], scale[n][None]).sum(-1)
        expected = logsumexp(comp + log_pi[n][None], axis=1).sum()
        assert elbo[n].item() == pytest.approx(expected, rel=1e-10)


def test_diagonal_m_step_is_sklearns_and_em_never_lowers_the_elbo(float64):
    """The M-step's means, variances and weights are scikit-learn's diagonal-covariance estimates
    from the same responsibilities; EM from random slots climbs monotonically; the decoder reads
    the means only."""
    model = tiny_autoencoder(mixture="diagonal")
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 40, F, generator=g) + 3 * torch.randn(2, 1, F, generator=g)
    resp = torch.softmax(torch.randn(2, 3, 40, generator=g), dim=1)
    slots = model.m_step(x, resp)
    parts = model.slot_spec.split(slots)
    for n in range(2):
        nk, means, var = _estimate_gaussian_parameters(x[n].numpy(), resp[n].T.numpy(), 0.0, "diag")
        np.testing.assert_allclose(parts["loc"][n].numpy(), means, rtol=1e-9)
        np.testing.assert_allclose(np.exp(2 * parts["log_scale"][n].numpy()), var, rtol=1e-4)
        np.testing.assert_allclose(np.exp(parts["logit"][n].numpy()), nk / 40, rtol=1e-9)
    for rule in (EM(20), SoftKMeans(20, temperature=2.0)):
        result = run_inner(model, x, rule, _slots(seed=3), 20)
        assert (result.history[1:] - result.history[:-1] >= -1e-9).all()
        assert (result.history[-1] > result.history[0]).all()
    with torch.no_grad():
        other = slots.clone()
        other[..., F:] = 0.0  # other variances and weights, same means
        torch.testing.assert_close(model.decode(other)[0], model.decode(slots)[0])


def test_diagonal_mixture_needs_slots_in_feature_space():
    with pytest.raises(ValueError, match="slot_dim: mixture='diagonal' .* feature_dim 16, got 8"):
        tiny_autoencoder(mixture="diagonal", slot_dim=8)
    with pytest.raises(ValueError, match="mixture: expected one of"):
        tiny_autoencoder(mixture="full")


def test_trainer_builds_the_diagonal_mixture_with_its_em():
    """--mixture diagonal --inner em: the model's slots carry their variances and weights (2F + 1
    numbers), EM is the rule, and one refinement equals GaussianMixture's EM on the features."""
    from pyro_slots import refine
    from pyro_slots.cli.config import ConfigError, TrainConfig
    from pyro_slots.cli.registry import build, resolve
    from pyro_slots.models import GaussianMixture

    c = build(resolve(TrainConfig(model="slot-autoencoder", dataset="tetrominoes", slot_dim=8,
                                  mixture="diagonal", inner="em", batch_size=2)))  # fmt: skip
    assert c.model.mixture == "diagonal" and c.model.slot_dim == 17
    x = c.stream.batch(0).x
    with torch.no_grad():
        features = c.model.encode(x)
        ours = refine(c.model, x, c.inner, num_slots=4, num_steps=3, seed=1).slots
        slots0 = refine(c.model, x, c.inner, num_slots=4, num_steps=1, seed=1).initial_slots[0]
        gmm = refine(GaussianMixture(4, 8), features, EM(3), slots=slots0).slots
    torch.testing.assert_close(ours, gmm)
    with pytest.raises(ConfigError, match="mixture: only for --model slot-autoencoder"):
        resolve(TrainConfig(model="iodine", mixture="diagonal"))
    with pytest.raises(ConfigError, match="mixture: unknown kind 'full'"):
        resolve(TrainConfig(model="slot-autoencoder", mixture="full"))
