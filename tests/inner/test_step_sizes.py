"""Default step sizes that do not diverge, and divergence hints that name the parameter."""

import pyro
import pytest
import torch

import pyro_slots as ps
from pyro_slots.inner import EM, GradientAscent, LearnedGradient, Safeguarded, trust_region
from pyro_slots.models import GaussianMixture
from pyro_slots.objectives import NegativeELBO
from tests.conftest import make_point_sets, tiny_autoencoder


def tight_clusters(num_sets=16, num_points=50, width=0.05, seed=0):
    """Well-separated 2-D clusters of width ``width``: ∇ log σ grows like 1/σ²."""
    g = torch.Generator().manual_seed(seed)
    means = 4 * torch.randn(num_sets, 3, 2, generator=g)
    labels = torch.randint(3, (num_sets, num_points), generator=g)
    centers = torch.gather(means, 1, labels[..., None].expand(-1, -1, 2))
    return centers + width * torch.randn(num_sets, num_points, 2, generator=g)


def standardized(x):
    return (x - x.mean(1, keepdim=True)) / x.std(1, keepdim=True)


def test_trust_region_is_the_soft_clip_formula(float64):
    g = torch.Generator().manual_seed(0)
    u = torch.randn(4, 3, 5, generator=g) * torch.tensor([1e-4, 1.0, 1e4]).view(1, 3, 1)
    out = trust_region(u, 2.0)
    norm = u.norm(dim=-1, keepdim=True)
    assert torch.allclose(out, u / torch.sqrt(1 + (norm / 2.0) ** 2), rtol=1e-12)
    assert (out.norm(dim=-1) < 2.0).all()
    assert torch.allclose(out[:, 0], u[:, 0], rtol=1e-8)  # short steps unchanged
    assert torch.allclose(out[:, 2].norm(dim=-1), torch.full((4,), 2.0), rtol=1e-7)
    assert trust_region(u, None) is u


def _gmm_cases():
    return {
        "gmm_tight": (GaussianMixture(3, 2), tight_clusters()),
        "gmm_standardized": (GaussianMixture(3, 2), standardized(make_point_sets(16, 50)[0])),
        "gmm_random_from_data": (GaussianMixture(3, 2, init="random_from_data"), tight_clusters()),
    }


def _image_cases():
    from tests.models.test_image_models import squares, tiny_iodine

    x = squares(2)[0]
    return {"slot_autoencoder": (tiny_autoencoder(), x), "iodine": (tiny_iodine(), x)}


CASES = ["gmm_tight", "gmm_standardized", "gmm_random_from_data", "slot_autoencoder", "iodine"]


def _case(name):
    cases = _gmm_cases() if name.startswith("gmm") else _image_cases()
    return cases[name]


@pytest.mark.parametrize("name", CASES)
def test_gradient_ascent_defaults_stay_finite_for_100_steps(name):
    model, x = _case(name)
    result = ps.refine(model, x, GradientAscent(100), seed=0)
    assert torch.isfinite(result.slots).all()
    assert torch.isfinite(result.history).all()
    assert result.num_steps == 100


@pytest.mark.parametrize("name", CASES)
def test_learned_gradient_defaults_stay_finite_for_100_steps(name):
    model, x = _case(name)
    torch.manual_seed(0)
    rule = LearnedGradient(100, slot_dim=model.slot_dim)
    result = ps.refine(model, x, rule, seed=0)
    assert torch.isfinite(result.slots).all()
    assert torch.isfinite(result.history).all()


def test_without_the_trust_region_the_same_steps_diverge():
    """The failure the default prevents (the test above would fail without it)."""
    model = GaussianMixture(3, 2)
    with pytest.raises(ps.InnerLoopError):
        ps.refine(model, tight_clusters(), GradientAscent(100, trust_radius=None), seed=0)


@pytest.mark.parametrize("trust_radius", [1.0, None], ids=["default", "raw_gradient"])
def test_learned_gradient_in_nested_svi_first_updates(trust_radius):
    """At its defaults the untrained rule gives a finite J at the first outer updates on the
    GMM; with the raw gradient term the very first update fails."""
    x = tight_clusters()
    pyro.set_rng_seed(0)
    model = GaussianMixture(3, 2)
    rule = LearnedGradient(5, slot_dim=model.slot_dim, trust_radius=trust_radius)
    svi = ps.NestedSVI(model, rule, NegativeELBO(), pyro.optim.Adam({"lr": 1e-2}), seed=0)
    if trust_radius is None:
        with pytest.raises(ps.InnerLoopError):
            svi.step(x)
        return
    for _ in range(3):
        out = svi.step(x)
        loss = out[0] if isinstance(out, tuple) else out
        assert torch.isfinite(torch.as_tensor(loss))
    assert all(torch.isfinite(p).all() for p in rule.parameters())


def test_divergence_hints_name_the_rule_its_parameter_and_safeguarded():
    hint = GradientAscent(step_size=1.0).divergence_hint()
    assert "GradientAscent(step_size=1," in hint
    assert "lower step_size (e.g. 0.1)" in hint
    assert "pyro_slots.inner.Safeguarded" in hint
    hint = LearnedGradient(slot_dim=5, step_size=0.2).divergence_hint()
    assert "LearnedGradient(step_size=0.2" in hint and "Safeguarded" in hint
    # EM has no step size to lower: its hint points at the model and its M-step
    assert EM(1).divergence_hint().startswith("EM has no step size: its M-step produced")
    assert "Safeguarded" in Safeguarded(EM(1)).divergence_hint()
