"""The inner loop: one function drives every rule, for inference alone or inside training."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .elbo import PerDatapointELBO
from .inner.base import InnerProblem, InnerRule, InnerState
from .validation import (
    check_data,
    check_finite,
    check_num_measurements,
    check_positive_float,
    check_positive_int,
    check_slots,
)

__all__ = ["InnerLoopError", "RefineResult", "refine"]


class InnerLoopError(FloatingPointError):
    """The ELBO or the slots became NaN or infinite inside the inner loop."""


@dataclass
class RefineResult:
    """What :func:`refine` returns.

    Shapes are given for ``num_restarts == 1``; with ``R > 1`` restarts every tensor gains a
    leading restart dimension (``history`` and ``residuals`` after their step dimension), e.g.
    ``slots`` is ``(R, batch, num_slots, slot_dim)`` and ``history`` is
    ``(num_steps + 1, R, batch)``. :meth:`best` picks the best restart per datapoint.

    :ivar slots: ``(batch, num_slots, slot_dim)`` final slots λ*; inside the autograd graph when
        the last steps were run with ``backprop_steps > 0``.
    :ivar elbo: ``(batch,)`` ELBO at the final slots.
    :ivar history: ``(num_steps + 1, batch)`` ELBO at λ_0, ..., λ_T.
    :ivar residuals: ``(num_steps, batch)`` fixed-point residual ``‖λ_{t+1} - λ_t‖``.
    :ivar relative_residuals: ``(num_steps, batch)`` residual divided by ``‖λ_t‖ + 1e-8``.
    :ivar responsibilities: ``(batch, num_slots, measurements)`` posterior assignment
        probabilities from the last step, where the rule computes them.
    :ivar initial_slots: ``(batch, num_slots, slot_dim)`` λ_0.
    :ivar trajectory: λ_0, ..., λ_T (only with ``keep_trajectory=True``); the steps run with
        gradients keep their graph.
    :ivar num_steps: steps actually run (fewer than asked when ``tol`` stopped the loop).
    :ivar x_enc: the encoded measurements the ELBO was computed on, ``(batch, M, F)``.
    :ivar state: the rule's final :class:`~pyro_slots.inner.InnerState` (restart dimension
        first with restarts, like ``slots``).
    :ivar steps: ``(batch,)`` steps each datapoint ran, when ``refine`` stopped datapoints
        individually (``tol`` / ``elbo_tol``); else ``None`` (all ran ``num_steps``).
    """

    slots: torch.Tensor
    elbo: torch.Tensor
    history: torch.Tensor
    residuals: torch.Tensor
    relative_residuals: torch.Tensor
    initial_slots: torch.Tensor
    num_steps: int
    num_restarts: int = 1
    responsibilities: torch.Tensor | None = None
    trajectory: list = field(default_factory=list)
    x_enc: torch.Tensor | None = None
    state: InnerState | None = None
    steps: torch.Tensor | None = None

    def best(self) -> RefineResult:
        """The restart with the highest final ELBO for every datapoint (``R == 1``: itself)."""
        if self.num_restarts == 1:
            return self
        idx = self.elbo.argmax(0)  # (batch,)
        ar = torch.arange(idx.shape[0])

        def pick(t, step_dim=False):
            if t is None:
                return None
            return t[:, idx, ar] if step_dim else t[idx, ar]

        return RefineResult(
            slots=pick(self.slots),
            elbo=pick(self.elbo),
            history=pick(self.history, True),
            residuals=pick(self.residuals, True),
            relative_residuals=pick(self.relative_residuals, True),
            initial_slots=pick(self.initial_slots),
            num_steps=self.num_steps,
            responsibilities=pick(self.responsibilities),
            trajectory=[pick(s) for s in self.trajectory],
            x_enc=self.x_enc,
            steps=pick(self.steps),
            state=None
            if self.state is None
            else InnerState(
                pick(self.state.slots),
                self.state.step,
                tuple(pick(a) if torch.is_tensor(a) else a for a in self.state.aux),
            ),
        )


def _detach_state(state: InnerState) -> InnerState:
    return InnerState(
        slots=state.slots.detach(),
        step=state.step,
        aux=tuple(a.detach() if torch.is_tensor(a) else a for a in state.aux),
    )


def _check_elbo(elbo: torch.Tensor, step: int, recorded: bool = True):
    bad = ~torch.isfinite(elbo) if recorded else elbo.isinf()
    if bad.any():
        idx = bad.nonzero().flatten()[:8].tolist()
        raise InnerLoopError(
            f"inner step {step}: the ELBO is not finite for datapoints {idx} "
            f"(values {elbo[bad][:8].tolist()}); lower the step size or check the model"
        )


def _guarded_step(inner, state, problem_graph, problem_free, in_graph, t):
    """One step; a distribution rejecting its parameters becomes an error naming the step."""
    try:
        if in_graph:
            return inner.step(state, problem_graph, create_graph=True)
        with torch.no_grad():
            return inner.step(state, problem_free, create_graph=False)
    except ValueError as e:
        if "Expected parameter" not in str(e):
            raise
        raise InnerLoopError(
            f"inner step {t}: a distribution of the model got invalid parameters "
            f"({str(e).splitlines()[0]}); lower the step size or check the model"
        ) from e


def _check_slots(slots: torch.Tensor, step: int):
    bad = ~torch.isfinite(slots.detach()).flatten(1).all(1)
    if bad.any():
        idx = bad.nonzero().flatten()[:8].tolist()
        raise InnerLoopError(
            f"inner step {step}: the update produced non-finite slots for datapoints {idx}; "
            "lower the step size or check the model"
        )


def initial_slots(model, x_enc, num_slots, *, inner=None, init=None, generator=None):
    """λ_0 ``(batch, num_slots, slot_dim)``: from ``init``, else the rule's, else the model's."""
    if init is None:
        init = getattr(inner, "slot_init", None)
    if init is not None:
        return init(x_enc.shape[0], num_slots, generator=generator, dtype=x_enc.dtype)
    return model.init_slots(x_enc, num_slots, generator=generator)


def run_inner(
    model,
    x_enc: torch.Tensor,
    inner: InnerRule,
    slots: torch.Tensor,
    num_steps: int,
    *,
    backprop_steps: int = 0,
    implicit=None,
    tol: float | None = None,
    elbo_tol: float | None = None,
    keep_trajectory: bool = False,
    estimator: PerDatapointELBO | None = None,
    record_history: bool = True,
) -> RefineResult:
    """Run ``num_steps`` steps of ``inner`` from ``slots``; the one loop of the library.

    The first ``num_steps - backprop_steps`` steps run without an autograd graph (λ detached);
    the last ``backprop_steps`` keep it (``create_graph=True``). With ``tol``, the graph-free
    phase stops once every datapoint's residual is below ``tol`` (or its ELBO changed by less
    than ``elbo_tol`` per measurement in the last step) and the graph steps follow.
    ``implicit`` (a callable ``(out, lam) -> out``) wraps one final differentiable step from the
    detached fixed point, for implicit differentiation (see :mod:`pyro_slots.nested`).
    """
    problem_graph = InnerProblem(model, x_enc, estimator, record_history)
    problem_free = InnerProblem(model, x_enc.detach(), estimator, record_history)
    state = inner.init(problem_graph if backprop_steps >= num_steps else problem_free, slots)
    start_slots = state.slots
    history, residuals, relres = [], [], []
    trajectory = [state.slots] if keep_trajectory else []
    responsibilities = None
    graph_from = num_steps - backprop_steps
    t = 0
    while t < num_steps:
        in_graph = t >= graph_from
        if not in_graph:
            state = _detach_state(state)
        new_state, info = _guarded_step(inner, state, problem_graph, problem_free, in_graph, t)
        _check_elbo(info.elbo, t, record_history)
        _check_slots(new_state.slots, t)
        with torch.no_grad():
            delta = (new_state.slots - state.slots).flatten(1).norm(dim=1)
            residuals.append(delta)
            relres.append(delta / (state.slots.flatten(1).norm(dim=1) + 1e-8))
        history.append(info.elbo.detach())
        if info.responsibilities is not None:
            responsibilities = info.responsibilities
        state = new_state
        t += 1
        if keep_trajectory:
            trajectory.append(state.slots)
        converged = tol is not None and bool((delta < tol).all())
        if elbo_tol is not None and len(history) >= 2:
            change = (history[-1] - history[-2]).abs() / x_enc.shape[1]
            converged = converged or bool((change < elbo_tol).all())
        if converged and t < num_steps:
            if in_graph or backprop_steps == 0:
                break
            # Converged without a graph: the differentiable steps follow right away.
            num_steps = t + backprop_steps
            graph_from = t
    if implicit is not None:
        lam = state.slots.detach().requires_grad_()
        fixed = InnerState(lam, state.step, tuple(a.detach() for a in state.aux))
        new_state, info = inner.step(fixed, problem_graph, create_graph=True)
        _check_elbo(info.elbo, t, record_history)
        with torch.no_grad():
            delta = (new_state.slots - lam).flatten(1).norm(dim=1)
            residuals.append(delta)
            relres.append(delta / (lam.flatten(1).norm(dim=1) + 1e-8))
        history.append(info.elbo.detach())
        state = InnerState(implicit(new_state.slots, lam), new_state.step, new_state.aux)
        t += 1
        if keep_trajectory:
            trajectory.append(state.slots)
    with torch.no_grad():
        final = problem_free.elbo(state.slots.detach())
    _check_elbo(final, t)
    history.append(final)
    return RefineResult(
        slots=state.slots,
        elbo=final,
        history=torch.stack(history),
        residuals=torch.stack(residuals) if residuals else final.new_zeros(0, final.shape[0]),
        relative_residuals=torch.stack(relres) if relres else final.new_zeros(0, final.shape[0]),
        initial_slots=start_slots.detach(),
        num_steps=t,
        responsibilities=responsibilities,
        trajectory=trajectory,
        x_enc=x_enc,
        state=state,
    )


def _slice_state(state: InnerState, keep: torch.Tensor) -> InnerState:
    return InnerState(
        state.slots[keep],
        state.step,
        tuple(a[keep] if torch.is_tensor(a) else a for a in state.aux),
    )


def run_inner_freezing(
    model,
    x_enc: torch.Tensor,
    inner: InnerRule,
    slots: torch.Tensor,
    num_steps: int,
    *,
    tol: float | None = None,
    elbo_tol: float | None = None,
    keep_trajectory: bool = False,
    estimator: PerDatapointELBO | None = None,
    record_history: bool = True,
) -> RefineResult:
    """Graph-free inner loop in which every datapoint stops on its own criterion.

    A datapoint is frozen once its residual falls below ``tol`` or its ELBO changed by less than
    ``elbo_tol`` per measurement in one step; the following steps run on the datapoints still
    active only, so the cost is the sum of the datapoints' step counts rather than the batch
    size times the slowest one (as one scikit-learn fit per datapoint would). A frozen
    datapoint's slots stay put: its later history entries repeat its final ELBO and its later
    residuals are zero. ``RefineResult.steps`` holds each datapoint's step count.
    """
    batch, num_points = x_enc.shape[:2]
    x_free = x_enc.detach()
    problem = InnerProblem(model, x_free, estimator, record_history)
    with torch.no_grad():
        state = _detach_state(inner.init(problem, slots))
    start_slots = state.slots
    # Full-batch copy of the state, whose active rows are overwritten after every step.
    final = InnerState(
        state.slots.clone(),
        state.step,
        tuple(a.clone() if torch.is_tensor(a) else a for a in state.aux),
    )
    dtype = x_enc.dtype
    history = torch.full((num_steps + 1, batch), float("nan"), dtype=dtype)
    residuals = torch.zeros(num_steps, batch, dtype=dtype)
    relres = torch.zeros(num_steps, batch, dtype=dtype)
    steps = torch.zeros(batch, dtype=torch.long)
    trajectory = [start_slots.clone()] if keep_trajectory else []
    responsibilities = None
    active = torch.arange(batch)
    previous = None
    t = 0
    while t < num_steps:
        new_state, info = _guarded_step(inner, state, problem, problem, False, t)
        _check_elbo(info.elbo, t, record_history)
        _check_slots(new_state.slots, t)
        with torch.no_grad():
            delta = (new_state.slots - state.slots).flatten(1).norm(dim=1)
            residuals[t, active] = delta
            relres[t, active] = delta / (state.slots.flatten(1).norm(dim=1) + 1e-8)
            history[t, active] = info.elbo.detach().to(dtype)
            final.slots[active] = new_state.slots
            for full, part in zip(final.aux, new_state.aux):
                if torch.is_tensor(full):
                    full[active] = part
            if info.responsibilities is not None:
                if responsibilities is None:
                    shape = (batch, *info.responsibilities.shape[1:])
                    responsibilities = info.responsibilities.new_zeros(shape)
                responsibilities[active] = info.responsibilities
        steps[active] += 1
        t += 1
        if keep_trajectory:
            trajectory.append(final.slots.clone())
        converged = torch.zeros_like(delta, dtype=torch.bool)
        if tol is not None:
            converged |= delta < tol
        if elbo_tol is not None and previous is not None:
            converged |= (info.elbo - previous).abs() / num_points < elbo_tol
        state, previous = new_state, info.elbo
        if bool(converged.any()):
            if bool(converged.all()):
                break
            keep = ~converged
            state, previous, active = _slice_state(state, keep), previous[keep], active[keep]
            problem = InnerProblem(model, x_free[active], estimator, record_history)
    final = InnerState(final.slots, t, final.aux)
    with torch.no_grad():
        final_elbo = InnerProblem(model, x_free, estimator).elbo(final.slots)
    _check_elbo(final_elbo, t)
    history = history[: t + 1]
    # A frozen datapoint sits at λ_{steps_n} from then on: its ELBO is the final one.
    rows = torch.arange(t + 1).unsqueeze(1)
    history = torch.where(rows >= steps.unsqueeze(0), final_elbo.unsqueeze(0), history)
    return RefineResult(
        slots=final.slots,
        elbo=final_elbo,
        history=history,
        residuals=residuals[:t],
        relative_residuals=relres[:t],
        initial_slots=start_slots,
        num_steps=t,
        responsibilities=responsibilities,
        trajectory=trajectory,
        x_enc=x_enc,
        state=final,
        steps=steps,
    )


def make_generator(seed=None, generator=None) -> torch.Generator | None:
    if generator is not None and seed is not None:
        raise ValueError("seed, generator: pass one of them, not both")
    if generator is not None:
        if not isinstance(generator, torch.Generator):
            raise TypeError(
                f"generator: expected a torch.Generator, got {type(generator).__name__}"
            )
        return generator
    if seed is None:
        return None
    return torch.Generator().manual_seed(int(seed))


def refine(
    model,
    x: torch.Tensor,
    inner: InnerRule,
    *,
    num_slots: int | None = None,
    num_steps: int | None = None,
    slots: torch.Tensor | dict | None = None,
    init=None,
    seed: int | None = None,
    generator: torch.Generator | None = None,
    num_restarts: int = 1,
    tol: float | None = None,
    elbo_tol: float | None = None,
    keep_trajectory: bool = False,
    estimator: PerDatapointELBO | None = None,
    record_history: bool = True,
) -> RefineResult:
    """Run the inner loop alone: maximize every datapoint's ELBO over its slots.

    No shared weight receives a gradient: the loop's own gradients are taken with
    :func:`torch.autograd.grad` w.r.t. the slots only, and the result is detached.

    Example::

        gmm = GaussianMixture(num_slots=4, dim=2)
        result = refine(gmm, x, EM(num_steps=50), seed=0)
        result.slots, result.elbo, result.history  # (B, 4, 5), (B,), (51, B)

    :param SlotModel model: the model (its ``encode`` is applied to ``x`` first).
    :param torch.Tensor x: datapoints, as the model's ``encode`` expects them.
    :param InnerRule inner: the rule, fixed or learned.
    :param int num_slots: K; defaults to ``model.num_slots``. Test-time K may differ from
        training K for every rule whose weights do not depend on K.
    :param int num_steps: T; defaults to ``inner.num_steps``.
    :param slots: explicit λ_0, ``(batch, num_slots, slot_dim)`` or a dict of named parts.
    :param init: a :class:`~pyro_slots.init.SlotInitializer` to draw λ_0 from.
    :param int seed: seed of the slot initialization (or pass ``generator``).
    :param int num_restarts: R independent initializations per datapoint, run side by side.
    :param float tol: stop a datapoint early once its residual ``‖λ_{t+1} - λ_t‖`` is below
        ``tol``; later steps only run on the datapoints still active.
    :param float elbo_tol: stop a datapoint early once its ELBO changed by less than
        ``elbo_tol`` per measurement in one step (scikit-learn's criterion for EM).
    :param bool keep_trajectory: keep λ_t of every step in ``result.trajectory``.
    :param bool record_history: with ``False``, rules whose update does not need the ELBO
        (slot attention) skip evaluating it at every step: ``history`` is NaN for those steps
        (its last row, the final ELBO, is always computed). Saves one model evaluation per
        step at test time.
    :returns: a :class:`RefineResult`.
    """
    if not isinstance(inner, InnerRule):
        raise TypeError(f"inner: expected an InnerRule, got {type(inner).__name__}")
    inner.check_model(model)
    num_steps = check_positive_int(inner.num_steps if num_steps is None else num_steps, "num_steps")
    num_restarts = check_positive_int(num_restarts, "num_restarts")
    if tol is not None:
        tol = check_positive_float(tol, "tol")
    if elbo_tol is not None:
        elbo_tol = check_positive_float(elbo_tol, "elbo_tol")
    generator = make_generator(seed, generator)
    check_data(x, "x", model)
    with torch.no_grad():
        x_enc = model.encode(x)
    check_num_measurements(x_enc, num_slots or getattr(model, "num_slots", None))
    batch = x_enc.shape[0]
    if isinstance(slots, dict):
        slots = model.slot_spec.pack(slots)
    if slots is not None:
        requested, num_slots = num_slots, (slots.shape[-2] if slots.dim() >= 2 else num_slots)
        if num_restarts > 1:
            if slots.dim() != 4 or slots.shape[0] != num_restarts:
                raise ValueError(
                    f"slots: with num_restarts={num_restarts} expected shape "
                    f"({num_restarts}, {batch}, num_slots, {model.slot_dim}), "
                    f"got {tuple(slots.shape)}"
                )
            slots = slots.reshape(num_restarts * batch, *slots.shape[2:])
        check_slots(slots, "slots", num_restarts * batch, model.slot_dim, requested, like=x_enc)
    else:
        num_slots = getattr(model, "num_slots", None) if num_slots is None else num_slots
        if num_slots is None:
            raise ValueError("num_slots: required, since the model has no default num_slots")
        num_slots = check_positive_int(num_slots, "num_slots")
    x_rep = x_enc.repeat(num_restarts, 1, 1) if num_restarts > 1 else x_enc
    if slots is None:
        with torch.no_grad():
            slots = initial_slots(
                model, x_rep, num_slots, inner=inner, init=init, generator=generator
            )
    slots = check_finite(slots.detach(), "initial slots")
    loop = run_inner_freezing if tol is not None or elbo_tol is not None else run_inner
    result = loop(
        model,
        x_rep,
        inner,
        slots,
        num_steps,
        tol=tol,
        elbo_tol=elbo_tol,
        keep_trajectory=keep_trajectory,
        estimator=estimator,
        record_history=record_history,
    )
    result.slots = result.slots.detach()
    result.trajectory = [s.detach() for s in result.trajectory]
    result.state = _detach_state(result.state)
    if num_restarts > 1:
        _split_restarts(result, num_restarts, batch)
        result.x_enc = x_enc
    return result


def _split_restarts(result: RefineResult, num_restarts: int, batch: int) -> None:
    def split(t, step_dim=False):
        if t is None:
            return None
        if step_dim:
            return t.reshape(t.shape[0], num_restarts, batch, *t.shape[2:])
        return t.reshape(num_restarts, batch, *t.shape[1:])

    result.num_restarts = num_restarts
    result.slots = split(result.slots)
    result.elbo = split(result.elbo)
    result.initial_slots = split(result.initial_slots)
    result.responsibilities = split(result.responsibilities)
    result.history = split(result.history, True)
    result.residuals = split(result.residuals, True)
    result.relative_residuals = split(result.relative_residuals, True)
    result.trajectory = [split(s) for s in result.trajectory]
    result.steps = split(result.steps)
    if result.state is not None:
        state = result.state
        result.state = InnerState(
            split(state.slots),
            state.step,
            tuple(split(a) if torch.is_tensor(a) else a for a in state.aux),
        )
