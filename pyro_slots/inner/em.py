"""Coordinate ascent on the ELBO: EM (closed-form or derived M-step), generalized EM, soft
k-means."""

from __future__ import annotations

import pyro.util
import torch
from pyro import poutine
from pyro.distributions.util import scale_and_mask
from pyro.poutine.util import site_is_subsample

from ..validation import CapabilityError, check_bool, check_positive_float, check_positive_int
from .base import InnerProblem, InnerRule, InnerState, StepInfo
from .gradient import trust_region
from .mstep import DerivedMStep

__all__ = ["EM", "GeneralizedEM", "SoftKMeans", "expected_log_joint"]


def _require(model, method: str, rule: str):
    if not callable(getattr(model, method, None)):
        raise CapabilityError(
            f"{rule} needs a model with a closed-form {method}(); {type(model).__name__} has none. "
            "Use GradientAscent or a learned rule instead."
        )


def _require_assignment(model, rule: str):
    if getattr(model, "assignment_site", None) is None:
        raise CapabilityError(
            f"{rule} needs a model with an enumerated assignment_site; {type(model).__name__} "
            "declares none"
        )


class EM(InnerRule):
    """Expectation-maximization (Dempster et al. 1977) per datapoint, vectorized over the batch.

    The E-step sets ``q(z)`` to the exact posterior under ``λ_t``; the M-step maximizes the
    expected complete log-likelihood in closed form. Both are coordinate ascent on the ELBO, so
    the ELBO never decreases (Neal & Hinton 1998). The E-step is the posterior of the model's
    enumerated ``assignment_site``, computed from the Pyro program in the same pass as the
    ELBO. The M-step is, in this order: ``m_step`` if given; the model's own
    ``m_step(x, responsibilities, slots)`` if it defines one (e.g.
    :class:`pyro_slots.models.GaussianMixture`); else a :class:`~pyro_slots.inner.DerivedMStep`
    derived from the model's trace -- closed form for mixtures of Normal, Bernoulli,
    Categorical, Poisson, Gamma and Beta components. Models the derived M-step cannot handle
    are refused at the first step with a :class:`~pyro_slots.validation.CapabilityError`
    naming the site; :class:`GeneralizedEM` handles every model.

    Example::

        refine(bernoulli_mixture, x, EM(50), seed=0)  # no hand-written m_step needed

    :param int num_steps: default number of EM iterations.
    :param DerivedMStep m_step: force this M-step (e.g. ``DerivedMStep(reg_covar=0)``) even
        where the model writes its own; ``None`` as described above.
    """

    def __init__(self, num_steps: int = 100, m_step: DerivedMStep | None = None):
        super().__init__(num_steps)
        if m_step is not None and not callable(m_step):
            raise TypeError(
                f"m_step: expected a DerivedMStep or a callable (model, x, resp, slots), got "
                f"{type(m_step).__name__}"
            )
        self.m_step = m_step
        self._derived = DerivedMStep()

    step_is_elbo_evaluation = True

    def check_model(self, model):
        _require_assignment(model, "EM")

    def divergence_hint(self) -> str:
        return (
            "EM has no step size: its M-step produced non-finite slots, so check the model "
            "and its m_step (or the DerivedMStep estimates), or use GeneralizedEM"
        )

    def _maximize(self, model, x, resp, slots):
        if self.m_step is not None:
            return self.m_step(model, x, resp, slots)
        own = getattr(model, "m_step", None)
        if callable(own):
            return own(x, resp, slots)
        return self._derived(model, x, resp, slots)

    def step(self, state: InnerState, problem: InnerProblem, create_graph: bool = False):
        elbo, resp = problem.elbo_and_responsibilities(state.slots)
        slots = self._maximize(problem.model, problem.x, resp, state.slots)
        return InnerState(slots, state.step + 1, state.aux), StepInfo(elbo.detach(), resp.detach())


def expected_log_joint(model, x: torch.Tensor, slots: torch.Tensor, responsibilities):
    r"""``Q(λ) = E_r[log p(x, z | λ)] - log q(z_guide | λ)`` per datapoint, ``(batch,)``.

    The expected complete log-likelihood of EM with the assignment's posterior held at
    ``responsibilities`` ``r`` (``(batch, K, M)``): the guide is traced (its latents drawn
    once, reparameterized), the model replayed against it under ``poutine.enum``, and every
    log-density that has the assignment's enumeration dimension is averaged over it with
    weights ``r``. Plus ``H(r)``, which does not depend on ``λ``, it is the ELBO of the
    distribution ``r × q_λ`` -- a lower bound of ``L(λ)`` that touches it at ``λ_t``, which is
    why raising ``Q`` never lowers the ELBO (generalized EM, Neal & Hinton 1998).

    Differentiable in ``slots`` and the model's weights.
    """
    nesting = model.max_plate_nesting
    enum_dim = -nesting - 1
    guide_trace = poutine.trace(model.guide).get_trace(x, slots)
    replayed = poutine.replay(model.model, trace=guide_trace)
    model_trace = poutine.trace(poutine.enum(replayed, first_available_dim=enum_dim)).get_trace(
        x, slots
    )
    batch, num_slots = slots.shape[:2]
    r_aligned = None
    total = x.new_zeros(batch)
    for trace, sign in ((model_trace, 1.0), (guide_trace, -1.0)):
        for site in trace.nodes.values():
            if site["type"] != "sample" or site_is_subsample(site):
                continue
            if sign < 0 and site["name"] not in guide_trace.nodes:
                continue
            lp = scale_and_mask(site["fn"].log_prob(site["value"]), site["scale"], site["mask"])
            if sign > 0 and site["name"] == model.assignment_site:
                plates = [1] * nesting
                for frame in site["cond_indep_stack"]:
                    if frame.vectorized:
                        plates[frame.dim] = frame.size
                r_aligned = responsibilities.movedim(1, 0).reshape(num_slots, *plates)
            if sign > 0 and lp.dim() >= nesting + 1 and lp.shape[enum_dim] > 1:
                if r_aligned is None:
                    raise CapabilityError(
                        f"expected_log_joint: site {site['name']!r} of {type(model).__name__} "
                        f"depends on an enumerated site other than {model.assignment_site!r}"
                    )
                lp = (lp * r_aligned).sum(enum_dim)
            elif lp.dim() >= nesting + 1:
                lp = lp.sum(enum_dim)
            total = total + sign * _per_datapoint(lp, nesting, batch)
    return total


def _per_datapoint(lp, nesting, batch):
    """Sum a site's log-density over every dimension but the batch plate's: ``(batch,)``."""
    pos = lp.dim() - nesting
    if pos < 0 or lp.shape[pos] not in (1, batch):
        raise ValueError(
            f"expected_log_joint: a log-density of shape {tuple(lp.shape)} lies outside the "
            "batch plate"
        )
    other = [d for d in range(lp.dim()) if d != pos]
    out = lp.sum(other) if other else lp
    return out.expand(batch)


class GeneralizedEM(InnerRule):
    r"""Generalized EM (Dempster et al. 1977; Neal & Hinton 1998) for any slot model.

    E-step: the exact posterior ``r`` of the model's ``assignment_site`` at ``λ_t``. M-step:
    ``ascent_steps`` gradient-ascent steps on the expected complete log-likelihood
    :func:`expected_log_joint` ``Q(λ)`` with ``r`` held fixed (each step
    ``α_n · trust_region(∇Q / M)``), and the result is accepted per datapoint only where the
    ELBO does not drop: ``L(λ') >= L(λ_t)``, else the datapoint stays at ``λ_t`` and its step
    size ``α_n`` is halved (it doubles after an accepted step, up to ``step_size``). So the
    recorded ELBO never decreases, and the rule needs nothing from the model but its Pyro
    program: no ``m_step``, no conjugacy. Where a closed-form M-step exists, :class:`EM` is
    faster per step.

    With a guide that samples (continuous latents per slot), ``Q`` and ``L`` are estimated
    with one draw each, and both ELBOs of the acceptance test use the same random numbers
    (common random numbers), so noise alone does not decide it.

    :param int num_steps: default number of E/M iterations.
    :param int ascent_steps: gradient steps per M-step.
    :param float step_size: largest ``α`` (> 0), the starting one of every datapoint.
    :param float trust_radius: longest step direction per slot (see
        :func:`~pyro_slots.inner.gradient.trust_region`).
    :param bool safeguarded: with ``False``, every M-step is kept and ``α`` stays at
        ``step_size``: the generalized EM step of Neural EM (Greff et al. 2017), which can lower
        the ELBO when the step is too long.
    """

    uses_elbo_gradient = True

    def __init__(
        self,
        num_steps: int = 50,
        ascent_steps: int = 5,
        step_size: float = 1.0,
        trust_radius: float | None = 1.0,
        safeguarded: bool = True,
    ):
        super().__init__(num_steps)
        self.safeguarded = check_bool(safeguarded, "safeguarded")
        self.implicit_differentiable = not self.safeguarded  # a rejected step is the identity
        self.ascent_steps = check_positive_int(ascent_steps, "ascent_steps")
        self.step_size = check_positive_float(step_size, "step_size")
        self.trust_radius = (
            None if trust_radius is None else check_positive_float(trust_radius, "trust_radius")
        )

    def check_model(self, model):
        _require_assignment(model, "GeneralizedEM")

    def divergence_hint(self) -> str:
        return (
            f"GeneralizedEM(step_size={self.step_size:g}, trust_radius={self.trust_radius}) "
            "produced non-finite values (its steps are only kept where the ELBO does not drop, "
            "so the model itself is the likely cause): check the model, lower step_size, or "
            "wrap it in pyro_slots.inner.Safeguarded(rule, fallback=...)"
        )

    def init(self, problem: InnerProblem, slots: torch.Tensor) -> InnerState:
        alpha = slots.new_full(slots.shape[:2], self.step_size)
        return InnerState(slots=slots, step=0, aux=(alpha,))

    def step(self, state: InnerState, problem: InnerProblem, create_graph: bool = False):
        (alpha,) = state.aux
        rng = pyro.util.get_rng_state()
        elbo, resp = problem.elbo_and_responsibilities(state.slots)
        if not create_graph:
            resp = resp.detach()
        scale = alpha.detach()[..., None]
        lam = state.slots
        num_points = problem.x.shape[1]
        with torch.enable_grad():
            for _ in range(self.ascent_steps):
                # ∇_λ Q(λ; r) holds r fixed: the gradient is taken w.r.t. a view of λ made
                # after r, so r's own dependence on λ_t is not in it; with create_graph the
                # step still depends on r (and through it on λ_t and the weights) for the
                # outer gradient, as the unrolled computation does.
                lam = lam.view_as(lam) if lam.requires_grad else lam.detach().requires_grad_()
                q = expected_log_joint(problem.model, problem.x, lam, resp)
                (grad,) = torch.autograd.grad(q.sum(), lam, create_graph=create_graph)
                lam = lam + scale * trust_region(grad / num_points, self.trust_radius)
                if not create_graph:
                    lam = lam.detach()
        if not self.safeguarded:
            return InnerState(lam, state.step + 1, (alpha,)), StepInfo(elbo.detach(), resp.detach())
        # Common random numbers: the proposal's ELBO draws what the ELBO at λ_t drew.
        after = pyro.util.get_rng_state()
        pyro.util.set_rng_state(rng)
        with torch.no_grad():
            current = elbo.detach()
            proposed = problem.elbo(lam.detach())
        pyro.util.set_rng_state(after)
        accept = proposed >= current  # NaN proposals are rejected
        slots = torch.where(accept.view(-1, 1, 1), lam, state.slots)
        alpha = torch.where(accept.unsqueeze(-1), (2 * alpha).clamp_max(self.step_size), alpha / 2)
        new_state = InnerState(slots, state.step + 1, (alpha,))
        return new_state, StepInfo(elbo.detach(), resp.detach(), retry=~accept)

    def extra_repr(self):
        return (
            f"num_steps={self.num_steps}, ascent_steps={self.ascent_steps}, "
            f"step_size={self.step_size}, trust_radius={self.trust_radius}, "
            f"safeguarded={self.safeguarded}"
        )


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

    step_is_elbo_evaluation = True

    def check_model(self, model):
        _require(model, "m_step", "SoftKMeans")
        _require(model, "isotropic", "SoftKMeans")
        _require_assignment(model, "SoftKMeans")

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
