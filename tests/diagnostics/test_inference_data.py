import numpy as np
import pytest
import torch
import xarray as xr
from scipy.special import logsumexp
from scipy.stats import norm

import pyro_slots as ps
from pyro_slots.diagnostics import (
    RhatWarning,
    laplace_draws,
    to_inference_data,
    unaligned_posterior,
)
from pyro_slots.diagnostics._arviz import az
from pyro_slots.diagnostics._traces import pointwise_log_likelihood as traced_log_likelihood
from pyro_slots.models import GaussianMixture
from tests.conftest import gmm_log_joint


def _max_rhat(posterior, var="loc"):
    return az.rhat(posterior)[var].max(["slot", f"{var}_dim_0"]).values


def test_rhat_aligned_vs_unaligned(float64, gmm_restarts):
    gmm, x, result = gmm_restarts(5, seed=0)
    # Preconditions: every restart found the same solution, in a different slot order.
    assert (result.elbo.max(0).values - result.elbo.min(0).values).max() < 1e-6
    idata = to_inference_data(result, gmm, draws="laplace", num_draws=1000, seed=0)
    perm = idata.sample_stats["slot_permutation"].isel(draw=0).values  # (chain, datapoint, slot)
    assert all((perm[:, n] != perm[0, n]).any() for n in range(x.shape[0]))

    assert (_max_rhat(idata.posterior) <= 1.01).all()
    assert (_max_rhat(unaligned_posterior(idata)) > 1.5).all()
    raw = to_inference_data(result, gmm, align=False, draws="laplace", num_draws=1000, seed=0)
    assert (_max_rhat(raw.posterior) > 1.5).all()


def test_rhat_flags_a_restart_in_a_local_optimum(float64, gmm_restarts):
    gmm, x, result = gmm_restarts(5, seed=1, stuck=[(3, 1)])
    spread = result.elbo.max(0).values - result.elbo.min(0).values
    stuck = spread > 1.0
    assert stuck.tolist() == [False, True, False, False, False]  # precondition
    idata = to_inference_data(result, gmm, draws="laplace", num_draws=1000, seed=0)
    rhat = torch.as_tensor(_max_rhat(idata.posterior))
    assert (rhat[stuck] > 1.1).all()
    assert (rhat[~stuck] <= 1.01).all()


def test_point_draws_hold_the_aligned_slots(float64, gmm_restarts):
    gmm, x, result = gmm_restarts(3, seed=0)
    with pytest.warns(RhatWarning, match="1 draw"):
        idata = to_inference_data(result, gmm, draws="point")
    perm = idata.sample_stats["slot_permutation"].isel(draw=0).values
    parts = gmm.slot_spec.split(result.slots)
    # The mixing logits centred over the slots (the weights ignore a common shift)
    parts["logit"] = parts["logit"] - parts["logit"].mean(-1, keepdim=True)
    for name, value in parts.items():
        got = idata.posterior[name].isel(draw=0).values
        for r in range(4):
            for n in range(3):
                np.testing.assert_array_equal(got[r, n], value[r, n, perm[r, n]].numpy())
    with pytest.warns(RhatWarning):
        raw = to_inference_data(result, gmm, align=False, draws="point")
    xr.testing.assert_equal(raw.posterior["loc"], unaligned_posterior(idata)["loc"])
    np.testing.assert_array_equal(
        idata.sample_stats["elbo_history"].values[:, 0], result.history.permute(1, 2, 0).numpy()
    )
    np.testing.assert_array_equal(idata.observed_data["x"].values, x.numpy())


def test_log_likelihood_matches_scipy(float64, gmm_restarts):
    gmm, x, result = gmm_restarts(2, seed=2)
    with pytest.warns(RhatWarning):
        idata = to_inference_data(result, gmm, draws="point")
    loc, scale, log_w = (t.numpy() for t in gmm.component_params(result.slots))
    ll = idata.log_likelihood["x"].isel(draw=0).values  # (chain, datapoint, measurement)
    for r in range(4):
        for n in range(2):
            comp = norm.logpdf(x[n].numpy()[None], loc[r, n][:, None], scale[r, n][:, None])
            expected = logsumexp(comp.sum(-1) + log_w[r, n][:, None], axis=0)
            np.testing.assert_allclose(ll[r, n], expected, rtol=1e-10)
    # The measurement log-likelihoods of a fully enumerated model add up to its ELBO.
    np.testing.assert_allclose(ll.sum(-1), result.elbo.numpy(), rtol=1e-10)


def test_generic_traced_log_likelihood_equals_closed_form(float64, point_sets):
    x = point_sets(3, 15, seed=3)
    gmm = GaussianMixture(3, 2)
    slots = gmm.init_slots(x, 3, torch.Generator().manual_seed(0))
    traced = traced_log_likelihood(gmm, x, slots)
    torch.testing.assert_close(traced, gmm_log_joint(gmm, x, slots).logsumexp(1))


def test_laplace_of_one_gaussian_is_classical(float64):
    # K = 1: λ = (loc, log_scale, logit) at the MLE. The Laplace covariance is the inverse
    # Fisher information: var(loc) = σ² / M, var(log σ) = 1 / (2M); the logit is not identified.
    g = torch.Generator().manual_seed(0)
    m = 400
    x = torch.tensor([1.0, -2.0]) + torch.tensor([0.5, 2.0]) * torch.randn(1, m, 2, generator=g)
    gmm = GaussianMixture(1, 2, reg_covar=0.0)
    slots = gmm.m_step(x, torch.ones(1, 1, m))
    draws, unidentified, ascent = laplace_draws(
        gmm, x, slots, 20000, generator=torch.Generator().manual_seed(1)
    )
    assert unidentified.tolist() == [1] and ascent.tolist() == [0]
    parts = gmm.slot_spec.split(draws[:, 0, 0])
    sigma2 = gmm.component_params(slots)[1][0, 0] ** 2
    torch.testing.assert_close(parts["loc"].var(0), sigma2 / m, rtol=0.05, atol=0)
    torch.testing.assert_close(
        parts["log_scale"].var(0), torch.full((2,), 1 / (2 * m)), rtol=0.05, atol=0
    )
    assert parts["logit"].std() == 0


def test_guide_draws(float64, conjugate):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 2, generator=g)
    slots = conjugate.exact_slots(x)
    # A refine result sitting at the exact posterior (one negligible gradient step).
    result = ps.refine(conjugate, x, ps.inner.GradientAscent(1, step_size=1e-12), slots=slots)
    idata = to_inference_data(result, conjugate, draws="guide", num_draws=4000, seed=0)
    z = idata.posterior["z"]
    # the model's slot plate is the slot dim, the one restarts are aligned by
    assert z.dims == ("chain", "draw", "datapoint", "slot", "z_event_0")
    parts = conjugate.slot_spec.split(slots)
    np.testing.assert_allclose(z.mean(("chain", "draw")), parts["loc"].numpy(), atol=0.03)
    np.testing.assert_allclose(
        z.std(("chain", "draw")), parts["log_scale"].exp().numpy(), rtol=0.05
    )
    assert "lambda_loc" in idata.sample_stats
    assert "log_likelihood" not in idata.groups()  # not defined with guide latents


def test_netcdf_round_trip_and_az_summary(float64, gmm_restarts, tmp_path):
    gmm, x, result = gmm_restarts(2, seed=0)
    idata = to_inference_data(result, gmm, draws="laplace", num_draws=50, seed=0)
    path = tmp_path / "idata.nc"
    idata.to_netcdf(str(path))
    loaded = az.from_netcdf(str(path))
    assert set(loaded.groups()) == set(idata.groups())
    for group in idata.groups():
        xr.testing.assert_equal(loaded[group], idata[group])
    assert loaded.posterior.attrs["slots_aligned"] == 1
    table = az.summary(idata, var_names=["loc"])
    table_loaded = az.summary(loaded, var_names=["loc"])
    pd_testing = pytest.importorskip("pandas.testing")
    pd_testing.assert_frame_equal(table, table_loaded)
    # az.summary's means are the draw means of the aligned posterior.
    means = idata.posterior["loc"].mean(("chain", "draw")).values.reshape(-1)
    np.testing.assert_allclose(table["mean"].values, means, atol=1e-3)


def test_to_inference_data_errors(gmm_restarts):
    gmm, x, result = gmm_restarts(1, seed=0)
    with pytest.raises(ValueError, match="draws"):
        to_inference_data(result, gmm, draws="mcmc")
    with pytest.raises(ValueError, match="model"):
        to_inference_data(result, draws="laplace")
    with pytest.raises(ValueError, match="guide"):
        to_inference_data(result, gmm, draws="guide")
    with pytest.raises(TypeError, match="result"):
        to_inference_data(result.slots, gmm)


def test_default_draws_follow_the_guide(float64, gmm_restarts, conjugate):
    """Enumerated model: Laplace draws; sampled guide: guide draws; no model: the point."""
    gmm, x, result = gmm_restarts(2, seed=0)
    idata = to_inference_data(result, gmm, num_draws=30, seed=0)
    assert idata.posterior.attrs["draws"] == "laplace"
    assert idata.posterior.sizes["draw"] == 30
    assert np.isfinite(az.rhat(idata.posterior)["loc"].values).all()
    xc = torch.randn(2, 3, 2, generator=torch.Generator().manual_seed(0))
    guided = ps.refine(
        conjugate, xc, ps.inner.GradientAscent(2), num_slots=3, num_restarts=2, seed=0
    )
    idata = to_inference_data(guided, conjugate, num_draws=30, seed=0)
    assert idata.posterior.attrs["draws"] == "guide" and "z" in idata.posterior
    assert np.isfinite(az.rhat(idata.posterior)["z"].values).all()
    with pytest.warns(RhatWarning, match="1 draw"):
        assert to_inference_data(result).posterior.attrs["draws"] == "point"
    assert to_inference_data(result, gmm, draws="auto", num_draws=5).posterior.sizes["draw"] == 5


def test_nan_rhat_of_unidentified_parameters_is_announced(float64, point_sets):
    """One slot: its weight logit is not identified, the Laplace draws never move it and
    ArviZ's R-hat is NaN there -- which our own warning says beforehand."""
    x = point_sets(2, 30, seed=1)
    gmm = GaussianMixture(1, 2)
    result = ps.refine(gmm, x, ps.inner.EM(5), num_restarts=2, seed=0)
    with pytest.warns(RhatWarning, match=r"logit \(2 of 2 elements\)"):
        idata = to_inference_data(result, gmm, num_draws=20, seed=0)
    with np.errstate(invalid="ignore"):  # ArviZ's own 0/0 on the constant elements
        rhat = az.rhat(idata.posterior)
    assert np.isnan(rhat["logit"].values).all()
    assert np.isfinite(rhat["loc"].values).all()


def test_guide_draws_of_unaligned_restarts_are_aligned_by_the_slot_plate(float64, conjugate):
    """Restart 1 is restart 0 with its slots swapped. Guide draws named their slot axis after
    the model's plate ("slots"), so aligned_posterior left an align=False InferenceData's
    draws unpermuted (R-hat 1.9 where the aligned conversion reads 1.0)."""
    from pyro_slots.diagnostics import aligned_posterior
    from pyro_slots.diagnostics._arviz import az

    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 2, generator=g)
    slots = conjugate.exact_slots(x)
    init = torch.stack([slots, slots.flip(1)])
    result = ps.refine(conjugate, x, ps.inner.GradientAscent(1, step_size=1e-12), slots=init,
                       num_restarts=2)  # fmt: skip
    rhat = {}
    for align in (True, False):
        idata = to_inference_data(result, conjugate, draws="guide", num_draws=400, seed=0,
                                  align=align)  # fmt: skip
        rhat[align] = float(az.rhat(aligned_posterior(idata))["z"].max())
        raw = float(az.rhat(idata.posterior)["z"].max())
    assert rhat[True] < 1.05 and rhat[False] < 1.05
    assert raw > 1.2  # the unaligned draws themselves are label-switched
