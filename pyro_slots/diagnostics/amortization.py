"""The amortization gap of an inner rule (Cremer, Li & Duvenaud 2018).

Cremer et al. split the gap between the log evidence and the ELBO of an amortized posterior into
the *approximation gap* (the best member of the variational family is not the posterior) and the
*amortization gap* ``L(λ*) - L(λ_rule)``: how much ELBO the rule leaves on the table compared with
optimizing each datapoint's λ on its own. Here ``λ_rule`` is what a (learned or truncated) inner
rule returns and ``λ*`` what a fixed rule finds when it keeps refining from ``λ_rule`` to
convergence, so the gap is a lower bound on the true amortization gap (the refiner may stop at a
local optimum) and is ``0`` for a rule that is already at a fixed point of the refiner.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..elbo import PerDatapointELBO
from ..inner import EM, GradientAscent
from ..inner.base import InnerRule
from ..refine import refine
from ..validation import CapabilityError, check_positive_float, check_positive_int

__all__ = ["AmortizationGap", "amortization_gap", "default_refiner", "refinement_gap"]


@dataclass
class AmortizationGap:
    """What :func:`amortization_gap` returns; tensors are ``(batch,)``.

    :ivar elbo_rule: ELBO at the rule's slots ``L(λ_rule)``.
    :ivar elbo_refined: ELBO after refining ``L(λ*)``.
    :ivar gap: ``elbo_refined - elbo_rule``; negative entries mean the refiner lowered the ELBO
        (a non-monotone refiner, e.g. gradient ascent with too large a step).
    :ivar converged: whether the refiner's last step met its tolerance for that datapoint.
    :ivar slots_rule: ``(batch, num_slots, slot_dim)`` the rule's slots.
    :ivar slots_refined: ``(batch, num_slots, slot_dim)`` the refined slots.
    :ivar refine_steps: steps the refiner ran.
    """

    elbo_rule: torch.Tensor
    elbo_refined: torch.Tensor
    gap: torch.Tensor
    converged: torch.Tensor
    slots_rule: torch.Tensor
    slots_refined: torch.Tensor
    refine_steps: int

    def summary(self) -> dict[str, float]:
        """Mean, median, min and max gap, and the fraction of converged datapoints."""
        gap = self.gap.double()
        return {
            "gap_mean": gap.mean().item(),
            "gap_median": gap.quantile(0.5).item(),  # (torch.median: the lower middle)
            "gap_min": gap.min().item(),
            "gap_max": gap.max().item(),
            "fraction_converged": self.converged.double().mean().item(),
        }


def default_refiner(model, num_steps: int = 500) -> InnerRule:
    """EM where the model has a closed-form M-step, else per-datapoint Adam gradient ascent."""
    em = EM(num_steps)
    try:
        em.check_model(model)
    except CapabilityError:
        return GradientAscent(num_steps, step_size=0.01, adam=True)
    return em


def refinement_gap(
    model,
    x: torch.Tensor,
    slots: torch.Tensor,
    refiner: InnerRule | None = None,
    *,
    refine_steps: int = 500,
    tol: float | None = None,
    elbo_tol: float | None = None,
) -> AmortizationGap:
    """ELBO at ``slots`` versus after refining them with ``refiner`` until convergence.

    The second half of :func:`amortization_gap`, for slots computed elsewhere (e.g. the best
    restart of a refine result). The refiner stops once every datapoint has converged: its
    residual ``‖λ_{t+1} - λ_t‖`` is below ``tol`` or its ELBO changed by less than ``elbo_tol``
    per measurement in the last step (scikit-learn's criterion for EM). Without either,
    ``elbo_tol`` is ``1000 · eps`` of the data's dtype: a residual tolerance would never be met in
    float32, where the residual of EM stalls at the rounding level.

    :param SlotModel model: the model.
    :param torch.Tensor x: datapoints, as for :func:`~pyro_slots.refine`.
    :param torch.Tensor slots: ``(batch, num_slots, slot_dim)``, the rule's output.
    :param InnerRule refiner: a fixed rule; :func:`default_refiner` if ``None``.
    :param int refine_steps: maximum steps of the refiner.
    :param float tol: residual tolerance.
    :param float elbo_tol: ELBO-change tolerance per measurement.
    :returns: an :class:`AmortizationGap`.
    """
    refine_steps = check_positive_int(refine_steps, "refine_steps")
    if tol is not None:
        tol = check_positive_float(tol, "tol")
    if elbo_tol is not None:
        elbo_tol = check_positive_float(elbo_tol, "elbo_tol")
    if tol is None and elbo_tol is None:
        elbo_tol = 1000 * torch.finfo(slots.dtype).eps
    if refiner is None:
        refiner = default_refiner(model, refine_steps)
    if not isinstance(refiner, InnerRule):
        raise TypeError(f"refiner: expected an InnerRule, got {type(refiner).__name__}")
    slots = slots.detach()
    with torch.no_grad():
        x_enc = model.encode(x)
        elbo_rule = PerDatapointELBO()(model, x_enc, slots)
    refined = refine(
        model, x, refiner, slots=slots, num_steps=refine_steps, tol=tol, elbo_tol=elbo_tol
    ).select(0)
    elbo_refined = refined.elbo[0]
    converged = torch.zeros_like(elbo_refined, dtype=torch.bool)
    if refined.residuals.shape[0]:
        if tol is not None:
            converged |= refined.residuals[-1, 0] < tol
        if elbo_tol is not None:
            change = (refined.history[-1, 0] - refined.history[-2, 0]).abs() / x_enc.shape[1]
            converged |= change < elbo_tol
    return AmortizationGap(
        elbo_rule=elbo_rule,
        elbo_refined=elbo_refined,
        gap=elbo_refined - elbo_rule,
        converged=converged,
        slots_rule=slots,
        slots_refined=refined.slots[0],
        refine_steps=refined.num_steps,
    )


def amortization_gap(
    model,
    x: torch.Tensor,
    rule: InnerRule,
    refiner: InnerRule | None = None,
    *,
    num_steps: int | None = None,
    refine_steps: int = 500,
    tol: float | None = None,
    elbo_tol: float | None = None,
    num_slots: int | None = None,
    slots: torch.Tensor | None = None,
    seed: int | None = None,
) -> AmortizationGap:
    """ELBO after ``rule`` versus after refining its slots further with ``refiner``.

    Example::

        gap = amortization_gap(gmm, x, trained_slot_attention, EM(), seed=0)
        gap.gap, gap.summary()

    :param SlotModel model: the model.
    :param torch.Tensor x: datapoints, as for :func:`~pyro_slots.refine`.
    :param InnerRule rule: the rule under test (learned, or a fixed rule with few steps).
    :param InnerRule refiner: a fixed rule run to convergence; :func:`default_refiner` if
        ``None`` (EM where available).
    :param int num_steps: steps of ``rule`` (default ``rule.num_steps``).
    :param int refine_steps: maximum steps of the refiner.
    :param float tol: residual tolerance of the refiner (see :func:`refinement_gap`).
    :param float elbo_tol: ELBO-change tolerance per measurement of the refiner.
    :param int num_slots: K (default ``model.num_slots``).
    :param torch.Tensor slots: explicit λ_0 for ``rule``, ``(batch, num_slots, slot_dim)``.
    :param int seed: seed of the rule's slot initialization.
    :returns: an :class:`AmortizationGap`.
    """
    if not isinstance(rule, InnerRule):
        raise TypeError(f"rule: expected an InnerRule, got {type(rule).__name__}")
    first = refine(model, x, rule, num_slots=num_slots, num_steps=num_steps, slots=slots, seed=seed)
    return refinement_gap(
        model, x, first.slots[0], refiner, refine_steps=refine_steps, tol=tol, elbo_tol=elbo_tol
    )
