import itertools

import numpy as np
import pytest
import torch

from pyro_slots.diagnostics import (
    align_slots,
    apply_permutation,
    invert_permutation,
    match_slots,
)


def _brute_force(cost):
    k = cost.shape[0]
    return min(itertools.permutations(range(k)), key=lambda p: cost[np.arange(k), p].sum())


@pytest.mark.parametrize("num_slots", [1, 2, 3, 4])
def test_hungarian_equals_brute_force(num_slots):
    rng = np.random.default_rng(num_slots)
    cost = rng.exponential(size=(50, num_slots, num_slots))
    perm = match_slots(cost)
    for c, p in zip(cost, perm):
        assert tuple(p) == _brute_force(c)


def test_align_slots_undoes_known_permutations(float64):
    g = torch.Generator().manual_seed(0)
    restarts, batch, k, d = 4, 6, 4, 5
    truth = 3 * torch.randn(batch, k, d, generator=g)
    true_perm = torch.stack(
        [
            torch.stack([torch.randperm(k, generator=g) for _ in range(batch)])
            for _ in range(restarts)
        ]
    )
    slots = apply_permutation(truth.expand(restarts, -1, -1, -1), true_perm, 2)
    slots = slots + 0.01 * torch.randn(slots.shape, generator=g)
    aligned, perm, ref = align_slots(slots, reference="first")
    assert (ref == 0).all()
    # Every restart now lists its slots in restart 0's order.
    expected = apply_permutation(
        truth.expand(restarts, -1, -1, -1), true_perm[:1].expand_as(true_perm), 2
    )
    torch.testing.assert_close(aligned, expected, atol=0.05, rtol=0)
    # perm composes: restart r's aligned slot j is its raw slot perm[r, n, j].
    inv = torch.as_tensor(invert_permutation(perm))
    torch.testing.assert_close(apply_permutation(aligned, inv, 2), slots)


def test_align_to_best_restart(float64):
    g = torch.Generator().manual_seed(1)
    slots = torch.randn(3, 2, 3, 2, generator=g)
    elbo = torch.tensor([[0.0, 5.0], [1.0, 0.0], [-1.0, 2.0]])
    aligned, perm, ref = align_slots(slots, elbo=elbo)
    assert ref.tolist() == [1, 0]
    torch.testing.assert_close(aligned[1, 0], slots[1, 0])  # the reference keeps its order
    torch.testing.assert_close(aligned[0, 1], slots[0, 1])
    assert perm[1, 0].tolist() == [0, 1, 2]


def test_align_on_fields(float64):
    from pyro_slots.models import GaussianMixture

    gmm = GaussianMixture(3, 2)
    g = torch.Generator().manual_seed(2)
    slots = torch.randn(2, 1, 3, gmm.slot_dim, generator=g)
    # Restart 1: the locations of restart 0 reversed, everything else scrambled far away.
    parts = gmm.slot_spec.split(slots.clone())
    parts["loc"][1] = parts["loc"][0].flip(-2)
    parts["log_scale"][1] = 100 * torch.randn(1, 3, 2, generator=g)
    slots = gmm.slot_spec.pack(parts)
    _, perm, _ = align_slots(slots, reference=0, fields=("loc",), slot_spec=gmm.slot_spec)
    assert perm[1, 0].tolist() == [2, 1, 0]


def test_alignment_errors():
    slots = torch.zeros(2, 3, 4, 5)
    with pytest.raises(ValueError, match="elbo"):
        align_slots(slots)
    with pytest.raises(ValueError, match="reference"):
        align_slots(slots, reference=7)
    with pytest.raises(ValueError, match="reference"):
        align_slots(slots, reference="worst")
    with pytest.raises(ValueError, match="slots"):
        align_slots(torch.zeros(3, 4, 5))
    with pytest.raises(ValueError, match="slot_spec"):
        align_slots(slots, reference=0, fields=("loc",))
    with pytest.raises(ValueError, match="cost"):
        match_slots(np.zeros((2, 3)))
