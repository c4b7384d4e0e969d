"""Negative ELBO as the task objective (meta-learned posterior inference, §3.2)."""

from __future__ import annotations

import torch
from pyro.infer import TraceEnum_ELBO

from ..validation import check_positive_int
from .base import Objective

__all__ = ["NegativeELBO"]


class NegativeELBO(Objective):
    """``J = -L(x̃^n, λ*^n; w)``: the outer loop fits the generative model itself.

    Computed by Pyro's standard :meth:`~pyro.infer.TraceEnum_ELBO.differentiable_loss` — a code
    path separate from the inner loop's per-datapoint ELBO (:mod:`pyro_slots.elbo`), so the two
    cross-check each other. Pyro returns the batch total; every datapoint carries the batch mean,
    so the mean :class:`~pyro_slots.NestedSVI` takes is exactly ``-ELBO / batch``.

    :param int num_particles: Monte Carlo samples of the guide.
    """

    def __init__(self, num_particles: int = 1):
        super().__init__()
        self.num_particles = check_positive_int(num_particles, "num_particles")
        self._elbo = None

    def forward(self, model, x, x_enc, slots, *targets):
        if self._elbo is None or self._elbo.max_plate_nesting != model.max_plate_nesting:
            self._elbo = TraceEnum_ELBO(
                max_plate_nesting=model.max_plate_nesting,
                num_particles=self.num_particles,
                vectorize_particles=self.num_particles > 1,
                strict_enumeration_warning=False,
            )
        if torch.is_grad_enabled():
            try:
                loss = self._elbo.differentiable_loss(model.model, model.guide, x_enc, slots)
            except ValueError as e:
                # Pyro refuses to differentiate an ELBO that depends on nothing trainable;
                # NestedSVI reports that case itself, naming the gradient mode.
                if "cannot be differentiated" not in str(e):
                    raise
                loss = None
        else:
            loss = None
        if loss is None:
            value = self._elbo.loss(model.model, model.guide, x_enc, slots)
            loss = torch.as_tensor(value, dtype=x_enc.dtype, device=x_enc.device)
        return (loss / x_enc.shape[0]).expand(x_enc.shape[0])
