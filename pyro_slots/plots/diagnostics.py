"""Figures of the posterior diagnostics (:mod:`pyro_slots.diagnostics`): Pareto k̂, ELBO
trajectories per restart, R-hat across restarts. The report saves them as PNG on the Agg canvas.
"""

from __future__ import annotations

import warnings

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from ..diagnostics._arviz import az
from ..diagnostics.summary import (
    RHAT_BAD,
    aligned_posterior,
    rhat_per_datapoint,
    unaligned_posterior,
)
from ._style import slot_colors

__all__ = ["plot_elbo_trajectories", "plot_khat", "plot_rhat"]


def plot_khat(psis, ax=None):
    """Pareto k̂ per datapoint with :func:`arviz.plot_khat` and its sample-size threshold.

    :param PSISResult psis: from :func:`~pyro_slots.diagnostics.psis_diagnostic`.
    :returns: the matplotlib axes.
    """
    if ax is None:
        ax = Figure(figsize=(6, 3.5)).subplots()
    with warnings.catch_warnings():
        # ArviZ 0.23 passes matplotlib 3.11 an alias dict it deprecates; harmless until 3.13
        # and nothing a caller can change.
        warnings.filterwarnings(
            "ignore", message="Passing a dict or None as alias_mapping", category=DeprecationWarning
        )
        ax = az.plot_khat(psis.to_elpd_data(), ax=ax, show_hlines=True)
    ax.set_xlabel("datapoint")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    exact = int(np.isneginf(psis.khat.detach().cpu().numpy()).sum())
    title = "PSIS diagnostic of the guide (Yao et al. 2018)"
    ax.set_title(title + (f"; {exact} exact (constant weights)" if exact else ""))
    return ax


def plot_elbo_trajectories(idata, datapoints=None, ax=None, max_datapoints: int = 8):
    """ELBO across inner steps, one line per restart, one colour per datapoint (the slot
    palette, :func:`~pyro_slots.plots.slot_colors`).

    :param idata: from :func:`~pyro_slots.diagnostics.to_inference_data`.
    :param datapoints: positions of the datapoints to show (default: the first
        ``max_datapoints``); each is labelled with its ``datapoint`` coordinate (a shard's
        numbers in the batch).
    :returns: the matplotlib axes.
    """
    history = idata.sample_stats["elbo_history"].isel(draw=0)  # (chain, datapoint, inner_step)
    numbers = history["datapoint"].values
    if datapoints is None:
        datapoints = list(range(min(max_datapoints, history.sizes["datapoint"])))
    if ax is None:
        ax = Figure(figsize=(6, 3.5)).subplots()
    steps = history["inner_step"].values
    colors = slot_colors(len(datapoints))
    for i, n in enumerate(datapoints):
        for c in range(history.sizes["chain"]):
            ax.plot(
                steps,
                history.isel(datapoint=n, chain=c).values,
                color=colors[i],
                alpha=0.8,
                lw=1,
                label=f"datapoint {numbers[n]}" if c == 0 else None,
            )
    ax.set_xlabel("inner step")
    ax.set_ylabel("ELBO")
    ax.set_title("ELBO trajectories (one line per restart)")
    ax.legend(fontsize="small", ncol=2)
    return ax


def plot_rhat(idata, ax=None, var_names=None):
    """Largest R-hat per datapoint, aligned vs unaligned restarts (log scale).

    :param idata: from :func:`~pyro_slots.diagnostics.to_inference_data` with ≥ 4 draws.
    :returns: the matplotlib axes.
    """
    aligned = rhat_per_datapoint(aligned_posterior(idata), var_names)
    if ax is None:
        ax = Figure(figsize=(6, 3.5)).subplots()
    x = np.asarray(aligned.index)  # the datapoint coordinate: a shard's numbers in the batch
    # Guide draws have no "slot" dim to undo the alignment on (see summary()).
    if any("slot" in v.dims for v in idata.posterior.data_vars.values()):
        unaligned = rhat_per_datapoint(unaligned_posterior(idata), var_names)
        ax.plot(
            x, unaligned.values, "o", color=slot_colors(4)[3], label="unaligned (label switching)"
        )
    ax.plot(x, aligned.values, "o", color=slot_colors(1)[0], label="aligned (Hungarian)")
    ax.axhline(RHAT_BAD, color="k", ls="--", lw=1, label=f"R-hat = {RHAT_BAD}")
    ax.set_yscale("log")
    ax.set_xlabel("datapoint")
    ax.set_ylabel("max R-hat")
    ax.set_title("R-hat across restarts")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.legend(fontsize="small")
    return ax
