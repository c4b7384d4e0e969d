"""Pyro's :class:`~pyro.infer.TraceEnum_ELBO` pipeline with a per-datapoint final reduction.

Importance traces, packed log-probabilities, exact marginalization of enumerated sites by tensor
contraction, and the DiCE estimator for non-reparameterized guide sites run unchanged; only the
last reduction differs: where Pyro sums each cost term over every dimension, the batch plate's
dimension is kept. The sum over datapoints therefore equals
``-TraceEnum_ELBO().differentiable_loss(model.model, model.guide, x, slots)``.
"""

from __future__ import annotations

import math

import torch
from opt_einsum import shared_intermediates
from pyro.infer import TraceEnum_ELBO
from pyro.infer.util import Dice
from pyro.ops import packed
from pyro.ops.contract import contract_tensor_tree
from pyro.ops.rings import MarginalRing, SampleRing
from pyro.poutine.util import site_is_subsample

from .. import _pyro_compat as compat
from .base import ELBOEstimator

__all__ = ["TraceEnumEstimator", "marginal_model_costs"]


class TraceEnumEstimator(ELBOEstimator):
    """Per-datapoint ELBO by Pyro's ``TraceEnum_ELBO`` pipeline: handles everything
    ``TraceEnum_ELBO`` handles (enumeration in any plates, DiCE for non-reparameterized guides).

    The ``TraceEnum_ELBO`` objects (one per plate nesting) are attributes of the estimator.

    :param int num_particles: Monte Carlo samples of the guide (vectorized as a plate).
    :param int max_plate_nesting: overrides ``model.max_plate_nesting``.
    """

    def __init__(self, num_particles: int = 1, max_plate_nesting: int | None = None):
        super().__init__(num_particles, max_plate_nesting)
        self._pyro_elbos: dict[int, TraceEnum_ELBO] = {}

    def pyro_elbo(self, model) -> TraceEnum_ELBO:
        """The :class:`~pyro.infer.TraceEnum_ELBO` this estimator runs for ``model``."""
        nesting = self.nesting(model)
        if nesting not in self._pyro_elbos:
            self._pyro_elbos[nesting] = TraceEnum_ELBO(
                max_plate_nesting=nesting,
                num_particles=self.num_particles,
                vectorize_particles=self.num_particles > 1,
                strict_enumeration_warning=False,
            )
        return self._pyro_elbos[nesting]

    def __call__(self, model, x: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        elbo = self.pyro_elbo(model)
        batch = x.shape[0]
        total = None
        for model_trace, guide_trace in compat.get_traces(
            elbo, model.model, model.guide, (x, slots), {}
        ):
            symbol = compat.plate_symbols(model_trace).get(model.batch_plate)
            if symbol is None:
                raise ValueError(
                    f"{type(model).__name__}.model has no plate named {model.batch_plate!r}; "
                    "slot models must index datapoints with that plate"
                )
            _check_sites_in_plate(model_trace, guide_trace, model.batch_plate)
            value = _per_datapoint_dice_elbo(model_trace, guide_trace, symbol, batch)
            total = value if total is None else total + value
        return total / self.num_particles

    def elbo_and_posterior(
        self, model, x: torch.Tensor, slots: torch.Tensor, site: str, probs: bool = False
    ):
        elbo = self(model, x, slots)
        log_post = self.log_posterior(model, x, slots, site)
        return elbo, (log_post.exp() if probs else log_post)

    def log_posterior(self, model, x: torch.Tensor, slots: torch.Tensor, site: str):
        """``log p(site | x, λ)`` from ``TraceEnum_ELBO.compute_marginals``, the enumeration
        dimension first.

        Pyro's ``compute_marginals`` fails where a plate or the enumeration has size one (a
        batch of one datapoint, one slot, one measurement: packed tensors drop such dims); there
        the posterior is the lean estimator's (exact for the programs it supports), else a
        ``ValueError`` says so."""
        try:
            marginal = self.pyro_elbo(model).compute_marginals(model.model, model.guide, x, slots)
        except (KeyError, AssertionError) as error:
            if min(x.shape[0], x.shape[1] if x.dim() > 1 else 2, slots.shape[1]) != 1:
                raise
            from .lean import LeanEstimator, LeanFallback

            try:
                lean = LeanEstimator(self.num_particles, self.max_plate_nesting)
                log_post = lean.estimate(model, x, slots).log_posterior(site)
            except LeanFallback:
                log_post = None
            if log_post is None:
                raise ValueError(
                    f"site: Pyro's compute_marginals fails for {type(model).__name__} where a "
                    f"plate or the enumeration has size one (x {tuple(x.shape)}, slots "
                    f"{tuple(slots.shape)}), and the lean estimator does not give {site!r}'s "
                    "posterior for this program"
                ) from error
            return log_post
        if site not in marginal:
            raise ValueError(
                f"site: {site!r} is not an enumerated site of {type(model).__name__}.model "
                f"(enumerated: {sorted(marginal)})"
            )
        logits = marginal[site].logits  # (..., num_values): move the value axis first
        return torch.log_softmax(logits, -1).movedim(-1, 0)


class _PerDatapointDice(Dice):
    """:class:`pyro.infer.util.Dice` whose expectation keeps one named dimension (the batch)."""

    def compute_expectation_per(self, costs, keep: str, size: int):
        result = None
        with shared_intermediates() as cache:
            ring = MarginalRing(cache=cache)
            for ordinal, cost_terms in costs.items():
                log_factors = compat.dice_log_factors(self, ordinal)
                scale = math.exp(sum(f for f in log_factors if not isinstance(f, torch.Tensor)))
                log_factors = [f for f in log_factors if isinstance(f, torch.Tensor)]
                # Same queries as Dice.compute_expectation: the marginal probability of the
                # guide's non-reparameterized choices each cost term depends on.
                queries = {frozenset(compat.pyro_dims(cost)): None for cost in cost_terms}
                for log_factor in log_factors:
                    key = frozenset(compat.pyro_dims(log_factor))
                    if queries.get(key, False) is None:
                        queries[key] = log_factor
                for cost in cost_terms:
                    key = frozenset(compat.pyro_dims(cost))
                    if queries[key] is None:
                        query = compat.set_pyro_dims(torch.zeros_like(cost), compat.pyro_dims(cost))
                        log_factors.append(query)
                        queries[key] = query
                sum_dims = set().union(*(compat.pyro_dims(f) for f in log_factors)) - ordinal
                for query in queries.values():
                    compat.require_marginal(query)
                root = ring.sumproduct(log_factors, sum_dims)
                marginals = compat.backward_marginals(root, queries)
                probs = {k: m.exp() for k, m in marginals.items()}
                for cost in cost_terms:
                    key = frozenset(compat.pyro_dims(cost))
                    prob = compat.set_pyro_dims(probs[key], compat.pyro_dims(queries[key]))
                    cost_b, prob_b = packed.broadcast_all(cost, prob)
                    term = _reduce_keep(
                        torch.where(prob_b > 0, prob_b * cost_b, torch.zeros_like(cost_b)),
                        compat.pyro_dims(cost_b),
                        keep,
                        size,
                    )
                    term = scale * term
                    result = term if result is None else result + term
        return result


def _check_sites_in_plate(model_trace, guide_trace, batch_plate: str) -> None:
    """Every sample site of the model and the guide lies inside the batch plate (decided from
    the traces: the packed tensors of a batch of one have no batch dimension to tell)."""
    for trace in (model_trace, guide_trace):
        for name, site in trace.nodes.items():
            if site["type"] != "sample" or site_is_subsample(site):
                continue
            if not any(f.name == batch_plate for f in site["cond_indep_stack"]):
                raise ValueError(
                    f"per-datapoint ELBO: site {name!r} lies outside the batch plate "
                    f"{batch_plate!r}; every sample site of a slot model must lie inside the "
                    "batch plate"
                )


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


def marginal_model_costs(model_trace, guide_trace):
    """Packed model log-density terms with the model's enumerated sites summed out.

    The first half of ``pyro.infer.traceenum_elbo._compute_dice_elbo``: Pyro's exact
    marginalization by tensor contraction.

    :returns: ``(costs, ordering)``, ``costs`` mapping a plate ordinal to its list of packed
        terms, ``ordering`` mapping a site name to its ordinal.
    """
    marginal_costs, log_factors, ordering, sum_dims, scale = compat.compute_model_factors(
        model_trace, guide_trace
    )
    if log_factors:
        dim_to_size = {}
        for terms in log_factors.values():
            for term in terms:
                dim_to_size.update(zip(compat.pyro_dims(term), term.shape))
        with shared_intermediates() as cache:
            ring = SampleRing(cache=cache, dim_to_size=dim_to_size)
            log_factors = contract_tensor_tree(log_factors, sum_dims, ring=ring)
        for t, log_factors_t in log_factors.items():
            marginal_costs_t = marginal_costs.setdefault(t, [])
            for term in log_factors_t:
                marginal_costs_t.append(packed.scale_and_mask(term, scale=scale))
    return marginal_costs, ordering


def _per_datapoint_dice_elbo(model_trace, guide_trace, keep: str, size: int) -> torch.Tensor:
    # Mirrors pyro.infer.traceenum_elbo._compute_dice_elbo up to the final reduction.
    costs, ordering = marginal_model_costs(model_trace, guide_trace)
    for name, site in guide_trace.nodes.items():
        if site["type"] == "sample":
            costs.setdefault(ordering[name], []).append(packed.neg(compat.packed_log_prob(site)))
    return _PerDatapointDice(guide_trace, ordering).compute_expectation_per(costs, keep, size)
