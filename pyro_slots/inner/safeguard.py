"""A safeguarded rule: keep a learned step only where it does not lower the ELBO."""

from __future__ import annotations

import torch

from .base import InnerProblem, InnerRule, InnerState, StepInfo

__all__ = ["Safeguarded"]


class Safeguarded(InnerRule):
    """Accept ``rule``'s step per datapoint when it does not lower the ELBO, else fall back.

    Every step proposes ``λ' = rule(λ_t)`` and evaluates ``L(λ')``; a datapoint keeps ``λ'`` when
    ``L(λ') >= L(λ_t)``, otherwise it takes the ``fallback`` rule's step from ``λ_t`` (e.g.
    :class:`~pyro_slots.inner.EM`, which never lowers the ELBO) where that step does not lower
    the ELBO either, and stays at ``λ_t`` elsewhere (always, with ``fallback=None``). The
    per-datapoint ELBO is therefore non-decreasing in the number of steps whatever the
    proposing rule does -- a learned rule run for more steps than it was trained
    for, an untrained one, a rule with an unstable fixed point (the safeguarded learned
    optimizers of Heaton et al. 2023, with the ELBO as the merit function). A rejected datapoint
    also keeps the proposing rule's recurrent state (``aux``) of ``λ_t``. The guarantee is on the
    ELBO as computed in the step's batch: :func:`~pyro_slots.refine`'s per-datapoint early
    stopping re-evaluates it on sub-batches, which in float32 can differ by rounding (~1e-7
    relative).

    Cost per step: one ELBO evaluation of the proposal (the ELBO at ``λ_t`` is carried over from
    the previous step), plus the fallback step and its ELBO when there is a fallback. The
    decision is not differentiated: gradients flow through the branch each datapoint took.

    Example::

        rule = Safeguarded(SlotAttention(num_steps=3, ...), fallback=EM(1))
        refine(gmm, x, rule, num_steps=20)  # history[t] never decreases

    :param InnerRule rule: the proposing rule (its weights are this rule's weights).
    :param InnerRule fallback: a rule without recurrent state (``aux == ()``) for rejected
        datapoints, or ``None`` to stay put.
    :param int num_steps: default ``T`` (default ``rule.num_steps``).
    """

    def __init__(self, rule: InnerRule, fallback: InnerRule | None = None, num_steps=None):
        if not isinstance(rule, InnerRule):
            raise TypeError(f"rule: expected an InnerRule, got {type(rule).__name__}")
        if fallback is not None and not isinstance(fallback, InnerRule):
            raise TypeError(
                f"fallback: expected an InnerRule or None, got {type(fallback).__name__}"
            )
        super().__init__(rule.num_steps if num_steps is None else num_steps)
        self.rule = rule
        self.fallback = fallback
        self.uses_elbo_gradient = rule.uses_elbo_gradient or bool(
            fallback is not None and fallback.uses_elbo_gradient
        )
        self.implicit_differentiable = False  # a rejected step is the identity

    @property
    def slot_init(self):
        return getattr(self.rule, "slot_init", None)

    def check_model(self, model):
        self.rule.check_model(model)
        if self.fallback is not None:
            self.fallback.check_model(model)

    def init(self, problem: InnerProblem, slots: torch.Tensor) -> InnerState:
        if self.fallback is not None and self.fallback.init(problem, slots).aux != ():
            raise ValueError(
                f"fallback: expected a rule without recurrent state (aux), got "
                f"{type(self.fallback).__name__} with one; e.g. EM() or GradientAscent(adam=False)"
            )
        # From the rule's own λ_0 (a rule's init may project it, as SoftKMeans onto its family).
        inner = self.rule.init(problem, slots)
        # The ELBO of λ_t rides in aux with the slots' leading (batch, K) dims (all K equal), so
        # freezing and restarts index and permute it like any recurrent state.
        elbo = _merit(problem, inner.slots)
        return InnerState(inner.slots, inner.step, (*inner.aux, _per_slot(elbo, inner.slots)))

    def step(self, state: InnerState, problem: InnerProblem, create_graph: bool = False):
        *inner_aux, merit = state.aux
        current = merit[:, 0]
        proposal, info = self.rule.step(
            InnerState(state.slots, state.step, tuple(inner_aux)), problem, create_graph
        )
        proposed = _merit(problem, proposal.slots)
        accept = proposed >= current  # NaN proposals are rejected
        other_slots, other_elbo = state.slots, current
        if self.fallback is not None:
            other, _ = self.fallback.step(
                InnerState(state.slots, state.step), problem, create_graph
            )
            fallback_elbo = _merit(problem, other.slots)
            # EM never lowers the ELBO in exact arithmetic; in floating point, at convergence,
            # it may by a rounding error: then stay put, so the guarantee holds as computed.
            keep = fallback_elbo >= current
            other_slots = torch.where(keep.view(-1, 1, 1), other.slots, state.slots)
            other_elbo = torch.where(keep, fallback_elbo, current)
        slots = torch.where(accept.view(-1, 1, 1), proposal.slots, other_slots)
        elbo = torch.where(accept, proposed, other_elbo)
        if len(proposal.aux) == len(inner_aux) and all(
            a.shape == b.shape for a, b in zip(proposal.aux, inner_aux)
        ):
            aux = tuple(
                torch.where(accept.view(-1, *([1] * (new.dim() - 1))), new, old)
                for new, old in zip(proposal.aux, inner_aux)
            )
        else:  # the proposing rule changed its state's layout (e.g. a Hybrid's hand-over)
            aux = proposal.aux
        new_state = InnerState(slots, proposal.step, (*aux, _per_slot(elbo, slots)))
        # A rejected proposal keeps the rule's state: it proposes the same again, no retry.
        retry = None if info.retry is None else info.retry & accept
        return new_state, StepInfo(current, info.responsibilities, retry)

    def extra_repr(self):
        fallback = type(self.fallback).__name__ if self.fallback is not None else None
        return f"num_steps={self.num_steps}, fallback={fallback}"


def _merit(problem: InnerProblem, slots: torch.Tensor) -> torch.Tensor:
    """The per-datapoint ELBO that decides acceptance (no graph: the decision is discrete)."""
    with torch.no_grad():
        return problem.elbo(slots.detach())


def _per_slot(elbo: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    return elbo.unsqueeze(1).expand(slots.shape[:2]).clone()
