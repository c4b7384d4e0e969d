"""Gradient ascent on the per-datapoint ELBO (Eq. 2 of the seed paper)."""

from __future__ import annotations

import torch

from ..validation import check_bool, check_positive_float
from .base import InnerProblem, InnerRule, InnerState, StepInfo

__all__ = ["GradientAscent", "trust_region"]


def trust_region(update: torch.Tensor, radius: float | None) -> torch.Tensor:
    r"""Soft trust region: ``u / sqrt(1 + (‖u‖ / radius)²)`` with ``‖·‖`` over each slot.

    A step ``u`` much shorter than ``radius`` is left as it is (to first order); a longer one is
    shortened to length ``radius`` in the same direction. Unlike clipping, the map is smooth
    (its derivative is finite everywhere), so an unrolled or implicit outer gradient through it
    is well defined, and it is computed out of place. Near a fixed point (``u → 0``) it is the
    identity to second order: the fixed points and their stability are those of the plain step.

    :param torch.Tensor update: ``(batch, num_slots, slot_dim)``.
    :param float radius: > 0, or ``None`` for no trust region (returns ``update``).
    :returns: a tensor of the shape of ``update``, each slot's row of norm ``< radius``.
    """
    if radius is None:
        return update
    norm2 = update.pow(2).sum(-1, keepdim=True)
    return update * torch.rsqrt(1.0 + norm2 / (radius * radius))


class GradientAscent(InnerRule):
    r"""``λ_{t+1} = λ_t + α · u_t`` per datapoint, with plain or Adam-style steps.

    ``g_t = ∇_λ L(x̃^n, λ^n_t)``, divided by the number of measurements when
    ``per_measurement=True`` so that one step size suits sets of any size. A plain step is
    ``u_t = trust_region(g_t, trust_radius)`` (:func:`trust_region`): the gradient itself
    where it is shorter than ``trust_radius`` per slot, shortened to that length where it is
    longer. So a slot moves by at most ``step_size * trust_radius`` per step whatever the
    curvature: tight clusters, whose gradient in ``log_scale`` grows like ``1/σ²``, no longer
    send the slots to infinity in one step (they did with the plain gradient at any step size
    from 0.1 on well-separated 2-D clusters of width 0.05). With ``adam=True``
    every datapoint keeps its own first and second moments (Kingma & Ba 2015, bias-corrected),
    carried in the state, never in module buffers, and updated out of place so the loop can be
    unrolled.

    :param int num_steps: default number of steps.
    :param float step_size: α > 0.
    :param bool adam: per-datapoint Adam instead of plain steps.
    :param tuple betas: Adam's moment decay rates in [0, 1).
    :param float eps: Adam's denominator offset > 0.
    :param bool per_measurement: scale the gradient by 1 / measurements.
    :param float trust_radius: largest length of a plain step's direction per slot (> 0), or
        ``None`` for the raw gradient (steps then diverge where the curvature exceeds
        ``2 / step_size``). Not applied to Adam, whose steps are normalized already.

    Example::

        result = refine(gmm, x, GradientAscent(100), seed=0)  # finite at the defaults
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
        trust_radius: float | None = 1.0,
    ):
        super().__init__(num_steps)
        self.step_size = check_positive_float(step_size, "step_size")
        self.adam = check_bool(adam, "adam")
        if len(betas) != 2 or not all(0 <= b < 1 for b in betas):
            raise ValueError(f"betas: expected two numbers in [0, 1), got {betas}")
        self.betas = tuple(float(b) for b in betas)
        self.eps = check_positive_float(eps, "eps")
        self.per_measurement = check_bool(per_measurement, "per_measurement")
        self.trust_radius = (
            None if trust_radius is None else check_positive_float(trust_radius, "trust_radius")
        )

    def divergence_hint(self) -> str:
        return (
            f"GradientAscent(step_size={self.step_size:g}, adam={self.adam}, "
            f"trust_radius={self.trust_radius}) diverged: lower step_size (e.g. "
            f"{self.step_size / 10:g}) or wrap it in pyro_slots.inner.Safeguarded(rule, "
            "fallback=...)"
        )

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
            update = trust_region(grad, self.trust_radius)
        slots = state.slots + self.step_size * update
        return InnerState(slots=slots, step=state.step + 1, aux=aux), StepInfo(elbo=elbo.detach())

    def extra_repr(self):
        return (
            f"num_steps={self.num_steps}, step_size={self.step_size}, adam={self.adam}, "
            f"per_measurement={self.per_measurement}, trust_radius={self.trust_radius}"
        )
