"""Neural EM: the Pyro program against brute force, its N-EM and RNN-EM steps against hand
computations and finite differences."""

import math

import pyro.optim
import pytest
import torch

import pyro_slots as ps
from pyro_slots.inner import RNNEM, GeneralizedEM, InnerProblem
from pyro_slots.models import NeuralEM
from pyro_slots.objectives import NegativeELBO

SIZE, K, D, C = 4, 3, 3, 2


def _model():
    torch.manual_seed(0)
    return NeuralEM(SIZE, num_slots=K, slot_dim=D, channels=C, decoder_channels=(4,)).double()


def _data(batch=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    images = torch.rand(batch, C, SIZE, SIZE, generator=g, dtype=torch.float64)
    slots = torch.randn(batch, K, D, generator=g, dtype=torch.float64)
    return images, slots


def _log_joint(model, x, slots):
    """Brute force ``log(1/K) + Σ_c log N(x_mc | ψ_kmc, σ)`` of shape ``(B, K, M)``."""
    means = model.component_means(slots)  # (B, K, M, C)
    sigma = model.pixel_scale
    log_pdf = -0.5 * ((x.unsqueeze(1) - means) / sigma) ** 2 - math.log(
        sigma * math.sqrt(2 * math.pi)
    )
    return log_pdf.sum(-1) - math.log(slots.shape[1])


def test_elbo_and_posterior_are_the_mixture_likelihood_and_bayes_rule():
    model = _model()
    images, slots = _data()
    x = model.encode(images)
    assert x.shape == (2, SIZE * SIZE, C)
    assert torch.equal(x[1, SIZE + 2], images[1, :, 1, 2])  # pixel (1, 2), row-major
    elbo, resp = InnerProblem(model, x).elbo_and_responsibilities(slots)
    log_joint = _log_joint(model, x, slots)
    torch.testing.assert_close(elbo, log_joint.logsumexp(1).sum(-1), rtol=1e-10, atol=1e-8)
    torch.testing.assert_close(resp, torch.softmax(log_joint, 1), rtol=1e-8, atol=1e-12)
    masks = model.segment(x, slots)
    assert masks.shape == (2, K, SIZE, SIZE)
    torch.testing.assert_close(masks.flatten(2), resp)
    recon = model.reconstruct(x, slots)
    expected = (resp.unsqueeze(-1) * model.component_means(slots)).sum(1)  # (B, M, C)
    torch.testing.assert_close(recon.flatten(2).transpose(1, 2), expected)


def test_nem_step_is_a_gradient_step_on_the_expected_complete_log_likelihood():
    """GeneralizedEM(ascent_steps=1, safeguarded=False) = θ + α ∇_θ Q(θ; γ) / M, with γ the
    brute-force posterior at θ and ∇Q by central finite differences."""
    model = _model()
    images, slots = _data(seed=1)
    x = model.encode(images)
    alpha = 0.3
    rule = GeneralizedEM(1, ascent_steps=1, step_size=alpha, trust_radius=None, safeguarded=False)
    new = ps.refine(model, images, rule, slots=slots).slots[0]
    with torch.no_grad():
        resp = torch.softmax(_log_joint(model, x, slots), 1)

    def q(theta):
        return (resp * _log_joint(model, x, theta)).sum()

    grad = torch.zeros_like(slots)
    eps = 1e-6
    with torch.no_grad():
        for index in torch.cartesian_prod(*(torch.arange(n) for n in slots.shape)):
            plus, minus = slots.clone(), slots.clone()
            plus[tuple(index)] += eps
            minus[tuple(index)] -= eps
            grad[tuple(index)] = (q(plus) - q(minus)) / (2 * eps)
    torch.testing.assert_close(new, slots + alpha * grad / x.shape[1], rtol=1e-6, atol=1e-8)


def test_rnn_em_step_by_hand_and_permutation_equivariance():
    model = _model()
    images, slots = _data(seed=2)
    x = model.encode(images)
    torch.manual_seed(1)
    rule = RNNEM(1, slot_dim=D, num_measurements=SIZE * SIZE, channels=C, hidden_dim=5).double()
    new = ps.refine(model, images, rule, slots=slots).slots[0]
    with torch.no_grad():
        resp = torch.softmax(_log_joint(model, x, slots), 1)  # (B, K, M)
        error = resp.unsqueeze(-1) * (model.component_means(slots) - x.unsqueeze(1))
        error = error / model.pixel_scale**2
        layer = rule.encoder[1]
        h = torch.nn.functional.elu(error.flatten(2) @ layer.weight.T + layer.bias)
        expected = rule.cell(h.reshape(-1, 5), slots.reshape(-1, D)).reshape(2, K, D)
    torch.testing.assert_close(new, expected, rtol=1e-10, atol=1e-12)
    perm = torch.tensor([2, 0, 1])
    permuted = ps.refine(model, images, rule, slots=slots[:, perm]).slots[0]
    torch.testing.assert_close(permuted, new[:, perm], rtol=1e-10, atol=1e-12)


def test_rnn_em_refuses_a_model_without_component_means():
    from pyro_slots.models import GaussianMixture

    rule = RNNEM(1, slot_dim=5, num_measurements=10, channels=2)
    with pytest.raises(ps.CapabilityError, match="component_means"):
        ps.refine(GaussianMixture(3, 2), torch.randn(2, 10, 2), rule)


@pytest.mark.parametrize("fixed", [True, False], ids=["nem", "rnn_em"])
def test_unrolled_outer_gradient_matches_finite_differences(fixed):
    """J = -ELBO after two inner steps; its gradient w.r.t. a decoder weight (and, for RNN-EM,
    a weight of the rule) against a central finite difference: the fixed and learned rules are
    one argument apart."""
    model = _model()
    images, _ = _data(seed=3)
    torch.manual_seed(2)
    rule = (
        GeneralizedEM(2, ascent_steps=1, step_size=0.5, trust_radius=None, safeguarded=False)
        if fixed
        else RNNEM(2, slot_dim=D, num_measurements=SIZE * SIZE, channels=C, hidden_dim=5).double()
    )
    svi = ps.NestedSVI(model, rule, NegativeELBO(), pyro.optim.SGD({"lr": 0.0}), seed=0)
    weights = [model.decoder.net[-1].weight] + ([] if fixed else [rule.cell.weight_hh])

    def loss():
        svi.generator.manual_seed(0)
        return svi.loss(images)

    grads = torch.autograd.grad(loss(), weights)
    for weight, grad in zip(weights, grads):
        index = (0,) * weight.dim()
        eps = 1e-6
        with torch.no_grad():
            weight[index] += eps
            up = loss()
            weight[index] -= 2 * eps
            down = loss()
            weight[index] += eps
        assert grad[index].item() == pytest.approx(((up - down) / (2 * eps)).item(), rel=1e-5)
