"""The elbo package: one interface, two estimators, the auto front, kernels, owned caches."""

import math
import pickle

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch

from pyro_slots.elbo import (
    ELBOEstimator,
    LeanEstimator,
    PerDatapointELBO,
    TraceEnumEstimator,
    make_estimator,
)
from pyro_slots.elbo import auto as auto_module
from pyro_slots.elbo.kernels import (
    broadcast_shape,
    contract_last,
    diag_normal_log_prob,
    squared_distance,
    stable_logsumexp,
    unbroadcast,
)
from pyro_slots.models import GaussianMixture
from tests.conftest import make_point_sets
from tests.test_elbo import ScoreFunctionGuideModel


def _gmm_problem(seed=0):
    x, _ = make_point_sets(3, 20, num_components=3, seed=seed)
    gmm = GaussianMixture(3, 2)
    return gmm, x, gmm.init_slots(x, 3, torch.Generator().manual_seed(seed))


def test_make_estimator_builds_each_strategy_and_all_agree(float64):
    gmm, x, slots = _gmm_problem()
    estimators = {s: make_estimator(s) for s in ("auto", "lean", "trace_enum")}
    assert type(estimators["lean"]) is LeanEstimator
    assert type(estimators["trace_enum"]) is TraceEnumEstimator
    assert type(estimators["auto"]) is PerDatapointELBO
    assert all(isinstance(e, ELBOEstimator) for e in estimators.values())
    # Independent answer: log Σ_k π_k N(x | μ_k, σ_k) per point, summed.
    loc, scale, logw = gmm.component_params(slots)
    comp = dist.Normal(loc.unsqueeze(2), scale.unsqueeze(2)).log_prob(x.unsqueeze(1)).sum(-1)
    expected = torch.logsumexp(comp + logw.unsqueeze(-1), 1).sum(-1)
    for estimator in estimators.values():
        assert torch.allclose(estimator(gmm, x, slots), expected, atol=1e-9)
        elbo, log_post = estimator.elbo_and_posterior(gmm, x, slots, "assignment")
        assert torch.allclose(elbo, expected, atol=1e-9)
        resp = torch.softmax(comp + logw.unsqueeze(-1), 1)  # (batch, K, M)
        assert torch.allclose(log_post.exp().reshape(3, 3, 20).movedim(0, 1), resp, atol=1e-9)
        elbo, post = estimator.elbo_and_posterior(gmm, x, slots, "assignment", probs=True)
        assert torch.allclose(elbo, expected, atol=1e-9)
        assert torch.allclose(post.reshape(3, 3, 20).movedim(0, 1), resp, atol=1e-12)


def test_interface_is_abstract():
    with pytest.raises(TypeError):
        ELBOEstimator()


def test_lean_estimator_refuses_what_it_cannot_do(float64):
    model, x = ScoreFunctionGuideModel(), torch.randn(3, 5, 1)
    slots = torch.randn(3, 2, 2) * 0.3
    with pytest.raises(ValueError, match="strategy: ScoreFunctionGuideModel needs Pyro's"):
        LeanEstimator()(model, x, slots)
    gmm, x, slots = _gmm_problem()
    with pytest.raises(ValueError, match="site: the lean estimator .* 'obs'"):
        LeanEstimator().elbo_and_posterior(gmm, x, slots, "obs")
    with pytest.raises(ValueError, match="site: 'obs' is not an enumerated site"):
        TraceEnumEstimator().elbo_and_posterior(gmm, x, slots, "obs")
    with pytest.raises(ValueError, match="num_particles: expected an integer >= 1"):
        LeanEstimator(num_particles=0)
    with pytest.raises(ValueError, match="strategy: expected one of"):
        make_estimator("fast")


def test_auto_remembers_per_instance_which_estimator_a_model_class_needs(float64):
    """The lean/fallback record is an attribute of the estimator, not module state."""
    model, x = ScoreFunctionGuideModel(), torch.randn(3, 5, 1)
    slots = torch.randn(3, 2, 2) * 0.3
    gmm, xg, sg = _gmm_problem()
    first, second = PerDatapointELBO(), PerDatapointELBO()
    pyro.set_rng_seed(1)
    a = first(model, x, slots)
    first(gmm, xg, sg)
    assert first._lean_ok[ScoreFunctionGuideModel] is False
    assert first._lean_ok[GaussianMixture] is True
    assert len(second._lean_ok) == 0
    # The fallback did not consume the random stream: the same draw as TraceEnum's.
    pyro.set_rng_seed(1)
    b = TraceEnumEstimator()(model, x, slots)
    assert torch.allclose(a, b, atol=1e-12)
    assert [
        k for k, v in vars(auto_module).items() if isinstance(v, dict) and not k.startswith("__")
    ] == []


def test_estimators_pickle_without_their_caches(float64):
    gmm, x, slots = _gmm_problem()
    estimator = PerDatapointELBO()
    before = estimator(gmm, x, slots)
    assert len(estimator.lean.validated) == 1
    clone = pickle.loads(pickle.dumps(estimator))
    assert len(clone.lean.validated) == 0 and len(clone._lean_ok) == 0
    assert torch.equal(clone(gmm, x, slots), before)


class _RecordingGMM(GaussianMixture):
    """Records whether distribution arguments are checked while its program runs."""

    def model(self, x, slots):
        self.checks.append(dist.is_validation_enabled())
        return super().model(x, slots)


def test_lean_estimator_checks_arguments_once_per_model_and_signature(float64):
    """With Pyro's validation on, the first call per (model, x and slots signature) runs the
    program with argument checks, later ones without them and with the same ELBO as a checked
    evaluation; a new batch size is checked again; ``validate_once=False`` checks every call.
    A bad parameter is refused by the first call; later it gives a NaN ELBO, never a finite
    one; an observation outside the support is refused at every call."""
    gmm, x, slots = _gmm_problem()
    model = _RecordingGMM(3, 2)
    model.checks = []
    lean, every = LeanEstimator(), LeanEstimator(validate_once=False)
    values = [lean(model, x, slots) for _ in range(3)]
    assert model.checks == [True, False, False]
    assert dist.is_validation_enabled()  # restored after each call
    assert lean.checked_before(model, x, slots) and not lean.checked_before(model, x[:2], slots)
    expected = every(model, x, slots)
    assert model.checks[-1] is True
    assert all(torch.equal(v, expected) for v in values)
    lean(model, x[:2], slots[:2])
    assert model.checks[-1] is True
    bad = slots.clone()
    bad[0, 0, 0] = float("nan")  # a NaN mean: the model's slot check refuses it, naming it
    with pytest.raises(ValueError, match="slots: contains 1 NaN"):
        LeanEstimator()(model, x, bad)
    assert torch.isnan(lean(model, x, bad)[0]) and torch.isfinite(lean(model, x, bad)[1:]).all()
    x_nan = x.clone()  # observations are still checked against their support
    x_nan[0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="support"):
        lean(model, x_nan, slots)
    with pytest.raises(TypeError, match="validate_once: expected True or False"):
        LeanEstimator(validate_once=1)
    clone = pickle.loads(pickle.dumps(lean))
    assert not clone.checked_before(model, x, slots)


@pytest.mark.parametrize("features", [2, 20])
@pytest.mark.parametrize("shared_scale", [False, True])
def test_diag_normal_log_prob_matches_torch_distributions(float64, features, shared_scale):
    g = torch.Generator().manual_seed(features)
    loc = torch.randn(4, 3, 1, features, generator=g)  # (batch, K, 1, F): mixture means
    scale = torch.rand(4, 3, 1, 1 if shared_scale else features, generator=g) + 0.5
    value = torch.randn(4, 1, 30, features, generator=g)  # (batch, 1, M, F): points
    expected = dist.Normal(loc, scale).to_event(1).log_prob(value)
    assert torch.allclose(diag_normal_log_prob(loc, scale, value), expected, atol=1e-10)
    # Per-point means (the same shape as the points): the one-pass branch.
    loc_full = torch.randn(4, 3, 30, features, generator=g)
    expected = dist.Normal(loc_full, scale).to_event(1).log_prob(value)
    assert torch.allclose(diag_normal_log_prob(loc_full, scale, value), expected, atol=1e-10)


@pytest.mark.parametrize("features", [3, 20])
@pytest.mark.parametrize("sigma", [0.8, 1.0])
def test_diag_normal_log_prob_with_one_fixed_scale(float64, features, sigma):
    """One fixed scale for every component (IODINE's pixels, a standard-normal prior), the
    factor and constant taken as Python numbers: torch's log-density and its gradient."""
    g = torch.Generator().manual_seed(features)
    loc = torch.randn(4, 3, 30, features, generator=g, requires_grad=True)
    value = torch.randn(3, 30, features, generator=g)
    scale = torch.tensor(sigma).expand(4, 3, 30, features)  # as Normal(loc, sigma) holds it
    got = diag_normal_log_prob(loc, scale, value)
    expected = dist.Normal(loc, sigma).to_event(1).log_prob(value)
    assert torch.allclose(got, expected, atol=1e-10)
    w = torch.randn(expected.shape, generator=g)
    ours, theirs = (torch.autograd.grad((t * w).sum(), loc)[0] for t in (got, expected))
    assert torch.allclose(ours, theirs, atol=1e-10)
    # A scale that is not positive is left to torch's formula (NaN, not a math domain error).
    assert diag_normal_log_prob(loc, torch.tensor(0.0).expand_as(loc), value).isnan().all()


@pytest.mark.parametrize("grad", [False, True])
def test_diag_normal_log_prob_in_place_without_graph_equals_torch(float64, grad):
    """Without a graph the few-feature branch reuses its temporaries in place: the same numbers
    as torch's distribution, also where the scale has dimensions the means and points lack
    (no in-place broadcast), and the inputs untouched."""
    g = torch.Generator().manual_seed(0)
    loc = torch.randn(3, 4, 1, 2, generator=g)  # (K, batch, 1, F)
    value = torch.randn(4, 30, 2, generator=g)  # (batch, M, F)
    for scale in (torch.rand(3, 4, 1, 2, generator=g) + 0.5,
                  torch.rand(5, 3, 4, 1, 2, generator=g) + 0.5):  # fmt: skip
        inputs = [t.clone().requires_grad_(grad) for t in (loc, scale, value)]
        copies = [t.detach().clone() for t in inputs]
        got = diag_normal_log_prob(*inputs)
        expected = dist.Normal(copies[0], copies[1]).to_event(1).log_prob(copies[2])
        assert got.shape == expected.shape
        assert torch.allclose(got, expected, atol=1e-10)
        assert all(torch.equal(t.detach(), c) for t, c in zip(inputs, copies))
        assert got.requires_grad == grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("features", [1, 2, 4, 5])
@pytest.mark.parametrize(
    "loc_shape, scale_shape, value_shape, layout",
    [((3, 4, 1), (3, 4, 1), (4, 37), "ABM"),  # (K, batch, 1) against (batch, M): a mixture
     ((3, 4, 1), (5, 3, 4, 1), (4, 37), "AABM"),  # the scale with a dimension of its own
     ((3, 4, 1), (3, 1, 1), (4, 37), "ABM"),  # a scale shared by the datapoints
     ((1, 4, 1), (1, 4, 1), (6, 4, 37), None),  # points along a dimension before the datapoints
     ((4, 3, 1), (4, 3, 1), (4, 1, 37), None)],  # components inside the datapoints: torch's
)  # fmt: skip
def test_fused_outer_diag_normal_matches_torch_distributions(
    logprob_path, dtype, features, loc_shape, scale_shape, value_shape, layout
):
    """The one-pass kernel (pyro_slots/elbo/_fused_logprob.py) where the dimensions are
    components, datapoints, points in that order (:func:`outer_layout`), torch's passes
    elsewhere: torch's log-density either way, for points interleaved or feature-major, one
    scale per feature or one per component, and the inputs untouched."""
    from pyro_slots.elbo import _fused_logprob

    g = torch.Generator().manual_seed(features)
    loc = torch.randn(*loc_shape, features, generator=g, dtype=torch.float64) * 3.0
    scale = torch.rand(*scale_shape, features, generator=g, dtype=torch.float64) + 0.3
    value = torch.randn(*value_shape, features, generator=g, dtype=torch.float64) * 3.0
    kinds = _fused_logprob.outer_layout(value_shape, [loc_shape, scale_shape, scale_shape])
    assert (kinds is None) == (layout is None)
    if layout is not None:
        assert "".join(kinds[0]) == layout
    for scale_ in (scale, scale[..., :1]):
        expected = dist.Normal(loc, scale_).to_event(1).log_prob(value)
        interleaved = value.to(dtype)
        feature_major = interleaved.movedim(-1, 0).contiguous().movedim(0, -1)
        for points in (interleaved, feature_major):
            inputs = [loc.to(dtype), scale_.to(dtype), points]
            copies = [t.clone() for t in inputs]
            with torch.no_grad():
                got = diag_normal_log_prob(*inputs)
            assert got.shape == expected.shape and got.dtype == dtype
            tol = 1e-10 if dtype == torch.float64 else 2e-6 * expected.abs().max().item()
            assert (got.double() - expected).abs().max().item() < tol
            assert all(torch.equal(t, c) for t, c in zip(inputs, copies))


def test_fused_outer_layout_reads_components_datapoints_points():
    from pyro_slots.elbo._fused_logprob import outer_layout

    assert outer_layout((4, 37), [(3, 4, 1), (1, 1, 1)]) == (["A", "B", "M"], (3, 4, 37))
    assert outer_layout((2, 1, 4, 37), [(2, 3, 4, 1)]) is None  # datapoints around components
    assert outer_layout((1, 4, 37), [(3, 4, 1)]) == (["A", "B", "M"], (3, 4, 37))
    assert outer_layout((4, 37), [(3, 5, 1)]) is None  # 4 against 5: no broadcast
    assert outer_layout((4, 37), [(3, 4, 37)]) == (["A", "B", "B"], (3, 4, 37))
    assert outer_layout((37, 4), [(4, 1, 4)]) is None  # a point dimension before a datapoint's


@pytest.mark.parametrize(
    "value_shape, loc_shape",
    [((2, 6, 3), (4, 2, 6, 3)), ((4, 2, 6, 3), (2, 6, 3)), ((2, 6, 1), (3, 2, 6, 3)),
     ((5, 2), (5, 2))],
)  # fmt: skip
def test_squared_distance_and_its_gradients_are_autograds(float64, value_shape, loc_shape):
    """Against ((value - loc)²).sum(-1) differentiated by autograd, and by finite differences
    through two derivatives (gradcheck, gradgradcheck): the inner loop differentiates the ELBO
    with create_graph=True and unrolled training differentiates that gradient again."""
    g = torch.Generator().manual_seed(len(loc_shape))
    value = torch.randn(value_shape, generator=g, requires_grad=True)
    # feature-major storage, a strided view like IODINE's per-pixel means
    loc = torch.randn(loc_shape[-1:] + loc_shape[:-1], generator=g).movedim(0, -1)
    loc.requires_grad_()
    assert len(loc_shape) == 2 or not loc.is_contiguous()
    out = squared_distance(value, loc)
    expected = ((value - loc) ** 2).sum(-1)
    assert out.shape == expected.shape and torch.allclose(out, expected, atol=1e-12)
    w = torch.randn(expected.shape, generator=g)
    ours = torch.autograd.grad((out * w).sum(), (value, loc))
    theirs = torch.autograd.grad((expected * w).sum(), (value, loc))
    for a, b in zip(ours, theirs):
        assert a.shape == b.shape and torch.allclose(a, b, atol=1e-12)
    assert torch.autograd.gradcheck(squared_distance, (value, loc))
    assert torch.autograd.gradgradcheck(squared_distance, (value, loc))
    # Only one of them needing a gradient.
    (only,) = torch.autograd.grad((squared_distance(value.detach(), loc) * w).sum(), loc)
    assert torch.allclose(only, theirs[1], atol=1e-12)
    (only,) = torch.autograd.grad((squared_distance(value, loc.detach()) * w).sum(), value)
    assert torch.allclose(only, theirs[0], atol=1e-12)
    # A constant weight and shift (a Normal's log-density with a fixed scale), to two
    # derivatives; the third through the kept differences' product against autograd's.
    scaled = squared_distance(value, loc, -0.7, 2.5)
    assert torch.allclose(scaled, -0.7 * expected + 2.5, atol=1e-12)

    def weighted(v, m):
        return squared_distance(v, m, -0.7, 2.5)

    assert torch.autograd.gradcheck(weighted, (value, loc))
    assert torch.autograd.gradgradcheck(weighted, (value, loc))
    ours, theirs = (
        (f(value, loc) * w).sum()
        for f in (weighted, lambda v, m: -0.7 * ((v - m) ** 2).sum(-1) + 2.5)
    )
    third = []
    for total in (ours, theirs):
        g_loc = torch.autograd.grad(total, loc, create_graph=True)[0]
        h = torch.autograd.grad((g_loc * g_loc).sum(), (value, loc), create_graph=True)
        third.append(torch.autograd.grad(sum((t * t).sum() for t in h), loc)[0])
    assert torch.allclose(third[0], third[1], atol=1e-10)


def test_diag_normal_log_prob_declines_where_float32_would_cancel():
    loc = torch.full((1, 2, 1, 20), 1e3)
    scale = torch.full((1, 2, 1, 20), 1e-2)
    value = torch.full((1, 1, 5, 20), 1e3)
    assert diag_normal_log_prob(loc, scale, value) is None


@pytest.mark.parametrize(
    "a, b",
    [((3, 1, 2), (4, 2)), ((), (5,)), ((2, 1), (1, 3)), ((1,), (1,)), ((4, 1, 1), (3, 2)),
     ((256, 4, 1, 2), (256, 1, 500, 2)), ((7,), (2, 3, 1))],
)  # fmt: skip
def test_broadcast_shape_is_torchs(a, b):
    assert broadcast_shape(a, b) == tuple(torch.broadcast_shapes(a, b))
    assert broadcast_shape(b, a) == tuple(torch.broadcast_shapes(b, a))
    with pytest.raises(ValueError, match="do not broadcast"):
        broadcast_shape(a + (3,), b + (4,))


def test_contract_last_and_unbroadcast_are_exact(float64):
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(3, 1, 5, 7, generator=g), torch.randn(4, 1, 7, generator=g)
    assert torch.allclose(contract_last(a, b), (a * b).sum(-1), atol=1e-12)
    loc = torch.randn(3, 1, 2, generator=g).expand(3, 10, 2)
    fn = dist.Normal(loc, torch.ones(1, 1, 2).expand(3, 10, 2)).to_event(1)
    compact = unbroadcast(fn)
    assert compact is not fn and compact.base_dist.loc.shape == (3, 1, 2)
    value = torch.randn(3, 10, 2, generator=g)
    assert torch.allclose(compact.log_prob(value), fn.log_prob(value), atol=1e-12)
    plain = dist.Normal(torch.zeros(3), torch.ones(3))  # nothing broadcast
    assert unbroadcast(dist.Gamma(1.0, 1.0)).__class__ is dist.Gamma
    assert unbroadcast(plain.to_event(1)).base_dist is plain


def test_stable_softmax_matches_scipy_on_logits_far_below_the_exp_floor():
    """Differences to the maximum down to -300 (float32 exp's slow range): every probability
    within e^-80 of scipy's float64 softmax, plus eps; NaN logits stay NaN."""
    from scipy.special import softmax

    from pyro_slots.elbo.kernels import stable_softmax

    t = torch.randn(3, 4, 50, generator=torch.Generator().manual_seed(0)) * 100.0
    for eps in (0.0, 1e-8):
        exact = softmax(t.double().numpy(), axis=1)
        want = exact + eps
        tiny = exact < 1e-30
        assert tiny.any()
        # Natural logits; base-2 logits t log2(e) (exp2); the latter overwriting its input.
        t2 = t / math.log(2.0)
        for got in (
            stable_softmax(t, 1, eps),
            stable_softmax(t2, 1, eps, log2=True),
            stable_softmax(t2.clone(), 1, eps, log2=True, overwrite=True),
        ):
            got = got.double().numpy()
            assert np.abs(got - want).max() < 1e-6 * want.max()
            assert np.all(np.abs(got[tiny] - want[tiny]) < 2e-35 + 1e-7 * eps)
    scratch = t.clone()
    assert stable_softmax(scratch, 1, overwrite=True).data_ptr() == scratch.data_ptr()
    assert torch.equal(t, t.clone()) and not torch.equal(scratch, t)  # only the scratch changed
    bad = t.clone()
    bad[0, 0, 0] = float("nan")
    assert torch.isnan(stable_softmax(bad, 1)[0, :, 0]).all()
    assert torch.isnan(stable_softmax(bad, 1, log2=True)[0, :, 0]).all()


def test_stable_logsumexp_parts_overwriting_its_input_matches_scipy():
    """The no-graph path (exp2, ``t - max`` in ``t``'s storage with ``overwrite``) and the
    differentiable path give scipy's log-sum-exp, and the log-posterior parts sum to one."""
    from scipy.special import logsumexp

    from pyro_slots.elbo.kernels import stable_logsumexp_parts

    t = torch.randn(4, 6, 30, generator=torch.Generator().manual_seed(1)) * 20.0
    want = logsumexp(t.double().numpy(), axis=0)
    with torch.no_grad():
        scratch = t.clone()
        lse, shifted, log_norm, _, _ = stable_logsumexp_parts(scratch, 0, overwrite=True)
    assert shifted.data_ptr() == scratch.data_ptr()
    leaf = t.clone().requires_grad_()
    lse_graph = stable_logsumexp_parts(leaf, 0, overwrite=True)[0]  # a graph: never in place
    assert torch.equal(leaf.detach(), t)
    for got in (lse, lse_graph.detach()):
        assert np.abs(got.double().numpy() - want).max() < 1e-5 * np.abs(want).max()
    posterior = (shifted - log_norm).double().exp().sum(0)
    assert torch.allclose(posterior, torch.ones_like(posterior), atol=1e-5)


def test_stable_logsumexp_clamps_only_negligible_terms(float64):
    """The clamp at -80 is inside exp only: the log-softmax of a far term is exact (it was
    -80 - lse), and a row that is -inf throughout has log-sum-exp -inf (it was log K - 80: an
    impossible observation scored as a finite ELBO), as torch.logsumexp says."""
    t = torch.tensor([[0.0, -1.0, -200.0], [5.0, 5.0, float("-inf")], [-math.inf] * 3])
    lse, log_post = stable_logsumexp(t, 1)
    torch.testing.assert_close(lse, torch.logsumexp(t, 1), atol=1e-12, rtol=0)
    assert lse[2] == -math.inf
    assert torch.allclose(log_post[:2].exp().sum(1), torch.ones(2), atol=1e-12)
    assert log_post[0, 2] == pytest.approx(torch.log_softmax(t[0], 0)[2].item(), abs=1e-12)
    assert log_post[1, 2] == -math.inf


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_stable_logsumexp_parts_probs_and_lse_match_scipy(logprob_path, dtype):
    """``parts="probs"`` without autograd: the softmax formed in ``t``'s own storage (with
    ``overwrite``), ``parts="lse"``: ``t`` untouched; both with scipy's log-sum-exp and softmax,
    on torch's path and the fused kernel's (float32), including columns that are all ``-inf``,
    hold a NaN or ``+inf``, or spread beyond the clamp."""
    from scipy.special import logsumexp, softmax

    from pyro_slots.elbo.kernels import stable_logsumexp_parts

    t = (torch.randn(4, 6, 37, generator=torch.Generator().manual_seed(2)) * 20.0).to(dtype)
    t[:, 0, 0] = float("-inf")
    t[2, 0, 1] = float("nan")
    t[1, 0, 2] = float("inf")
    t[0, 0, 3] = -1e4  # exp underflows; clamped at -80 below the maximum
    finite = torch.ones(6, 37, dtype=torch.bool)
    finite[0, :3] = False
    plain = t.double().masked_fill(~finite, 0.0).numpy()  # scipy on the finite columns
    want, want_probs = logsumexp(plain, axis=0), softmax(plain, axis=0)
    with torch.no_grad():
        scratch = t.clone()
        lse, shifted, _, probs, total = stable_logsumexp_parts(
            scratch, 0, overwrite=True, parts="probs"
        )
        kept = t.clone()
        lse2, _, log_norm, none, _ = stable_logsumexp_parts(kept, 0, parts="lse")
    assert shifted is None and total is None and none is None
    assert probs.data_ptr() == scratch.data_ptr()
    torch.testing.assert_close(kept, t, rtol=0, atol=0, equal_nan=True)
    for got in (lse, lse2, (log_norm[0] + t.amax(0))):
        got = got.double()
        assert np.abs(got[finite].numpy() - want[finite.numpy()]).max() < 1e-5 * np.abs(want).max()
        # off the finite columns, torch.logsumexp's numbers: NaN, +inf, and -inf for all -inf
        assert torch.isnan(got[0, 1]) and got[0, 2] == float("inf")
        assert got[0, 0].item() == -math.inf
    probs = probs.double()
    assert np.abs(probs[:, finite].numpy() - want_probs[:, finite.numpy()]).max() < 1e-6
    assert torch.isnan(probs[:, 0, 1]).all()
    assert torch.allclose(probs[:, 0, 0], torch.full((4,), 0.25, dtype=torch.float64))
    leaf = t.clone().requires_grad_()  # a graph: everything returned, nothing in place
    _, shifted, _, _, total = stable_logsumexp_parts(leaf, 0, overwrite=True, parts="probs")
    assert shifted is not None and total is not None
    torch.testing.assert_close(leaf.detach(), t, rtol=0, atol=0, equal_nan=True)
    with pytest.raises(ValueError, match="parts"):
        stable_logsumexp_parts(t, 0, parts="posterior")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("grad", [False, True])
def test_lean_estimate_parts_give_the_same_elbo_and_posterior(logprob_path, grad, dtype):
    """``parts="probs"`` and ``"elbo"`` (in place without autograd, through the fused kernels
    where they are built) give the numbers of ``"all"``, the posterior equal to the
    brute-force responsibilities (float64); no observed tensor or parameter is written to; a bad
    ``parts`` is refused."""
    from pyro_slots.elbo import LeanEstimator
    from pyro_slots.models import GaussianMixture
    from tests.conftest import gmm_responsibilities, make_point_sets

    x, _ = make_point_sets(3, 25, seed=4)
    x = x.to(dtype)
    gmm = GaussianMixture(3, 2)
    slots = gmm.init_slots(x, 3, torch.Generator().manual_seed(1))
    x_before, slots_before = x.clone(), slots.clone()
    est = LeanEstimator()
    with torch.set_grad_enabled(grad):
        full = est.estimate(gmm, x, slots.requires_grad_(grad))
        probs = est.estimate(gmm, x, slots, parts="probs")
        elbo_only = est.estimate(gmm, x, slots, parts="elbo")
    brute = gmm_responsibilities(gmm, x.double(), slots.detach().double())
    exact = dtype == torch.float64
    for estimate in (full, probs, elbo_only):
        assert estimate.elbo.dtype == dtype
        atol = 1e-12 if exact else 2e-5 * full.elbo.abs().max().item()
        assert torch.allclose(estimate.elbo, full.elbo, rtol=0, atol=atol)
    atol = 1e-10 if exact else 2e-6
    for estimate in (full, probs):
        post = estimate.posterior("assignment").reshape(3, 3, 25).movedim(0, 1)
        assert torch.allclose(post.double(), brute, atol=atol)
        log_post = estimate.log_posterior("assignment").reshape(3, 3, 25).movedim(0, 1)
        assert torch.allclose(log_post.double().exp(), brute, atol=atol)
    assert elbo_only.posterior("assignment") is None
    assert torch.equal(x, x_before) and torch.equal(slots.detach(), slots_before)
    with pytest.raises(ValueError, match="parts: expected one of"):
        est.estimate(gmm, x, slots, parts="posterior")


def test_lean_joint_adds_into_its_own_term_only():
    """Without autograd the enumerated log-densities are summed into the one this module made
    (in place); a term it did not make is never written to, and with autograd a new tensor
    carries the gradient of every term (one everywhere for the sum)."""
    from pyro_slots.elbo.lean import _joint

    g = torch.Generator().manual_seed(0)
    own, other, narrow = (torch.randn(3, 4, 5, generator=g, dtype=torch.float64) for _ in "abc")
    narrow = narrow[:, :, :1]
    want = own + other + narrow
    with torch.no_grad():
        kept = other.clone()
        joint, owned = _joint([(other, False), (own.clone(), True), (narrow, False)])
    assert owned and torch.allclose(joint, want, rtol=0, atol=1e-12)
    assert torch.equal(other, kept)
    with torch.no_grad():  # nothing of ours with the full shape: a new tensor
        joint, _ = _joint([(other, False), (narrow, True)])
    assert torch.equal(other, kept) and torch.allclose(joint, other + narrow)
    leaf = own.clone().requires_grad_()
    joint, _ = _joint([(leaf, True), (other, False)])
    assert torch.equal(leaf.detach(), own)
    (d_leaf,) = torch.autograd.grad(joint.sum(), leaf)
    assert torch.equal(d_leaf, torch.ones_like(own))


def test_fused_logsumexp_with_a_graph_differentiates_twice_as_torch(logprob_path, monkeypatch):
    """With autograd, ``parts="lse"`` over the first axis of float32 is one pass of the fused
    kernel (its own autograd node where built); its value, gradient and gradient of the
    gradient (``create_graph``, as an unrolled inner step needs) are ``torch.logsumexp``'s,
    also over spreads far beyond the clamp; a column that is ``-inf`` throughout has
    log-sum-exp ``-inf`` and a zero gradient (not NaN). (The fused pass from any size here;
    by default from ``FEWER_PASSES_MIN_ELEMENTS``.)"""
    from pyro_slots.elbo import kernels
    from pyro_slots.elbo.kernels import stable_logsumexp_parts

    monkeypatch.setattr(kernels, "FEWER_PASSES_MIN_ELEMENTS", 0)

    g = torch.Generator().manual_seed(3)
    t = (torch.randn(4, 5, 30, generator=g) * 60.0).requires_grad_()
    w, v = torch.randn(5, 30, generator=g), torch.randn(4, 5, 30, generator=g)
    lse = stable_logsumexp_parts(t, 0, parts="lse")[0]
    fused = logprob_path == "kernel"
    assert (type(lse.grad_fn).__name__ == "_LogSumExpFirstBackward") == fused
    ref = torch.logsumexp(t, 0)
    torch.testing.assert_close(lse, ref, rtol=1e-6, atol=1e-5)
    (grad,) = torch.autograd.grad((lse * w).sum(), t, create_graph=True)
    (ref_grad,) = torch.autograd.grad((ref * w).sum(), t, create_graph=True)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-5, atol=1e-6)
    (hvp,) = torch.autograd.grad((grad * v).sum(), t)
    (ref_hvp,) = torch.autograd.grad((ref_grad * v).sum(), t)
    torch.testing.assert_close(hvp, ref_hvp, rtol=1e-4, atol=1e-5)

    dead = torch.full((4, 3), -math.inf)
    dead[:, 1] = torch.randn(4, generator=g)
    dead.requires_grad_()
    lse = stable_logsumexp_parts(dead, 0, parts="lse")[0]
    assert lse[0] == -math.inf and lse[2] == -math.inf
    (grad,) = torch.autograd.grad(lse[1] + lse[0] * 0.0, dead)
    assert torch.isfinite(grad).all()
    torch.testing.assert_close(grad[:, 1], torch.softmax(dead.detach()[:, 1], 0))
    assert torch.all(grad[:, [0, 2]].abs() < 1e-30)
    # not contiguous, float64: torch's operations, the same numbers
    t64 = t.detach().double().transpose(1, 2).requires_grad_()
    lse64 = stable_logsumexp_parts(t64, 0, parts="lse")[0]
    assert lse64.grad_fn is not None and "LogSumExpFirst" not in type(lse64.grad_fn).__name__
    torch.testing.assert_close(lse64, torch.logsumexp(t64, 0))


@pytest.mark.parametrize("prior", ["standard", "fixed", "tensor", "shared"])
def test_diag_normal_log_ratio_is_the_difference_of_two_log_probs(float64, prior):
    """``diag_normal_log_ratio`` against ``Independent(Normal, 1).log_prob`` of the prior less
    the guide's, with a standard-normal prior (a number), another fixed scale, tensor
    parameters, and one scale shared by the event; the gradient too (finite differences)."""
    from pyro_slots.elbo.kernels import diag_normal_log_ratio

    g = torch.Generator().manual_seed(5)
    shape = (3, 4, 6)
    value = torch.randn(shape, generator=g)
    q_loc = torch.randn(shape, generator=g).requires_grad_()
    q_scale = (torch.rand(shape, generator=g) + 0.3).requires_grad_()
    if prior == "standard":  # as pyro.sample("z", dist.Normal(zeros, 1.0).to_event(1)) makes
        p_loc, p_scale = torch.zeros(shape), torch.tensor(1.0).expand(shape)
    elif prior == "fixed":
        p_loc, p_scale = torch.tensor(0.5).expand(shape), torch.tensor(2.0).expand(shape)
    elif prior == "tensor":
        p_loc = torch.randn(shape, generator=g)
        p_scale = (torch.rand(shape, generator=g) + 0.5).requires_grad_()
    else:
        p_loc, p_scale = torch.randn(shape, generator=g), torch.rand(3, 4, 1, generator=g) + 0.5

    def reference(q_loc, q_scale):
        p = dist.Normal(p_loc, p_scale.expand(shape)).to_event(1)
        return p.log_prob(value) - dist.Normal(q_loc, q_scale).to_event(1).log_prob(value)

    got = diag_normal_log_ratio(value, p_loc, p_scale, q_loc, q_scale)
    assert got.shape == (3, 4)
    torch.testing.assert_close(got, reference(q_loc, q_scale), rtol=0, atol=1e-12)
    assert torch.autograd.gradcheck(
        lambda a, b: diag_normal_log_ratio(value, p_loc, p_scale, a, b), (q_loc, q_scale)
    )


@pytest.mark.parametrize("shared_scale", [False, True])
@pytest.mark.parametrize("features", [1, 2, 5])
@pytest.mark.parametrize("min_elements", [0, None])
def test_diag_normal_log_prob_with_a_graph_differentiates_twice_as_torch(
    float64, features, shared_scale, min_elements, monkeypatch
):
    """Mixture means against points with autograd (few features: from
    ``FEWER_PASSES_MIN_ELEMENTS`` one scaled difference and one ``addcmul`` per feature, below
    it squares summed): the log-density, its gradient and the gradient of the gradient
    (``create_graph``) are ``Independent(Normal, 1).log_prob``'s."""
    from pyro_slots.elbo import kernels

    if min_elements is not None:
        monkeypatch.setattr(kernels, "FEWER_PASSES_MIN_ELEMENTS", min_elements)
    g = torch.Generator().manual_seed(features)
    loc = torch.randn(4, 3, 1, features, generator=g).requires_grad_()
    scale = (
        torch.rand(4, 3, 1, 1 if shared_scale else features, generator=g) + 0.5
    ).requires_grad_()
    value = torch.randn(4, 1, 30, features, generator=g)

    def ours(loc, scale):
        return diag_normal_log_prob(loc, scale, value)

    def torchs(loc, scale):
        return dist.Normal(loc, scale.expand_as(loc)).to_event(1).log_prob(value)

    torch.testing.assert_close(ours(loc, scale), torchs(loc, scale), rtol=0, atol=1e-10)
    w = torch.randn(4, 3, 30, generator=g)
    grads = [
        torch.autograd.grad((f(loc, scale) * w).sum(), (loc, scale), create_graph=True)
        for f in (ours, torchs)
    ]
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-10)
    second = [torch.autograd.grad(sum(x.sum() for x in gr), (loc, scale)) for gr in grads]
    for a, b in zip(*second):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-9)
