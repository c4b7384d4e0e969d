import math

import numpy as np
import pytest
import torch
import xarray as xr

import pyro_slots as ps
from pyro_slots.diagnostics import (
    assignment_entropy,
    duplicate_slots,
    inner_loop_health,
    jacobian_spectral_norm,
    slot_mass,
    trajectory_dataset,
)
from pyro_slots.inner import EM, GradientAscent, InnerRule, InnerState, StepInfo
from pyro_slots.models import GaussianMixture
from tests.conftest import gmm_responsibilities


class LinearRule(InnerRule):
    """``λ ↦ A_n λ`` (flattened) with one matrix per datapoint."""

    def __init__(self, matrices):
        super().__init__(1)
        self.register_buffer("matrices", matrices)

    def step(self, state, problem, create_graph=False):
        b, k, d = state.slots.shape
        flat = torch.einsum("bij,bj->bi", self.matrices, state.slots.reshape(b, k * d))
        return InnerState(flat.reshape(b, k, d), state.step + 1), StepInfo(flat.new_zeros(b))


class ScriptedRule(InnerRule):
    """Steps through a fixed sequence of slots, whatever the current slots are."""

    def __init__(self, sequence):
        super().__init__(len(sequence))
        self.sequence = sequence

    def step(self, state, problem, create_graph=False):
        elbo = problem.elbo(state.slots).detach()
        return InnerState(self.sequence[state.step], state.step + 1), StepInfo(elbo)


def test_jacobian_norm_of_linear_update_is_largest_singular_value(float64):
    g = torch.Generator().manual_seed(0)
    batch, k, d = 3, 2, 5
    matrices = (
        torch.randn(batch, k * d, k * d, generator=g) * torch.tensor([0.5, 1.0, 3.0])[:, None, None]
    )
    gmm = GaussianMixture(k, 2)  # only provides the problem; the rule ignores the ELBO
    x = torch.randn(batch, 4, 2, generator=g)
    slots = torch.randn(batch, k, d, generator=g)
    norm = jacobian_spectral_norm(
        gmm, x, LinearRule(matrices), slots, num_iterations=1000, rtol=1e-12, generator=g
    )
    torch.testing.assert_close(norm, torch.linalg.matrix_norm(matrices, ord=2), rtol=1e-6, atol=0)


def test_jacobian_norm_of_gradient_step_matches_full_jacobian(float64, point_sets):
    x = point_sets(2, 20, seed=9)
    gmm = GaussianMixture(3, 2)
    rule = GradientAscent(1, step_size=0.5)
    slots = ps.refine(gmm, x, EM(3), seed=0).slots[0]
    norm = jacobian_spectral_norm(gmm, x, rule, slots, num_iterations=500, rtol=1e-12)
    problem = ps.inner.InnerProblem(gmm, x)
    for n in range(2):

        def step(lam, n=n):
            full = torch.cat([slots[:n], lam.unsqueeze(0), slots[n + 1 :]])
            state, _ = rule.step(InnerState(full, 0), problem, create_graph=True)
            return state.slots[n]

        jac = torch.autograd.functional.jacobian(step, slots[n])
        exact = torch.linalg.matrix_norm(jac.reshape(slots[n].numel(), -1), ord=2)
        torch.testing.assert_close(norm[n], exact, rtol=1e-5, atol=0)


def test_em_never_lowers_the_elbo(float64, point_sets):
    x = point_sets(4, 30, seed=23)
    gmm = GaussianMixture(3, 2)
    result = ps.refine(gmm, x, EM(20), num_restarts=2, seed=0)
    health = inner_loop_health(result, gmm, EM(20))
    assert (health.fraction_elbo_decrease == 0).all()
    assert health.elbo_decrease.shape == (20, 4)
    # At a well-separated optimum EM contracts: its Jacobian norm is below 1.
    assert (health.jacobian_norm < 1).all()
    assert (health.num_dead_slots == 0).all() and (health.num_duplicate_slots == 0).all()
    # The best restart of each set; of restarts at the same optimum (ELBOs equal to rounding)
    # the first (whether a set's two restarts tie here depends on the rounding of the CPU's
    # sums; the tie itself is tested on best_restart in tests/test_refine.py).
    chosen = result.elbo[torch.as_tensor(health.restart), torch.arange(4)]
    assert torch.allclose(chosen, result.elbo.max(0).values, rtol=1e-13, atol=0)
    tied = (result.elbo[0] - result.elbo[1]).abs() <= 1e-13 * result.elbo[0].abs()
    assert health.restart.tolist() == torch.where(tied, 0, result.elbo.argmax(0)).tolist()
    frame = health.to_dataframe()
    assert list(frame.index) == [0, 1, 2, 3]


def test_elbo_decreases_are_counted(float64, point_sets):
    x = point_sets(1, 30, seed=11)
    gmm = GaussianMixture(3, 2)
    good = ps.refine(gmm, x, EM(30), seed=0).slots[0]
    parts = gmm.slot_spec.split(good.clone())
    parts["loc"] = parts["loc"] + 5.0  # every slot moved off its cluster
    bad = gmm.slot_spec.pack(parts)
    rule = ScriptedRule([good, bad, good, bad])
    result = ps.refine(gmm, x, rule, slots=bad)
    health = inner_loop_health(result, gmm, jacobian=False)
    assert health.elbo_decrease[:, 0].tolist() == [False, True, False, True]
    assert health.fraction_elbo_decrease.item() == 0.5
    assert health.jacobian_norm is None


def test_entropy_mass_duplicates_and_dead_slots(float64):
    m = 6
    uniform = torch.full((1, 3, m), 1 / 3)
    one_hot = torch.zeros(1, 3, m)
    one_hot[0, 0, :3] = 1
    one_hot[0, 1, 3:] = 1  # slot 2 explains nothing
    torch.testing.assert_close(assignment_entropy(uniform), torch.tensor([math.log(3)]))
    torch.testing.assert_close(assignment_entropy(one_hot), torch.tensor([0.0]))
    torch.testing.assert_close(slot_mass(one_hot), torch.tensor([[0.5, 0.5, 0.0]]))
    assert duplicate_slots(uniform).tolist() == [2]  # slots 1 and 2 repeat slot 0
    assert duplicate_slots(one_hot).tolist() == [0]
    masks = torch.stack([one_hot[0], uniform[0]])
    dup = duplicate_slots(masks, threshold=0.99)
    assert dup.tolist() == [0, 2]


def test_dead_slot_is_reported(float64, point_sets):
    # Two clusters, three slots with one placed far away: it ends with no mass.
    x = point_sets(1, 40, num_components=2, seed=12)
    gmm = GaussianMixture(3, 2)
    slots = gmm.init_slots(x, 3, torch.Generator().manual_seed(0))
    parts = gmm.slot_spec.split(slots.clone())
    parts["loc"][0, 2] = 1e3
    result = ps.refine(gmm, x, EM(10), slots=gmm.slot_spec.pack(parts))
    health = inner_loop_health(result, gmm, jacobian=False)
    assert health.num_dead_slots.tolist() == [1]
    assert health.slot_mass[0, 2] < 1e-6


def test_trajectory_dataset(float64, point_sets, tmp_path):
    x = point_sets(2, 20, seed=13)
    gmm = GaussianMixture(3, 2)
    result = ps.refine(gmm, x, EM(5), num_restarts=2, seed=0, keep_trajectory=True)
    ds = trajectory_dataset(result, gmm, reconstructions=True)
    assert ds["loc"].dims == ("inner_step", "restart", "datapoint", "slot", "loc_dim_0")
    assert ds.sizes["inner_step"] == 6
    np.testing.assert_array_equal(
        ds["loc"].values[-1], gmm.slot_spec.split(result.slots)["loc"].numpy()
    )
    expected = gmm_responsibilities(gmm, x, result.slots[1])
    np.testing.assert_allclose(ds["masks"].values[-1, 1], expected.numpy(), atol=1e-30)
    np.testing.assert_allclose(ds["elbo"].values[-1], result.elbo.numpy())
    assert "reconstruction" in ds
    ds.to_netcdf(tmp_path / "trajectory.nc")
    with xr.open_dataset(tmp_path / "trajectory.nc") as loaded:
        xr.testing.assert_equal(loaded.load(), ds)
    with pytest.raises(ValueError, match="keep_trajectory"):
        trajectory_dataset(ps.refine(gmm, x, EM(2), seed=0), gmm)


def test_jacobian_uses_the_final_adam_state_of_the_best_restart(float64, point_sets):
    x = point_sets(2, 20, seed=14)
    gmm = GaussianMixture(3, 2)
    rule = GradientAscent(5, step_size=0.05, adam=True)
    result = ps.refine(gmm, x, rule, num_restarts=2, seed=0)
    health = inner_loop_health(result, gmm, rule, num_power_iterations=500)
    best = result.elbo.argmax(0)
    problem = ps.inner.InnerProblem(gmm, x)
    m, v = (a.reshape(2, 2, 3, -1) for a in result.state.aux)  # (restart, batch, K, D)
    for n in range(2):
        r = best[n]
        slots = result.slots[r]
        aux = (m[r], v[r])

        def step(lam, n=n, slots=slots, aux=aux):
            full = torch.cat([slots[:n], lam.unsqueeze(0), slots[n + 1 :]])
            state, _ = rule.step(InnerState(full, 5, aux), problem, create_graph=True)
            return state.slots[n]

        jac = torch.autograd.functional.jacobian(step, slots[n])
        exact = torch.linalg.matrix_norm(jac.reshape(slots[n].numel(), -1), ord=2)
        torch.testing.assert_close(health.jacobian_norm[n], exact, rtol=1e-5, atol=0)


def test_float32_rounding_is_not_an_elbo_decrease(point_sets):
    x = point_sets(8, 200, num_components=4, seed=15).float()
    gmm = GaussianMixture(4, 2)
    result = ps.refine(gmm, x, EM(40), num_restarts=2, seed=0)
    best = result.elbo.argmax(0)
    steps = result.history.diff(dim=0)[:, best, torch.arange(8)]
    assert (steps < 0).any()  # precondition: rounding makes some steps "decrease"
    health = inner_loop_health(result, gmm, jacobian=False)
    assert (health.fraction_elbo_decrease == 0).all()


def test_generic_responsibilities_from_the_assignment_site(float64, point_sets):
    from pyro_slots.diagnostics import model_responsibilities

    x = point_sets(3, 25, seed=16)
    gmm = GaussianMixture(3, 2)
    slots = gmm.init_slots(x, 3, torch.Generator().manual_seed(0))
    generic = model_responsibilities(gmm, x, slots)
    torch.testing.assert_close(generic, gmm_responsibilities(gmm, x, slots))


def test_image_model_health_reads_the_decoders_masks():
    """masks=decoder_masks: slot mass, dead and duplicate slots come from the decoder's masks
    (computed here from model.decode and checked by brute force), and a slot repeated from an
    earlier one is a duplicate; masks_of picks the decoder's masks for an image model and the
    posterior for a Gaussian mixture."""
    from pyro_slots.diagnostics import inner_loop_health
    from pyro_slots.inner import SlotAttention, decoder_masks, masks_of, posterior_masks
    from pyro_slots.models import SlotAutoencoder

    torch.manual_seed(0)
    model = SlotAutoencoder(image_size=16, num_slots=4, slot_dim=8)
    x = torch.rand(3, 3, 16, 16)
    rule = SlotAttention(num_steps=1, slot_dim=8, input_dim=model.encode(x).shape[-1])
    result = ps.refine(model, x, rule, seed=0)
    result.slots[0, :, 3] = result.slots[0, :, 1]  # slot 3 repeats slot 1 in every image
    health = inner_loop_health(result, model, jacobian=False, masks=decoder_masks,
                               duplicate_threshold=0.999999)  # fmt: skip
    with torch.no_grad():
        masks = model.decode(result.slots[0])[2].flatten(2).double().numpy()  # (3, 4, 256)
    np.testing.assert_allclose(health.slot_mass.numpy(), masks.mean(-1), rtol=1e-5)
    unit = masks / np.linalg.norm(masks, axis=-1, keepdims=True)
    cos = np.einsum("bkn,bjn->bkj", unit, unit)
    dup = [sum(bool((cos[b, k, :k] > 0.999999).any()) for k in range(4)) for b in range(3)]
    assert health.num_duplicate_slots.tolist() == dup and min(dup) >= 1
    assert masks_of(model) is decoder_masks and masks_of(GaussianMixture(3, 2)) is posterior_masks
