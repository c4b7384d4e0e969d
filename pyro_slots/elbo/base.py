"""The interface every per-datapoint ELBO estimator implements."""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch

from ..validation import check_positive_int


class ELBOEstimator(ABC):
    """Per-datapoint ELBO ``L(x^n, λ^n)`` of a :class:`~pyro_slots.SlotModel`, computed from its
    Pyro program (``model`` and ``guide`` run under Pyro's effect handlers).

    :param int num_particles: Monte Carlo samples of the guide (vectorized as a plate).
    :param int max_plate_nesting: overrides ``model.max_plate_nesting``.
    """

    def __init__(self, num_particles: int = 1, max_plate_nesting: int | None = None):
        self.num_particles = check_positive_int(num_particles, "num_particles")
        if max_plate_nesting is not None:
            max_plate_nesting = check_positive_int(max_plate_nesting, "max_plate_nesting")
        self.max_plate_nesting = max_plate_nesting

    def nesting(self, model) -> int:
        """The plate nesting the program is run with."""
        return self.max_plate_nesting or model.max_plate_nesting

    @abstractmethod
    def __call__(self, model, x: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        """ELBO of each datapoint, shape ``(batch,)``, differentiable in slots and weights.

        :param SlotModel model: the slot model.
        :param torch.Tensor x: encoded measurements ``(batch, measurements, features)``.
        :param torch.Tensor slots: ``(batch, num_slots, slot_dim)``.
        """

    @abstractmethod
    def elbo_and_posterior(
        self, model, x: torch.Tensor, slots: torch.Tensor, site: str, probs: bool = False
    ):
        """``(elbo (batch,), log p(site | x, λ))`` for an enumerated ``site``.

        The log-posterior has the enumeration dimension first, then the site's plate
        dimensions, e.g. ``(num_slots, batch, measurements)`` for a mixture assignment.
        With ``probs=True`` the posterior itself, ``p(site | x, λ)``, in the same layout.
        """
