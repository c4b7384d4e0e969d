import itertools
import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine
from pyro.infer import Trace_ELBO, TraceEnum_ELBO
from pyro.ops.indexing import Vindex

import pyro_slots as ps
from pyro_slots import PerDatapointELBO, SlotModel, SlotSpec, per_datapoint_elbo
from pyro_slots.models import GaussianMixture
from tests.conftest import gmm_log_joint, gmm_responsibilities, make_point_sets


class GaussianLatentModel(SlotModel):
    """z^{n,k} ~ N(0, 1) per slot; x^{n,m} ~ N(sum_k z^{n,k}, 1); guide N(loc, exp(log_scale))."""

    max_plate_nesting = 2

    def __init__(self):
        super().__init__(SlotSpec({"loc": (), "log_scale": ()}), feature_dim=1)

    def model(self, x, slots):
        batch, num_points, _ = x.shape
        with pyro.plate("batch", batch, dim=-2):
            with pyro.plate("slots", slots.shape[1], dim=-1):
                z = pyro.sample("z", dist.Normal(0.0, 1.0))
            loc = z.sum(-1, keepdim=True)  # (batch, 1)
            with pyro.plate("measurements", num_points, dim=-1):
                pyro.sample("obs", dist.Normal(loc, 1.0), obs=x[..., 0])

    def guide(self, x, slots):
        parts = self.slot_spec.split(slots)
        with pyro.plate("batch", x.shape[0], dim=-2):
            with pyro.plate("slots", slots.shape[1], dim=-1):
                pyro.sample("z", dist.Normal(parts["loc"], parts["log_scale"].exp()))


def test_sum_equals_pyro_traceenum_loss(float64):
    x, _ = make_point_sets(6, 40, num_components=3)
    gmm = GaussianMixture(3, 2)
    slots = gmm.init_slots(x, 3, torch.Generator().manual_seed(1)).requires_grad_()
    per = per_datapoint_elbo(gmm, x, slots)
    loss = TraceEnum_ELBO(max_plate_nesting=2).differentiable_loss(gmm.model, gmm.guide, x, slots)
    assert per.shape == (6,)
    assert torch.allclose(per.sum(), -loss, rtol=0, atol=1e-5)
    # The gradients agree too (w.r.t. the per-datapoint slots).
    g1 = torch.autograd.grad(per.sum(), slots)[0]
    g2 = torch.autograd.grad(-loss, slots)[0]
    assert torch.allclose(g1, g2, atol=1e-8)


def test_per_datapoint_values_equal_closed_form_log_likelihood(float64):
    x, _ = make_point_sets(5, 30, num_components=2)
    gmm = GaussianMixture(2, 2)
    slots = gmm.init_slots(x, 2, torch.Generator().manual_seed(2))
    loc, scale, logw = gmm.component_params(slots)
    # Independent: scipy-free closed form with torch.distributions per datapoint loop.
    expected = []
    for n in range(5):
        comps = [
            dist.Normal(loc[n, k], scale[n, k]).log_prob(x[n]).sum(-1) + logw[n, k]
            for k in range(2)
        ]
        expected.append(torch.logsumexp(torch.stack(comps), 0).sum())
    assert torch.allclose(per_datapoint_elbo(gmm, x, slots), torch.stack(expected), atol=1e-9)


def test_brute_force_enumeration_k2_n3(float64):
    """Sum over all K^N = 8 joint assignments of one datapoint equals the TraceEnum value."""
    x = torch.tensor([[[0.1, -0.3], [2.0, 1.5], [-1.0, 0.4]]])
    gmm = GaussianMixture(2, 2)
    slots = gmm.slot_spec.pack(
        {
            "loc": torch.tensor([[[0.0, 0.0], [1.5, 1.0]]]),
            "log_scale": torch.tensor([[[0.1, -0.2], [0.3, 0.0]]]),
            "logit": torch.tensor([[0.2, -0.4]]),
        }
    )
    loc, scale, logw = gmm.component_params(slots)
    joint = []
    for zs in itertools.product(range(2), repeat=3):
        lp = sum(
            logw[0, z] + dist.Normal(loc[0, z], scale[0, z]).log_prob(x[0, m]).sum()
            for m, z in enumerate(zs)
        )
        joint.append(lp)
    brute = torch.logsumexp(torch.stack(joint), 0)
    assert torch.allclose(per_datapoint_elbo(gmm, x, slots)[0], brute, atol=1e-10)


def _lean_and_trace_elbo(model, x, slots, seed):
    """The per-datapoint ELBO and Pyro's ``-Trace_ELBO`` loss, each from the same draws."""
    pyro.set_rng_seed(seed)
    per = per_datapoint_elbo(model, x, slots)
    pyro.set_rng_seed(seed)
    loss = Trace_ELBO(max_plate_nesting=2).differentiable_loss(model.model, model.guide, x, slots)
    return per, -loss


def test_continuous_guide_matches_trace_elbo(float64):
    """With a reparameterized guide and one particle, the same draw gives Pyro's Trace_ELBO."""
    per, pyro_elbo = _lean_and_trace_elbo(
        GaussianLatentModel(), torch.randn(4, 7, 1), torch.randn(4, 3, 2) * 0.3, seed=5
    )
    assert per.shape == (4,)
    assert torch.allclose(per.sum(), pyro_elbo, atol=1e-8)


class SubsampledLocalModel(SlotModel):
    """A local latent per measurement in a subsampled plate of the guide and the model:
    z^{n,m} ~ N(0, 1), x^{n,m} ~ N(z^{n,m}, 1); guide N(loc + x / 2, exp(log_scale))."""

    max_plate_nesting = 2

    def __init__(self, subsample_size):
        super().__init__(SlotSpec({"loc": (), "log_scale": ()}), feature_dim=1)
        self.subsample_size = subsample_size

    def _plates(self, x):
        batch, num_points, _ = x.shape
        return pyro.plate("batch", batch, dim=-2), pyro.plate(
            "measurements", num_points, subsample_size=self.subsample_size, dim=-1
        )

    def model(self, x, slots):
        batch_plate, points = self._plates(x)
        with batch_plate, points as idx:
            z = pyro.sample("z", dist.Normal(0.0, 1.0))
            pyro.sample("obs", dist.Normal(z, 1.0), obs=x[..., 0].index_select(-1, idx))

    def guide(self, x, slots):
        parts = self.slot_spec.split(slots)
        batch_plate, points = self._plates(x)
        with batch_plate, points as idx:
            loc = parts["loc"] + 0.5 * x[..., 0].index_select(-1, idx)
            pyro.sample("z", dist.Normal(loc, parts["log_scale"].exp()))


def test_guide_subsample_indices_are_replayed_into_the_model(float64):
    """The lean estimator replays the guide's sites into the model, its subsample indices
    included: the same draws give Pyro's Trace_ELBO (whose replay is ``poutine.replay``)."""
    per, pyro_elbo = _lean_and_trace_elbo(
        SubsampledLocalModel(subsample_size=4), torch.randn(3, 9, 1), torch.randn(3, 1, 2) * 0.3, 2
    )
    assert torch.allclose(per.sum(), pyro_elbo, atol=1e-10)


def test_continuous_guide_expectation_is_analytic(float64):
    """Averaged over many particles, the ELBO converges to its closed form."""
    model = GaussianLatentModel()
    x = torch.randn(2, 5, 1)
    loc, log_scale = torch.randn(2, 3) * 0.2, torch.full((2, 3), -0.5)
    slots = torch.stack([loc, log_scale], -1)
    from pyro_slots.elbo import PerDatapointELBO

    est = PerDatapointELBO(num_particles=20000)(model, x, slots)
    s2 = (2 * log_scale).exp()
    mean_sum, var_sum = loc.sum(-1), s2.sum(-1)  # sum_k z ~ N(mean_sum, var_sum) under q
    m = x.shape[1]
    exp_loglik = (-0.5 * m * torch.log(torch.tensor(2 * torch.pi))) - 0.5 * (
        ((x[..., 0] - mean_sum[:, None]) ** 2).sum(-1) + m * var_sum
    )
    kl = 0.5 * (s2 + loc**2 - 1 - 2 * log_scale).sum(-1)
    assert torch.allclose(est, exp_loglik - kl, atol=0.1)


def test_site_outside_batch_plate_is_rejected():
    class Bad(GaussianMixture):
        def model(self, x, slots):
            pyro.sample("global", dist.Normal(0.0, 1.0))
            super().model(x, slots)

        def guide(self, x, slots):
            pyro.sample("global", dist.Normal(0.0, 1.0))

    bad = Bad(2, 2)
    x = torch.randn(3, 4, 2)
    with pytest.raises(ValueError, match="outside the batch plate"):
        per_datapoint_elbo(bad, x, bad.init_slots(x, 2))
    # Whatever the batch size: a batch of one has no batch dimension in Pyro's packed tensors,
    # and the program was accepted there (a one-datapoint smoke test passed).
    with pytest.raises(ValueError, match="site 'global' lies outside the batch plate 'batch'"):
        per_datapoint_elbo(bad, x[:1], bad.init_slots(x[:1], 2))


class SetLabelModel(GaussianMixture):
    """One discrete label per datapoint, outside the measurement plate: the observation
    factors are multiplied over measurements before the label is summed out."""

    def model(self, x, slots):
        loc, scale, log_weights = self.component_params(slots)
        batch, num_points, _ = x.shape
        with pyro.plate("batch", batch, dim=-2) as n:
            z = pyro.sample(
                "set_label",
                dist.Categorical(logits=log_weights.unsqueeze(-2)),
                infer={"enumerate": "parallel"},
            )
            with pyro.plate("measurements", num_points, dim=-1):
                from pyro.ops.indexing import Vindex

                n = n.unsqueeze(-1)
                pyro.sample(
                    "obs", dist.Normal(Vindex(loc)[n, z], Vindex(scale)[n, z]).to_event(1), obs=x
                )


@pytest.mark.parametrize("num_particles", [1, 3])
@pytest.mark.parametrize("model_name", ["gmm", "gaussian_latent", "set_label"])
def test_lean_and_trace_enum_strategies_agree(float64, model_name, num_particles):
    from pyro_slots.elbo import PerDatapointELBO

    if model_name == "gaussian_latent":
        model, x = GaussianLatentModel(), torch.randn(4, 6, 1)
        slots = torch.randn(4, 3, 2) * 0.3
    else:
        model = GaussianMixture(3, 2) if model_name == "gmm" else SetLabelModel(3, 2)
        x, _ = make_point_sets(4, 20, seed=3)
        slots = model.init_slots(x, 3, torch.Generator().manual_seed(0))
    slots = slots.requires_grad_()
    values, grads = {}, {}
    for strategy in ["auto", "trace_enum"]:
        pyro.set_rng_seed(11)
        values[strategy] = PerDatapointELBO(num_particles, strategy=strategy)(model, x, slots)
        grads[strategy] = torch.autograd.grad(values[strategy].sum(), slots)[0]
    assert torch.allclose(values["auto"], values["trace_enum"], atol=1e-8)
    assert torch.allclose(grads["auto"], grads["trace_enum"], atol=1e-8)
    if model_name == "set_label":
        # Independent brute force: log Σ_k π_k Π_m N(x_m | μ_k, σ_k) per datapoint.
        loc, scale, logw = model.component_params(slots)
        comp = dist.Normal(loc.unsqueeze(2), scale.unsqueeze(2)).log_prob(x.unsqueeze(1))
        brute = torch.logsumexp(comp.sum((-1, -2)) + logw, -1)
        assert torch.allclose(values["trace_enum"], brute, atol=1e-8)


@pytest.mark.parametrize("strategy", ["lean", "trace_enum"])
def test_posterior_of_enumerated_assignment_equals_responsibilities(float64, strategy):
    from pyro_slots.elbo import PerDatapointELBO

    x, _ = make_point_sets(3, 25, seed=4)
    gmm = GaussianMixture(3, 2)
    slots = gmm.init_slots(x, 3, torch.Generator().manual_seed(1))
    elbo, log_post = PerDatapointELBO(strategy=strategy).elbo_and_posterior(
        gmm, x, slots, "assignment"
    )
    resp = log_post.exp().reshape(3, 3, 25).movedim(0, 1)
    assert torch.allclose(resp, gmm_responsibilities(gmm, x, slots), atol=1e-10)
    expected = torch.logsumexp(gmm_log_joint(gmm, x, slots), 1).sum(-1)
    assert torch.allclose(elbo, expected, atol=1e-9)


def test_stable_logsumexp_matches_torch_within_float_precision():
    from pyro_slots.elbo import _stable_logsumexp

    t = torch.randn(4, 50, 30) * 100  # gaps far beyond -87 between components
    lse, log_post = _stable_logsumexp(t, 0)
    assert torch.allclose(lse, torch.logsumexp(t, 0), rtol=1e-6)
    assert torch.allclose(log_post.exp().sum(0), torch.ones(50, 30), atol=1e-6)


class ScoreFunctionGuideModel(GaussianLatentModel):
    """The same model with a non-reparameterized guide: only DiCE (TraceEnum) handles it."""

    def guide(self, x, slots):
        parts = self.slot_spec.split(slots)
        with pyro.plate("batch", x.shape[0], dim=-2):
            with pyro.plate("slots", slots.shape[1], dim=-1):
                fn = dist.Normal(parts["loc"], parts["log_scale"].exp())
                fn.has_rsample = False
                pyro.sample("z", fn)


def test_lean_strategy_refuses_what_it_cannot_do_and_auto_falls_back(float64):
    from pyro_slots.elbo import PerDatapointELBO

    model, x = ScoreFunctionGuideModel(), torch.randn(3, 5, 1)
    slots = torch.randn(3, 2, 2) * 0.3
    with pytest.raises(ValueError, match="strategy: ScoreFunctionGuideModel needs Pyro's"):
        PerDatapointELBO(strategy="lean")(model, x, slots)
    pyro.set_rng_seed(2)
    auto = PerDatapointELBO()(model, x, slots)
    pyro.set_rng_seed(2)
    ref = Trace_ELBO(max_plate_nesting=2).loss(model.model, model.guide, x, slots)
    assert auto.sum().item() == pytest.approx(-ref, abs=1e-8)


def _values_and_grads(model, x, slots, strategy, seed=3):
    from pyro_slots.elbo import PerDatapointELBO

    slots = slots.detach().requires_grad_()
    x = x.detach().requires_grad_()
    weights = [p for p in model.parameters() if p.requires_grad]
    pyro.set_rng_seed(seed)
    value = PerDatapointELBO(strategy=strategy)(model, model.encode(x), slots)
    grads = torch.autograd.grad(value.sum(), [slots, x, *weights], allow_unused=True)
    return value, grads


@pytest.mark.parametrize("dim", [10, 20])
def test_lean_matches_trace_enum_for_many_features(float64, dim):
    """Both code paths of the lean diagonal-Normal log-density (feature by feature below 16
    features, a matrix product from 16 on), values and gradients, against Pyro's TraceEnum."""
    g = torch.Generator().manual_seed(dim)
    x = torch.randn(3, 30, dim, generator=g)
    gmm = GaussianMixture(4, dim, encoder=torch.nn.Linear(dim, dim).double())
    slots = gmm.init_slots(gmm.encode(x).detach(), 4, g)
    v_lean, g_lean = _values_and_grads(gmm, x, slots, "lean")
    v_ref, g_ref = _values_and_grads(gmm, x, slots, "trace_enum")
    assert torch.allclose(v_lean, v_ref, rtol=1e-10, atol=1e-8)
    assert all(a is not None for a in g_ref)  # slots, data and both encoder weights
    for a, b in zip(g_lean, g_ref):
        assert torch.allclose(a, b, rtol=1e-8, atol=1e-8)


def test_lean_matches_trace_enum_for_iodine(float64):
    from pyro_slots.models import IODINE

    torch.manual_seed(0)
    model = IODINE(image_size=8, num_slots=3, latent_dim=4).double()
    images = torch.rand(2, 3, 8, 8, dtype=torch.float64)
    slots = torch.randn(2, 3, model.slot_dim, dtype=torch.float64) * 0.3
    v_lean, g_lean = _values_and_grads(model, images, slots, "lean")
    v_ref, g_ref = _values_and_grads(model, images, slots, "trace_enum")
    assert torch.allclose(v_lean, v_ref, rtol=1e-10, atol=1e-8)
    assert sum(g is not None for g in g_ref) > 4  # slots, pixels and decoder weights
    for a, b in zip(g_lean, g_ref):
        assert (a is None) == (b is None)
        if a is not None:
            assert torch.allclose(a, b, rtol=1e-8, atol=1e-8)


def test_lean_keeps_float32_digits_for_tight_components_in_many_dimensions():
    """Components of scale 1e-2 at distance ~10 from the origin in 20-D: expanding the square
    would cancel 1e6-sized terms in float32; the lean path must stay as exact as Pyro's."""
    g = torch.Generator().manual_seed(0)
    dim = 20
    centers = 10 + torch.randn(2, 3, dim, generator=g)
    x = (centers.repeat_interleave(10, 1) + 0.01 * torch.randn(2, 30, dim, generator=g)).float()
    gmm = GaussianMixture(3, dim)
    slots = gmm.slot_spec.pack(
        {
            "loc": centers.float(),
            "log_scale": torch.full((2, 3, dim), math.log(0.01)),
            "logit": torch.zeros(2, 3),
        }
    )
    lean = per_datapoint_elbo(gmm, x, slots, strategy="lean")
    exact = per_datapoint_elbo(gmm, x.double(), slots.double(), strategy="trace_enum")
    assert torch.allclose(lean.double(), exact, rtol=1e-5)


def test_observed_values_are_validated_once_per_version_and_untouched():
    """The support check of an observed tensor is remembered by the estimator (nothing is
    written onto the tensor, no module-level cache), repeated after an in-place change, and
    forgotten with the tensor."""
    import gc

    gmm = GaussianMixture(3, 2)
    x, _ = make_point_sets(2, 30, num_components=3, seed=0)
    slots = gmm.init_slots(x, 3, torch.Generator().manual_seed(0))
    estimator = PerDatapointELBO(strategy="lean")
    validated = estimator.lean.validated
    first = estimator(gmm, x, slots)
    assert not hasattr(x, "_pyro_slots_real") and x in validated and len(validated) == 1
    x.mul_(1.0)  # a new version: validated again, the same numbers
    assert torch.allclose(estimator(gmm, x, slots), first)
    assert validated[x][0] == x._version
    x_nan = x.clone()
    x_nan[0, 0, 0] = float("nan")
    with pytest.raises(ValueError):
        estimator(gmm, x_nan, slots)
    assert x_nan not in validated
    del x, x_nan
    gc.collect()
    assert len(validated) == 0
    # Another estimator has its own record.
    assert len(PerDatapointELBO(strategy="lean").lean.validated) == 0


_NAN_ROW = torch.randn(3, 4).index_put((torch.tensor([1]),), torch.tensor(float("nan")))
_INFINITIES = torch.tensor([[float("inf"), -float("inf"), 0.0, 1.0]] * 3)


def _normal(event=True):
    fn = dist.Normal(torch.zeros(3, 4), 1.0)
    return fn.to_event(1) if event else fn


@pytest.mark.parametrize(
    "fn, value",
    [
        (_normal(), torch.randn(3, 4)),
        (_normal(), torch.randn(2, 3, 4)),  # broadcasts
        (_normal(event=False), _NAN_ROW),
        (_normal(), _INFINITIES),  # the sum is NaN, the values are real
        (_normal(), torch.full((3, 4), 3e38)),  # the sum overflows to inf
        (_normal(), torch.randn(3, 5)),  # event shape
        (_normal(event=False), torch.randn(2, 4)),  # batch shape
        (dist.Poisson(torch.ones(3)), torch.tensor([1.0, -1.0, 2.0])),  # not the real line
        (dist.Poisson(torch.ones(3)), torch.tensor([1.0, 0.0, 2.0])),
    ],
)
def test_check_observation_agrees_with_the_distributions_own_check(fn, value):
    """The lean estimator's check of an observation (one sum for a real support) raises exactly
    where the distribution's ``_validate_sample`` raises, with its message."""
    from pyro_slots.elbo.lean import check_observation

    try:
        fn._validate_sample(value)
        expected = None
    except ValueError as e:
        expected = str(e)
    if expected is None:
        check_observation(fn, value)
    else:
        with pytest.raises(ValueError) as info:
            check_observation(fn, value)
        assert str(info.value) == expected


def test_far_posteriors_and_impossible_observations_are_exact(logprob_path):
    """The log-sum-exp's clamp at -80 sits inside exp only. A posterior e^-200 below the best
    component is log p(z | x) = -200 (it was reported as -80), and a count that every
    component gives probability 0 makes the ELBO -inf (it was log K - 80, finite), as Pyro's
    TraceEnum_ELBO says; on torch's path and the fused kernel's (no graph, float32)."""
    from pyro.ops.indexing import Vindex

    from pyro_slots.elbo import LeanEstimator, TraceEnumEstimator

    gmm = GaussianMixture(2, 1)
    x = torch.tensor([[[0.0], [20.0], [5.0]]] * 2, dtype=torch.float64)
    slots = gmm.slot_spec.pack(
        {
            "loc": torch.tensor([[[0.0], [20.0]]] * 2, dtype=torch.float64),
            "log_scale": torch.zeros(2, 2, 1, dtype=torch.float64),
            "logit": torch.zeros(2, 2, dtype=torch.float64),
        }
    )
    # log p(z = k | x) = -(x - μ_k)²/2 - log Σ_j exp(-(x - μ_j)²/2), to 1e-40
    exact = torch.tensor([[[0.0, -200.0, 0.0]] * 2, [[-200.0, 0.0, -100.0]] * 2]).double()
    for estimator in (LeanEstimator(), TraceEnumEstimator()):
        _, log_post = estimator.elbo_and_posterior(gmm, x, slots, "assignment")
        torch.testing.assert_close(log_post, exact, atol=1e-9, rtol=0)

    class PoissonMixture(SlotModel):
        def __init__(self):
            super().__init__(SlotSpec({"rate": (2,), "logit": ()}), feature_dim=2)

        def model(self, x, slots):
            p = self.slot_spec.split(slots)
            batch, num_points, _ = x.shape
            with pyro.plate("batch", batch, dim=-2), pyro.plate("measurements", num_points, dim=-1):
                z = pyro.sample("z", dist.Categorical(logits=p["logit"].unsqueeze(-2)),
                                infer={"enumerate": "parallel"})  # fmt: skip
                rate = Vindex(p["rate"].unsqueeze(-3))[..., z, :]
                pyro.sample("obs", dist.Poisson(rate).to_event(1), obs=x)

    model = PoissonMixture()
    # Both components have rate 0 for the second count; datapoint 0 observes 3 there.
    slots = torch.tensor([[[1.0, 0.0, 0.0], [4.0, 0.0, 0.0]]] * 2)
    x = torch.tensor([[[1.0, 0.0], [2.0, 3.0]], [[1.0, 0.0], [2.0, 0.0]]])
    want = -TraceEnum_ELBO(max_plate_nesting=2).loss(model.model, model.guide, x[:1], slots[:1])
    assert want == -math.inf
    for grad in (True, False):
        with torch.set_grad_enabled(grad):
            elbo = LeanEstimator()(model, x, slots.clone().requires_grad_(grad))
        assert elbo[0] == -math.inf and torch.isfinite(elbo[1])
        torch.testing.assert_close(elbo[1:], TraceEnumEstimator()(model, x[1:], slots[1:]))


@pytest.mark.parametrize("batch, num_slots, num_points", [(1, 2, 6), (2, 1, 6), (2, 2, 1)])
def test_trace_enum_posterior_where_a_plate_has_size_one(float64, batch, num_slots, num_points):
    """Pyro's compute_marginals fails on size-1 plates or enumeration (a KeyError or a bare
    AssertionError from inside Pyro, so refine(EM, estimator=TraceEnumEstimator()) failed on
    one datapoint): the posterior is still the closed-form one."""
    from pyro_slots.elbo import TraceEnumEstimator
    from pyro_slots.inner import EM

    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, num_points, 2, generator=g)
    gmm = GaussianMixture(num_slots, 2)
    slots = gmm.slot_spec.pack(
        {
            "loc": torch.randn(batch, num_slots, 2, generator=g),
            "log_scale": 0.3 * torch.randn(batch, num_slots, 2, generator=g),
            "logit": torch.randn(batch, num_slots, generator=g),
        }
    )
    _, probs = TraceEnumEstimator().elbo_and_posterior(gmm, x, slots, "assignment", probs=True)
    want = gmm_responsibilities(gmm, x, slots).transpose(0, 1)  # (K, batch, M)
    torch.testing.assert_close(probs.reshape(want.shape), want)
    if num_points >= num_slots:  # (refine needs a measurement per slot)
        result = ps.refine(gmm, x, EM(3), seed=0, estimator=TraceEnumEstimator())
        assert torch.isfinite(result.elbo).all()


def test_a_scaled_site_inside_the_enumeration_is_refused_as_pyro_refuses_it():
    """One cluster per datapoint (enumerated, unscaled), its points in a subsampled plate
    (scaled by 2): the lean estimator tempered the likelihood inside the log-sum-exp,
    log Σ_z p(z) Π_m p(x_m | z)², and returned a number where Pyro's TraceEnum_ELBO refuses the
    program; every strategy now refuses it."""
    from pyro.ops.indexing import Vindex

    from pyro_slots.elbo import LeanEstimator, TraceEnumEstimator

    class ClusterPerDatapoint(SlotModel):
        def __init__(self):
            super().__init__(SlotSpec({"loc": (2,), "logit": ()}), feature_dim=2)

        def model(self, x, slots):
            p = self.slot_spec.split(slots)
            batch, num_points, _ = x.shape
            with pyro.plate("batch", batch, dim=-2):
                z = pyro.sample("z", dist.Categorical(logits=p["logit"].unsqueeze(-2)),
                                infer={"enumerate": "parallel"})  # fmt: skip
                loc = Vindex(p["loc"].unsqueeze(-3))[..., z, :]
                with pyro.plate("measurements", num_points, subsample_size=3, dim=-1) as idx:
                    pyro.sample("obs", dist.Normal(loc, 1.0).to_event(1), obs=x[:, idx])

    model = ClusterPerDatapoint()
    x, slots = torch.randn(2, 6, 2), torch.randn(2, 3, 3)
    with pytest.raises(ValueError, match="common poutine.scale"):
        TraceEnum_ELBO(max_plate_nesting=2).loss(model.model, model.guide, x, slots)
    with pytest.raises(ValueError, match="sites depending on them"):
        LeanEstimator()(model, x, slots)
    for estimator in (PerDatapointELBO(), TraceEnumEstimator()):
        with pytest.raises(ValueError, match="common poutine.scale"):
            estimator(model, x, slots)


class _PairedLatentModel(SlotModel):
    """z^{n,k} ~ N(μ_p, σ_p) over 3 features (prior by ``prior``), a guide N(loc, exp(s)),
    x^{n,m} a mixture over the slots with means z: the prior and guide of z are the pair that
    the lean estimator evaluates as one difference, except where ``prior`` makes it unpairable."""

    max_plate_nesting = 2

    def __init__(self, prior="standard"):
        super().__init__(SlotSpec({"loc": (3,), "log_scale": (3,)}), feature_dim=3)
        self.prior = prior

    def model(self, x, slots):
        batch, num_points, _ = x.shape
        num_slots = slots.shape[1]
        with pyro.plate("batch", batch, dim=-2):
            if self.prior == "enumerated":  # the prior's mean depends on an enumerated site
                c = pyro.sample(
                    "c", dist.Bernoulli(x.new_tensor(0.3)), infer={"enumerate": "parallel"}
                )
            with pyro.plate("slots", num_slots, dim=-1):
                if self.prior == "standard":
                    fn = dist.Normal(x.new_zeros(batch, num_slots, 3), 1.0)
                elif self.prior == "enumerated":
                    loc = (2.0 * c).unsqueeze(-1)  # (..., batch, 1, 1): broadcast by the plates
                    fn = dist.Normal(loc.expand(loc.shape[:-1] + (3,)), x.new_tensor(1.5))
                else:
                    fn = dist.Normal(x.new_full((batch, num_slots, 3), 0.5), x.new_tensor(0.7))
                with poutine.scale(scale=0.5 if self.prior == "scaled" else 1.0):
                    z = pyro.sample("z", fn.to_event(1))
            with pyro.plate("measurements", num_points, dim=-1):
                if self.prior == "enumerated":  # one group of enumerated sites: c alone
                    loc = z.mean(-2).unsqueeze(-2)  # (..., batch, 1, 3)
                else:
                    a = pyro.sample(
                        "a",
                        dist.Categorical(logits=x.new_zeros(num_slots)),
                        infer={"enumerate": "parallel"},
                    )
                    loc = Vindex(z.unsqueeze(-3))[..., a, :]  # (..., batch, 1, 3)
                pyro.sample("obs", dist.Normal(loc, 1.0).to_event(1), obs=x)

    def guide(self, x, slots):
        parts = self.slot_spec.split(slots)
        with pyro.plate("batch", x.shape[0], dim=-2):
            with pyro.plate("slots", slots.shape[1], dim=-1):
                pyro.sample("z", dist.Normal(parts["loc"], parts["log_scale"].exp()).to_event(1))


@pytest.mark.parametrize("num_particles", [1, 3])
@pytest.mark.parametrize("prior", ["standard", "fixed", "enumerated", "scaled"])
def test_lean_evaluates_a_normal_prior_and_guide_as_one_difference(
    float64, prior, num_particles, monkeypatch
):
    """A Normal latent whose guide is Normal: its two log-densities are one difference
    (``diag_normal_log_ratio``), with the ELBO and its gradient equal to TraceEnum's; a prior
    depending on an enumerated site, or a scaled site, keeps the two apart (same numbers)."""
    from pyro_slots.elbo import LeanEstimator, TraceEnumEstimator
    from pyro_slots.elbo import lean as lean_module

    calls = []
    ratio = lean_module.diag_normal_log_ratio
    monkeypatch.setattr(
        lean_module, "diag_normal_log_ratio", lambda *a: calls.append(1) or ratio(*a)
    )
    model = _PairedLatentModel(prior)
    g = torch.Generator().manual_seed(4)
    x = torch.randn(3, 7, 3, generator=g)
    slots = (0.3 * torch.randn(3, 2, 6, generator=g)).requires_grad_()
    values, grads = {}, {}
    estimators = LeanEstimator(num_particles), TraceEnumEstimator(num_particles)
    for name, est in zip(("lean", "trace_enum"), estimators):
        pyro.set_rng_seed(5)
        values[name] = est(model, x, slots)
        grads[name] = torch.autograd.grad(values[name].sum(), slots)[0]
    assert len(calls) == (1 if prior in ("standard", "fixed") else 0)
    torch.testing.assert_close(values["lean"], values["trace_enum"], rtol=0, atol=1e-10)
    torch.testing.assert_close(grads["lean"], grads["trace_enum"], rtol=0, atol=1e-10)
