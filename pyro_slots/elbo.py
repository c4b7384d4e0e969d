"""Per-datapoint ELBO computed by Pyro's own machinery.

Pyro's ELBO classes return one number for the whole batch. The nested problem (Eq. 4 of the seed
paper) needs one ELBO per datapoint, ``L(x̃^n, λ^n)``, differentiable in ``λ^n`` and in the shared
weights. We run Pyro's :class:`~pyro.infer.TraceEnum_ELBO` pipeline unchanged — importance traces,
packed log-probabilities, exact marginalization of enumerated sites by tensor contraction, and
the DiCE estimator for non-reparameterized guide sites — and only change its last reduction: where
Pyro sums each cost term over every dimension, we keep the batch plate's dimension.

The sum over datapoints of :func:`per_datapoint_elbo` therefore equals
``-TraceEnum_ELBO().differentiable_loss(model.model, model.guide, x, slots)`` (tested to 1e-5).
"""

from __future__ import annotations

import math

import torch
from opt_einsum import shared_intermediates
from pyro.infer import TraceEnum_ELBO
from pyro.infer.traceenum_elbo import _compute_model_factors
from pyro.infer.util import Dice
from pyro.ops import packed
from pyro.ops.contract import contract_tensor_tree
from pyro.ops.einsum.adjoint import require_backward
from pyro.ops.rings import MarginalRing, SampleRing

from .validation import check_positive_int

__all__ = ["PerDatapointELBO", "per_datapoint_elbo"]


class _PerDatapointDice(Dice):
    """:class:`pyro.infer.util.Dice` whose expectation keeps one named dimension (the batch)."""

    def compute_expectation_per(self, costs, keep: str, size: int):
        result = None
        with shared_intermediates() as cache:
            ring = MarginalRing(cache=cache)
            for ordinal, cost_terms in costs.items():
                log_factors = self._get_log_factors(ordinal)
                scale = math.exp(sum(f for f in log_factors if not isinstance(f, torch.Tensor)))
                log_factors = [f for f in log_factors if isinstance(f, torch.Tensor)]
                # Same queries as Dice.compute_expectation: the marginal probability of the
                # guide's non-reparameterized choices each cost term depends on.
                queries = {frozenset(cost._pyro_dims): None for cost in cost_terms}
                for log_factor in log_factors:
                    key = frozenset(log_factor._pyro_dims)
                    if queries.get(key, False) is None:
                        queries[key] = log_factor
                for cost in cost_terms:
                    key = frozenset(cost._pyro_dims)
                    if queries[key] is None:
                        query = torch.zeros_like(cost)
                        query._pyro_dims = cost._pyro_dims
                        log_factors.append(query)
                        queries[key] = query
                sum_dims = set().union(*(f._pyro_dims for f in log_factors)) - ordinal
                for query in queries.values():
                    require_backward(query)
                root = ring.sumproduct(log_factors, sum_dims)
                root._pyro_backward()
                probs = {k: q._pyro_backward_result.exp() for k, q in queries.items()}
                for cost in cost_terms:
                    key = frozenset(cost._pyro_dims)
                    prob = probs[key]
                    prob._pyro_dims = queries[key]._pyro_dims
                    cost_b, prob_b = packed.broadcast_all(cost, prob)
                    term = _reduce_keep(
                        torch.where(prob_b > 0, prob_b * cost_b, torch.zeros_like(cost_b)),
                        cost_b._pyro_dims,
                        keep,
                        size,
                    )
                    term = scale * term
                    result = term if result is None else result + term
        return result


def _reduce_keep(t: torch.Tensor, dims: str, keep: str, size: int) -> torch.Tensor:
    """Sum a packed tensor over every dimension except ``keep``; returns shape ``(size,)``."""
    if keep not in dims and size == 1:
        # Packed tensors drop size-1 dimensions: a batch of one has no batch dimension.
        return t.sum().reshape(1)
    if keep not in dims:
        # A term outside the batch plate would be shared by all datapoints: not a
        # factorized per-datapoint model.
        raise ValueError(
            "per-datapoint ELBO: found a log-density term outside the batch plate (dims "
            f"{dims!r}); every sample site of a slot model must lie inside the batch plate"
        )
    pos = dims.index(keep)
    other = [i for i in range(t.dim()) if i != pos]
    out = t.sum(other) if other else t
    if out.shape != (size,):
        out = out.expand(size)
    return out


class PerDatapointELBO:
    """Per-datapoint ELBO of a :class:`~pyro_slots.SlotModel` through ``TraceEnum_ELBO``.

    :param int num_particles: Monte Carlo samples of the guide (vectorized as a plate).
    :param int max_plate_nesting: overrides ``model.max_plate_nesting``.
    """

    def __init__(self, num_particles: int = 1, max_plate_nesting: int | None = None):
        self.num_particles = check_positive_int(num_particles, "num_particles")
        self.max_plate_nesting = max_plate_nesting
        self._elbos = {}

    def _pyro_elbo(self, model) -> TraceEnum_ELBO:
        nesting = self.max_plate_nesting or model.max_plate_nesting
        if nesting not in self._elbos:
            self._elbos[nesting] = TraceEnum_ELBO(
                max_plate_nesting=nesting,
                num_particles=self.num_particles,
                vectorize_particles=self.num_particles > 1,
                strict_enumeration_warning=False,
            )
        return self._elbos[nesting]

    def __call__(self, model, x: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        """ELBO of each datapoint, shape ``(batch,)``, differentiable in slots and weights.

        :param SlotModel model: the slot model.
        :param torch.Tensor x: encoded measurements ``(batch, measurements, features)``.
        :param torch.Tensor slots: ``(batch, num_slots, slot_dim)``.
        """
        elbo = self._pyro_elbo(model)
        batch = x.shape[0]
        total = None
        for model_trace, guide_trace in elbo._get_traces(model.model, model.guide, (x, slots), {}):
            symbol = model_trace.plate_to_symbol.get(model.batch_plate)
            if symbol is None:
                raise ValueError(
                    f"{type(model).__name__}.model has no plate named {model.batch_plate!r}; "
                    "slot models must index datapoints with that plate"
                )
            value = _per_datapoint_dice_elbo(model_trace, guide_trace, symbol, batch)
            total = value if total is None else total + value
        return total / self.num_particles


def _per_datapoint_dice_elbo(model_trace, guide_trace, keep: str, size: int) -> torch.Tensor:
    # Mirrors pyro.infer.traceenum_elbo._compute_dice_elbo up to the final reduction.
    marginal_costs, log_factors, ordering, sum_dims, scale = _compute_model_factors(
        model_trace, guide_trace
    )
    if log_factors:
        dim_to_size = {}
        for terms in log_factors.values():
            for term in terms:
                dim_to_size.update(zip(term._pyro_dims, term.shape))
        with shared_intermediates() as cache:
            ring = SampleRing(cache=cache, dim_to_size=dim_to_size)
            log_factors = contract_tensor_tree(log_factors, sum_dims, ring=ring)
        for t, log_factors_t in log_factors.items():
            marginal_costs_t = marginal_costs.setdefault(t, [])
            for term in log_factors_t:
                marginal_costs_t.append(packed.scale_and_mask(term, scale=scale))
    costs = marginal_costs
    for name, site in guide_trace.nodes.items():
        if site["type"] == "sample":
            costs.setdefault(ordering[name], []).append(packed.neg(site["packed"]["log_prob"]))
    return _PerDatapointDice(guide_trace, ordering).compute_expectation_per(costs, keep, size)


_DEFAULT = PerDatapointELBO()


def per_datapoint_elbo(model, x, slots, num_particles: int = 1) -> torch.Tensor:
    """Functional form of :class:`PerDatapointELBO`: ELBO of every datapoint, ``(batch,)``."""
    estimator = _DEFAULT if num_particles == 1 else PerDatapointELBO(num_particles)
    return estimator(model, x, slots)
