"""Gradient ascent on the per-datapoint ELBO (Eq. 2 of the seed paper)."""

from __future__ import annotations

import torch

from ..validation import check_positive_float
from .base import InnerProblem, InnerRule, InnerState, StepInfo

__all__ = ["GradientAscent"]


class GradientAscent(InnerRule):
    r"""``λ_{t+1} = λ_t + α · g_t`` per datapoint, with plain or Adam-style steps.

    ``g_t = ∇_λ L(x̃^n, λ^n_t)``, divided by the number of measurements when
    ``per_measurement=True`` so that one step size suits sets of any size. With ``adam=True``
    every datapoint keeps its own first and second moments (Kingma & Ba 2015, bias-corrected),
    carried in the state, never in module buffers, and updated out of place so the loop can be
    unrolled.

    :param int num_steps: default number of steps.
    :param float step_size: α > 0.
    :param bool adam: per-datapoint Adam instead of plain steps.
    :param tuple betas: Adam's moment decay rates in [0, 1).
    :param float eps: Adam's denominator offset > 0.
    :param bool per_measurement: scale the gradient by 1 / measurements.
    """

    uses_elbo_gradient = True

    def __init__(
        self,
        num_steps: int = 100,
        step_size: float = 0.1,
        adam: bool = False,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        per_measurement: bool = True,
    ):
        super().__init__(num_steps)
        self.step_size = check_positive_float(step_size, "step_size")
        self.adam = bool(adam)
        if len(betas) != 2 or not all(0 <= b < 1 for b in betas):
            raise ValueError(f"betas: expected two numbers in [0, 1), got {betas}")
        self.betas = tuple(float(b) for b in betas)
        self.eps = check_positive_float(eps, "eps")
        self.per_measurement = bool(per_measurement)

    def init(self, problem, slots):
        aux = (torch.zeros_like(slots), torch.zeros_like(slots)) if self.adam else ()
        return InnerState(slots=slots, step=0, aux=aux)

    def step(self, state: InnerState, problem: InnerProblem, create_graph: bool = False):
        elbo, grad = problem.elbo_and_grad(state.slots, create_graph=create_graph)
        if self.per_measurement:
            grad = grad / problem.x.shape[1]
        aux = state.aux
        if self.adam:
            b1, b2 = self.betas
            t = state.step + 1
            m = b1 * aux[0] + (1 - b1) * grad
            v = b2 * aux[1] + (1 - b2) * grad * grad
            m_hat = m / (1 - b1**t)
            v_hat = v / (1 - b2**t)
            # sqrt(v + eps^2) rather than sqrt(v) + eps: finite second derivative at v = 0,
            # which unrolled gradients need.
            update = m_hat / (v_hat + self.eps**2).sqrt()
            aux = (m, v)
        else:
            update = grad
        slots = state.slots + self.step_size * update
        return InnerState(slots=slots, step=state.step + 1, aux=aux), StepInfo(elbo=elbo.detach())

    def extra_repr(self):
        return (
            f"num_steps={self.num_steps}, step_size={self.step_size}, adam={self.adam}, "
            f"per_measurement={self.per_measurement}"
        )
