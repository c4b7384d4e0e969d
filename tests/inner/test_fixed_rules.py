import warnings

import pytest
import torch
from sklearn.exceptions import ConvergenceWarning
from sklearn.mixture import GaussianMixture as SkGaussianMixture

import pyro_slots as ps
from pyro_slots.inner import EM, GradientAscent, SoftKMeans
from pyro_slots.models import GaussianMixture
from tests.conftest import gmm_responsibilities, make_point_sets


def _match(a, b):
    """Permutation of b's slots closest to a (brute force, K small)."""
    import itertools

    best = min(
        itertools.permutations(range(a.shape[0])), key=lambda p: (a - b[list(p)]).abs().sum()
    )
    return b[list(best)]


@pytest.mark.parametrize("num_steps", [1, 5, 30])
def test_em_matches_sklearn_from_same_init(float64, num_steps):
    x, _ = make_point_sets(1, 200, num_components=3, seed=3)
    gmm = GaussianMixture(3, 2)
    slots0 = gmm.init_slots(x, 3, torch.Generator().manual_seed(0))
    loc, scale, logw = gmm.component_params(slots0)
    sk = SkGaussianMixture(
        3,
        covariance_type="diag",
        weights_init=logw[0].exp().numpy(),
        means_init=loc[0].numpy(),
        precisions_init=(1 / scale[0] ** 2).numpy(),
        max_iter=num_steps,
        tol=0.0,
        reg_covar=1e-6,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        sk.fit(x[0].numpy())
    result = ps.refine(gmm, x, EM(num_steps), slots=slots0)
    loglik_per_point = result.elbo[0].item() / x.shape[1]
    assert loglik_per_point == pytest.approx(sk.score(x[0].numpy()), abs=1e-4)
    loc, scale, logw = gmm.component_params(result.slots[0])
    theirs = torch.cat(
        [
            torch.from_numpy(sk.means_),
            torch.from_numpy(sk.covariances_).sqrt(),
            torch.from_numpy(sk.weights_)[:, None],
        ],
        -1,
    )
    ours = torch.cat([loc[0], scale[0], logw[0].exp()[:, None]], -1)
    assert torch.allclose(ours, _match(ours, theirs), atol=1e-3)


def test_em_mean_update_is_scaled_gradient_step(float64):
    """EM's mean update equals λ + σ²/N_k ∇_loc L (exact identity for Gaussian mixtures)."""
    x, _ = make_point_sets(4, 50, num_components=3, seed=1)
    gmm = GaussianMixture(3, 2)
    slots = gmm.init_slots(x, 3, torch.Generator().manual_seed(1))
    new = ps.refine(gmm, x, EM(1), slots=slots).slots[0]
    resp = gmm_responsibilities(gmm, x, slots)
    problem = ps.inner.InnerProblem(gmm, x)
    _, grad = problem.elbo_and_grad(slots)
    loc, scale, _ = gmm.component_params(slots)
    nk = resp.sum(-1, keepdim=True)
    grad_loc = gmm.slot_spec.split(grad)["loc"]
    expected = loc + scale**2 / nk * grad_loc
    assert torch.allclose(gmm.slot_spec.split(new)["loc"], expected, atol=1e-8)


def test_soft_kmeans_equals_em_with_uniform_weights_and_fixed_variance(float64):
    x, _ = make_point_sets(3, 40, seed=2)
    gmm = GaussianMixture(3, 2)
    slots = gmm.isotropic(gmm.init_slots(x, 3, torch.Generator().manual_seed(0)), 0.7)
    skm = ps.refine(gmm, x, SoftKMeans(1, temperature=0.7), slots=slots).slots[0]
    # Hand-written soft k-means: softmax(-|x - mu|^2 / (2 T)) responsibilities, weighted means.
    mu = gmm.slot_spec.split(slots)["loc"]
    d2 = ((x.unsqueeze(1) - mu.unsqueeze(2)) ** 2).sum(-1)
    r = torch.softmax(-d2 / (2 * 0.7), dim=1)
    expected = torch.einsum("bkm,bmd->bkd", r, x) / r.sum(-1, keepdim=True)
    assert torch.allclose(gmm.slot_spec.split(skm)["loc"], expected, atol=1e-10)
    em_means = gmm.m_step(x, r, fixed_variance=0.7, fixed_weights=True)
    assert torch.allclose(skm, em_means, atol=1e-12)


@pytest.mark.parametrize(
    "rule",
    [EM(30), SoftKMeans(30, temperature=0.5), GradientAscent(30, step_size=0.01)],
    ids=["em", "soft_kmeans", "gradient"],
)
def test_elbo_never_decreases_on_100_point_sets(float64, rule):
    x, _ = make_point_sets(100, 60, num_components=4, seed=7)
    gmm = GaussianMixture(4, 2)
    result = ps.refine(gmm, x, rule, seed=0)
    steps = result.history.diff(dim=0)
    tol = 1e-6 * result.history[:-1].abs()
    assert (steps >= -tol).all(), steps.min()
    assert (result.history[-1] > result.history[0]).float().mean() > 0.9


@pytest.mark.parametrize(
    "rule",
    [
        EM(5),
        SoftKMeans(5, temperature=0.5),
        GradientAscent(5, 0.05),
        GradientAscent(5, 0.05, adam=True),
    ],
    ids=["em", "soft_kmeans", "gradient", "adam"],
)
def test_permuting_initial_slots_permutes_output(float64, rule):
    x, _ = make_point_sets(5, 40, num_components=3, seed=4)
    gmm = GaussianMixture(3, 2)
    slots0 = gmm.init_slots(x, 3, torch.Generator().manual_seed(3))
    perm = torch.tensor([2, 0, 1])
    a = ps.refine(gmm, x, rule, slots=slots0)
    b = ps.refine(gmm, x, rule, slots=slots0[:, perm])
    assert torch.allclose(a.slots[:, :, perm], b.slots, atol=1e-10)
    assert torch.allclose(a.elbo, b.elbo, atol=1e-10)


def test_adam_first_step_is_sign_of_gradient(float64):
    """Bias-corrected Adam's first step is step_size · g / sqrt(g² + eps²) ≈ step_size · sign(g)."""
    x, _ = make_point_sets(2, 30, seed=5)
    gmm = GaussianMixture(3, 2)
    slots0 = gmm.init_slots(x, 3, torch.Generator().manual_seed(0))
    _, grad = ps.inner.InnerProblem(gmm, x).elbo_and_grad(slots0)
    result = ps.refine(gmm, x, GradientAscent(1, step_size=0.1, adam=True), slots=slots0)
    g = grad / x.shape[1]
    expected = slots0 + 0.1 * g / (g * g + 1e-16).sqrt()
    assert torch.allclose(result.slots[0], expected, atol=1e-9)


def test_em_with_restarts_clusters_as_well_as_sklearn(float64):
    from sklearn.metrics import adjusted_rand_score

    x, labels = make_point_sets(8, 100, num_components=3, seed=11, spread=6.0)
    gmm = GaussianMixture(3, 2)
    result = ps.refine(gmm, x, EM(50), seed=0, num_restarts=3).best()
    assert torch.allclose(
        result.responsibilities[0], gmm_responsibilities(gmm, x, result.slots[0]), atol=1e-10
    )
    pred = result.responsibilities[0].argmax(1)
    for n in range(8):
        sk = SkGaussianMixture(3, covariance_type="diag", n_init=5, random_state=0).fit(x[n])
        ours = adjusted_rand_score(labels[n], pred[n])
        theirs = adjusted_rand_score(labels[n], sk.predict(x[n]))
        assert ours >= theirs - 0.02, (n, ours, theirs)
