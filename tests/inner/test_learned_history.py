import math

import torch

import pyro_slots as ps
from pyro_slots.inner import SlotAttention
from pyro_slots.models import GaussianMixture
from tests.conftest import make_point_sets


def test_record_history_off_skips_only_the_diagnostic(float64):
    x, _ = make_point_sets(3, 40, seed=1)
    gmm = GaussianMixture(3, 2, init_lloyd_steps=0)
    torch.manual_seed(0)
    rule = SlotAttention(3, slot_dim=gmm.slot_dim, input_dim=2, hidden_dim=16).double()
    on = ps.refine(gmm, x, rule, seed=0)
    off = ps.refine(gmm, x, rule, seed=0, record_history=False)
    assert torch.equal(on.slots, off.slots)
    assert torch.isnan(off.history[:-1]).all()
    assert torch.allclose(off.history[-1], on.history[-1])
    assert torch.allclose(on.elbo[0], ps.per_datapoint_elbo(gmm, x, on.slots[0]))
    assert not any(math.isnan(v) for v in on.history.flatten().tolist())


def test_elbo_tol_evaluates_the_elbo_with_the_history_off(float64):
    """elbo_tol reads every step's ELBO: with record_history=False a rule that skips it
    (slot attention) still stops each datapoint where its ELBO changed by less than elbo_tol
    per point, as with the history on: where the change from λ_t to λ_{t+1}, recomputed here
    from the full run's history, first falls below the tolerance, the step from λ_{t+1} that
    evaluated it is kept, so the datapoint ran t + 2 steps."""
    x, _ = make_point_sets(4, 40, seed=2)
    gmm = GaussianMixture(3, 2, init_lloyd_steps=0)
    torch.manual_seed(0)
    rule = SlotAttention(3, slot_dim=gmm.slot_dim, input_dim=2, hidden_dim=16).double()
    full = ps.refine(gmm, x, rule, seed=0, num_steps=30)
    change = full.history.diff(dim=0).abs()[:, 0] / x.shape[1]  # (30, batch)
    tol = float(change.median())
    below = change < tol
    expected = [int(below[:, n].nonzero()[0]) + 2 if below[:, n].any() else 30 for n in range(4)]
    assert min(expected) < 30  # some stop early
    for record_history in (True, False):
        run = ps.refine(gmm, x, rule, seed=0, num_steps=30, elbo_tol=tol,
                        record_history=record_history)  # fmt: skip
        assert run.steps[0].tolist() == expected
        assert not torch.isnan(run.history).any()
