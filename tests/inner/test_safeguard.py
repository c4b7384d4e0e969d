"""Safeguarded: the ELBO never decreases, accepted steps are the rule's, rejected the fallback's."""

import pytest
import torch

import pyro_slots as ps
from pyro_slots.inner import EM, GradientAscent, InnerRule, InnerState, Safeguarded, SlotAttention
from pyro_slots.inner.base import StepInfo
from pyro_slots.models import GaussianMixture
from tests.conftest import make_point_sets


class Scramble(InnerRule):
    """A bad rule: moves every mean by a large random offset (almost always lowers the ELBO)."""

    def __init__(self, num_steps=5, size=3.0):
        super().__init__(num_steps)
        self.size = size

    def step(self, state, problem, create_graph=False):
        g = torch.Generator().manual_seed(state.step)
        noise = torch.randn(state.slots.shape, generator=g, dtype=state.slots.dtype)
        noise[..., 2:] = 0  # only the means
        elbo = problem.history_elbo(state.slots)
        return InnerState(state.slots + self.size * noise, state.step + 1), StepInfo(elbo)


def _setup(seed=0):
    x, _ = make_point_sets(4, 60, num_components=3, seed=seed)
    gmm = GaussianMixture(3, 2)
    slots = gmm.init_slots(x, 3, torch.Generator().manual_seed(seed))
    return gmm, x.double(), slots.double()


@pytest.mark.parametrize(
    "make_rule",
    [
        lambda: Scramble(),
        lambda: GradientAscent(num_steps=5, step_size=10.0),  # far too large a step
        lambda: SlotAttention(5, slot_dim=5, input_dim=2, hidden_dim=16, moments=True),  # untrained
    ],
)
@pytest.mark.parametrize("fallback", [None, "em"])
def test_elbo_never_decreases(float64, make_rule, fallback):
    torch.manual_seed(0)
    gmm, x, slots = _setup()
    rule = make_rule().double()
    raw = ps.refine(gmm, x, rule, slots=slots, num_steps=12)
    safe = Safeguarded(rule, EM(1) if fallback else None)
    res = ps.refine(gmm, x, safe, slots=slots, num_steps=12)
    assert (res.history.diff(dim=0) >= 0).all()
    assert (res.elbo >= raw.history[0]).all()
    # the raw rule does lower it somewhere, so the safeguard had work to do
    assert (raw.history.diff(dim=0) < -1e-6).any()


def test_accepted_steps_are_the_rules_own(float64):
    """EM never lowers the ELBO: Safeguarded(EM) takes EM's steps (up to the steps at
    convergence, where rounding may make an EM step lower the ELBO by ~1e-16 and be refused)."""
    gmm, x, slots = _setup(1)
    em = ps.refine(gmm, x, EM(8), slots=slots, keep_trajectory=True)
    safe = ps.refine(gmm, x, Safeguarded(EM(8)), slots=slots, keep_trajectory=True)
    assert torch.equal(em.trajectory[1], safe.trajectory[1])
    for a, b in zip(em.trajectory, safe.trajectory):
        assert torch.allclose(a, b, atol=1e-6)
    assert torch.allclose(em.history, safe.history, atol=1e-10)


def test_rejected_steps_take_the_fallback_step(float64):
    """A rejected datapoint's next slots are one EM step from its current slots."""
    gmm, x, slots = _setup(2)
    rule = Safeguarded(Scramble(1, size=50.0), EM(1))
    problem = ps.inner.InnerProblem(gmm, x)
    state = rule.init(problem, slots)
    new, info = rule.step(state, problem)
    proposal, _ = Scramble(1, size=50.0).step(InnerState(slots, 0), problem)
    em_step, _ = EM(1).step(EM(1).init(problem, slots), problem)
    accepted = problem.elbo(proposal.slots) >= problem.elbo(slots)
    assert not accepted.all()
    assert (problem.elbo(em_step.slots) >= problem.elbo(slots)).all()  # EM improves here
    expected = torch.where(accepted.view(-1, 1, 1), proposal.slots, em_step.slots)
    assert torch.equal(new.slots, expected)
    assert torch.allclose(info.elbo, problem.elbo(slots))
    # the carried ELBO is that of the new slots
    assert torch.allclose(new.aux[-1][:, 0], problem.elbo(new.slots))


def test_stateful_fallback_and_non_rules_are_refused():
    gmm, x, slots = _setup()
    with pytest.raises(TypeError, match="rule"):
        Safeguarded(torch.nn.Linear(2, 2))
    with pytest.raises(TypeError, match="fallback"):
        Safeguarded(EM(1), fallback="em")
    with pytest.raises(ValueError, match="fallback"):
        ps.refine(gmm, x, Safeguarded(EM(1), GradientAscent(1, adam=True)), slots=slots)


def test_a_fallback_step_that_lowers_the_elbo_is_refused_too(float64):
    """With a bad fallback as well, every rejected datapoint stays exactly where it was."""
    gmm, x, slots = _setup(3)
    rule = Safeguarded(Scramble(1, size=50.0), fallback=Scramble(1, size=40.0))
    problem = ps.inner.InnerProblem(gmm, x)
    new, _ = rule.step(rule.init(problem, slots), problem)
    moved = (new.slots != slots).any(-1).any(-1)
    assert (problem.elbo(new.slots) >= problem.elbo(slots)).all()
    assert not moved.all()  # the scrambled steps are refused for (almost) every datapoint


def test_safeguarding_a_monotone_rule_changes_nothing_from_its_own_start(float64):
    """SoftKMeans projects λ_0 onto its isotropic family in init and is EM on that family, so
    its ELBO never falls: Safeguarded(SoftKMeans) accepts every step and is SoftKMeans (it
    stepped from the unprojected λ_0 and rejected every step, never moving)."""
    from pyro_slots.inner import SoftKMeans

    x, _ = make_point_sets(4, 40, seed=3)
    gmm = GaussianMixture(3, 2)
    plain = ps.refine(gmm, x, SoftKMeans(8, temperature=0.5), seed=0)
    safe = ps.refine(gmm, x, Safeguarded(SoftKMeans(8, temperature=0.5)), seed=0)
    assert (plain.history.diff(dim=0) >= -1e-9).all()  # monotone: nothing to reject
    # (equal up to a step rejected at convergence for an ELBO lower by rounding)
    torch.testing.assert_close(safe.slots, plain.slots, rtol=0, atol=1e-6)
    torch.testing.assert_close(safe.history, plain.history, rtol=0, atol=1e-9)
    assert not torch.allclose(safe.slots, safe.initial_slots)
