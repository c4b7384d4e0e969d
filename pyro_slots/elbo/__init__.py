"""Per-datapoint ELBO computed by Pyro's own machinery.

Pyro's ELBO classes return one number for the whole batch. The nested problem (Eq. 4 of the seed
paper) needs one ELBO per datapoint, ``L(x̃^n, λ^n)``, differentiable in ``λ^n`` and in the shared
weights. Every estimator implements :class:`ELBOEstimator` (``__call__(model, x, slots)`` →
``(batch,)`` and ``elbo_and_posterior``):

* :class:`TraceEnumEstimator` (:mod:`~pyro_slots.elbo.trace_enum`) — Pyro's
  :class:`~pyro.infer.TraceEnum_ELBO` pipeline with a per-datapoint final reduction; its sum over
  datapoints equals ``-TraceEnum_ELBO().differentiable_loss(model.model, model.guide, x, slots)``;
* :class:`LeanEstimator` (:mod:`~pyro_slots.elbo.lean`) — log-densities accumulated by a
  messenger, exact for mixture models and several times cheaper;
* :class:`PerDatapointELBO` (:mod:`~pyro_slots.elbo.auto`) — the front: ``strategy="auto"``
  uses the lean estimator where the program allows it, else TraceEnum; :func:`make_estimator`
  builds the estimator of a strategy.

The CPU kernels of the lean estimator live in :mod:`~pyro_slots.elbo.kernels`; every private
Pyro function used goes through :mod:`pyro_slots._pyro_compat`.
"""

from .auto import (
    DEFAULT_ESTIMATOR,
    STRATEGIES,
    PerDatapointELBO,
    make_estimator,
    per_datapoint_elbo,
)
from .base import ELBOEstimator
from .kernels import stable_logsumexp as _stable_logsumexp  # noqa: F401  (former private name)
from .lean import LeanEstimate, LeanEstimator
from .trace_enum import TraceEnumEstimator, marginal_model_costs

__all__ = [
    "DEFAULT_ESTIMATOR",
    "STRATEGIES",
    "ELBOEstimator",
    "LeanEstimate",
    "LeanEstimator",
    "PerDatapointELBO",
    "TraceEnumEstimator",
    "make_estimator",
    "marginal_model_costs",
    "per_datapoint_elbo",
]
