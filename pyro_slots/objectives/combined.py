"""A weighted sum of task objectives, e.g. reconstruction + set prediction."""

from __future__ import annotations

import math

import torch
from torch import nn

from .base import Objective

__all__ = ["WeightedSum"]


class WeightedSum(Objective):
    r"""``J = Σ_i w_i J_i``: several task objectives trained together.

    Every part receives the same arguments ``(model, x, x_enc, slots, *targets)`` and must
    return a loss per datapoint ``(batch,)``; parts that need no targets (e.g.
    :class:`~pyro_slots.objectives.Reconstruction`) ignore them. The parts' heads are
    submodules, so :meth:`NestedSVI.parameters <pyro_slots.NestedSVI.parameters>` trains them
    all. Like every objective, the sum only sees the final slots: it never enters the inner
    rule, which still maximizes the model's ELBO.

    Example::

        head = SetPrediction(slot_dim=64, num_shapes=4, num_colors=8)
        objective = WeightedSum([Reconstruction(), head], weights=[1.0, 0.1])
        svi = NestedSVI(model, rule, objective, optim)
        svi.step(x, *head.targets_from_batch(batch))

    :param objectives: the parts, a non-empty sequence of :class:`Objective`.
    :param weights: one finite weight ``>= 0`` per part; default all ones (a plain sum).
    """

    def __init__(self, objectives, weights=None):
        super().__init__()
        objectives = list(objectives)
        if not objectives:
            raise ValueError("objectives: expected at least one Objective, got none")
        for i, objective in enumerate(objectives):
            if not isinstance(objective, Objective):
                raise TypeError(
                    f"objectives[{i}]: expected an Objective, got {type(objective).__name__}"
                )
        weights = [1.0] * len(objectives) if weights is None else list(weights)
        if len(weights) != len(objectives):
            raise ValueError(
                f"weights: expected {len(objectives)} weights (one per objective), "
                f"got {len(weights)}"
            )
        for i, w in enumerate(weights):
            if isinstance(w, bool) or not isinstance(w, (int, float)):
                raise TypeError(f"weights[{i}]: expected a number, got {type(w).__name__}")
            if not (math.isfinite(w) and w >= 0):
                raise ValueError(f"weights[{i}]: expected a finite number >= 0, got {w}")
        self.parts = nn.ModuleList(objectives)
        self.weights = tuple(float(w) for w in weights)
        #: Batch means of the unweighted parts at the last call (diagnostics only, detached).
        self.last_terms: tuple[float, ...] | None = None

    def terms(self, model, x, x_enc, slots, *targets) -> list[torch.Tensor]:
        """The unweighted losses of the parts, each ``(batch,)``."""
        out = []
        for i, objective in enumerate(self.parts):
            loss = objective(model, x, x_enc, slots, *targets)
            if loss.shape != (x.shape[0],):
                raise ValueError(
                    f"objectives[{i}] ({type(objective).__name__}) returned shape "
                    f"{tuple(loss.shape)}, expected ({x.shape[0]},)"
                )
            out.append(loss)
        return out

    def forward(self, model, x, x_enc, slots, *targets):
        """``Σ_i w_i J_i`` per datapoint, ``(batch,)``; arguments as :class:`Objective`."""
        terms = self.terms(model, x, x_enc, slots, *targets)
        self.last_terms = tuple(t.detach().mean().item() for t in terms)
        return sum(w * t for w, t in zip(self.weights, terms))
