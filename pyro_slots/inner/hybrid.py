"""A learned rule followed by a fixed one: amortized start, classical test-time refinement."""

from __future__ import annotations

import torch

from ..validation import check_positive_int
from .base import InnerProblem, InnerRule, InnerState

__all__ = ["Hybrid"]


class Hybrid(InnerRule):
    """``num_learned_steps`` steps of ``learned``, then steps of ``fixed`` until the end.

    E.g. ``Hybrid(SlotAttention(num_steps=3, ...), EM(), num_fixed_steps=1)``: three learned
    steps, then one EM step. ``num_steps`` defaults to the sum; with another ``num_steps`` (e.g.
    in :func:`~pyro_slots.refine`) the learned part still takes ``num_learned_steps`` steps and
    the fixed part takes the rest, so test-time compute goes to the fixed rule, whose steps never
    lower the ELBO when it is EM.

    The state's ``aux`` is the learned rule's during the learned steps and the fixed rule's after
    them: at step ``num_learned_steps`` the fixed rule is initialized from the current slots
    (``fixed.init``) and the learned rule's hidden state is dropped. The fixed rule sees its own
    step count (``state.step - num_learned_steps``), e.g. for Adam's bias correction.

    Only the learned rule has weights, so ``parameters()`` are the learned rule's; its
    ``slot_init`` (if any) initializes the hybrid. Under ``gradient="implicit"`` or
    ``"first_order"`` training, only the last step is differentiated: when that step is a fixed
    one the learned weights receive no gradient — train the learned rule alone and wrap it for
    evaluation.

    :param InnerRule learned: the rule that runs first (usually learned).
    :param InnerRule fixed: the rule that runs after it (usually fixed, e.g. EM).
    :param int num_fixed_steps: default number of steps of ``fixed`` (>= 0).
    :param int num_learned_steps: steps of ``learned`` (default ``learned.num_steps``).
    """

    def __init__(
        self,
        learned: InnerRule,
        fixed: InnerRule,
        num_fixed_steps: int = 1,
        num_learned_steps: int | None = None,
    ):
        for name, rule in (("learned", learned), ("fixed", fixed)):
            if not isinstance(rule, InnerRule):
                raise TypeError(f"{name}: expected an InnerRule, got {type(rule).__name__}")
        num_learned = learned.num_steps if num_learned_steps is None else num_learned_steps
        num_learned = check_positive_int(num_learned, "num_learned_steps")
        num_fixed = check_positive_int(num_fixed_steps, "num_fixed_steps", minimum=0)
        super().__init__(num_learned + num_fixed)
        self.learned = learned
        self.fixed = fixed
        self.num_learned_steps = num_learned
        self.uses_elbo_gradient = learned.uses_elbo_gradient or fixed.uses_elbo_gradient
        self.implicit_differentiable = (
            learned.implicit_differentiable and fixed.implicit_differentiable
        )

    @property
    def slot_init(self):
        return getattr(self.learned, "slot_init", None)

    def check_model(self, model):
        self.learned.check_model(model)
        self.fixed.check_model(model)

    def init(self, problem: InnerProblem, slots: torch.Tensor) -> InnerState:
        return self.learned.init(problem, slots)

    def step(self, state: InnerState, problem: InnerProblem, create_graph: bool = False):
        if state.step < self.num_learned_steps:
            return self.learned.step(state, problem, create_graph=create_graph)
        offset = self.num_learned_steps
        if state.step == offset:
            # Hand over: the fixed rule starts from the current slots with its own aux.
            sub = self.fixed.init(problem, state.slots)
        else:
            sub = InnerState(state.slots, state.step - offset, state.aux)
        new, info = self.fixed.step(sub, problem, create_graph=create_graph)
        return InnerState(new.slots, new.step + offset, new.aux), info

    def extra_repr(self):
        return f"num_steps={self.num_steps}, num_learned_steps={self.num_learned_steps}"
