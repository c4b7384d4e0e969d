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
    the ELBO never decreases (Neal & Hinton 1998). The model provides the closed forms through
    ``em_update(x, slots) -> (slots, responsibilities)``; see
    :class:`pyro_slots.models.GaussianMixture`.

    :param int num_steps: default number of EM iterations.
    """

    def check_model(self, model):
        _require(model, "em_update", "EM")

    def step(self, state: InnerState, problem: InnerProblem, create_graph: bool = False):
        elbo = problem.elbo(state.slots).detach()
        slots, resp = problem.model.em_update(problem.x, state.slots)
        return InnerState(slots, state.step + 1, state.aux), StepInfo(elbo, resp.detach())


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
        _require(model, "soft_kmeans_update", "SoftKMeans")
        _require(model, "isotropic", "SoftKMeans")

    def init(self, problem, slots):
        return InnerState(problem.model.isotropic(slots, self.temperature), step=0, aux=())

    def step(self, state: InnerState, problem: InnerProblem, create_graph: bool = False):
        elbo = problem.elbo(state.slots).detach()
        slots, resp = problem.model.soft_kmeans_update(problem.x, state.slots, self.temperature)
        return InnerState(slots, state.step + 1, state.aux), StepInfo(elbo, resp.detach())

    def extra_repr(self):
        return f"num_steps={self.num_steps}, temperature={self.temperature}"
