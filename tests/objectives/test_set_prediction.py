import itertools
import math

import pyro.optim
import pytest
import torch
import torch.nn.functional as F

from pyro_slots import NestedSVI
from pyro_slots.data import ShapesDataset, TetrominoesDataset, generate_shapes, sample_point_sets
from pyro_slots.inner import EM
from pyro_slots.models import GaussianMixture
from pyro_slots.objectives.set_prediction import SetPrediction


def _random_targets(g, batch, num_slots, num_shapes, num_colors, max_objects):
    present = torch.zeros(batch, max_objects, dtype=torch.bool)
    for b in range(batch):
        n = int(torch.randint(0, num_slots + 1, (1,), generator=g))
        present[b, torch.randperm(max_objects, generator=g)[:n]] = True
    position = torch.rand(batch, max_objects, 2, generator=g, dtype=torch.float64)
    shape = torch.randint(num_shapes, (batch, max_objects), generator=g)
    color = torch.randint(num_colors, (batch, max_objects), generator=g)
    scale = 0.1 + 0.1 * torch.rand(batch, max_objects, generator=g, dtype=torch.float64)
    return present, position, shape, color, scale


def _brute_force(objective, slots, present, position, shape, color, scale):
    """Minimum over all permutations of slots onto the objects padded with 'absent' entries,
    every pair loss computed with torch.nn.functional on its own."""
    out = objective.outputs(slots)
    num_slots = slots.shape[1]
    best_losses, best_assignments = [], []
    for b in range(slots.shape[0]):
        objects = present[b].nonzero().flatten().tolist()
        entries = objects + [None] * (num_slots - len(objects))

        def pair(k, m, b=b):
            logit = out["presence_logit"][b, k]
            if m is None:
                return F.binary_cross_entropy_with_logits(logit, torch.zeros_like(logit))
            return (
                F.binary_cross_entropy_with_logits(logit, torch.ones_like(logit))
                + F.cross_entropy(out["shape_logits"][b, k], shape[b, m])
                + F.cross_entropy(out["color_logits"][b, k], color[b, m])
                + F.mse_loss(out["position"][b, k], position[b, m], reduction="sum")
                + (out["scale"][b, k] - scale[b, m]) ** 2
            )

        table = {(k, m): pair(k, m).item() for k in range(num_slots) for m in set(entries)}
        best = min(
            itertools.permutations(entries),
            key=lambda perm: sum(table[k, m] for k, m in enumerate(perm)),
        )
        best_losses.append(sum(table[k, m] for k, m in enumerate(best)) / num_slots)
        best_assignments.append([-1 if m is None else m for m in best])
    return torch.tensor(best_losses, dtype=torch.float64), best_assignments


@pytest.mark.parametrize("num_slots", [1, 2, 3, 4, 5])
def test_matching_equals_brute_force(num_slots):
    g = torch.Generator().manual_seed(num_slots)
    torch.manual_seed(num_slots)
    objective = SetPrediction(slot_dim=6, num_shapes=4, num_colors=3, hidden=16).double()
    slots = torch.randn(8, num_slots, 6, generator=g, dtype=torch.float64)
    targets = _random_targets(g, 8, num_slots, 4, 3, max_objects=num_slots + 1)
    loss = objective(None, None, None, slots, *targets)
    expected, assignments = _brute_force(objective, slots, *targets)
    assert loss.shape == (8,)
    torch.testing.assert_close(loss, expected, atol=1e-10, rtol=0)
    # The matching itself is optimal: its total equals the brute-force minimum (the argmin
    # can differ only on exact ties, which random costs do not produce).
    assert objective.match(slots, *targets).tolist() == assignments


def test_gradient_matches_finite_differences():
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    objective = SetPrediction(slot_dim=5, num_shapes=3, num_colors=2, hidden=8).double()
    slots = torch.randn(3, 4, 5, generator=g, dtype=torch.float64, requires_grad=True)
    targets = _random_targets(g, 3, 4, 3, 2, max_objects=4)
    # The matching is piecewise constant in the slots, so the loss is smooth where it is unique.
    assert torch.autograd.gradcheck(
        lambda s: objective(None, None, None, s, *targets).sum(), (slots,), eps=1e-6, atol=1e-6
    )


def test_the_padding_of_absent_objects_enters_neither_loss_nor_gradient():
    """Absent objects padded with a class out of range (it failed in gather) or with NaN
    attributes (the loss was right, its gradient NaN): the loss and gradient of any padding
    are those of zeros, and gradcheck (finite differences) holds."""
    g = torch.Generator().manual_seed(1)
    torch.manual_seed(1)
    objective = SetPrediction(slot_dim=5, num_shapes=3, num_colors=2, hidden=8).double()
    slots = torch.randn(3, 4, 5, generator=g, dtype=torch.float64, requires_grad=True)
    present, position, shape, color, scale = _random_targets(g, 3, 4, 3, 2, max_objects=4)
    present[:, -1] = False  # at least one padded object per datapoint
    padded = (
        present,
        torch.where(present[..., None], position, torch.nan),
        shape.masked_fill(~present, 3),  # == num_shapes
        color.masked_fill(~present, -5),
        torch.where(present, scale, torch.nan),
    )
    zeros = (
        present,
        position * present[..., None],
        shape * present,
        color * present,
        scale * present,
    )
    loss = objective(None, None, None, slots, *padded)
    torch.testing.assert_close(loss, objective(None, None, None, slots, *zeros))
    (grad,) = torch.autograd.grad(loss.sum(), slots)
    (want,) = torch.autograd.grad(objective(None, None, None, slots, *zeros).sum(), slots)
    torch.testing.assert_close(grad, want)
    assert torch.autograd.gradcheck(
        lambda s: objective(None, None, None, s, *padded).sum(), (slots,), eps=1e-6, atol=1e-6
    )


def _oracle_slots(batch, num_slots, g):
    """Slots that encode the attributes of a shuffled, padded object set (plus a little noise)."""
    parts = [
        batch["visible"].float()[..., None],
        F.one_hot(batch["attr_shape"], 4).float(),
        F.one_hot(batch["attr_color"], 8).float(),
        batch["attr_position"],
        batch["attr_scale"][..., None] * 5,
    ]
    slots = torch.cat(parts, -1) * batch["visible"][..., None]
    pad = torch.zeros(slots.shape[0], num_slots - slots.shape[1], slots.shape[2])
    slots = torch.cat([slots, pad], 1)
    order = torch.argsort(torch.rand(slots.shape[:2], generator=g), 1)
    slots = torch.gather(slots, 1, order[..., None].expand_as(slots))
    return slots + 0.01 * torch.randn(slots.shape, generator=g)


def test_head_learns_attributes_from_informative_slots():
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    train = generate_shapes(256, image_size=32, seed=1)
    test = generate_shapes(128, image_size=32, seed=2)
    objective = SetPrediction(slot_dim=16, num_shapes=4, num_colors=8, hidden=64)
    optim = torch.optim.Adam(objective.parameters(), lr=3e-3)
    for _ in range(300):
        idx = torch.randint(256, (64,), generator=g)
        batch = {k: v[idx] for k, v in train.items()}
        loss = objective(
            None, None, None, _oracle_slots(batch, 6, g), *objective.targets_from_batch(batch)
        )
        optim.zero_grad()
        loss.mean().backward()
        optim.step()
    slots = _oracle_slots(test, 6, g)
    ap = objective.average_precisions(slots, *objective.targets_from_batch(test))
    assert set(ap) == {math.inf, 1.0, 0.5, 0.25, 0.125}
    # Slots hold the answer: every object is found with its attributes and a close position.
    assert ap[math.inf] > 0.95 and ap[0.125] > 0.9
    assert ap[math.inf] >= ap[0.25] >= ap[0.125]


def test_targets_from_dataloader_batches():
    loader = torch.utils.data.DataLoader(ShapesDataset(8, image_size=16, seed=0), batch_size=4)
    batch = next(iter(loader))
    objective = SetPrediction(slot_dim=8, num_shapes=4, num_colors=8)
    targets = objective.targets_from_batch(batch)
    assert [tuple(t.shape) for t in targets] == [(4, 5), (4, 5, 2), (4, 5), (4, 5), (4, 5)]
    assert torch.equal(targets[0], batch["visible"]) and torch.equal(
        targets[2], batch["attr_shape"]
    )
    drawn = SetPrediction(8, num_shapes=4, num_colors=8, presence_key="present")
    assert torch.equal(drawn.targets_from_batch(batch)[0], batch["present"])
    assert objective(None, None, None, torch.randn(4, 6, 8), *targets).shape == (4,)
    # Tetrominoes: 19 piece classes, no scale.
    tetro = next(iter(torch.utils.data.DataLoader(TetrominoesDataset(4), batch_size=4)))
    with pytest.raises(ValueError, match="predict_scale=False"):
        objective.targets_from_batch(tetro)
    pieces = SetPrediction(
        8, num_shapes=19, num_colors=6, predict_scale=False, shape_key="attr_piece"
    )
    targets = pieces.targets_from_batch(tetro)
    assert len(targets) == 4 and torch.equal(targets[2], tetro["attr_piece"])
    assert pieces(None, None, None, torch.randn(4, 4, 8), *targets).shape == (4,)


def test_bad_targets_are_named():
    objective = SetPrediction(slot_dim=4, num_shapes=2, num_colors=2)
    slots = torch.randn(2, 2, 4)
    present = torch.tensor([[True, True, True], [True, False, False]])
    pos, cls, scale = torch.rand(2, 3, 2), torch.zeros(2, 3, dtype=torch.long), torch.rand(2, 3)
    with pytest.raises(ValueError, match="3 objects but there are only 2 slots"):
        objective(None, None, None, slots, present, pos, cls, cls, scale)
    present[0, 2] = False
    with pytest.raises(ValueError, match="shape: expected classes in \\[0, 2\\)"):
        objective(None, None, None, slots, present, pos, cls + 2, cls, scale)
    with pytest.raises(ValueError, match="scale: required"):
        objective(None, None, None, slots, present, pos, cls, cls)
    with pytest.raises(ValueError, match="position"):
        objective(None, None, None, slots, present, pos[..., :1], cls, cls, scale)
    with pytest.raises(ValueError, match="slots"):
        objective(None, None, None, torch.randn(2, 2, 5), present, pos, cls, cls, scale)
    with pytest.raises(ValueError, match="num_shapes"):
        SetPrediction(slot_dim=4, num_shapes=0, num_colors=2)


def test_nested_svi_optimizes_set_prediction_of_mixture_components():
    sets = sample_point_sets(8, 50, num_components=3, seed=0)
    # Targets: every component is an object at its normalized mean, one shape and colour class.
    targets = (
        torch.ones(8, 3, dtype=torch.bool),
        (sets.means + 4.0) / 8.0,
        torch.zeros(8, 3, dtype=torch.long),
        torch.zeros(8, 3, dtype=torch.long),
    )
    model = GaussianMixture(3, 2)
    objective = SetPrediction(slot_dim=5, num_shapes=1, num_colors=1, predict_scale=False)
    svi = NestedSVI(
        model, EM(3), objective, pyro.optim.Adam({"lr": 1e-2}), gradient="first_order", seed=0
    )
    # J is the mean set-prediction loss at the slots the inner loop returned.
    loss, result = svi.loss_and_result(sets.x, *targets)
    loss, slots = loss.item(), result.slots[0].detach()
    with torch.no_grad():
        expected = objective(model, sets.x, sets.x, slots, *targets).mean().item()
    assert loss == pytest.approx(expected, rel=1e-6)
    before = [p.detach().clone() for p in objective.parameters()]
    svi.step(sets.x, *targets)
    assert any(not torch.equal(p, b) for p, b in zip(objective.parameters(), before))
