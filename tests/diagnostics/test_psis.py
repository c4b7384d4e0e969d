import warnings

import numpy as np
import pytest
import torch
from scipy.special import logsumexp
from scipy.stats import multivariate_normal

import pyro_slots as ps
from pyro_slots.diagnostics import PSISWarning, khat_reliability, khat_threshold, psis_diagnostic
from pyro_slots.models import GaussianMixture

NUM_SAMPLES = 2000


def _data(batch=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return 1.5 * torch.randn(batch, 3, 2, generator=g)


def test_exact_guide(float64, conjugate):
    x = _data()
    result = psis_diagnostic(conjugate, x, conjugate.exact_slots(x), NUM_SAMPLES, seed=0)
    truth = conjugate.log_evidence(x)
    # With q = p(z | x) every log ratio is log p(x): an exact identity of the traces.
    torch.testing.assert_close(result.log_weights, truth[:, None].expand(-1, NUM_SAMPLES))
    assert (result.khat < 0.5).all()
    assert (result.log_evidence - truth).abs().max() < 0.05


def test_exact_guide_in_float32_is_exact_not_unusable(conjugate):
    """In float32 an exact guide's log ratios differ by rounding (about 1e-6 of their size):
    a fixed tolerance of 1e-9 sent them to the Pareto fit, which read a heavy tail (k̂ = inf,
    'unusable', with a PSISWarning). The default tolerance follows the dtype."""
    x = _data().float()
    slots = conjugate.exact_slots(x).float()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no PSISWarning
        result = psis_diagnostic(conjugate, x, slots, NUM_SAMPLES, seed=0)
    assert result.log_weights.dtype == torch.float32
    spread = (result.log_weights.amax(1) - result.log_weights.amin(1)).double()
    assert (spread > 1e-9 * (1 + result.log_weights.double().mean(1).abs())).any()  # rounding
    assert torch.isneginf(result.khat).all()
    truth = conjugate.log_evidence(x.double())
    assert (result.log_evidence.double() - truth).abs().max() < 1e-3


def test_slightly_wide_guide_is_good(float64, conjugate):
    # A guide 20% wider than the posterior has bounded importance ratios: the Pareto fit runs
    # (no constant-weight shortcut) and k̂ stays below 0.5.
    x = _data()
    result = psis_diagnostic(conjugate, x, conjugate.exact_slots(x, 1.2), NUM_SAMPLES, seed=0)
    truth = conjugate.log_evidence(x)
    assert torch.isfinite(result.khat).all()
    assert (result.khat < 0.5).all()
    assert (result.log_evidence - truth).abs().max() < 0.05
    # The ELBO is a strict lower bound here; PSIS recovers the gap.
    assert (result.elbo < truth - 0.1).all()


def test_over_narrow_guide_is_flagged(float64, conjugate):
    x = _data()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = psis_diagnostic(conjugate, x, conjugate.exact_slots(x, 0.3), NUM_SAMPLES, seed=0)
    assert (result.khat > 0.7).all()
    # One warning of our own naming every datapoint, nothing from ArviZ or NumPy.
    assert [w.category for w in caught] == [PSISWarning]
    message = str(caught[0].message)
    for label in np.unique(result.reliability):
        assert label in message
    assert set(result.reliability) <= {"unreliable", "unusable"}


def test_khat_reliability_thresholds():
    khat = [-np.inf, 0.2, 0.5, 0.69, 0.7, 0.71, 1.0, 1.01, np.inf]
    assert khat_reliability(khat).tolist() == [
        "exact",
        "good",
        "ok",
        "ok",
        "ok",
        "unreliable",
        "unreliable",
        "unusable",
        "unusable",
    ]


def test_numeric_warnings_of_the_pareto_fit_do_not_leak(float64, conjugate, monkeypatch):
    """Whatever NumPy says inside ArviZ's fit (overflow in exp of a poor guide's ratios) stays
    inside; ratios spanning thousands of nats get k̂ = inf, labelled unusable."""
    import pyro_slots.diagnostics.psis as psis_module

    original = psis_module.az.psislw

    def noisy(*args, **kwargs):
        np.exp(np.array([1e4]))  # RuntimeWarning: overflow encountered in exp
        return original(*args, **kwargs)

    monkeypatch.setattr(psis_module.az, "psislw", noisy)
    x = _data(3)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = psis_diagnostic(conjugate, x, conjugate.exact_slots(x, 0.3), 500, seed=0)
    assert [w.category for w in caught] == [PSISWarning]
    assert np.isfinite(result.smoothed_log_weights.numpy()).all()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        psis_module._warn_khat(np.array([np.inf, 0.3]))
    assert len(caught) == 1 and "datapoints [0]" in str(caught[0].message)
    assert "unusable" in str(caught[0].message)


def test_khat_threshold():
    # min(1 - 1 / log10(S), 0.7) of Vehtari et al. (2024): 0.5 at S = 100, capped at 0.7.
    assert khat_threshold(100) == pytest.approx(0.5)
    assert khat_threshold(10**6) == pytest.approx(0.7)


def test_seed_reproducible_and_rng_untouched(float64, conjugate):
    x = _data(2)
    slots = conjugate.exact_slots(x, 0.8)
    state = torch.random.get_rng_state()
    a = psis_diagnostic(conjugate, x, slots, 100, seed=3)
    b = psis_diagnostic(conjugate, x, slots, 100, seed=3)
    torch.testing.assert_close(a.log_weights, b.log_weights)
    assert torch.equal(state, torch.random.get_rng_state())


def test_enumerated_model_has_constant_ratios(float64, point_sets):
    """GMM: no guide latents, so every ratio is the exact log-likelihood (scipy)."""
    x = point_sets(3, 20, seed=4)
    gmm = GaussianMixture(3, 2)
    slots = ps.refine(gmm, x, ps.inner.EM(5), seed=0).slots[0]
    result = psis_diagnostic(gmm, x, slots, 50, seed=0)
    loc, scale, log_w = gmm.component_params(slots)
    expected = []
    for n in range(x.shape[0]):
        comp = [
            multivariate_normal(loc[n, k].numpy(), torch.diag(scale[n, k] ** 2).numpy()).logpdf(
                x[n].numpy()
            )
            + log_w[n, k].item()
            for k in range(3)
        ]
        expected.append(logsumexp(comp, axis=0).sum())
    torch.testing.assert_close(result.log_evidence, torch.tensor(expected))
    assert torch.isneginf(result.khat).all()


def test_psis_errors(conjugate):
    x = _data(2)
    with pytest.raises(ValueError, match="num_samples"):
        psis_diagnostic(conjugate, x, conjugate.exact_slots(x), 5)
    with pytest.raises(ValueError, match="slots"):
        psis_diagnostic(conjugate, x, conjugate.exact_slots(x)[:1], 100)
