"""One table per batch: did inference work for each datapoint? (in the spirit of az.summary)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import xarray as xr

from ._arviz import az
from .alignment import invert_permutation

__all__ = [
    "aligned_posterior",
    "centre_rhat_per_datapoint",
    "rhat_per_datapoint",
    "summary",
    "unaligned_posterior",
]

#: Thresholds of the ``flags`` column.
KHAT_BAD = 0.7  # Yao et al. 2018
RHAT_BAD = 1.01  # Vehtari et al. 2021
JACOBIAN_BAD = 1.0


def _permute_slots(ds: xr.Dataset, perm: np.ndarray) -> xr.Dataset:
    """``out[c, :, n, j] = ds[c, :, n, perm[c, n, j]]`` for every variable with a slot dim."""
    out = {}
    for name, var in ds.data_vars.items():
        if not {"chain", "draw", "datapoint", "slot"} <= set(var.dims):
            out[name] = var
            continue
        rest = [d for d in var.dims if d not in ("chain", "draw", "datapoint", "slot")]
        var = var.transpose("chain", "draw", "datapoint", "slot", *rest)
        index = perm[:, None, :, :].reshape(*perm.shape[:1], 1, *perm.shape[1:], *[1] * len(rest))
        out[name] = var.copy(data=np.take_along_axis(var.values, index, axis=3))
    return xr.Dataset(out, attrs=ds.attrs)


def _permutation(idata) -> np.ndarray:
    perm = idata.sample_stats["slot_permutation"].isel(draw=0)
    return perm.transpose("chain", "datapoint", "slot").values


def aligned_posterior(idata) -> xr.Dataset:
    """The posterior with restarts aligned, whatever ``align`` the InferenceData was built with."""
    post = idata.posterior
    if post.attrs.get("slots_aligned", 1):
        return post
    return _permute_slots(post, _permutation(idata))


def unaligned_posterior(idata) -> xr.Dataset:
    """The posterior with the raw slot order of every restart."""
    post = idata.posterior
    if not post.attrs.get("slots_aligned", 1):
        return post
    return _permute_slots(post, invert_permutation(_permutation(idata)))


def rhat_per_datapoint(posterior: xr.Dataset, var_names=None) -> pd.Series:
    """Largest rank-normalized R-hat (:func:`arviz.rhat`) over slots and fields per datapoint.

    ``nan`` with fewer than 4 draws per chain or a single chain.
    """
    if posterior.sizes.get("chain", 1) < 2 or posterior.sizes.get("draw", 1) < 4:
        return pd.Series(np.nan, index=posterior["datapoint"].values)
    rhat = az.rhat(posterior, var_names=var_names)
    return _max_per_datapoint(rhat)


def centre_rhat_per_datapoint(idata, var_names=None) -> pd.Series | None:
    """R-hat without Monte Carlo noise where the draws are centred at known points: for
    ``draws="laplace"`` the chains are draws around the
    restarts' aligned final slots λ_r (``sample_stats`` ``lambda_<field>``), so the limit of
    R-hat for infinitely many draws, ``sqrt(1 + var_r(λ_r) / W)`` with ``W`` the mean
    within-chain variance of the draws, is known; its largest value over slots and fields per
    datapoint. Restarts at one optimum give 1 exactly, where ArviZ's R-hat of 200 draws per
    chain, maximized over every slot and field, exceeds 1.01 for about one datapoint in ten.

    ``None`` where some posterior variable has no ``lambda_<name>`` centre (guide draws, whose
    variables are latent sites, not λ), or with one chain or fewer than 4 draws.
    """
    post = idata.posterior
    names = list(post.data_vars) if var_names is None else list(var_names)
    stats = idata.sample_stats
    if post.sizes.get("chain", 1) < 2 or post.sizes.get("draw", 1) < 4:
        return None
    if not all(f"lambda_{name}" in stats for name in names):
        return None
    centres = xr.Dataset({name: stats[f"lambda_{name}"] for name in names}, attrs=post.attrs)
    if not post.attrs.get("slots_aligned", 1):  # the centres are stored as the posterior is
        centres = _permute_slots(centres, _permutation(idata))
    post = aligned_posterior(idata)
    ratios = {}
    for name in names:
        within = post[name].var("draw", ddof=1).mean("chain")
        between = centres[name].isel(draw=0).var("chain", ddof=1)
        ratio = xr.where(within > 0, between / within.where(within > 0), np.inf)
        ratios[name] = np.sqrt(1 + xr.where(between > 0, ratio, 0.0))
    return _max_per_datapoint(xr.Dataset(ratios))


def _max_per_datapoint(ds: xr.Dataset, reduce="max") -> pd.Series:
    parts = []
    for var in ds.data_vars.values():
        if "datapoint" not in var.dims:
            continue
        other = [d for d in var.dims if d != "datapoint"]
        parts.append(getattr(var, reduce)(other) if other else var)
    if not parts:
        raise ValueError("posterior: no variable has a datapoint dimension")
    combined = xr.concat(parts, dim="variable")
    return getattr(combined, reduce)("variable").to_series()


def summary(
    data,
    model=None,
    *,
    psis=None,
    gap=None,
    health=None,
    var_names=None,
    **to_idata_kwargs,
) -> pd.DataFrame:
    """A table with one row per datapoint: ELBO, k̂, R-hat aligned/unaligned, ESS, gap, health.

    Columns (present when their input is): ``elbo`` (best restart), ``elbo_spread`` (best minus
    worst restart), ``khat`` (from ``psis``), ``rhat`` and ``rhat_unaligned`` (largest over slots
    and fields; need ≥ 2 restarts and ≥ 4 draws), ``rhat_centres`` (Laplace draws: R-hat's
    limit from the restarts' own slots, free of Monte Carlo noise,
    :func:`centre_rhat_per_datapoint`; the ``rhat`` flag reads it where present),
    ``ess_bulk`` (smallest, aligned),
    ``amortization_gap``, the health fields and ``flags``: a comma-separated list of
    ``khat>0.7``, ``rhat>1.01``, ``elbo_decreased``, ``jacobian_norm>1``, ``duplicate_slots``,
    ``dead_slots`` (empty when none applies). The unaligned R-hat measures label switching and is
    expected to be large; it is not a flag.

    Example::

        idata = to_inference_data(refine(gmm, x, EM(50), num_restarts=4), gmm, draws="laplace")
        summary(idata, psis=psis_diagnostic(...), gap=amortization_gap(...))

    :param data: an InferenceData from :func:`to_inference_data`, or a refine result (converted
        with ``to_inference_data(data, model, **to_idata_kwargs)``).
    :param SlotModel model: for a refine result.
    :param PSISResult psis: from :func:`psis_diagnostic`.
    :param AmortizationGap gap: from :func:`amortization_gap`.
    :param InnerLoopHealth health: from :func:`inner_loop_health`.
    :param var_names: posterior variables for R-hat and ESS (default: all).
    :returns: :class:`pandas.DataFrame` indexed by ``datapoint``.
    """
    if isinstance(data, az.InferenceData):
        if to_idata_kwargs:
            raise TypeError(
                f"summary: {sorted(to_idata_kwargs)} only apply to a refine result, "
                "not to an InferenceData"
            )
        idata = data
    else:
        from .inference_data import to_inference_data

        idata = to_inference_data(data, model, **to_idata_kwargs)
    if "sample_stats" not in idata.groups() or "elbo" not in idata.sample_stats:
        raise ValueError("data: expected an InferenceData made by to_inference_data()")
    elbo = idata.sample_stats["elbo"].isel(draw=0)
    table = pd.DataFrame(index=pd.Index(elbo["datapoint"].values, name="datapoint"))
    table["elbo"] = elbo.max("chain").values
    table["elbo_spread"] = (elbo.max("chain") - elbo.min("chain")).values
    batch = len(table)
    if psis is not None:
        table["khat"] = _per_datapoint(psis.khat, batch, "psis.khat")
    table["rhat"] = rhat_per_datapoint(aligned_posterior(idata), var_names).values
    centred = centre_rhat_per_datapoint(idata, var_names)
    if centred is not None:
        table["rhat_centres"] = centred.values
    if any("slot" in v.dims for v in idata.posterior.data_vars.values()):
        table["rhat_unaligned"] = rhat_per_datapoint(unaligned_posterior(idata), var_names).values
    else:
        # Draws of a guide without the model's slot plate have no slot dim to undo the
        # alignment on: there is no unaligned version to compare with.
        table["rhat_unaligned"] = np.nan
    post = aligned_posterior(idata)
    if post.sizes.get("draw", 1) >= 4:
        table["ess_bulk"] = _max_per_datapoint(
            az.ess(post, var_names=var_names, method="bulk"), "min"
        ).values
    if gap is not None:
        table["amortization_gap"] = _per_datapoint(gap.gap, batch, "gap.gap")
    if health is not None:
        frame = health.to_dataframe()
        if len(frame) != batch:
            raise ValueError(f"health: {len(frame)} datapoints, expected {batch}")
        for column in frame.columns:
            table[column] = frame[column].values
    table["flags"] = [", ".join(_flags(row)) for _, row in table.iterrows()]
    return table


def _per_datapoint(t, batch: int, name: str) -> np.ndarray:
    values = t.detach().cpu().numpy() if hasattr(t, "detach") else np.asarray(t)
    if values.shape != (batch,):
        raise ValueError(f"{name}: expected shape ({batch},), got {values.shape}")
    return values


def _flags(row) -> list[str]:
    flags = []
    if row.get("khat", -np.inf) > KHAT_BAD:
        flags.append(f"khat>{KHAT_BAD}")
    # The noise-free R-hat where the draws' centres are known (Laplace draws), else ArviZ's.
    rhat = row.get("rhat_centres", row.get("rhat", 1.0))
    if rhat > RHAT_BAD:
        flags.append(f"rhat>{RHAT_BAD}")
    if row.get("fraction_elbo_decrease", 0.0) > 0:
        flags.append("elbo_decreased")
    if row.get("jacobian_norm", 0.0) > JACOBIAN_BAD:
        flags.append(f"jacobian_norm>{JACOBIAN_BAD:g}")
    if row.get("num_duplicate_slots", 0) > 0:
        flags.append("duplicate_slots")
    if row.get("num_dead_slots", 0) > 0:
        flags.append("dead_slots")
    return flags
