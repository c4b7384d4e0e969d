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
