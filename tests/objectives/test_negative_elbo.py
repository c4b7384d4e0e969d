"""NegativeELBO returns the per-datapoint negative ELBO, as the Objective contract says."""

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import TraceEnum_ELBO

from pyro_slots import per_datapoint_elbo
from pyro_slots.models import IODINE, GaussianMixture
from pyro_slots.objectives import NegativeELBO
from tests.conftest import make_point_sets


def test_values_are_per_datapoint_and_sum_to_pyro_s_loss(float64):
    x, _ = make_point_sets(4, 25, num_components=3, seed=2)
    gmm = GaussianMixture(3, 2, encoder=torch.nn.Linear(2, 2).double())
    x_enc = gmm.encode(x)
    slots = gmm.init_slots(x_enc.detach(), 3, torch.Generator().manual_seed(0))
    j = NegativeELBO()(gmm, x, x_enc, slots)
    assert j.shape == (4,)
    # Independent answer: -Σ_m log Σ_k π_k N(x_m | μ_k, σ_k) per datapoint.
    loc, scale, logw = gmm.component_params(slots)
    comp = dist.Normal(loc.unsqueeze(2), scale.unsqueeze(2)).log_prob(x_enc.unsqueeze(1)).sum(-1)
    expected = -torch.logsumexp(comp + logw.unsqueeze(-1), 1).sum(-1)
    assert torch.allclose(j, expected, atol=1e-9)
    assert j.std() > 1.0  # not one value broadcast over the batch
    # Its sum is Pyro's TraceEnum_ELBO loss, value and gradient in the encoder's weights.
    loss = TraceEnum_ELBO(max_plate_nesting=2).differentiable_loss(
        gmm.model, gmm.guide, x_enc, slots
    )
    assert j.sum().item() == pytest.approx(loss.item(), abs=1e-9)
    weight = gmm.encoder.weight
    g_j = torch.autograd.grad(j.sum(), weight, retain_graph=True)[0]
    g_ref = torch.autograd.grad(loss, weight)[0]
    assert torch.allclose(g_j, g_ref, atol=1e-9)
    with torch.no_grad():
        assert torch.allclose(NegativeELBO()(gmm, x, x_enc, slots), expected, atol=1e-9)


def test_a_sampling_guide_gives_the_per_datapoint_elbo_of_the_same_draw(float64):
    torch.manual_seed(0)
    model = IODINE(image_size=8, num_slots=3, latent_dim=4).double()
    images = torch.rand(3, 3, 8, 8, dtype=torch.float64)
    x_enc = model.encode(images)
    slots = torch.randn(3, 3, model.slot_dim, dtype=torch.float64) * 0.3
    objective = NegativeELBO()
    assert objective.num_particles == 1
    pyro.set_rng_seed(5)
    j = objective(model, images, x_enc, slots)
    pyro.set_rng_seed(5)
    elbo = per_datapoint_elbo(model, x_enc, slots, strategy="trace_enum")
    pyro.set_rng_seed(5)
    loss = TraceEnum_ELBO(
        max_plate_nesting=model.max_plate_nesting, strict_enumeration_warning=False
    ).loss(model.model, model.guide, x_enc, slots)
    assert j.shape == (3,)
    assert torch.allclose(j, -elbo, atol=1e-10)
    assert j.sum().item() == pytest.approx(loss, rel=1e-10)


def test_bad_num_particles_is_named():
    with pytest.raises(ValueError, match="num_particles"):
        NegativeELBO(0)
