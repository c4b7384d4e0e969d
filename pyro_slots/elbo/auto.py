"""The front estimator: the lean estimator where the program allows it, else TraceEnum."""

from __future__ import annotations

import weakref

import pyro.util
import torch

from ..validation import check_data, check_measurements, check_slots
from .base import ELBOEstimator
from .lean import LeanEstimator, LeanFallback, unsupported_message
from .trace_enum import TraceEnumEstimator

__all__ = [
    "DEFAULT_ESTIMATOR",
    "STRATEGIES",
    "PerDatapointELBO",
    "make_estimator",
    "per_datapoint_elbo",
]

#: The evaluation strategies of :class:`PerDatapointELBO`.
STRATEGIES = ("auto", "lean", "trace_enum")


class PerDatapointELBO(ELBOEstimator):
    """Per-datapoint ELBO of a :class:`~pyro_slots.SlotModel`, computed from its Pyro program.

    The front over the two estimators, both running the user's ``model`` and ``guide`` under
    Pyro's effect handlers (``trace``, ``replay``, ``enum``):

    * ``"trace_enum"`` — :class:`~pyro_slots.elbo.TraceEnumEstimator`: Pyro's
      :class:`~pyro.infer.TraceEnum_ELBO` pipeline unchanged (packed traces, tensor-contraction
      of enumerated sites, DiCE) with a per-datapoint final reduction. Handles everything
      ``TraceEnum_ELBO`` handles.
    * ``"lean"`` — :class:`~pyro_slots.elbo.LeanEstimator`: a messenger accumulates each site's
      log-density without building the model trace; enumerated sites that share their plates
      are summed out by one stable log-sum-exp (which also yields their exact posterior). Exact
      for mixture models; several times cheaper per call. Programs it cannot handle raise
      ``ValueError``.
    * ``"auto"`` (default) — ``"lean"`` where the program allows it, else ``"trace_enum"``;
      which one a model class needs is found on its first call and remembered by this object.

    Tests check the strategies agree on every model of the zoo.

    :param int num_particles: Monte Carlo samples of the guide (vectorized as a plate).
    :param int max_plate_nesting: overrides ``model.max_plate_nesting``.
    :param str strategy: one of :data:`STRATEGIES`.
    """

    def __init__(
        self,
        num_particles: int = 1,
        max_plate_nesting: int | None = None,
        strategy: str = "auto",
    ):
        super().__init__(num_particles, max_plate_nesting)
        if strategy not in STRATEGIES:
            raise ValueError(f"strategy: expected one of {STRATEGIES}, got {strategy!r}")
        self.strategy = strategy
        self.lean = LeanEstimator(num_particles, max_plate_nesting)
        self.trace_enum = TraceEnumEstimator(num_particles, max_plate_nesting)
        # model class -> whether the lean estimator handles it (weak: classes may be local).
        self._lean_ok = weakref.WeakKeyDictionary()

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_lean_ok"] = None  # weak references do not pickle; rediscovered after loading
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._lean_ok = weakref.WeakKeyDictionary()

    def _lean(self, model, x, slots, parts: str = "all"):
        if self.strategy == "trace_enum":
            return None
        known = self._lean_ok.get(type(model))
        if known is False:
            return None
        # A first attempt that falls back must not consume the random stream the general path
        # then draws from (the guide may sample before the program is found unsupported).
        rng = pyro.util.get_rng_state() if known is None else None
        try:
            estimate = self.lean.estimate(model, x, slots, parts)
        except LeanFallback:
            if rng is not None:
                pyro.util.set_rng_state(rng)
            if self.strategy == "lean":
                raise ValueError(unsupported_message(model)) from None
            self._lean_ok[type(model)] = False
            return None
        if known is None:
            self._lean_ok[type(model)] = True
        return estimate

    def __call__(self, model, x: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        estimate = self._lean(model, x, slots, "elbo")
        if estimate is not None:
            return estimate.elbo
        return self.trace_enum(model, x, slots)

    def elbo_and_posterior(
        self, model, x: torch.Tensor, slots: torch.Tensor, site: str, probs: bool = False
    ):
        estimate = self._lean(model, x, slots, "probs" if probs else "all")
        if estimate is not None:
            post = estimate.posterior(site) if probs else estimate.log_posterior(site)
            if post is not None:
                return estimate.elbo, post
        # Several enumerated sites, or a program the lean estimator does not handle.
        return self.trace_enum.elbo_and_posterior(model, x, slots, site, probs=probs)


def make_estimator(
    strategy: str = "auto", num_particles: int = 1, max_plate_nesting: int | None = None
) -> ELBOEstimator:
    """The estimator for ``strategy``: :class:`~pyro_slots.elbo.LeanEstimator` (``"lean"``),
    :class:`~pyro_slots.elbo.TraceEnumEstimator` (``"trace_enum"``) or the falling-back
    :class:`PerDatapointELBO` (``"auto"``).

    :param str strategy: one of :data:`STRATEGIES`.
    """
    if strategy == "lean":
        return LeanEstimator(num_particles, max_plate_nesting)
    if strategy == "trace_enum":
        return TraceEnumEstimator(num_particles, max_plate_nesting)
    return PerDatapointELBO(num_particles, max_plate_nesting, strategy)


#: The estimator of every :class:`~pyro_slots.inner.InnerProblem` built without one (so of
#: :func:`~pyro_slots.refine` and :class:`~pyro_slots.NestedSVI` by default) and of
#: :func:`per_datapoint_elbo`. Shared, so that what it learns about a program runs once per
#: model and signature of ``x`` and ``slots``, not once per call: which estimator the model
#: needs, the distributions' argument checks (see :class:`~pyro_slots.elbo.LeanEstimator`) and
#: the observations' support checks (once per tensor version).
DEFAULT_ESTIMATOR = PerDatapointELBO()


def per_datapoint_elbo(
    model, x: torch.Tensor, slots: torch.Tensor, num_particles: int = 1, strategy: str = "auto"
) -> torch.Tensor:
    """Functional form of :class:`PerDatapointELBO`: ELBO of every datapoint, ``(batch,)``.

    ``x`` (the model's measurements, as ``model.model`` takes them) and ``slots`` are checked
    first, as :func:`~pyro_slots.refine` checks them (the estimators themselves, called by the
    inner loop at every step, are not).
    """
    check_data(x, "x", model)
    check_measurements(x, "x")
    check_slots(slots, "slots", x.shape[0], model.slot_dim, like=x)
    if num_particles == 1 and strategy == "auto":
        return DEFAULT_ESTIMATOR(model, x, slots)
    return PerDatapointELBO(num_particles, strategy=strategy)(model, x, slots)
