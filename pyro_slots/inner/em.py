"""Closed-form coordinate ascent on the ELBO: EM and soft k-means."""

from __future__ import annotations

from ..validation import CapabilityError, check_positive_float
from .base import InnerProblem, InnerRule, InnerState, StepInfo

__all__ = ["EM", "SoftKMeans"]


def _require(model, method: str, rule: str):
    if not callable(getattr(model, method, None)):
        raise CapabilityError(
            f"{rule} needs a model with a closed-form {method}(); {type(model).__name__} has none. "
            "Use GradientAscent or a learned rule instead."
        )


class EM(InnerRule):
    """Expectation-maximization (Dempster et al. 1977) per datapoint, vectorized over the batch.

    The E-step sets ``q(z)`` to the exact posterior under ``λ_t``; the M-step maximizes the
    expected complete log-likelihood in closed form. Both are coordinate ascent on the ELBO, so
    the ELBO never decreases (Neal & Hinton 1998). The E-step is the posterior of the model's
    enumerated ``assignment_site``, computed from the Pyro program in the same pass as the
    ELBO; the model provides the M-step, ``m_step(x, responsibilities, slots)``; see
    :class:`pyro_slots.models.GaussianMixture`.

    :param int num_steps: default number of EM iterations.
    """

    def check_model(self, model):
        _require(model, "m_step", "EM")
        if getattr(model, "assignment_site", None) is None:
            raise CapabilityError(
                f"EM needs a model with an enumerated assignment_site; {type(model).__name__} "
                "declares none"
            )

    def step(self, state: InnerState, problem: InnerProblem, create_graph: bool = False):
        elbo, resp = problem.elbo_and_responsibilities(state.slots)
        slots = problem.model.m_step(problem.x, resp, state.slots)
        return InnerState(slots, state.step + 1, state.aux), StepInfo(elbo.detach(), resp.detach())


class SoftKMeans(InnerRule):
    """Soft k-means with a temperature (Bottou & Bengio 1995).

    EM for an isotropic mixture with uniform weights whose variance is the temperature: the
    initial slots are projected onto that family (``model.isotropic``) and only the means move.
    It is EM on a restricted family, so it improves that model's ELBO monotonically — the ELBO
    recorded in the history is exactly it.

    :param int num_steps: default number of iterations.
    :param float temperature: variance of every component, > 0.
    """

    def __init__(self, num_steps: int = 10, temperature: float = 1.0):
        super().__init__(num_steps)
        self.temperature = check_positive_float(temperature, "temperature")

    def check_model(self, model):
        _require(model, "m_step", "SoftKMeans")
        _require(model, "isotropic", "SoftKMeans")
        if getattr(model, "assignment_site", None) is None:
            raise CapabilityError(
                f"SoftKMeans needs a model with an enumerated assignment_site; "
                f"{type(model).__name__} declares none"
            )

    def init(self, problem, slots):
        return InnerState(problem.model.isotropic(slots, self.temperature), step=0, aux=())

    def step(self, state: InnerState, problem: InnerProblem, create_graph: bool = False):
        # The model's ELBO at isotropic slots is the soft k-means ELBO; its posterior is the
        # soft assignment (softmax of -|x - μ|² / 2T).
        elbo, resp = problem.elbo_and_responsibilities(state.slots)
        slots = problem.model.m_step(
            problem.x, resp, state.slots, fixed_variance=self.temperature, fixed_weights=True
        )
        return InnerState(slots, state.step + 1, state.aux), StepInfo(elbo.detach(), resp.detach())

    def extra_repr(self):
        return f"num_steps={self.num_steps}, temperature={self.temperature}"
