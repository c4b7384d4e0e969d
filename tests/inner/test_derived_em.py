"""EM without a hand-written M-step, and generalized EM for any model."""

import numpy as np
import pytest
import scipy.stats
import torch
from scipy.special import logsumexp

import pyro_slots as ps
from pyro_slots import CapabilityError
from pyro_slots.inner import EM, DerivedMStep, GeneralizedEM, InnerProblem
from pyro_slots.models import GaussianMixture
from tests.conftest import make_point_sets, tiny_autoencoder
from tests.inner.mixtures import (
    BernoulliMixture,
    BetaMixture,
    CategoricalMixture,
    GammaMixture,
    PoissonMixture,
    ScaledMeanMixture,
)


def _responsibilities(model, x, slots):
    return InnerProblem(model, x).elbo_and_responsibilities(slots)[1]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_derived_m_step_equals_the_gaussian_mixture_m_step(float64, seed):
    x, _ = make_point_sets(6, 40, seed=seed)
    gmm = GaussianMixture(3, 2)
    slots = gmm.init_slots(x, 3, generator=torch.Generator().manual_seed(seed))
    slots = slots + 0.3 * torch.randn(slots.shape, generator=torch.Generator().manual_seed(1))
    resp = _responsibilities(gmm, x, slots)
    expected = gmm.m_step(x, resp, slots)
    derived = DerivedMStep(reg_covar=gmm.reg_covar)(gmm, x, resp, slots)
    assert torch.allclose(derived, expected, atol=1e-12, rtol=1e-12)


# ---------------------------------------------------------------- numpy EM references
def _numpy_em(x, log_weights, params, log_component, m_step, num_steps):
    """Textbook EM on one datapoint; returns the log-likelihood per point after the steps."""
    for _ in range(num_steps):
        joint = log_weights[:, None] + log_component(x, params)  # (K, M)
        resp = np.exp(joint - logsumexp(joint, axis=0))
        nk = resp.sum(1) + 10 * np.finfo(float).eps
        params = m_step(x, resp, nk)
        log_weights = np.log(nk / x.shape[0])
    joint = log_weights[:, None] + log_component(x, params)
    return logsumexp(joint, axis=0).mean()


def _bernoulli_log(x, p):
    return (x[None] * np.log(p[:, None]) + (1 - x[None]) * np.log1p(-p[:, None])).sum(-1)


def _bernoulli_m(x, resp, nk):
    eps = np.finfo(float).eps
    return np.clip(resp @ x / nk[:, None], eps, 1 - eps)


def _poisson_log(x, rate):
    return scipy.stats.poisson.logpmf(x[None], rate[:, None]).sum(-1)


def _poisson_m(x, resp, nk):
    return np.maximum(resp @ x / nk[:, None], np.finfo(float).tiny)


def test_bernoulli_mixture_em_matches_numpy(float64):
    g = torch.Generator().manual_seed(0)
    batch, num_points, dim, k = 5, 60, 6, 3
    prototypes = torch.rand(batch, k, dim, generator=g)
    labels = torch.randint(k, (batch, num_points), generator=g)
    probs = torch.gather(prototypes, 1, labels[..., None].expand(-1, -1, dim))
    x = torch.bernoulli(probs, generator=g)
    logits0 = torch.randn(batch, k, dim, generator=g)
    model = BernoulliMixture(k, dim)
    slots = model.slot_spec.pack({"logits": logits0, "weight_logit": torch.zeros(batch, k)})
    result = ps.refine(model, x, EM(15), slots=slots)
    for n in range(batch):
        ll = _numpy_em(
            x[n].numpy(),
            np.log(np.full(k, 1 / k)),
            torch.sigmoid(logits0[n]).numpy(),
            _bernoulli_log,
            _bernoulli_m,
            15,
        )
        assert result.elbo[0, n].item() / num_points == pytest.approx(ll, abs=1e-4)


def test_poisson_mixture_em_matches_numpy(float64):
    g = torch.Generator().manual_seed(1)
    batch, num_points, dim, k = 5, 60, 3, 2
    rates = 1 + 8 * torch.rand(batch, k, dim, generator=g)
    labels = torch.randint(k, (batch, num_points), generator=g)
    x = torch.poisson(torch.gather(rates, 1, labels[..., None].expand(-1, -1, dim)), generator=g)
    log_rate0 = torch.log(1 + 8 * torch.rand(batch, k, dim, generator=g))
    model = PoissonMixture(k, dim)
    slots = model.slot_spec.pack({"log_rate": log_rate0, "weight_logit": torch.zeros(batch, k)})
    result = ps.refine(model, x, EM(15), slots=slots)
    for n in range(batch):
        ll = _numpy_em(
            x[n].numpy(),
            np.log(np.full(k, 1 / k)),
            log_rate0[n].exp().numpy(),
            _poisson_log,
            _poisson_m,
            15,
        )
        assert result.elbo[0, n].item() / num_points == pytest.approx(ll, abs=1e-4)


def _one_component_fit(model, x, fields):
    """The derived M-step with one slot and unit responsibilities: the plain MLE."""
    slots = model.slot_spec.pack({**fields, "weight_logit": torch.zeros(x.shape[0], 1)})
    resp = torch.ones(x.shape[0], 1, x.shape[1])
    return model.slot_spec.split(DerivedMStep(newton_steps=8)(model, x, resp, slots))


def test_gamma_m_step_is_the_maximum_likelihood_fit(float64):
    g = torch.Generator().manual_seed(2)
    x = torch.distributions.Gamma(2.5, 1.5).sample((1, 400, 1))
    zeros = torch.zeros(1, 1, 1)
    parts = _one_component_fit(GammaMixture(1, 1), x, {"log_shape": zeros, "log_rate": zeros})
    shape, _, scale = scipy.stats.gamma.fit(x.flatten().numpy(), floc=0)
    assert parts["log_shape"].exp().item() == pytest.approx(shape, rel=1e-5)
    assert parts["log_rate"].exp().item() == pytest.approx(1 / scale, rel=1e-5)
    del g


def test_beta_m_step_is_the_maximum_likelihood_fit(float64):
    torch.manual_seed(3)
    x = torch.distributions.Beta(2.0, 5.0).sample((1, 400, 1))
    zeros = torch.zeros(1, 1, 1)
    parts = _one_component_fit(BetaMixture(1, 1), x, {"a": zeros, "b": zeros})
    a, b, _, _ = scipy.stats.beta.fit(x.flatten().numpy(), floc=0, fscale=1)
    softplus = torch.nn.functional.softplus
    assert softplus(parts["a"]).item() == pytest.approx(a, rel=1e-4)
    assert softplus(parts["b"]).item() == pytest.approx(b, rel=1e-4)


def test_categorical_m_step_is_the_weighted_frequency(float64):
    g = torch.Generator().manual_seed(4)
    x = torch.randint(4, (3, 50, 2), generator=g).to(torch.float64)
    model = CategoricalMixture(2, 2, 4)
    slots = model.slot_spec.pack(
        {"logits": torch.randn(3, 2, 2, 4, generator=g), "weight_logit": torch.zeros(3, 2)}
    )
    resp = _responsibilities(model, x, slots)
    parts = model.slot_spec.split(DerivedMStep()(model, x, resp, slots))
    onehot = torch.nn.functional.one_hot(x.long(), 4).to(torch.float64)  # (B, M, D, C)
    freq = torch.einsum("bkm,bmdc->bkdc", resp, onehot)
    freq = freq / freq.sum(-1, keepdim=True)
    assert torch.allclose(torch.softmax(parts["logits"], -1), freq, atol=1e-10)


# ------------------------------------------------------------------------ refusals
def test_derived_m_step_refuses_an_unknown_parameter_map(float64):
    x, _ = make_point_sets(2, 10, seed=0)
    model = ScaledMeanMixture(2, 2)
    with pytest.raises(CapabilityError, match=r"parameter 'loc' of site 'obs'.*GeneralizedEM"):
        ps.refine(model, x, EM(2), seed=0, slots=torch.zeros(2, 2, 3))


def test_derived_m_step_refuses_latent_sites_and_names_them():
    from tests.models.test_image_models import squares, tiny_iodine

    model = tiny_iodine()
    x = squares(2)[0]
    with pytest.raises(CapabilityError, match=r"latent site 'z'.*GeneralizedEM"):
        ps.refine(model, x, EM(1), seed=0)


# ---------------------------------------------------------------- monotone ELBO
def _random_bernoulli_problems(num_problems=100, seed=0):
    g = torch.Generator().manual_seed(seed)
    k, dim, num_points = 3, 5, 30
    prototypes = torch.rand(num_problems, k, dim, generator=g)
    labels = torch.randint(k, (num_problems, num_points), generator=g)
    x = torch.bernoulli(
        torch.gather(prototypes, 1, labels[..., None].expand(-1, -1, dim)), generator=g
    )
    slots = BernoulliMixture(k, dim).slot_spec.pack(
        {
            "logits": 2 * torch.randn(num_problems, k, dim, generator=g),
            "weight_logit": torch.randn(num_problems, k, generator=g),
        }
    )
    return BernoulliMixture(k, dim), x, slots


@pytest.mark.parametrize("rule", [EM(25), GeneralizedEM(15)], ids=["em", "generalized_em"])
def test_elbo_is_monotone_on_100_random_bernoulli_problems(float64, rule):
    model, x, slots = _random_bernoulli_problems()
    history = ps.refine(model, x, rule, slots=slots).history  # (T + 1, 100)
    assert (history.diff(dim=0) >= -1e-9 * history[:-1].abs()).all()
    assert (history[-1] > history[0] + 1e-3).float().mean() > 0.9  # and it moved


@pytest.mark.parametrize("rule", [EM(25), GeneralizedEM(15)], ids=["em", "generalized_em"])
def test_elbo_is_monotone_on_100_random_gaussian_problems(float64, rule):
    g = torch.Generator().manual_seed(5)
    x, _ = make_point_sets(100, 25, seed=5)
    gmm = GaussianMixture(3, 2)
    slots = gmm.init_slots(x, 3, generator=g) + 0.5 * torch.randn(100, 3, 5, generator=g)
    history = ps.refine(gmm, x, rule, slots=slots).history
    assert (history.diff(dim=0) >= -1e-9 * history[:-1].abs()).all()


def test_generalized_em_reaches_em_fixed_point_on_the_gmm(float64):
    """Same ELBO as closed-form EM after enough steps (both climb to the same local optimum)."""
    x, _ = make_point_sets(6, 30, seed=0)
    gmm = GaussianMixture(3, 2)
    em = ps.refine(gmm, x, EM(200), seed=0)
    gem = ps.refine(gmm, x, GeneralizedEM(200), seed=0)
    assert torch.allclose(gem.elbo, em.elbo, rtol=1e-4)


def test_generalized_em_runs_where_em_is_refused():
    """IODINE (continuous latents and a guide) and the slot autoencoder: finite, no refusal."""
    from tests.models.test_image_models import squares, tiny_iodine

    x = squares(2)[0]
    model = tiny_iodine()
    result = ps.refine(model, x, GeneralizedEM(3, ascent_steps=2), seed=0)
    assert torch.isfinite(result.slots).all() and torch.isfinite(result.elbo).all()
    ae = tiny_autoencoder()
    result = ps.refine(ae, x, GeneralizedEM(3, ascent_steps=2), seed=0)
    assert (result.history.diff(dim=0) >= -1e-4 * result.history[:-1].abs()).all()


# ------------------------------------------------------------- unrolled gradients
def _encoder_grad(rule, seed=0):
    import pyro
    from torch import nn

    from pyro_slots.objectives import NegativeELBO

    torch.manual_seed(seed)
    x, _ = make_point_sets(3, 20, seed=seed)
    model = GaussianMixture(3, 2, encoder=nn.Linear(2, 2).double())
    svi = ps.NestedSVI(model, rule, NegativeELBO(), pyro.optim.SGD({"lr": 0.0}), seed=0)

    def loss(weight=None):
        if weight is not None:
            with torch.no_grad():
                model.encoder.weight.copy_(weight)
        svi.generator.manual_seed(0)
        return svi.loss(x)

    w0 = model.encoder.weight.detach().clone()
    grad = torch.autograd.grad(loss(), model.encoder.weight)[0]
    return grad, loss, w0


def test_unrolled_gradient_through_the_derived_m_step_equals_the_hand_written_one(float64):
    derived, _, _ = _encoder_grad(EM(3, m_step=DerivedMStep()))
    closed, _, _ = _encoder_grad(EM(3))
    assert derived.abs().max() > 0
    assert torch.allclose(derived, closed, rtol=1e-8, atol=1e-10)


def test_unrolled_gradient_of_generalized_em_matches_finite_differences(float64):
    grad, loss, w0 = _encoder_grad(GeneralizedEM(3, ascent_steps=2))
    assert grad.abs().min() > 1.0  # J depends on the encoder through the refined slots
    # J is piecewise smooth: a step is kept or refused per datapoint. Here one datapoint's
    # proposal ties its current ELBO within 1e-6 of w0 in w[1, 0], so the difference is taken
    # over 1e-4, where the jump weighs less than the tolerance.
    eps = 1e-4
    for i, j in [(0, 0), (1, 0), (0, 1)]:
        plus, minus = w0.clone(), w0.clone()
        plus[i, j] += eps
        minus[i, j] -= eps
        with torch.no_grad():
            fd = (loss(plus) - loss(minus)) / (2 * eps)
        assert grad[i, j].item() == pytest.approx(fd.item(), rel=1e-4, abs=1e-7)


@pytest.mark.parametrize("features", [2, 16])
def test_weighted_sums_are_numpys_and_differentiable(float64, features):
    from pyro_slots.inner.mstep import FEATURE_MAJOR_MAX, weighted_sums

    g = torch.Generator().manual_seed(features)
    resp = torch.rand(3, 4, 11, generator=g, dtype=torch.float64)
    values = torch.randn(3, 11, features, generator=g, dtype=torch.float64)
    want = np.einsum("bkm,bme->bke", resp.numpy(), values.numpy())
    got = weighted_sums(resp, values)
    assert (features < FEATURE_MAJOR_MAX) == (features == 2)  # both layouts are exercised
    assert np.abs(got.numpy() - want).max() < 1e-12
    assert torch.autograd.gradcheck(
        weighted_sums, (resp.requires_grad_(), values.requires_grad_()), eps=1e-6
    )


@pytest.mark.parametrize("grad", [False, True])
def test_weighted_squared_deviations_equal_the_brute_force_sum(float64, grad):
    """``Σ_m r_km (x_md - μ_kd)²`` one feature at a time (in one reused block without autograd)
    against the ``(B, K, M, D)`` brute force, three features; the inputs are left as they were."""
    from pyro_slots.inner.mstep import weighted_squared_deviations

    g = torch.Generator().manual_seed(3)
    x, loc = torch.randn(2, 7, 3, generator=g), torch.randn(2, 4, 3, generator=g)
    resp = torch.rand(2, 4, 7, generator=g)
    kept = [t.clone() for t in (x, loc, resp)]
    want = (resp.unsqueeze(-1) * (x.unsqueeze(1) - loc.unsqueeze(2)) ** 2).sum(2)
    with torch.set_grad_enabled(grad):
        got = weighted_squared_deviations(x, loc.requires_grad_(grad), resp)
    assert torch.allclose(got, want, rtol=0, atol=1e-12)
    assert all(torch.equal(a, b) for a, b in zip((x, loc.detach(), resp), kept))


def _brute_force_moments(resp, x, reg_covar, loc=None):
    """Float64 numpy: counts, means and variances about ``loc`` (the weighted means by
    default) plus ``reg_covar`` times each datapoint's per-feature variance."""
    r, v = resp.double().numpy(), x.double().numpy()
    nk = r.sum(-1) + 10 * torch.finfo(x.dtype).eps
    mean = np.einsum("bkm,bmd->bkd", r, v) / nk[..., None] if loc is None else loc.double().numpy()
    dev = v[:, None] - mean[:, :, None]  # (B, K, M, D)
    var = np.einsum("bkm,bkmd->bkd", r, dev**2) / nk[..., None]
    unit = v.var(1, keepdims=True)
    return nk, mean, var + reg_covar * np.where(unit > 0, unit, 1.0)


@pytest.mark.parametrize("features", [2, 16])
@pytest.mark.parametrize("fixed_loc", [False, True])
def test_normal_moments_are_the_brute_force_statistics(float64, features, fixed_loc):
    """Counts, means and variances from one product with [1, x_c, x_c²], against numpy's
    ``(B, K, M, D)`` brute force, in both layouts, about the weighted means or fixed ones; the
    data sit at 50 ± 1 (the moments are taken about each datapoint's mean)."""
    from pyro_slots.inner.mstep import FEATURE_MAJOR_MAX, normal_moments

    g = torch.Generator().manual_seed(features)
    x = 50 + torch.randn(3, 40, features, generator=g)
    resp = torch.softmax(torch.randn(3, 4, 40, generator=g), 1)
    loc = 50 + torch.randn(3, 4, features, generator=g) if fixed_loc else None
    nk, mean, var = normal_moments(resp, x, 1e-3, loc=loc)
    want = _brute_force_moments(resp, x, 1e-3, loc)
    assert (features < FEATURE_MAJOR_MAX) == (features == 2)  # both layouts are exercised
    for got, expected in zip((nk, mean, var), want):
        assert np.abs(got.numpy() - expected).max() < 1e-10
    if fixed_loc:
        assert mean is loc


def test_normal_moments_are_differentiable(float64):
    from pyro_slots.inner.mstep import normal_moments

    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 9, 2, generator=g, requires_grad=True)
    resp = torch.softmax(torch.randn(2, 3, 9, generator=g), 1).requires_grad_()
    assert torch.autograd.gradcheck(
        lambda r, v: normal_moments(r, v, 1e-2), (resp, x), eps=1e-6, atol=1e-6
    )
    # With a graph the moments come from torch.cat, without one from a block written in place.
    with torch.no_grad():
        plain = normal_moments(resp, x, 1e-2)
    for a, b in zip(normal_moments(resp, x, 1e-2), plain):
        assert torch.allclose(a, b, atol=1e-12)


def test_normal_moments_recompute_cancelling_components_directly(monkeypatch):
    """Float32: datapoint 1 has a component of standard deviation 1e-2 at 1e3 from the rest of
    its measurements, where S₂/nk - μ² loses every digit of its variance (checked below); that
    datapoint alone is recomputed as Σ r (x - μ)², to float32 accuracy of float64's numbers
    (its deviations from the datapoint's mean, ~500, are rounded to ~3e-5)."""
    import pyro_slots.inner.mstep as mstep

    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 60, 2, generator=g)
    x[1, 30:] = 1e3 + 1e-2 * torch.randn(30, 2, generator=g)
    resp = torch.zeros(3, 2, 60)
    resp[:, 0, :30], resp[:, 1, 30:] = 1.0, 1.0
    recomputed = []
    direct = mstep.weighted_squared_deviations
    monkeypatch.setattr(
        mstep, "weighted_squared_deviations",
        lambda xc, loc, r: recomputed.append(xc.shape[0]) or direct(xc, loc, r),
    )  # fmt: skip
    nk, mean, var = mstep.normal_moments(resp, x, 0.0)
    assert recomputed == [1]
    _, want_mean, want_var = _brute_force_moments(resp, x, 0.0)
    assert want_var[1, 1].max() < 2e-4  # the tight component
    assert np.abs(var.double().numpy() / want_var - 1).max() < 1e-3
    assert np.abs(mean.double().numpy() - want_mean).max() < 1e-4
    # The raw moments alone: off by far more than the variance itself.
    xc = (x - x.mean(1, keepdim=True)).double()[1, 30:]
    raw = (xc.float() ** 2).mean(0) - xc.float().mean(0) ** 2
    assert (raw.double() - torch.from_numpy(want_var[1, 1])).abs().max() > 10 * want_var[1, 1].max()


def test_tol_does_not_stop_a_datapoint_on_a_rejected_step(float64):
    """GeneralizedEM with a step too long at first rejects it (the datapoint stays at λ_t and
    halves its step size): that zero residual, and the zero ELBO change after it, are not
    convergence. With tol or elbo_tol every datapoint ends where the run without them does, up
    to the tolerance (they used to stop at λ_0 or λ_1, tens of nats lower), and it stops on an
    accepted step whose residual (or ELBO change) is below the tolerance."""
    g = torch.Generator().manual_seed(0)
    x = torch.cat([torch.randn(4, 30, 2, generator=g) * 0.3 - 2,
                   torch.randn(4, 30, 2, generator=g) * 0.3 + 2], 1).double()  # fmt: skip
    gmm = GaussianMixture(2, 2, init="random_from_data")
    rule = GeneralizedEM(60, step_size=1.0, trust_radius=None, ascent_steps=5)
    free = ps.refine(gmm, x, rule, seed=0)
    assert (free.residuals[:, 0] == 0).any(0).all()  # every datapoint had a rejected step
    for options in ({"tol": 1e-4}, {"elbo_tol": 1e-7}):
        stopped = ps.refine(gmm, x, rule, seed=0, **options)
        assert (stopped.steps < 60).all()
        assert torch.allclose(stopped.elbo, free.elbo, rtol=1e-3, atol=0)
        for n, t in enumerate(stopped.steps[0].tolist()):
            if "tol" in options:
                assert 0 < stopped.residuals[t - 1, 0, n] < 1e-4
            else:
                change = (stopped.history[t - 1, 0, n] - stopped.history[t - 2, 0, n]).abs()
                assert 0 < change / x.shape[1] < 1e-7


def test_derived_m_step_weighs_a_masked_site_by_its_mask(float64):
    """Missing measurements masked out of the likelihood (poutine.mask) entered the derived
    M-step as if observed: rates [24.4, 28.0] where the maximizer is the weighted mean of the
    observed counts, and EM lowered the ELBO (-38 -> -382)."""
    import pyro
    import pyro.distributions as dist
    from pyro import poutine
    from pyro.ops.indexing import Vindex

    class Masked(PoissonMixture):
        def __init__(self, mask):
            super().__init__(2, 1)
            self.mask = mask

        def model(self, x, slots):
            parts = self.slot_spec.split(slots)
            with pyro.plate(self.batch_plate, x.shape[0], dim=-2) as n:
                with pyro.plate("measurements", x.shape[1], dim=-1):
                    z = pyro.sample(
                        "assignment",
                        dist.Categorical(logits=parts["weight_logit"].unsqueeze(-2)),
                        infer={"enumerate": "parallel"},
                    )
                    rate = Vindex(parts["log_rate"])[n.unsqueeze(-1), z].exp()
                    with poutine.mask(mask=self.mask):  # the missing entries: no likelihood
                        pyro.sample("obs", dist.Poisson(rate).to_event(1), obs=x)

    g = torch.Generator().manual_seed(0)
    x = torch.cat(
        [torch.poisson(torch.full((1, 20, 1), 2.0), generator=g), torch.full((1, 20, 1), 50.0)], 1
    )
    mask = torch.zeros(1, 40, dtype=torch.bool)
    mask[:, :20] = True
    model = Masked(mask)
    slots = model.slot_spec.pack(
        {"log_rate": torch.tensor([[[0.0], [1.5]]]), "weight_logit": torch.zeros(1, 2)}
    )
    resp = _responsibilities(model, x, slots)
    rates = DerivedMStep()(model, x, resp, slots)[..., 0].exp()
    # argmax_λ Σ_m r_km mask_m log Poisson(x_m | λ_k): the weighted mean of the observed counts
    w = resp[0] * mask[0].double()
    want = (w * x[0, :, 0]).sum(-1) / w.sum(-1)
    torch.testing.assert_close(rates[0], want)
    history = ps.refine(model, x, EM(5), slots=slots).history[:, 0, 0]
    assert (history.diff() >= -1e-9).all()


@pytest.mark.parametrize("grad", [False, True])
def test_a_mean_shared_by_every_feature_with_scales_per_feature(float64, grad):
    """x | z ~ Normal(0, σ_z) per feature: the lean estimator indexed the shared mean per
    feature (IndexError); its ELBO is Pyro's (TraceEnumEstimator), and derived EM fits the
    scales: the weighted root mean square of the zero-mean data, and never lowers the ELBO."""
    from pyro_slots.elbo import TraceEnumEstimator
    from tests.inner.mixtures import ScaleMixture

    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 30, 2, generator=g) * torch.tensor([1.0, 3.0])
    model = ScaleMixture(2, 2)
    slots = (0.3 * torch.randn(2, 2, model.slot_dim, generator=g)).requires_grad_(grad)
    want = InnerProblem(model, x, estimator=TraceEnumEstimator()).elbo(slots)
    torch.testing.assert_close(InnerProblem(model, x).elbo(slots), want)
    resp = _responsibilities(model, x, slots.detach())
    scale = DerivedMStep()(model, x, resp, slots.detach())[..., :2].exp()
    rms = ((resp.unsqueeze(-1) * x.unsqueeze(1) ** 2).sum(2) / resp.sum(-1, keepdim=True)).sqrt()
    torch.testing.assert_close(scale, rms, rtol=1e-5, atol=0)  # (reg_covar: a 1e-6 floor)
    history = ps.refine(model, x, EM(5), slots=slots.detach()[None]).history[:, 0]
    assert (history.diff(dim=0) >= -1e-9).all()


def test_an_estimate_outside_the_parameters_range_goes_to_its_boundary(float64):
    """x | z ~ Normal(exp(u_z), 1) on mostly negative data: the weighted mean is negative, and
    log of it was NaN (EM then told the user to lower a step size EM does not have). The
    expected complete log-likelihood is concave in the mean with its maximum below 0, so on
    means > 0 it grows toward 0: the M-step goes to the boundary (the smallest positive
    number), and EM never lowers the ELBO."""
    from tests.inner.mixtures import PositiveMeanMixture

    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 30, 1, generator=g) - 2.0
    model = PositiveMeanMixture(2, 1)
    slots = torch.zeros(1, 2, model.slot_dim)
    resp = _responsibilities(model, x, slots)
    log_loc = model.slot_spec.split(DerivedMStep()(model, x, resp, slots))["log_loc"]
    assert torch.isfinite(log_loc).all()
    assert (log_loc.exp() <= 10 * torch.finfo(torch.float64).tiny).all()
    history = ps.refine(model, x, EM(3), slots=slots[None]).history[:, 0, 0]
    assert (history.diff() >= -1e-9).all()
