"""pyro_slots.SlotCategorical: torch's Categorical over an axis that is not last."""

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import TraceEnum_ELBO

from pyro_slots import SlotCategorical, select_component


@pytest.mark.parametrize("dim", [0, 1, -2, -1])
def test_log_prob_probs_and_gradient_are_the_categorical_of_the_moved_axis(float64, dim):
    """Against ``dist.Categorical(logits=logits.movedim(dim, -1))`` (which normalizes over its
    last axis itself): log-densities of drawn values, probabilities, the entropy, and the
    gradient of a weighted log-density w.r.t. the unnormalized logits."""
    torch.manual_seed(0)
    logits = (3 * torch.randn(2, 4, 5)).requires_grad_()
    ours = SlotCategorical(logits, dim=dim)
    theirs = dist.Categorical(logits=logits.movedim(dim, -1))
    assert ours.batch_shape == theirs.batch_shape and ours.event_shape == theirs.event_shape
    value = theirs.sample((3,))
    assert torch.allclose(ours.log_prob(value), theirs.log_prob(value), atol=1e-12)
    assert torch.allclose(ours.probs, theirs.probs, atol=1e-12)
    assert torch.allclose(ours.entropy(), theirs.entropy(), atol=1e-12)
    weights = torch.randn(value.shape)
    (g_ours,) = torch.autograd.grad((ours.log_prob(value) * weights).sum(), logits)
    (g_theirs,) = torch.autograd.grad((theirs.log_prob(value) * weights).sum(), logits)
    assert torch.allclose(g_ours, g_theirs, atol=1e-12)


def test_expand_keeps_the_class_and_the_log_densities(float64):
    torch.manual_seed(0)
    logits = torch.randn(3, 4, 1)  # (B, K, M = 1), expanded to M = 6 below
    ours = SlotCategorical(logits, dim=1).expand((3, 6))
    assert type(ours) is SlotCategorical and ours.batch_shape == (3, 6)
    value = torch.randint(4, (3, 6))
    expected = torch.log_softmax(logits, 1).squeeze(-1).gather(1, value)
    assert torch.allclose(ours.log_prob(value), expected, atol=1e-12)


def test_enumerated_mixture_elbo_equals_the_one_with_torch_categorical(float64):
    """A per-measurement mixture whose mixing logits come slot-major ``(B, K, M)``: Pyro's
    TraceEnum_ELBO of the program with SlotCategorical equals it with ``dist.Categorical``, and
    both equal the log-likelihood summed by hand (log-sum-exp over the slots)."""
    torch.manual_seed(0)
    logits, means = torch.randn(2, 3, 5), torch.randn(2, 3, 5)  # (B, K, M)
    x = torch.randn(2, 5)

    def model(make):
        with pyro.plate("b", 2, dim=-2), pyro.plate("m", 5, dim=-1):
            z = pyro.sample("z", make(), infer={"enumerate": "parallel"})
            loc = select_component(means, z, dim=1, event_dim=0)
            pyro.sample("x", dist.Normal(loc, 1.0), obs=x)

    def elbo(make):
        return -TraceEnum_ELBO(max_plate_nesting=2).loss(lambda: model(make), lambda: None)

    ours = elbo(lambda: SlotCategorical(logits, dim=1))
    theirs = elbo(lambda: dist.Categorical(logits=logits.transpose(1, 2)))
    log_lik = torch.logsumexp(
        torch.log_softmax(logits, 1) + dist.Normal(means, 1.0).log_prob(x.unsqueeze(1)), 1
    ).sum()
    assert abs(ours - theirs) < 1e-10 and abs(ours - log_lik.item()) < 1e-10


@pytest.mark.parametrize(
    "logits, dim, match",
    [(torch.zeros(3, 4), 2, "dim: expected an axis"), (torch.tensor(1.0), 0, "logits: expected")],
)
def test_bad_arguments_are_named(logits, dim, match):
    with pytest.raises(ValueError, match=match):
        SlotCategorical(logits, dim=dim)
