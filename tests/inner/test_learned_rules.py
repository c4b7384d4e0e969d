"""Learned inner rules: equivariance, identities with fixed rules, gradients in every mode."""

import math
import warnings

import pyro.optim
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import pyro_slots as ps
from pyro_slots.inner import (
    EM,
    GaussianFeatures,
    GradientAscent,
    Hybrid,
    LearnedGradient,
    Safeguarded,
    SlotAttention,
)
from pyro_slots.inner.base import InnerProblem
from pyro_slots.models import GaussianMixture
from pyro_slots.objectives import NegativeELBO
from tests.conftest import gmm_log_joint, make_point_sets

RULES = {
    "sa": lambda: SlotAttention(2, slot_dim=5, input_dim=2, hidden_dim=16),
    "sa_heads_moments": lambda: SlotAttention(
        2, slot_dim=5, input_dim=2, hidden_dim=16, num_heads=4, moments=True
    ),
    # slot_dim == hidden_dim: the paper's setting, the slots are the hidden vectors.
    "sa_plain": lambda: SlotAttention(2, slot_dim=5, input_dim=2, hidden_dim=5, encoder=False),
    # the amortized-clustering configuration: Gaussian sufficient statistics, no input LayerNorm
    "sa_gaussian_features": lambda: SlotAttention(
        2,
        slot_dim=5,
        input_dim=2,
        hidden_dim=16,
        moments=True,
        encoder=GaussianFeatures(2),
        feature_dim=5,
        norm_inputs=False,
    ),
    "lg_gru": lambda: LearnedGradient(2, slot_dim=5, hidden_dim=16),
    "lg_lstm_layernorm": lambda: LearnedGradient(
        2, slot_dim=5, hidden_dim=16, cell="lstm", preprocessing="layernorm"
    ),
    "lg_mlp": lambda: LearnedGradient(2, slot_dim=5, hidden_dim=16, cell="mlp"),
    "hybrid": lambda: Hybrid(SlotAttention(2, slot_dim=5, input_dim=2, hidden_dim=16), EM(1), 1),
    "safeguarded": lambda: Safeguarded(
        SlotAttention(2, slot_dim=5, input_dim=2, hidden_dim=16, moments=True), EM(1)
    ),
}


def _data(num_sets=3, num_points=40, seed=0):
    x, _ = make_point_sets(num_sets, num_points, num_components=3, seed=seed)
    return x


def _slots(model, x, num_slots, seed=0):
    return model.init_slots(x, num_slots, torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------- equivariance
@pytest.mark.parametrize("num_slots", [3, 6])
@pytest.mark.parametrize("name", list(RULES))
def test_permuting_initial_slots_permutes_the_output(float64, name, num_slots):
    """f(P λ_0) = P f(λ_0) for every step, also at a K other than the one of the model."""
    torch.manual_seed(0)
    rule = RULES[name]()
    model = GaussianMixture(4, 2)
    x = _data()
    slots0 = _slots(model, x, num_slots)
    perm = torch.randperm(num_slots, generator=torch.Generator().manual_seed(1))
    a = ps.refine(model, x, rule, slots=slots0, keep_trajectory=True)
    b = ps.refine(model, x, rule, slots=slots0[:, perm], keep_trajectory=True)
    assert a.num_steps == rule.num_steps
    for sa, sb in zip(a.trajectory, b.trajectory):
        assert (sa[:, :, perm] - sb).abs().max().item() < 1e-5
    assert (a.history - b.history).abs().max().item() < 1e-5
    assert (a.responsibilities[:, :, perm] - b.responsibilities).abs().max().item() < 1e-5


@settings(max_examples=8, deadline=None)
@given(st.permutations(range(5)))
def test_slot_attention_equivariance_property(perm):
    torch.manual_seed(0)
    rule = SlotAttention(3, slot_dim=5, input_dim=2, hidden_dim=8, num_heads=2, moments=True)
    model = GaussianMixture(5, 2)
    x = _data(num_sets=2, num_points=20)
    slots0 = _slots(model, x, 5)
    perm = list(perm)
    a = ps.refine(model, x, rule, slots=slots0).slots
    b = ps.refine(model, x, rule, slots=slots0[:, perm]).slots
    assert (a[:, :, perm] - b).abs().max().item() < 1e-5


# ------------------------------------------------------- identities, independent answers
def test_slot_attention_step_matches_algorithm_1(float64):
    """One step equals Locatello et al. (2020), Algorithm 1, written out with einsum."""
    torch.manual_seed(0)
    rule = SlotAttention(1, slot_dim=6, input_dim=3, hidden_dim=6, encoder=False)
    x = torch.randn(2, 7, 3)
    slots = torch.randn(2, 4, 6)

    inputs = torch.nn.functional.layer_norm(x, (3,), rule.norm_inputs.weight, rule.norm_inputs.bias)
    k = inputs @ rule.to_k.weight.T
    v = inputs @ rule.to_v.weight.T
    s = torch.nn.functional.layer_norm(slots, (6,), rule.norm_slots.weight, rule.norm_slots.bias)
    q = s @ rule.to_q.weight.T
    attn = torch.einsum("bkd,bmd->bkm", q, k).div(math.sqrt(6)).softmax(dim=1) + 1e-8
    updates = torch.einsum("bkm,bmd->bkd", attn / attn.sum(-1, keepdim=True), v)
    h = rule.gru(updates.reshape(8, 6), slots.reshape(8, 6)).reshape(2, 4, 6)
    expected = h + rule.mlp(rule.norm_mlp(h))

    class NoModel:
        pass

    problem = InnerProblem(NoModel(), x)
    problem.elbo = lambda slots: slots.new_zeros(slots.shape[0])  # the ELBO is only recorded
    state, info = rule.step(rule.init(problem, slots), problem)
    assert torch.allclose(state.slots, expected, atol=1e-12)
    assert torch.allclose(info.responsibilities, attn, atol=1e-12)
    assert state.aux == () and state.step == 1


def test_encoder_module_without_input_norm_feeds_its_features_to_the_keys(float64):
    """norm_inputs=False: Algorithm 1's logits and updates on the encoder's raw features."""
    torch.manual_seed(0)
    enc = GaussianFeatures(3)
    rule = SlotAttention(
        1, slot_dim=6, input_dim=3, hidden_dim=6, encoder=enc, feature_dim=7, norm_inputs=False
    )
    x, slots = torch.randn(2, 9, 3), torch.randn(2, 4, 6)
    phi = enc(x)
    q = rule.to_q(rule.norm_slots(slots))
    attn = torch.einsum("bkd,bmd->bkm", q, phi @ rule.to_k.weight.T).div(math.sqrt(6))
    attn = attn.softmax(dim=1) + 1e-8
    updates = torch.einsum(
        "bkm,bmd->bkd", attn / attn.sum(-1, keepdim=True), phi @ rule.to_v.weight.T
    )
    got_attn, got_updates = rule.attend(slots, rule.normalized_inputs(InnerProblem(None, x)))
    assert torch.allclose(got_attn[:, 0], attn, atol=1e-12)
    assert torch.allclose(got_updates, updates, atol=1e-12)


def test_gaussian_features_are_standardized_sufficient_statistics(float64):
    """(1, z, z²) against numpy, and every E-step logit is exactly linear in them."""
    import numpy as np

    x, _ = make_point_sets(3, 50, num_components=3, seed=4)
    x = x.double()
    phi = GaussianFeatures(2)(x).numpy()
    xn = x.numpy()
    z = (xn - xn.mean(1, keepdims=True)) / (xn.std(1, ddof=1, keepdims=True) + 1e-6)
    np.testing.assert_allclose(phi, np.concatenate([np.ones_like(z[..., :1]), z, z**2], -1))
    # With a graph to keep (x requiring grad) the same features by autograd's operations,
    # differentiable: Σ z over a datapoint's points is 0 whatever x, so its gradient is 0.
    xg = x.clone().requires_grad_()
    phi_g = GaussianFeatures(2)(xg)
    np.testing.assert_allclose(phi_g.detach().numpy(), phi, rtol=1e-12, atol=1e-12)
    (grad,) = torch.autograd.grad(phi_g[..., 1:3].sum(), xg)
    assert grad.abs().max() < 1e-10
    # log π_k + log N(x | μ_k, σ_k) of any diagonal Gaussian lies in the span of the features:
    # least squares leaves no residual, so attention logits can express the E-step exactly.
    gmm = GaussianMixture(3, 2)
    slots = gmm.init_slots(x, 3, torch.Generator().manual_seed(0))
    log_joint = gmm_log_joint(gmm, x, slots).numpy()  # (B, K, M)
    for n in range(3):
        coef, *_ = np.linalg.lstsq(phi[n], log_joint[n].T, rcond=None)
        np.testing.assert_allclose(phi[n] @ coef, log_joint[n].T, atol=1e-8)


@pytest.mark.parametrize("num_heads", [1, 4])
def test_moments_from_pooled_gaussian_features_equal_the_raw_weighted_moments(float64, num_heads):
    """With GaussianFeatures keys the readout's moments come from the pooled (1, z, z²) mapped
    back through the standardization: the same steps (slots and gradients) as the weighted sums
    of the raw (x, x²) that any other encoder gets, here on sets far from the origin."""
    from torch import nn

    from pyro_slots.refine import run_inner

    class Opaque(nn.Module):  # the same features, without GaussianFeatures' type
        def __init__(self):
            super().__init__()
            self.features = GaussianFeatures(2)

        def forward(self, x):
            return self.features(x)

    kw = dict(slot_dim=5, input_dim=2, hidden_dim=16, num_heads=num_heads, moments=True,
              feature_dim=5, norm_inputs=False)  # fmt: skip
    torch.manual_seed(0)
    fast = SlotAttention(3, encoder=GaussianFeatures(2), **kw)
    raw = SlotAttention(3, encoder=Opaque(), **kw)
    raw.load_state_dict(fast.state_dict())
    assert fast._standardized_moments and not raw._standardized_moments
    model = GaussianMixture(4, 2)
    x = _data() * 3.0 + 40.0
    slots0 = _slots(model, x, 4).requires_grad_()
    a = run_inner(model, x, fast, slots0, 3, backprop_steps=3)
    b = run_inner(model, x, raw, slots0, 3, backprop_steps=3)
    assert torch.allclose(a.slots, b.slots, rtol=1e-9, atol=1e-9)
    (ga,) = torch.autograd.grad(a.slots.sin().sum(), slots0)
    (gb,) = torch.autograd.grad(b.slots.sin().sum(), slots0)
    assert torch.allclose(ga, gb, rtol=1e-8, atol=1e-9)


def test_multi_head_logits_scale_by_head_dim(float64):
    """Heads are scaled by head_dim ** -0.5 (not hidden_dim ** -0.5 as in lucidrains' port)."""
    torch.manual_seed(0)
    rule = SlotAttention(1, slot_dim=8, input_dim=8, hidden_dim=8, num_heads=2, encoder=False)
    x, s = torch.randn(1, 5, 8), torch.randn(1, 3, 8)
    attn, _ = rule.attend(s, rule.norm_inputs(x))
    inputs = rule.norm_inputs(x)
    q = rule.to_q(rule.norm_slots(s)).reshape(1, 3, 2, 4)
    k = rule.to_k(inputs).reshape(1, 5, 2, 4)
    expected = torch.einsum("bkhd,bmhd->bhkm", q, k).div(2.0).softmax(dim=2) + 1e-8
    assert torch.allclose(attn, expected, atol=1e-12)
    # Attention sums to one over the slots (competition), up to the eps per slot.
    assert torch.allclose(attn.sum(2), torch.full((1, 2, 5), 1 + 3e-8), atol=1e-12)


def _folded_and_plain(num_heads):
    """The same weights in the folded (fused) and the textbook order."""
    torch.manual_seed(0)
    kw = dict(slot_dim=5, input_dim=2, hidden_dim=16, num_heads=num_heads, moments=True)
    folded = SlotAttention(3, **kw)
    plain = SlotAttention(3, fold_projections=False, **kw)
    plain.load_state_dict(folded.state_dict())
    return folded, plain


@pytest.mark.parametrize("num_heads", [1, 4])
def test_folded_projections_equal_the_textbook_order(float64, num_heads):
    folded, plain = _folded_and_plain(num_heads)
    model = GaussianMixture(4, 2)
    x = _data()
    slots0 = _slots(model, x, 4)
    a = ps.refine(model, x, folded, slots=slots0)
    b = ps.refine(model, x, plain, slots=slots0)
    assert torch.allclose(a.slots, b.slots, atol=1e-10)
    assert torch.allclose(a.responsibilities, b.responsibilities, atol=1e-12)


@pytest.fixture(params=["whole batch", "chunks of 2"])
def attend_chunks(request, monkeypatch):
    """The fused attention over the whole batch at once, or in chunks (``ATTEND_CHUNK_BYTES``):
    of 2 datapoints for 6 inputs x 4 features, the last chunk shorter, and of one datapoint
    for the 40 points of ``_data()``."""
    from pyro_slots.inner import slot_attention as sa

    if request.param == "chunks of 2":
        monkeypatch.setattr(sa, "ATTEND_CHUNK_BYTES", 2 * 6 * 4 * 8)
    return request.param


@pytest.mark.parametrize("num_heads", [1, 2])
def test_fused_attention_gradients_match_finite_differences(float64, num_heads, attend_chunks):
    """The fused attention-pooling's hand-written backward (and its double backward) against
    central finite differences of its forward, with both outputs feeding the loss; over the
    whole batch and in chunks (the graph-free backward and the forward loop over them)."""
    from pyro_slots.inner.slot_attention import _AttendPool, _batch_chunks

    torch.manual_seed(0)
    q = torch.randn(5, num_heads, 3, 4, requires_grad=True)
    n = torch.randn(5, 6, 4, requires_grad=True)
    chunks = _batch_chunks(n)
    assert chunks == ([(0, 5)] if attend_chunks == "whole batch" else [(0, 2), (2, 4), (4, 5)])
    assert torch.autograd.gradcheck(lambda q, n: _AttendPool.apply(q, n, 1e-3), (q, n))
    assert torch.autograd.gradgradcheck(lambda q, n: _AttendPool.apply(q, n, 1e-3), (q, n))
    # Only one output used: the other's gradient arrives as None.
    assert torch.autograd.gradcheck(lambda q, n: _AttendPool.apply(q, n, 1e-3)[1], (q, n))
    assert torch.autograd.gradcheck(lambda q, n: _AttendPool.apply(q, n, 1e-3)[0], (q, n))


@pytest.mark.parametrize("num_heads", [1, 4])
def test_folded_gradients_equal_the_textbook_order(float64, num_heads, attend_chunks):
    """Unrolled gradients through three steps: every weight's and the inputs' gradient of the
    fused path (over the whole batch or in chunks) equals plain autograd through the textbook
    (unfolded) order."""
    folded, plain = _folded_and_plain(num_heads)
    model = GaussianMixture(4, 2)
    x = _data(num_sets=5).requires_grad_()
    slots0 = _slots(model, x.detach(), 4)
    grads = []
    for rule in (folded, plain):
        problem = InnerProblem(model, x)
        state = rule.init(problem, slots0)
        for _ in range(3):
            state, _ = rule.step(state, problem)
        params = [x, *rule.parameters()]
        grads.append(torch.autograd.grad(state.slots.sin().sum(), params, allow_unused=True))
    for a, b in zip(*grads):
        assert (a is None) == (b is None)
        if a is not None:
            assert torch.allclose(a, b, atol=1e-10)


def _unrolled(rule, model, x, slots0):
    problem = InnerProblem(model, x)
    state = rule.init(problem, slots0)
    for _ in range(3):
        state, _ = rule.step(state, problem)
    return state.slots.sin().sum(), problem


def test_deferred_input_gradient_in_every_kind_of_backward(float64, attend_chunks):
    """The inputs' gradient collected once over the steps (``_InputsGradient``) against plain
    autograd through the textbook order: a second backward of the same graph, a backward that
    reaches only some weights (it leaves no factors behind), and a double backward."""
    from pyro_slots.inner.slot_attention import _DERIVED_ATTR

    folded, plain = _folded_and_plain(1)
    model = GaussianMixture(4, 2)
    x = _data().requires_grad_()
    slots0 = _slots(model, x.detach(), 4)
    (loss, problem), (ref, _) = (_unrolled(r, model, x, slots0) for r in (folded, plain))
    enc = list(folded.encoder.parameters())
    expected = torch.autograd.grad(ref, [x, *plain.encoder.parameters()], retain_graph=True)
    for _ in range(2):  # the same graph twice: each pass collects only its own factors
        got = torch.autograd.grad(loss, [x, *enc], retain_graph=True)
        for a, b in zip(got, expected):
            assert torch.allclose(a, b, atol=1e-10)
    sink = problem.__dict__[_DERIVED_ATTR][(folded, "inputs")].value[1][1]
    torch.autograd.grad(loss, [folded.to_q.weight], retain_graph=True)  # the inputs not reached
    assert sink.factors == []
    # Hessian-vector product through x: the backward that builds a graph computes dn in place.
    v = torch.randn_like(x)
    hvp = []
    for out in (loss, ref):
        (gx,) = torch.autograd.grad(out, [x], create_graph=True)
        hvp.append(torch.autograd.grad((gx * v).sum(), [x])[0])
    assert torch.allclose(hvp[0], hvp[1], atol=1e-9)
    assert hvp[0].abs().max() > 1e-3  # not trivially zero


def test_without_the_engine_api_the_gradient_is_not_deferred(float64, monkeypatch):
    """On a torch whose engine lacks the private calls the sink relies on, every step writes
    its own input gradient (no sink is made), with the same gradients as the deferred path."""
    from pyro_slots.inner import slot_attention as sa

    folded, _ = _folded_and_plain(1)
    model = GaussianMixture(4, 2)
    x = _data().requires_grad_()
    slots0 = _slots(model, x.detach(), 4)
    grads = []
    for can in (True, False):
        monkeypatch.setattr(sa, "_CAN_DEFER", can)
        loss, problem = _unrolled(folded, model, x, slots0)
        grads.append(torch.autograd.grad(loss, [x, *folded.encoder.parameters()]))
        assert (problem.__dict__[sa._DERIVED_ATTR][(folded, "inputs")].value[1] is not None) == can
    for a, b in zip(*grads):
        assert torch.allclose(a, b, atol=1e-10)


def test_cached_inputs_follow_the_weights(float64):
    """The per-problem input cache is refreshed when the weights change in place."""
    torch.manual_seed(0)
    rule = SlotAttention(1, slot_dim=5, input_dim=2, hidden_dim=8)
    model = GaussianMixture(3, 2)
    x = _data()
    problem = InnerProblem(model, x)
    state = rule.init(problem, _slots(model, x, 3))
    first = rule.step(state, problem)[0].slots
    with torch.no_grad():
        rule.encoder[0].weight.mul_(2.0)
    cached = rule.step(state, problem)[0].slots
    fresh = rule.step(state, InnerProblem(model, x))[0].slots
    assert torch.equal(cached, fresh)
    assert not torch.allclose(cached, first)


def test_learned_gradient_without_correction_is_gradient_ascent(float64):
    """With the cell's output zeroed, the rule is plain gradient ascent with step size α."""
    x = _data()
    model = GaussianMixture(3, 2)
    rule = LearnedGradient(4, slot_dim=5, hidden_dim=8, step_size=0.3)
    with torch.no_grad():
        rule.to_update.weight.zero_()
    slots0 = _slots(model, x, 3)
    ours = ps.refine(model, x, rule, slots=slots0)
    ref = ps.refine(model, x, GradientAscent(4, step_size=0.3), slots=slots0)
    assert torch.allclose(ours.slots, ref.slots, atol=1e-10)
    assert torch.allclose(ours.history, ref.history, atol=1e-8)


def test_log_sign_preprocessing_matches_andrychowicz():
    from pyro_slots.inner.learned_gradient import log_sign

    g = torch.tensor([2.0, -1e-3, 1e-6, -1e-6, 0.0])
    out = log_sign(g, p=10.0)
    p = 10.0
    small = math.exp(-p)
    expected = [
        (math.log(abs(v)) / p, math.copysign(1.0, v)) if abs(v) >= small else (-1.0, v / small)
        for v in g.tolist()
    ]
    assert torch.allclose(out[:5], torch.tensor([e[0] for e in expected]), atol=1e-6)
    assert torch.allclose(out[5:], torch.tensor([e[1] for e in expected]), atol=1e-6)


def test_hybrid_equals_learned_then_fixed(float64):
    torch.manual_seed(0)
    sa = SlotAttention(2, slot_dim=5, input_dim=2, hidden_dim=8)
    model = GaussianMixture(3, 2)
    x = _data()
    slots0 = _slots(model, x, 3)
    hybrid = Hybrid(sa, EM(1), num_fixed_steps=3)
    assert hybrid.num_steps == 5
    assert {id(p) for p in hybrid.parameters()} == {id(p) for p in sa.parameters()}
    result = ps.refine(model, x, hybrid, slots=slots0)
    learned = ps.refine(model, x, sa, slots=slots0)
    fixed = ps.refine(model, x, EM(3), slots=learned.slots)
    assert torch.allclose(result.slots, fixed.slots, atol=1e-10)
    assert torch.allclose(result.history[:3], learned.history[:3], atol=1e-10)
    assert torch.allclose(result.history[2:], fixed.history, atol=1e-10)
    # More test-time steps go to the fixed part: EM never lowers the ELBO.
    longer = ps.refine(model, x, hybrid, slots=slots0, num_steps=12)
    assert (longer.history[3:].diff(dim=0) >= -1e-9).all()


def test_hybrid_fixed_rule_keeps_its_own_aux_and_step_count(float64):
    torch.manual_seed(0)
    model = GaussianMixture(3, 2)
    x = _data()
    slots0 = _slots(model, x, 3)
    sa = SlotAttention(1, slot_dim=5, input_dim=2, hidden_dim=8)
    adam = GradientAscent(4, step_size=0.05, adam=True)
    result = ps.refine(model, x, Hybrid(sa, adam, num_fixed_steps=4), slots=slots0)
    start = ps.refine(model, x, sa, slots=slots0).slots
    ref = ps.refine(model, x, adam, slots=start)  # Adam's bias correction restarts at t = 1
    assert torch.allclose(result.slots, ref.slots, atol=1e-10)
    assert len(result.state.aux) == 2  # Adam's moments, not the learned rule's hidden state


def test_slot_init_of_the_rule_draws_the_initial_slots(float64):
    model = GaussianMixture(3, 2)
    init = ps.GaussianInit(5, loc=0.5, scale=0.1)
    rule = SlotAttention(1, slot_dim=5, input_dim=2, hidden_dim=8, slot_init=init)
    x = _data()
    result = ps.refine(model, x, rule, seed=3)
    expected = init(x.shape[0], 3, generator=torch.Generator().manual_seed(3))
    assert torch.allclose(result.initial_slots, expected)
    assert {id(p) for p in init.parameters()} <= {id(p) for p in rule.parameters()}


# ------------------------------------------------------------ training through NestedSVI
def _svi(rule, model=None, gradient="unrolled", lr=1e-2, **kw):
    model = model or GaussianMixture(3, 2)
    optim = pyro.optim.Adam({"lr": lr})
    return ps.NestedSVI(model, rule, NegativeELBO(), optim, gradient=gradient, seed=0, **kw)


@pytest.mark.parametrize("name", ["sa", "sa_heads_moments", "lg_gru"])
def test_parameters_are_optimized_by_nested_svi(name):
    torch.manual_seed(0)
    rule = RULES[name]()
    svi = _svi(rule)
    assert {id(p) for p in rule.parameters()} <= {id(p) for p in svi.parameters()}
    names = [n for n, _ in svi.named_parameters()]
    assert all(n.startswith("inner.") for n in names) and len(names) == len(list(rule.parameters()))
    before = [p.detach().clone() for p in rule.parameters()]
    svi.step(_data())
    for (n, p), b in zip(rule.named_parameters(), before):
        assert not torch.equal(p, b), f"{n} did not change"


MODES = ["unrolled", "truncated", "first_order", "implicit"]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(
    "name", ["sa_heads_moments", "sa_plain", "sa_gaussian_features", "lg_gru", "lg_lstm_layernorm"]
)
def test_gradients_reach_every_learned_parameter(name, mode):
    torch.manual_seed(0)
    rule = RULES[name]()
    svi = _svi(rule, gradient=mode, truncate=2)
    with warnings.catch_warnings():
        # The adjoint may fall back to first order for an untrained rule; either way the
        # gradient has to reach the weights through the last step.
        warnings.simplefilter("ignore", ps.ImplicitGradientWarning)
        svi.loss_and_grads(_data())
    for n, p in rule.named_parameters():
        assert p.grad is not None, f"{n}: no gradient under {mode}"
        assert torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, f"{n}: zero gradient"


@pytest.mark.parametrize("name", ["sa_heads_moments", "lg_gru"])
def test_unrolled_gradient_matches_finite_difference(float64, name):
    """d J / d w along a random direction of all learned weights, vs a central difference."""
    torch.manual_seed(0)
    rule = RULES[name]()
    svi = _svi(rule)
    x = _data(num_sets=2, num_points=25)
    params = list(rule.parameters())
    direction = [torch.randn_like(p) for p in params]

    def loss():
        svi.generator.manual_seed(0)  # the same k-means++ draw every time
        return svi.loss(x)

    grads = torch.autograd.grad(loss(), params)
    analytic = sum((g * d).sum() for g, d in zip(grads, direction)).item()
    eps = 1e-6
    values = []
    for sign in (1, -1):
        with torch.no_grad():
            for p, d in zip(params, direction):
                p.add_(sign * eps * d)
            values.append(loss().item())
            for p, d in zip(params, direction):
                p.sub_(sign * eps * d)
    numeric = (values[0] - values[1]) / (2 * eps)
    assert analytic == pytest.approx(numeric, rel=1e-5)


def test_swap_em_for_slot_attention_in_the_same_nested_svi():
    """One argument swaps fixed for learned inference; both train with the same code."""
    x = make_point_sets(8, 60, num_components=3, seed=4)[0]
    model = GaussianMixture(3, 2)
    results = {}
    for name, inner in [
        ("em", EM(3)),
        ("slot_attention", SlotAttention(3, slot_dim=5, input_dim=2, hidden_dim=16)),
    ]:
        torch.manual_seed(0)
        init = ps.GaussianInit(model.slot_dim)
        svi = ps.NestedSVI(
            model, inner, NegativeELBO(), pyro.optim.Adam({"lr": 0.02}), init=init, seed=0
        )
        # J of the first step, cross-checked against refine's per-datapoint ELBO from the
        # same initial slots (two separate Pyro code paths).
        slots0 = init(x.shape[0], 3, generator=torch.Generator().manual_seed(0))
        elbo = ps.refine(model, x, inner, slots=slots0.detach()).elbo
        first = svi.step(x).loss
        assert first == pytest.approx(-elbo.mean().item(), rel=1e-5)
        losses = [first] + [svi.step(x).loss for _ in range(14)]
        expected = {"em": 2, "slot_attention": 2 + len(list(inner.parameters()))}[name]
        assert len(svi.parameters()) == expected
        results[name] = losses
    # Both lower J on this batch: EM by learning where to start, slot attention by learning
    # its update too.
    assert results["em"][-1] < results["em"][0] - 10.0
    assert results["slot_attention"][-1] < results["slot_attention"][0] - 10.0


def test_tiny_amortized_clustering_run_lowers_the_objective():
    """60 updates of the example's loop lower held-out J by > 10 nats/point (21.7 -> 5.1)."""
    import examples.amortized_clustering as ac

    args = ac.make_parser().parse_args(
        [
            "--num-updates=60",
            "--batch-size=8",
            "--min-points=60",
            "--max-points=100",
            "--hidden-dim=16",
            "--lr=3e-3",
            "--quiet",
        ]
    )
    torch.manual_seed(0)
    model, rule, svi = ac.build(args)
    held_out = ps.data.sample_point_sets(16, 80, seed=123).x

    def held_out_loss():  # J = -ELBO per point after T = 3 learned steps from k-means++ seeds
        return -ps.refine(model, held_out, rule, seed=0).elbo.mean().item() / 80

    before = held_out_loss()
    ac.train(args, rule, svi)
    after = held_out_loss()
    assert after < before - 10.0


# ------------------------------------------------------------------------- validation
@pytest.mark.parametrize(
    "build, match",
    [
        (lambda: SlotAttention(slot_dim=5, input_dim=2, hidden_dim=6, num_heads=4), "num_heads"),
        (lambda: SlotAttention(slot_dim=0, input_dim=2), "slot_dim"),
        (lambda: SlotAttention(slot_dim=5, input_dim=2, eps=0.0), "eps"),
        (
            lambda: SlotAttention(slot_dim=5, input_dim=2, encoder=GaussianFeatures(2)),
            "feature_dim",
        ),
        (lambda: SlotAttention(slot_dim=5, input_dim=2, feature_dim=5), "feature_dim"),
        (lambda: SlotAttention(slot_dim=5, input_dim=2, encoder="mlp"), "encoder"),
        (lambda: GaussianFeatures(0), "dim"),
        (lambda: LearnedGradient(slot_dim=5, cell="rnn"), "cell"),
        (lambda: LearnedGradient(slot_dim=5, preprocessing="none"), "preprocessing"),
        (lambda: LearnedGradient(slot_dim=5, step_size=-1.0), "step_size"),
        (lambda: LearnedGradient(slot_dim=5, extra_dim=3), "extra_dim"),
        (lambda: Hybrid(SlotAttention(slot_dim=5, input_dim=2), EM(1), -1), "num_fixed_steps"),
    ],
)
def test_bad_hyperparameters_raise_naming_the_argument(build, match):
    with pytest.raises((TypeError, ValueError), match=match):
        build()


def test_encoder_output_of_the_wrong_width_is_reported():
    rule = SlotAttention(slot_dim=5, input_dim=2, encoder=GaussianFeatures(2), feature_dim=4)
    x = torch.randn(2, 10, 2)
    with pytest.raises(ValueError, match=r"encoder: expected 4 output features"):
        rule.normalized_inputs(InnerProblem(None, x))


def test_slot_dim_mismatch_is_reported():
    rule = SlotAttention(slot_dim=4, input_dim=2, hidden_dim=8)
    with pytest.raises(ps.CapabilityError, match="slot_dim"):
        ps.refine(GaussianMixture(3, 2), _data(), rule)
    with pytest.raises(TypeError, match="learned"):
        Hybrid(object(), EM(1))


def test_amortized_clustering_checkpoint_resume_equals_uninterrupted(tmp_path):
    """Stop after 3 updates, resume to 6: the same weights as 6 updates in one go."""
    import examples.amortized_clustering as ac

    def run(num_updates, checkpoint):
        argv = [
            f"--num-updates={num_updates}",
            "--batch-size=4",
            "--min-points=30",
            "--max-points=40",
            "--hidden-dim=8",
            f"--checkpoint={checkpoint}",
            "--quiet",
        ]
        args = ac.make_parser().parse_args(argv)
        args.lr_decay = 0.5 ** (num_updates / 6)  # the same per-update decay in both runs
        torch.manual_seed(0)  # the same initial weights (resuming then overwrites them)
        _, rule, svi = ac.build(args)
        progress = ac.train(args, rule, svi)
        return rule, progress

    run(3, tmp_path / "a.pt")
    resumed, progress = run(6, tmp_path / "a.pt")
    straight, _ = run(6, tmp_path / "b.pt")
    assert progress["update"] == 6 and len(progress["losses"]) == 6
    for (name, p), q in zip(resumed.named_parameters(), straight.parameters()):
        assert torch.allclose(p, q, atol=1e-6), name
