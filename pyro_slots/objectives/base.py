"""The task objective J of the outer loop (Eq. 4-5 of the seed paper).

An objective never runs the inner loop: :class:`~pyro_slots.NestedSVI` hands it the slots the
inner rule produced, and it returns the loss to minimize over the shared weights ``w``.
"""

from __future__ import annotations

import torch
from pyro.nn import PyroModule

__all__ = ["Objective"]


class Objective(PyroModule):
    """Base class of task objectives ``J(x, w, λ)``.

    Subclasses implement :meth:`forward` and may own trainable heads (their parameters are
    optimized by :class:`~pyro_slots.NestedSVI` together with the model and the inner rule).
    """

    def forward(
        self,
        model,
        x: torch.Tensor,
        x_enc: torch.Tensor,
        slots: torch.Tensor,
        *targets,
    ) -> torch.Tensor:
        """Loss of every datapoint, shape ``(batch,)``.

        :param SlotModel model: the slot model (decoder, likelihood).
        :param torch.Tensor x: the raw datapoints as given to ``NestedSVI.step``.
        :param torch.Tensor x_enc: encoded measurements ``(batch, M, features)``.
        :param torch.Tensor slots: slots ``(batch, num_slots, slot_dim)``.
        :param targets: task targets as given to ``NestedSVI.step(x, *targets)``.
        """
        raise TypeError(f"{type(self).__name__} must define forward()")
