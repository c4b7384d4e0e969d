"""The fused CPU kernel of slot attention's attention (pyro_slots.inner._fused_attention).

Against the textbook formulas in float64 (softmax over the slots plus eps, weighted sums, and
autograd's gradients of both), and end to end against torch's path of the same rule; the kernel
is built at the first test that needs it (about half a minute), and these tests are skipped
where it cannot be built.
"""

import math

import pytest
import torch

from pyro_slots._native import NativeExtension
from pyro_slots.inner import InnerProblem, SlotAttention
from pyro_slots.inner import _fused_attention as fused
from pyro_slots.inner.slot_attention import _AttendPool
from pyro_slots.models import GaussianMixture

EPS = 1e-8

needs_kernel = pytest.mark.skipif(
    not fused.available(), reason=f"the fused kernel was not built: {fused.EXTENSION.error}"
)


def _textbook(q, n):
    """float64 ``softmax_K(q nᵀ) + eps`` ``(B, 1, K, M)`` and ``attn n`` ``(B, 1, K, F)``."""
    logits = torch.einsum("bhkf,bmf->bhkm", q.double(), n.double())
    attn = torch.softmax(logits, dim=2) + EPS
    return attn, torch.einsum("bhkm,bmf->bhkf", attn, n.double())


def _inputs(batch, num_slots, num_inputs, features, seed):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, 1, num_slots, features, generator=g) / math.sqrt(features)
    n = torch.randn(batch, num_inputs, features, generator=g)
    return q, n


@needs_kernel
@pytest.mark.parametrize(
    "num_slots, num_inputs, features",
    [
        (1, 16, 2),
        (4, 64, 10),
        (7, 1024, 64),
        (16, 80, 6),
        (4, 37, 8),
        (3, 1, 2),
        (7, 1225, 64),
        (4, 500, 5),
        (2, 16, 1),
    ],
)
def test_kernel_forward_is_the_softmax_and_the_weighted_sums(num_slots, num_inputs, features):
    """Against float64 formulas; input counts off the tile (37, 1, 35 × 35, 500) run on zero
    inputs appended in the kernel's buffers and an odd number of features (5, 1) on a zero
    feature appended, of which the caller sees nothing."""
    q, n = _inputs(3, num_slots, num_inputs, features, seed=num_slots)
    assert fused.supported(q, n)
    attn, pooled = _AttendPool.apply(q, n, EPS)
    assert attn.shape == (3, 1, num_slots, num_inputs)
    want_attn, want_pooled = _textbook(q, n)
    assert torch.allclose(attn.double(), want_attn, rtol=1e-5, atol=1e-6)
    scale = want_pooled.abs().max()
    assert (pooled.double() - want_pooled).abs().max() < 1e-5 * scale


@needs_kernel
@pytest.mark.parametrize("num_inputs, features", [(48, 12), (45, 12), (45, 5)])
@pytest.mark.parametrize("mass_only", [False, True])
def test_kernel_backward_is_autograds_gradient_of_the_textbook(mass_only, num_inputs, features):
    """d/dq and d/dn of a loss of both outputs, against float64 autograd through the formulas;
    ``mass_only``: the attention enters only through its sum over the inputs (as the rule's
    normalizer does), whose gradient is constant along M and read without a copy; 45 inputs:
    off the tile, 5 features: odd (the padding's gradients are not the caller's)."""
    q, n = _inputs(2, 7, num_inputs, features, seed=3)
    g = torch.Generator().manual_seed(4)
    w_attn = torch.randn(2, 1, 7, num_inputs, generator=g)
    w_pooled = torch.randn(2, 1, 7, features, generator=g)

    def loss(attn, pooled):
        a = attn.sum(-1) * w_attn[..., 0] if mass_only else attn * w_attn
        return a.sum() + (pooled * w_pooled.to(pooled.dtype)).sum()

    q1, n1 = q.clone().requires_grad_(), n.clone().requires_grad_()
    attn, pooled = _AttendPool.apply(q1, n1, EPS)
    loss(attn, pooled.to(attn.dtype)).backward()
    q2, n2 = q.double().requires_grad_(), n.double().requires_grad_()
    loss(*_textbook(q2, n2)).backward()
    for got, want in ((q1.grad, q2.grad), (n1.grad, n2.grad)):
        assert (got.double() - want).abs().max() < 2e-5 * want.abs().max()


def _unrolled_rule(monkeypatch, enabled: bool, num_inputs=64, num_steps=3):
    monkeypatch.setenv("PYRO_SLOTS_FUSED_ATTENTION", "1" if enabled else "0")
    torch.manual_seed(0)
    gmm = GaussianMixture(5, 2)
    rule = SlotAttention(3, slot_dim=gmm.slot_dim, input_dim=2, hidden_dim=16)
    x = torch.randn(4, num_inputs, 2, requires_grad=True)
    problem = InnerProblem(gmm, x)
    state = rule.init(problem, torch.randn(4, 5, gmm.slot_dim))
    for _ in range(num_steps):
        state, _ = rule.step(state, problem)
    return rule, x, problem, state.slots.square().mean()


def _rule_gradients(monkeypatch, enabled: bool, num_inputs=64, num_steps=3):
    rule, x, _, loss = _unrolled_rule(monkeypatch, enabled, num_inputs, num_steps)
    loss.backward()
    return [x.grad] + [p.grad for p in rule.parameters()]


@needs_kernel
@pytest.mark.parametrize("num_inputs", [64, 61])
@pytest.mark.parametrize("num_steps", [1, 3])
@pytest.mark.parametrize("defer", [True, False])
def test_rule_gradients_with_the_kernel_equal_torchs_path(
    monkeypatch, num_steps, defer, num_inputs
):
    """Steps of a SlotAttention rule, backward through all of them: the same weights' and
    inputs' gradients either way. With 16 features the input LayerNorm is the fused one
    (:class:`_NormalizeShared`); with ``defer`` the inputs' gradient is left in the sink
    (after 2 of 3 steps its 20 factor rows exceed the 16 features and are summed early, so the
    fused backward gets a partial sum too), without it each step returns its own. With 61
    inputs (off the tile) the attention runs on padded inputs and the LayerNorm is torch's."""
    from pyro_slots.inner import slot_attention as sa

    monkeypatch.setattr(sa, "_CAN_DEFER", defer and sa._CAN_DEFER)
    on = _rule_gradients(monkeypatch, True, num_inputs, num_steps)
    off = _rule_gradients(monkeypatch, False, num_inputs, num_steps)
    for a, b in zip(on, off):
        assert (a - b).abs().max() <= 1e-4 * b.abs().max() + 1e-7


@needs_kernel
@pytest.mark.parametrize("num_inputs", [64, 61])
def test_double_backward_through_the_fused_layer_norm_equals_torchs(monkeypatch, num_inputs):
    """A Hessian-vector product through the inputs (a backward that builds a graph: the fused
    LayerNorm differentiates torch's) equals the one of torch's path; and a gradient of the
    normalized inputs from outside the steps (the rule's attention masks) is added to the
    deferred one."""
    results = []
    for enabled in (True, False):
        rule, x, problem, loss = _unrolled_rule(monkeypatch, enabled, num_inputs)
        n = rule.normalized_inputs(problem)
        fused_norm = enabled and num_inputs % fused.tile() == 0  # off the tile: torch's
        assert (n.grad_fn.__class__.__name__ == "_NormalizeSharedBackward") == fused_norm
        masks = rule.attention_masks(problem, torch.randn(4, 5, rule.slot_dim))
        (gx,) = torch.autograd.grad(loss + masks.square().mean(), [x], create_graph=True)
        v = torch.linspace(-1, 1, x.numel()).view_as(x)
        (hvp,) = torch.autograd.grad((gx * v).sum(), [x])
        results.append((gx.detach(), hvp))
    for a, b in zip(*results):
        assert (a - b).abs().max() <= 1e-4 * b.abs().max() + 1e-7
    assert results[0][1].abs().max() > 1e-5  # not trivially zero (100× the tolerance's floor)


def _layer_norm_inputs(batch, num_inputs, features, seed):
    g = torch.Generator().manual_seed(seed)
    h = 3 * torch.randn(batch, num_inputs, features, generator=g) + 1
    return h, torch.randn(features, generator=g), torch.randn(features, generator=g)


@needs_kernel
@needs_kernel
@pytest.mark.parametrize("num_inputs", [1, 37, 500])
@pytest.mark.parametrize("dim", [1, 2, 3])
def test_fused_gaussian_features_are_numpys_with_the_blocked_copy(num_inputs, dim):
    """``GaussianFeatures.standardize`` without a graph in one pass: (1, z, z²), the mean and
    ``std + eps`` against numpy in float64, and the blocked copy written beside them equal to
    :func:`blocked` of the features (zero padding inputs and feature)."""
    import numpy as np

    from pyro_slots.inner.slot_attention import GaussianFeatures

    g = torch.Generator().manual_seed(num_inputs + dim)
    x = torch.randn(6, num_inputs, dim, generator=g) * torch.linspace(0.5, 3.0, dim) + 2.0
    with torch.no_grad():
        n, mean, scale = GaussianFeatures(dim, eps=1e-3).standardize(x, blocked=True)
    xn = x.double().numpy()
    std = xn.std(1, ddof=1 if num_inputs > 1 else 0, keepdims=True)
    z = (xn - xn.mean(1, keepdims=True)) / (std + 1e-3)
    want = np.concatenate([np.ones_like(z[..., :1]), z, z**2], -1)
    assert n.shape == (6, num_inputs, 2 * dim + 1) and n.stride(1) == 1  # feature-major
    np.testing.assert_allclose(n.numpy(), want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(mean.numpy(), xn.mean(1, keepdims=True), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(scale.numpy(), std + 1e-3, rtol=1e-5)
    kept = fused._blocked_cache[n][1]
    assert fused.blocked(n) is kept
    assert torch.equal(kept, fused.blocked(n.clone()))  # the copy made from the features
    without = GaussianFeatures(dim, eps=1e-3)
    with torch.no_grad():
        n2, _, _ = without.standardize(x)  # not asked for: no blocked copy kept
    assert n2 not in fused._blocked_cache and torch.equal(n2, n)


@pytest.mark.parametrize("features", [16, 64, 128])
def test_fused_layer_norm_is_the_layer_norm_and_the_blocked_copy(features):
    h, w, b = _layer_norm_inputs(3, 32, features, seed=features)
    assert fused.normalize_supported(h, w, b)
    n, nb, mean, rstd = fused.normalize(h, w, b, 1e-5)
    want = torch.nn.functional.layer_norm(h.double(), (features,), w.double(), b.double(), 1e-5)
    assert (n.double() - want).abs().max() < 1e-5 * want.abs().max()
    assert torch.allclose(mean.double(), h.double().mean(-1), atol=1e-5)
    var = h.double().var(-1, unbiased=False)
    assert torch.allclose(rstd.double(), (var + 1e-5).rsqrt(), rtol=1e-5)
    assert torch.equal(nb, fused.blocked(n.clone()))  # the layout of blocked(), same values
    assert fused.normalize(h, w, b, 1e-5, blocked=False)[1].numel() == 0


@needs_kernel
@pytest.mark.parametrize("features", [16, 64, 128])
@pytest.mark.parametrize("with_extra", [False, True])
def test_fused_layer_norm_backward_is_autograds(features, with_extra):
    """``d_h, d_w, d_b`` for the gradient ``Σ_i left_iᵀ right_i (+ extra)`` of ``n``, against
    float64 autograd through torch's layer_norm; factor pairs of different sizes."""
    batch, num_inputs = 3, 48
    h, w, b = _layer_norm_inputs(batch, num_inputs, features, seed=1)
    _, _, mean, rstd = fused.normalize(h, w, b, 1e-5)
    g = torch.Generator().manual_seed(2)
    factors = [
        (
            torch.randn(batch, j, num_inputs, generator=g),
            torch.randn(batch, j, features, generator=g),
        )
        for j in (14, 3, 14)
    ]
    extra = torch.randn(batch, num_inputs, features, generator=g) if with_extra else None
    got = fused.normalize_backward(h, mean, rstd, w, factors, extra)
    d_n = sum(torch.bmm(left.double().transpose(1, 2), right.double()) for left, right in factors)
    if with_extra:
        d_n = d_n + extra.double()
    leaves = [t.double().requires_grad_() for t in (h, w, b)]
    n = torch.nn.functional.layer_norm(leaves[0], (features,), leaves[1], leaves[2], 1e-5)
    for a, want in zip(got, torch.autograd.grad(n, leaves, d_n)):
        assert (a.double() - want).abs().max() < 2e-5 * want.abs().max()


@needs_kernel
def test_fused_layer_norm_applies_to_its_shapes_only():
    h, w, b = _layer_norm_inputs(2, 16, 16, seed=0)
    assert fused.normalize_supported(h, w, b)
    assert not fused.normalize_supported(h[..., :12], w[:12], b[:12])  # F not a multiple of 8
    big = torch.zeros(2, 16, (fused.MAX_NORM_VECTORS + 1) * fused.tile())
    assert not fused.normalize_supported(big, big[0, 0], big[0, 0])  # more features than compiled
    most = big[..., : fused.MAX_NORM_VECTORS * fused.tile()]
    assert fused.normalize_supported(most, most[0, 0], most[0, 0])
    assert not fused.normalize_supported(h[:, :12], w, b)  # M not a multiple of 8
    assert not fused.normalize_supported(h.double(), w.double(), b.double())
    assert not fused.normalize_supported(h, w[:8], b)  # a weight of another size
    assert not fused.normalize_supported(h, w, None)  # no bias


def test_unsupported_shapes_and_the_switch_keep_torchs_path(monkeypatch):
    q, n = _inputs(2, 4, 64, 8, seed=0)
    two_heads = torch.cat([q, q], 1)
    assert not fused.supported(two_heads, n)  # heads
    assert not fused.supported(q.double(), n.double())  # float64
    assert not fused.supported(torch.randn(2, 1, 17, 8), n)  # more slots than compiled for
    monkeypatch.setenv("PYRO_SLOTS_FUSED_ATTENTION", "0")
    assert not fused.available() and not fused.supported(q, n)
    # Torch's path then gives the textbook's numbers (as the kernel does, above).
    attn, pooled = _AttendPool.apply(q, n, EPS)
    want_attn, want_pooled = _textbook(q, n)
    assert torch.allclose(attn.double(), want_attn, rtol=1e-5, atol=1e-6)
    assert torch.allclose(pooled.double(), want_pooled, rtol=1e-4, atol=1e-5)


def test_a_failed_build_is_remembered_and_torchs_path_runs(monkeypatch, caplog):
    extension = NativeExtension("broken", "", [], "PYRO_SLOTS_BROKEN", "broken kernel")
    calls = []

    def broken():
        calls.append(1)
        raise RuntimeError("no compiler here")

    monkeypatch.setattr(extension, "_build", broken)
    monkeypatch.setattr(fused, "EXTENSION", extension)
    monkeypatch.setenv("PYRO_SLOTS_BROKEN", "1")
    with caplog.at_level("WARNING", logger="pyro_slots._native"):
        assert not fused.available()
        assert not fused.available()  # not retried
    assert calls == [1]
    assert "no compiler here" in caplog.text
    q, n = _inputs(2, 3, 16, 4, seed=1)
    assert not fused.supported(q, n)
    attn, _ = _AttendPool.apply(q, n, EPS)
    assert torch.allclose(attn.double(), _textbook(q, n)[0], rtol=1e-5, atol=1e-6)


@needs_kernel
def test_blocked_layout_is_made_once_per_tensor_version():
    t = fused.tile()
    assert t in (8, 16)
    n = torch.randn(2, 2 * t, 4)
    nb = fused.blocked(n)
    assert nb.shape == (2, 2, 4, t)
    assert torch.equal(nb[1, 1, 3], n[1, t : 2 * t, 3])  # tile 1, feature 3
    assert fused.blocked(n) is nb
    with torch.no_grad():
        n.add_(1.0)  # a new version: made again
    assert fused.blocked(n) is not nb
    assert torch.equal(fused.blocked(n)[0, 0, 0], n[0, :t, 0])
    # Off the tile: zero inputs appended up to the next multiple.
    odd = torch.randn(2, t + 3, 4)
    nb = fused.blocked(odd)
    assert nb.shape == (2, 2, 4, t) and fused.padded(t + 3) == 2 * t
    assert torch.equal(nb[1, 1, 2, :3], odd[1, t:, 2]) and not nb[:, 1, :, 3:].any()


@needs_kernel
def test_the_kernels_refuse_shapes_off_the_tile():
    """Called directly with shapes that :func:`normalize_supported` refuses, the C++ functions
    raise instead of writing past their rows."""
    h, w, b = _layer_norm_inputs(2, 16, 4, seed=0)  # 4 features: not a multiple of the tile
    with pytest.raises(RuntimeError, match="multiples of the tile"):
        fused.normalize(h, w, b, 1e-5)
    _, _, mean, rstd = fused.normalize(*_layer_norm_inputs(2, 16, 16, seed=0), 1e-5)
    with pytest.raises(RuntimeError, match="multiples of the tile"):
        fused.normalize_backward(h, mean, rstd, w, [])


@needs_kernel
def test_fused_layer_norm_backward_is_the_same_whatever_the_threads():
    """The weight and bias gradients are summed over the datapoints in their order, not in
    the order the threads finish: bit for bit the same on one thread and on several."""
    h, w, b = _layer_norm_inputs(6, 32, 16, seed=3)
    _, _, mean, rstd = fused.normalize(h, w, b, 1e-5)
    g = torch.Generator().manual_seed(4)
    factors = [(torch.randn(6, 5, 32, generator=g), torch.randn(6, 5, 16, generator=g))]
    threads = torch.get_num_threads()
    try:
        results = []
        for n in (1, 3):
            torch.set_num_threads(n)
            results.append(fused.normalize_backward(h, mean, rstd, w, factors))
    finally:
        torch.set_num_threads(threads)
    for a, c in zip(*results):
        assert torch.equal(a, c)
