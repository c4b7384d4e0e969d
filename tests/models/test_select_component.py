"""pyro_slots.select_component: a view under enumeration, Vindex's answer everywhere."""

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine
from pyro.ops.indexing import Vindex

from pyro_slots import select_component


def _enumerated_support(num_slots, rank):
    """The value Pyro's parallel enumeration gives a Categorical site: arange(K) reshaped to
    ``(K, 1, ..., 1)`` and marked as the distribution's support."""
    captured = {}

    def program():
        with pyro.plate("b", 2, dim=-2), pyro.plate("m", 3, dim=-1):
            z = pyro.sample(
                "z",
                dist.Categorical(logits=torch.zeros(num_slots)),
                infer={"enumerate": "parallel"},
            )
        captured["z"] = z

    poutine.enum(program, first_available_dim=-rank)()
    return captured["z"]


@pytest.mark.parametrize("rank", [3, 4])
def test_enumerated_index_is_a_view_equal_to_vindex(float64, rank):
    torch.manual_seed(0)
    values = torch.randn(2, 3, 4, 5, requires_grad=True)  # (B, M, K, C): slot axis -2
    z = _enumerated_support(4, rank)
    assert z.shape == (4,) + (1,) * (rank - 1)
    got = select_component(values, z, dim=-2)
    expected = Vindex(values)[..., z, :]
    assert got.shape == expected.shape
    assert torch.equal(got, expected)
    assert got.data_ptr() == values.data_ptr()  # a view: no gather
    w = torch.randn(expected.shape)
    (g1,) = torch.autograd.grad((got * w).sum(), values)
    (g2,) = torch.autograd.grad((expected * w).sum(), values)
    assert torch.allclose(g1, g2, atol=1e-12)


def test_component_axis_left_of_the_batch_dims(float64):
    """Neural EM's layout: means (B, K, M, C), slot axis 1."""
    torch.manual_seed(0)
    means = torch.randn(2, 4, 3, 5)
    z = _enumerated_support(4, 3)
    got = select_component(means, z, dim=1)
    expected = Vindex(means)[torch.arange(2).view(2, 1), z, torch.arange(3)]
    assert torch.equal(got, expected)


def test_sampled_index_gathers_like_vindex(float64):
    """A drawn assignment (no enumeration mark) is gathered: each point's own component."""
    torch.manual_seed(0)
    values = torch.randn(2, 3, 4, 5)  # (B, M, K, C)
    z = torch.randint(4, (2, 3))
    got = select_component(values, z, dim=-2)
    brute = torch.stack([torch.stack([values[b, m, z[b, m]] for m in range(3)]) for b in range(2)])
    assert torch.equal(got, brute)
    # An unmarked arange of the enumeration's shape is gathered too, with the same values.
    support = torch.arange(4).view(4, 1, 1)
    assert torch.equal(select_component(values, support, dim=-2), Vindex(values)[..., support, :])


def test_bad_dim_names_the_argument():
    with pytest.raises(ValueError, match="dim: expected a component axis"):
        select_component(torch.zeros(2, 3, 4), torch.zeros(2, dtype=torch.long), dim=-1)
    with pytest.raises(ValueError, match="dim: expected a component axis"):
        select_component(torch.zeros(2, 3, 4), torch.zeros(2, dtype=torch.long), dim=5)
