"""Pareto-smoothed importance sampling diagnostic of the variational posterior, per datapoint.

Yao, Vehtari, Simpson & Gelman (2018), "Yes, but did it work?: Evaluating variational
inference": draw ``S`` samples ``z_s ~ q(z | λ^n)`` from the guide, form the log importance
ratios ``log r_s = log p(x^n, z_s) - log q(z_s | λ^n)``, fit a generalized Pareto distribution to
their largest values and read off its shape ``k̂``. ``k̂ < 0.5``: the guide is close to the
posterior and importance sampling corrects it well; ``0.5 ≤ k̂ < 0.7``: usable; ``k̂ ≥ 0.7``: the
guide misses mass the posterior has and the ELBO (and anything computed from q) is unreliable;
``k̂ > 1``: the importance ratios have no finite mean and even the PSIS estimate is unusable.
:func:`psis_diagnostic` says so in one :class:`PSISWarning` naming the datapoints.
The smoothing and the fit are ArviZ's :func:`arviz.psislw` (Vehtari et al. 2024), run on log
ratios shifted by their maximum and with NumPy's floating-point warnings silenced inside it:
a poor guide's ratios span thousands of nats, the tail's ``exp`` then underflows or overflows,
and ArviZ returns ``k̂ = inf`` -- reported here as unusable, not as a stream of NumPy warnings.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import numpy as np
import torch
import xarray as xr

from ..validation import check_positive_int, check_slots
from . import _traces
from ._arviz import az

__all__ = ["PSISResult", "PSISWarning", "khat_reliability", "khat_threshold", "psis_diagnostic"]

#: k̂ above which the guide's ELBO is unreliable, and above which PSIS itself is unusable.
KHAT_UNRELIABLE, KHAT_UNUSABLE = 0.7, 1.0


class PSISWarning(UserWarning):
    """Pareto k̂ says the guide (and what is computed from it) cannot be trusted."""


def khat_reliability(khat) -> np.ndarray:
    """Labels of k̂ values: ``"exact"`` (``-inf``: constant ratios), ``"good"`` (< 0.5),
    ``"ok"`` (0.5-0.7), ``"unreliable"`` (0.7-1), ``"unusable"`` (> 1, or NaN/inf).

    :param khat: array-like of k̂.
    :returns: a NumPy array of strings of the same shape.
    """
    k = np.asarray(torch.as_tensor(khat).detach().cpu(), dtype=np.float64)
    labels = np.full(k.shape, "unusable", dtype=object)
    labels[k <= KHAT_UNUSABLE] = "unreliable"
    labels[k <= KHAT_UNRELIABLE] = "ok"
    labels[k < 0.5] = "good"
    labels[np.isneginf(k)] = "exact"
    return labels.astype(str)


def khat_threshold(num_samples: int) -> float:
    """Sample-size dependent k̂ threshold ``min(1 - 1 / log10(S), 0.7)`` (Vehtari et al. 2024)."""
    return min(1.0 - 1.0 / math.log10(num_samples), 0.7)


@dataclass
class PSISResult:
    """What :func:`psis_diagnostic` returns; tensors are per datapoint.

    :ivar khat: ``(batch,)`` Pareto shape estimate k̂. ``-inf`` where all log ratios agree to
        rounding (the guide is exact, e.g. when every latent is enumerated): a constant has no
        tail at all, while ArviZ's fit would report ``inf`` for lack of tail samples.
    :ivar log_evidence: ``(batch,)`` PSIS estimate of ``log p(x^n)``: the log mean of the
        smoothed importance ratios.
    :ivar log_evidence_is: ``(batch,)`` plain importance-sampling estimate (raw ratios).
    :ivar elbo: ``(batch,)`` Monte Carlo ELBO, the mean of the raw log ratios.
    :ivar log_weights: ``(batch, num_samples)`` raw log ratios.
    :ivar smoothed_log_weights: ``(batch, num_samples)`` Pareto-smoothed log ratios (not
        normalized).
    :ivar num_samples: ``S``.
    """

    khat: torch.Tensor
    log_evidence: torch.Tensor
    log_evidence_is: torch.Tensor
    elbo: torch.Tensor
    log_weights: torch.Tensor
    smoothed_log_weights: torch.Tensor
    num_samples: int

    @property
    def reliability(self) -> np.ndarray:
        """``(batch,)`` labels of k̂ (:func:`khat_reliability`)."""
        return khat_reliability(self.khat)

    @property
    def good_k(self) -> float:
        """The k̂ threshold for this sample size, :func:`khat_threshold`."""
        return khat_threshold(self.num_samples)

    def to_elpd_data(self):
        """An :class:`arviz.ELPDData` holding ``pareto_k`` (dim ``datapoint``), for
        :func:`arviz.plot_khat`. ``-inf`` k̂ (exact guides) are shown as ``nan``.
        """
        khat = self.khat.detach().cpu().numpy().astype(float)
        khat = np.where(np.isneginf(khat), np.nan, khat)
        pareto_k = xr.DataArray(
            khat, dims=["datapoint"], coords={"datapoint": np.arange(khat.size)}, name="pareto_k"
        )
        return az.ELPDData(
            data=[self.num_samples, khat.size, pareto_k, self.good_k],
            index=["n_samples", "n_data_points", "pareto_k", "good_k"],
        )


def psis_diagnostic(
    model,
    x: torch.Tensor,
    slots: torch.Tensor,
    num_samples: int = 1000,
    *,
    seed: int | None = None,
    constant_tol: float | None = None,
) -> PSISResult:
    """Pareto k̂ and the PSIS evidence estimate of the guide at ``slots``, per datapoint.

    Guide samples are drawn vectorized (a particle plate outside the model's plates); the model
    is replayed against them with its enumerated sites summed out exactly, as in
    :class:`~pyro.infer.TraceEnum_ELBO`. The guide itself must sample all its sites (no guide-side
    enumeration).

    Example::

        result = refine(model, x, GradientAscent(200), seed=0)
        psis = psis_diagnostic(model, x, result.best().slots[0], num_samples=2000, seed=0)
        psis.khat  # (batch,): < 0.5 good, > 0.7 unreliable

    :param SlotModel model: the slot model.
    :param torch.Tensor x: datapoints as for :func:`pyro_slots.refine` (``model.encode`` is
        applied first).
    :param torch.Tensor slots: ``(batch, num_slots, slot_dim)``, e.g. ``refine(...).slots[0]``
        or ``refine(...).best().slots[0]``.
    :param int num_samples: guide samples ``S`` per datapoint (ArviZ needs more than 4 tail
        samples; at least a few hundred are recommended).
    :param int seed: seed of the guide samples (drawn on a forked global RNG); ``None`` uses the
        global RNG.
    :param float constant_tol: log ratios whose range is below ``constant_tol · (1 + |mean|)``
        count as constant (k̂ = ``-inf``); default ``max(1e-9, 64 ε)`` with ``ε`` the machine
        epsilon of the model's dtype (an exact guide's float32 log ratios differ by rounding,
        about 1e-6 of their size, where a Pareto fit sees a heavy tail).
    :returns: a :class:`PSISResult`.
    """
    num_samples = check_positive_int(num_samples, "num_samples", minimum=10)
    with torch.no_grad():
        x_enc = model.encode(x)
        check_slots(slots, "slots", x_enc.shape[0], model.slot_dim)
        with _traces.seeded(seed):
            lw = _traces.log_weights(model, x_enc, slots.detach(), num_samples).T  # (B, S)
    if constant_tol is None:
        constant_tol = max(1e-9, 64 * torch.finfo(lw.dtype).eps)
    lw_np = lw.cpu().numpy().astype(np.float64)
    spread = lw_np.max(-1) - lw_np.min(-1)
    constant = spread <= constant_tol * (1.0 + np.abs(lw_np.mean(-1)))
    # Constant rows have no tail to fit (ArviZ would divide by zero on them): k̂ = -inf and the
    # weights stay as they are; the others are smoothed by ArviZ.
    khat = np.full(lw_np.shape[0], -np.inf)
    smoothed = lw_np.copy()
    fit = ~constant
    if fit.any():
        shift = lw_np[fit].max(-1, keepdims=True)  # k̂ and the smoothing are shift-invariant
        with np.errstate(all="ignore"), warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            fitted, fitted_khat = az.psislw(lw_np[fit] - shift, reff=1.0, normalize=False)
        smoothed[fit] = np.asarray(fitted) + shift
        khat[fit] = np.asarray(fitted_khat, dtype=np.float64).reshape(-1)
    khat = np.where(np.isnan(khat), np.inf, khat)
    _warn_khat(khat)
    log_s = math.log(num_samples)
    to = lw.new_tensor
    return PSISResult(
        khat=to(khat),
        log_evidence=to(smoothed).logsumexp(-1) - log_s,
        log_evidence_is=lw.logsumexp(-1) - log_s,
        elbo=lw.mean(-1),
        log_weights=lw,
        smoothed_log_weights=to(smoothed),
        num_samples=num_samples,
    )


def _warn_khat(khat: np.ndarray) -> None:
    labels = khat_reliability(khat)
    parts = []
    for label, meaning in (
        (
            "unusable",
            f"k̂ > {KHAT_UNUSABLE}: the importance ratios have no finite mean, "
            "so the PSIS estimates are unusable and the guide misses the posterior",
        ),
        (
            "unreliable",
            f"{KHAT_UNRELIABLE} < k̂ <= {KHAT_UNUSABLE}: the guide's ELBO and "
            "anything computed from q are unreliable",
        ),
    ):
        idx = np.flatnonzero(labels == label)
        if idx.size:
            shown = idx[:8].tolist()
            more = f" and {idx.size - 8} more" if idx.size > 8 else ""
            parts.append(f"datapoints {shown}{more}: {meaning}")
    if parts:
        warnings.warn(
            "PSIS: " + "; ".join(parts) + ". Refine longer, enlarge the guide, or report "
            "these datapoints as failed.",
            PSISWarning,
            stacklevel=3,
        )
