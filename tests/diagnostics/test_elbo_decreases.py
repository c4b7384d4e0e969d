"""ELBO decreases of a sampled guide: Monte Carlo noise is not a decrease, a real drop is."""

import pytest
import torch

import pyro_slots as ps
from pyro_slots.diagnostics import elbo_decreases, inner_loop_health
from tests.diagnostics.test_health import ScriptedRule


def _scripted(conjugate, x, sequence, keep_trajectory):
    start = sequence[0]
    return ps.refine(
        conjugate, x, ScriptedRule(sequence[1:]), slots=start, keep_trajectory=keep_trajectory
    )


@pytest.fixture
def noisy_setting(conjugate):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 3, 2, generator=g)
    # Half the posterior width: log p(x, z) - log q(z) varies with z, the ELBO estimate is noisy.
    slots = conjugate.exact_slots(x, 0.5)
    parts = conjugate.slot_spec.split(slots)
    far = conjugate.slot_spec.pack({"loc": parts["loc"] + 3.0, "log_scale": parts["log_scale"]})
    return x, slots, far


@pytest.mark.parametrize("keep_trajectory", [True, False], ids=["crn", "noise_threshold"])
def test_noise_of_a_one_particle_elbo_is_not_a_decrease(
    float64, conjugate, noisy_setting, keep_trajectory
):
    x, slots, _ = noisy_setting
    result = _scripted(conjugate, x, [slots] * 11, keep_trajectory)  # stays put for 10 steps
    naive = result.history.diff(dim=0) < 0
    assert naive.double().mean() > 0.25  # precondition: the recorded ELBO is noisy
    health = inner_loop_health(result, conjugate, jacobian=False)
    assert (health.fraction_elbo_decrease == 0).all()


def test_a_real_decrease_is_still_counted_with_common_random_numbers(
    float64, conjugate, noisy_setting
):
    x, slots, far = noisy_setting
    # The exact ELBO drops by ~ 3² · M · dim / (2 σ_q²) nats at step 1 and rises at step 3.
    result = _scripted(conjugate, x, [slots, slots, far, far, slots], keep_trajectory=True)
    health = inner_loop_health(result, conjugate, jacobian=False)
    assert health.elbo_decrease.tolist() == [[False] * 6, [True] * 6, [False] * 6, [False] * 6]
    assert health.fraction_elbo_decrease.tolist() == [0.25] * 6


def test_a_real_decrease_is_still_counted_beyond_the_noise(float64, conjugate, noisy_setting):
    """Without a trajectory the noise is measured at the final slots (here the far ones, the
    noisiest of the path)."""
    x, slots, far = noisy_setting
    result = _scripted(conjugate, x, [slots, slots, far, far], keep_trajectory=False)
    health = inner_loop_health(result, conjugate, jacobian=False)
    assert health.elbo_decrease.tolist() == [[False] * 6, [True] * 6, [False] * 6]


def test_elbo_decreases_checks_the_trajectory_length(conjugate):
    with pytest.raises(ValueError, match="trajectory"):
        elbo_decreases(torch.zeros(3, 2), conjugate, torch.zeros(2, 3, 2), [torch.zeros(2, 3, 4)])
