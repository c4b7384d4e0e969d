"""WeightedSum: the weighted sum of its parts, and every part's weights trained by NestedSVI."""

import math

import pyro.optim
import pytest
import torch

from pyro_slots import NestedSVI
from pyro_slots.data import generate_shapes
from pyro_slots.inner import SoftKMeans
from pyro_slots.objectives import Objective, Reconstruction, SetPrediction, WeightedSum
from tests import conftest

SIZE = 16
NUM_SLOTS = 3


def tiny_autoencoder():
    return conftest.tiny_autoencoder(
        image_size=SIZE,
        num_slots=NUM_SLOTS,
        feature_dim=8,
        encoder_channels=(4, 4),
        decoder_channels=(4, 4),
    )


def shapes_batch(batch=4):
    data = generate_shapes(batch, image_size=SIZE, min_objects=1, max_objects=NUM_SLOTS, seed=3)
    head = SetPrediction(slot_dim=8, num_shapes=4, num_colors=8, hidden=8)
    return data, head


@pytest.mark.parametrize("weights", [None, (1.0, 0.0), (0.3, 2.5)])
def test_weighted_sum_equals_sum_of_parts(float64, weights):
    model = tiny_autoencoder().double()
    data, head = shapes_batch()
    head = head.double()
    x = data["image"].double()
    targets = head.targets_from_batch(data)
    x_enc = model.encode(x)
    slots = torch.randn(x.shape[0], NUM_SLOTS, 8, generator=torch.Generator().manual_seed(0))
    recon, set_pred = Reconstruction(), head
    combined = WeightedSum([recon, set_pred], weights=weights)
    w = (1.0, 1.0) if weights is None else weights
    # Each part on its own, summed by hand.
    expected = w[0] * recon(model, x, x_enc, slots, *targets) + w[1] * set_pred(
        model, x, x_enc, slots, *targets
    )
    actual = combined(model, x, x_enc, slots, *targets)
    assert actual.shape == (x.shape[0],)
    torch.testing.assert_close(actual, expected, rtol=1e-12, atol=1e-12)
    parts = [
        recon(model, x, x_enc, slots, *targets).mean().item(),
        set_pred(model, x, x_enc, slots, *targets).mean().item(),
    ]
    assert combined.last_terms == pytest.approx(parts, rel=1e-12)


def test_nested_svi_trains_every_part():
    model = tiny_autoencoder()
    data, head = shapes_batch(batch=6)
    objective = WeightedSum([Reconstruction(), head], weights=[1.0, 0.1])
    svi = NestedSVI(
        model,
        SoftKMeans(2, temperature=model.variance),
        objective,
        pyro.optim.Adam({"lr": 1e-2}),
        seed=0,
    )
    params = {id(p) for p in svi.parameters()}
    assert {id(p) for p in head.parameters()} <= params
    assert {id(p) for p in model.parameters()} <= params
    names = [n for n, _ in svi.named_parameters()]
    assert any(n.startswith("objective.parts.1.head.") for n in names)
    before = {n: p.detach().clone() for n, p in svi.named_parameters()}
    loss, _ = svi.step(data["image"], *head.targets_from_batch(data))
    assert math.isfinite(loss)
    changed = {n for n, p in svi.named_parameters() if not torch.equal(p, before[n])}
    # The decoder learns from the reconstruction only, the head from set prediction only.
    assert any(n.startswith("model.decoder.") for n in changed)
    assert any(n.startswith("objective.parts.1.head.") for n in changed)


def test_validation():
    with pytest.raises(ValueError, match="at least one"):
        WeightedSum([])
    with pytest.raises(TypeError, match=r"objectives\[1\]"):
        WeightedSum([Reconstruction(), torch.nn.Linear(2, 2)])
    with pytest.raises(ValueError, match="2 weights"):
        WeightedSum([Reconstruction(), Reconstruction()], weights=[1.0])
    with pytest.raises(ValueError, match=r"weights\[0\]"):
        WeightedSum([Reconstruction()], weights=[-1.0])
    with pytest.raises(ValueError, match=r"weights\[0\]"):
        WeightedSum([Reconstruction()], weights=[math.nan])
    with pytest.raises(TypeError, match=r"weights\[0\]"):
        WeightedSum([Reconstruction()], weights=["1"])


def test_part_with_wrong_shape_is_named():
    class Scalar(Objective):
        def forward(self, model, x, x_enc, slots, *targets):
            return x.sum()

    model = tiny_autoencoder()
    x = torch.rand(2, 3, SIZE, SIZE)
    slots = torch.randn(2, NUM_SLOTS, 8)
    with pytest.raises(ValueError, match=r"objectives\[1\] \(Scalar\)"):
        WeightedSum([Reconstruction(), Scalar()])(model, x, model.encode(x), slots)
