"""Negative ELBO as the task objective (meta-learned posterior inference, §3.2)."""

from __future__ import annotations

import torch

from ..elbo import TraceEnumEstimator
from .base import Objective

__all__ = ["NegativeELBO"]


class NegativeELBO(Objective):
    """``J^n = -L(x̃^n, λ*^n; w)`` per datapoint: the outer loop fits the generative model itself.

    Computed by Pyro's :class:`~pyro.infer.TraceEnum_ELBO` pipeline with a per-datapoint final
    reduction (:class:`~pyro_slots.elbo.TraceEnumEstimator`; its sum over the batch is
    ``TraceEnum_ELBO.differentiable_loss``), whatever estimator the inner loop uses: with the
    default ``"auto"`` inner estimator (the lean one for mixtures) the two code paths
    cross-check each other. The mean that :class:`~pyro_slots.NestedSVI` takes is
    ``-ELBO / batch``.

    :param int num_particles: Monte Carlo samples of the guide.
    """

    def __init__(self, num_particles: int = 1):
        super().__init__()
        self.estimator = TraceEnumEstimator(num_particles)

    @property
    def num_particles(self) -> int:
        return self.estimator.num_particles

    def forward(self, model, x, x_enc, slots, *targets) -> torch.Tensor:
        """``-ELBO`` of every datapoint, ``(batch,)``; arguments as :class:`Objective`."""
        return -self.estimator(model, x_enc, slots)
