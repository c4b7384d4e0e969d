import numpy as np
import pandas as pd
import pytest
import torch

import pyro_slots as ps
from pyro_slots.diagnostics import (
    PSISWarning,
    RhatWarning,
    inner_loop_health,
    plot_elbo_trajectories,
    plot_khat,
    plot_rhat,
    plot_slot_masks,
    psis_diagnostic,
    refinement_gap,
    summary,
    to_inference_data,
    trajectory_dataset,
    write_report,
)
from pyro_slots.diagnostics._arviz import az
from pyro_slots.inner import EM
from pyro_slots.models import GaussianMixture


def test_summary_columns_and_values(float64, gmm_restarts):
    gmm, x, result = gmm_restarts(3, 36, seed=2, stuck=[(2, 1)])
    idata = to_inference_data(result, gmm, draws="laplace", num_draws=400, seed=0)
    health = inner_loop_health(result, gmm, EM(50))
    best = result.slots[result.elbo.argmax(0), torch.arange(3)]
    gap = refinement_gap(gmm, x, best, EM(100))
    table = summary(idata, gap=gap, health=health)
    assert list(table.index) == [0, 1, 2]
    np.testing.assert_allclose(table["elbo"], result.elbo.max(0).values.numpy())
    np.testing.assert_allclose(table["amortization_gap"], gap.gap.numpy())
    np.testing.assert_allclose(table["jacobian_norm"], health.jacobian_norm.numpy())
    # R-hat per datapoint is az.rhat of that datapoint's (chain, draw) arrays, maximized.
    for n in range(3):
        per = [
            az.rhat(idata.posterior[v].isel(datapoint=n).values.reshape(4, 400, -1)[..., i])
            for v in ("loc", "log_scale", "logit")
            for i in range(idata.posterior[v].isel(datapoint=n, chain=0, draw=0).size)
        ]
        assert table["rhat"][n] == pytest.approx(max(per), rel=1e-10)
    # rhat_centres: sqrt(1 + var over restarts of the aligned centres / mean within-chain
    # variance of the draws), by brute force over every coordinate
    for n in range(3):
        ratios = []
        for v in ("loc", "log_scale", "logit"):
            draws = idata.posterior[v].isel(datapoint=n).values.reshape(4, 400, -1)
            centres = idata.sample_stats[f"lambda_{v}"].isel(datapoint=n).values.reshape(4, -1)
            within = draws.var(1, ddof=1).mean(0)
            ratios.append(np.sqrt(1 + centres.var(0, ddof=1) / within))
        assert table["rhat_centres"][n] == pytest.approx(np.concatenate(ratios).max(), rel=1e-9)
    stuck = table["elbo_spread"] > 1.0
    assert stuck.tolist() == [False, True, False]  # one restart of datapoint 1 is stuck
    assert (table["rhat_centres"][stuck] > 1.5).all()
    assert (table.loc[stuck, "flags"].str.contains("rhat")).all()
    assert (table.loc[~stuck, "flags"] == "").all()
    assert (table["rhat_unaligned"] > 1.5).all()
    assert (table["ess_bulk"] > 0).all()


def test_summary_of_a_result_and_point_draws(float64, point_sets):
    x = point_sets(2, 20, seed=2)
    gmm = GaussianMixture(3, 2)
    result = ps.refine(gmm, x, EM(10), seed=0)
    with pytest.warns(RhatWarning, match="1 draw"):
        table = summary(result, gmm, draws="point")
    assert table["rhat"].isna().all()  # one chain, one draw: R-hat is undefined
    assert "ess_bulk" not in table
    # The default draws are Laplace draws for an enumerated model: ESS is defined.
    assert (summary(result, gmm, seed=0)["ess_bulk"] > 10).all()
    with pytest.raises(TypeError, match="draws"):
        summary(to_inference_data(result, gmm), draws="laplace")


def test_summary_flags_a_bad_guide(float64, conjugate):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 2, generator=g)
    slots = conjugate.exact_slots(x, 0.3)  # far too narrow
    result = ps.refine(conjugate, x, ps.inner.GradientAscent(1, step_size=1e-12), slots=slots)
    with pytest.warns(PSISWarning, match=r"datapoints \[0\].*datapoints \[1\]"):
        psis = psis_diagnostic(conjugate, x, slots, 1000, seed=0)
    table = summary(result, conjugate, psis=psis)
    assert table["flags"].str.contains("khat>0.7").all()


def test_plots(float64, point_sets, conjugate):
    x = point_sets(2, 36, seed=3)
    gmm = GaussianMixture(3, 2)
    result = ps.refine(gmm, x, EM(10), num_restarts=2, seed=0)
    idata = to_inference_data(result, gmm, draws="laplace", num_draws=20, seed=0)
    ax = plot_elbo_trajectories(idata)
    assert len(ax.lines) == 2 * 2
    ax = plot_rhat(idata)
    assert len(ax.lines[0].get_xdata()) == 2
    fig = plot_slot_masks(idata.sample_stats["responsibilities"], (6, 6))
    assert len(fig.axes) == 2 * 3
    with pytest.raises(ValueError, match="image_shape"):
        plot_slot_masks(result.responsibilities[0], (5, 5))
    xc = torch.randn(3, 3, 2)
    with pytest.warns(PSISWarning):
        psis = psis_diagnostic(conjugate, xc, conjugate.exact_slots(xc, 0.5), 200, seed=0)
    ax = plot_khat(psis)
    assert ax.get_xlabel() == "datapoint"


def test_write_report(float64, point_sets, tmp_path):
    x = point_sets(3, 36, seed=4)
    gmm = GaussianMixture(3, 2)
    path = write_report(
        tmp_path / "out", gmm, x, EM(20), num_restarts=2, seed=0, num_draws=50, image_shape=(6, 6)
    )
    folder = tmp_path / "out"
    assert path == folder / "report.md"
    for name in ("elbo_trajectories.png", "rhat.png", "slot_masks.png", "inference_data.nc"):
        assert (folder / name).stat().st_size > 0
    text = path.read_text()
    assert "| datapoint | elbo |" in text and "![rhat](rhat.png)" in text
    table = pd.read_csv(folder / "summary.csv", index_col=0)
    loaded = az.from_netcdf(str(folder / "inference_data.nc"))
    np.testing.assert_allclose(
        table["elbo"].values, loaded.sample_stats["elbo"].max(("chain", "draw")).values
    )
    assert loaded.posterior.sizes["draw"] == 50


def test_write_report_with_guide_latents(float64, conjugate, tmp_path):
    x = torch.randn(2, 3, 2, generator=torch.Generator().manual_seed(0))
    rule = ps.inner.GradientAscent(20, step_size=0.05, adam=True)
    with pytest.warns(PSISWarning):  # 20 Adam steps leave a guide PSIS does not trust
        path = write_report(
            tmp_path,
            conjugate,
            x,
            rule,
            num_slots=3,
            num_restarts=2,
            num_draws=20,
            num_psis_samples=200,
        )
    assert (tmp_path / "khat.png").stat().st_size > 0
    assert "Pareto k̂" in path.read_text()
    assert "z" in az.from_netcdf(str(tmp_path / "inference_data.nc")).posterior


def test_summary_of_guide_draws_undoes_the_alignment_for_the_unaligned_rhat(float64, conjugate):
    """Guide draws carry the model's slot plate as the slot dim: the unaligned R-hat is the
    one of the same draws in the restarts' raw slot order, as a conversion with align=False
    reads it (to Monte Carlo noise: other draws)."""
    x = torch.randn(2, 3, 2, generator=torch.Generator().manual_seed(0))
    rule = ps.inner.GradientAscent(3, step_size=0.05)
    result = ps.refine(conjugate, x, rule, num_slots=3, num_restarts=2, seed=0)
    table = summary(result, conjugate, draws="guide", num_draws=400, seed=0)
    assert table["rhat"].notna().all()
    raw = to_inference_data(result, conjugate, draws="guide", num_draws=400, seed=0, align=False)
    want = az.rhat(raw.posterior)["z"].max(("slot", "z_event_0")).values
    np.testing.assert_allclose(table["rhat_unaligned"].values, want, atol=0.1)


def test_restarts_at_one_optimum_are_not_flagged_by_monte_carlo_noise(float64, point_sets):
    """Four EM restarts of 20 well-separated two-cluster sets all reach the same optimum (ELBO
    spread 0): ArviZ's R-hat of the 200 Laplace draws, maximized over every slot and field,
    exceeds 1.01 for some datapoints by Monte Carlo noise alone; R-hat's limit from the
    restarts' own centres is 1 up to the optimum's rounding and nothing is flagged."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(20, 60, 2, generator=g, dtype=torch.float64)
    x[:, :30] += 6
    gmm = GaussianMixture(2, 2)
    result = ps.refine(gmm, x, EM(100), seed=0, num_restarts=4)
    table = summary(result, gmm, seed=0)
    assert table["elbo_spread"].max() < 1e-9
    assert (table["rhat"] > 1.01).any()  # the noise the flag used to read
    assert table["rhat_centres"].max() < 1 + 1e-6
    assert not table["flags"].str.contains("rhat").any()


def test_a_shard_keeps_the_numbers_of_its_datapoints(float64, point_sets):
    """A rank's result of refine(..., gather=False) holds datapoints [3, 6) of the batch: the
    InferenceData's datapoint coordinate, the summary's index and the health table are 3, 4, 5
    (they numbered every rank's shard from 0), with the same values as the unlabelled result."""
    import dataclasses

    x = point_sets(3, 30, seed=4)
    gmm = GaussianMixture(3, 2)
    whole = ps.refine(gmm, x, EM(20), seed=0, num_restarts=2)
    shard = dataclasses.replace(whole, datapoints=slice(3, 6))
    idata = to_inference_data(shard, gmm, seed=0, num_draws=8)
    assert idata.posterior["datapoint"].values.tolist() == [3, 4, 5]
    table = summary(idata, health=inner_loop_health(shard, gmm, EM(20)))
    assert table.index.tolist() == [3, 4, 5]
    assert inner_loop_health(shard, gmm, EM(20)).to_dataframe().index.tolist() == [3, 4, 5]
    plain = summary(to_inference_data(whole, gmm, seed=0, num_draws=8))
    np.testing.assert_allclose(table["elbo"].values, plain["elbo"].values)
    # the plots number them alike (they plotted positions 0, 1, 2)
    legend = [t.get_text() for t in plot_elbo_trajectories(idata).get_legend().get_texts()]
    assert legend == ["datapoint 3", "datapoint 4", "datapoint 5"]
    points = plot_rhat(idata).lines[0].get_xdata()
    assert list(points) == [3, 4, 5]
    # The inner loop's path too: the same numbers as the InferenceData of the same shard.
    traced = ps.refine(gmm, x, EM(3), seed=0, num_restarts=2, keep_trajectory=True)
    path = trajectory_dataset(dataclasses.replace(traced, datapoints=slice(3, 6)), gmm)
    assert path["datapoint"].values.tolist() == [3, 4, 5]
    np.testing.assert_allclose(path["elbo"].values, trajectory_dataset(traced, gmm)["elbo"].values)


def test_restarts_of_one_mixture_with_shifted_logits_are_not_flagged(float64, point_sets):
    """Two restarts that are the same mixture, the second's logits shifted by 1 (softmax
    ignores it: same weights, same ELBO): R-hat read them as two solutions (rhat_centres 3.4,
    every datapoint flagged). Compared in the model's canonical form they agree."""
    x = point_sets(3, 40, seed=3)
    gmm = GaussianMixture(3, 2)
    result = ps.refine(gmm, x, EM(30), seed=0)
    slots = result.slots[0]
    shifted = gmm.slot_spec.split(slots.clone())
    shifted["logit"] += 1.0
    both = torch.stack([slots, gmm.slot_spec.pack(shifted)])
    twice = ps.refine(gmm, x, ps.inner.GradientAscent(1, step_size=1e-14), slots=both,
                      num_restarts=2)  # fmt: skip
    torch.testing.assert_close(twice.elbo[0], twice.elbo[1])
    table = summary(twice, gmm, seed=0)
    assert table["rhat_centres"].max() < 1 + 1e-6
    assert not table["flags"].str.contains("rhat").any()
