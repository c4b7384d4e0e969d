"""The inner loop: one function drives every rule, for inference alone or inside training."""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass, field, fields

import torch

from .elbo import ELBOEstimator
from .inner.base import InnerProblem, InnerRule, InnerState, StepInfo, versioned
from .validation import (
    check_bool,
    check_data,
    check_finite,
    check_num_measurements,
    check_positive_float,
    check_positive_int,
    check_seed,
    check_slots,
    process_group,
)

__all__ = ["InnerLoopError", "RefineResult", "best_restart", "refine", "refine_video", "run_inner"]


class InnerLoopError(FloatingPointError):
    """The ELBO or the slots became NaN or infinite inside the inner loop."""


@dataclass
class RefineResult:
    """What :func:`refine` returns: every tensor keeps a leading *restart* axis ``R``.

    Independent restarts are to the inner loop what chains are to MCMC, so, as ArviZ keeps its
    ``chain`` dimension, the restart axis is always there (``R = 1`` without restarts). Per
    restart and datapoint (``batch``) the shapes are:

    :ivar slots: ``(R, batch, num_slots, slot_dim)`` final slots λ*.
    :ivar elbo: ``(R, batch)`` ELBO at the final slots.
    :ivar history: ``(num_steps + 1, R, batch)`` ELBO at λ_0, ..., λ_T (a datapoint that stopped
        early repeats its final ELBO). Row ``t`` is the ELBO the rule reported for the slots its
        step ``t`` started from: under :class:`~pyro_slots.inner.Reinitialize`, those after the
        step's redraws, which ``trajectory[t]`` (λ_t before them) does not hold.
    :ivar residuals: ``(num_steps, R, batch)`` fixed-point residual ``‖λ_{t+1} - λ_t‖`` (zero
        after a datapoint stopped).
    :ivar relative_residuals: ``(num_steps, R, batch)`` residual divided by ``‖λ_t‖ + 1e-8``.
    :ivar initial_slots: ``(R, batch, num_slots, slot_dim)`` λ_0.
    :ivar steps: ``(R, batch)`` steps each datapoint ran (fewer than ``num_steps`` where
        ``tol`` / ``elbo_tol`` stopped it).
    :ivar num_steps: steps of the loop, the largest entry of ``steps``.
    :ivar responsibilities: ``(R, batch, num_slots, measurements)`` posterior assignment
        probabilities ``p(z^{n,m} = k | x, λ*)`` at the final slots, from the Pyro program,
        whatever the rule, where the model declares an ``assignment_site``; else ``None``.
    :ivar trajectory: λ_0, ..., λ_T, each ``(R, batch, num_slots, slot_dim)`` (only with
        ``keep_trajectory=True``).
    :ivar x_enc: the encoded measurements ``(batch, M, F)`` the ELBO was computed on (shared by
        the restarts).
    :ivar state: the rule's final :class:`~pyro_slots.inner.InnerState`, its tensors with the
        restart axis first.
    :ivar datapoints: ``None`` where the result covers the whole batch; from
        ``refine(..., distributed=True, gather=False)`` the rank's own contiguous datapoints,
        ``slice(start, stop)`` of the batch, which every batch axis above (and ``x_enc``) then
        holds: ``result.slots[:, i]`` is datapoint ``start + i``.

    :meth:`best` keeps the best restart of every datapoint, :meth:`select` given ones.
    """

    slots: torch.Tensor
    elbo: torch.Tensor
    history: torch.Tensor
    residuals: torch.Tensor
    relative_residuals: torch.Tensor
    initial_slots: torch.Tensor
    steps: torch.Tensor
    num_steps: int
    responsibilities: torch.Tensor | None = None
    trajectory: list = field(default_factory=list)
    x_enc: torch.Tensor | None = None
    state: InnerState | None = None
    datapoints: slice | None = None

    #: Fields whose restart axis comes after a leading step axis.
    _STEP_FIRST = ("history", "residuals", "relative_residuals")

    @property
    def num_restarts(self) -> int:
        """``R``, the size of the restart axis."""
        return self.slots.shape[0]

    def best(self) -> RefineResult:
        """The restart with the highest final ELBO for every datapoint (``R = 1`` afterwards);
        of restarts tied up to rounding the first (:func:`best_restart`)."""
        return self.select(best_restart(self.elbo))

    def select(self, index) -> RefineResult:
        """Keep one restart per datapoint: ``index`` is an int (the same restart for every
        datapoint) or a ``(batch,)`` integer tensor. The result has ``R = 1``."""
        batch = self.elbo.shape[1]
        if isinstance(index, bool) or (torch.is_tensor(index) and index.dtype == torch.bool):
            raise ValueError(
                f"index: expected an int or a ({batch},) integer tensor of restarts, got a bool"
                " (a mask does not say which restart each datapoint keeps)"
            )
        if isinstance(index, int):
            if not -self.num_restarts <= index < self.num_restarts:
                raise ValueError(
                    f"index: expected a restart in [0, {self.num_restarts}), got {index}"
                )
            index = torch.full((batch,), index % self.num_restarts, dtype=torch.long)
        if not torch.is_tensor(index) or index.shape != (batch,) or index.is_floating_point():
            raise ValueError(
                f"index: expected an int or a ({batch},) integer tensor, got {index!r}"
            )
        if bool(((index < 0) | (index >= self.num_restarts)).any()):
            raise ValueError(
                f"index: expected restarts in [0, {self.num_restarts}), got {index.tolist()}"
            )
        index = index.to(self.slots.device)
        rows = torch.arange(batch, device=index.device)

        def pick(t, step_first=False):
            if not torch.is_tensor(t):
                return t
            return (t[:, index, rows] if step_first else t[index, rows]).unsqueeze(
                1 if step_first else 0
            )

        picked = {
            f.name: pick(getattr(self, f.name), f.name in self._STEP_FIRST)
            for f in fields(self)
            if f.name not in ("trajectory", "state", "x_enc", "num_steps")
        }
        state = self.state
        if state is not None:
            state = InnerState(pick(state.slots), state.step, tuple(pick(a) for a in state.aux))
        return RefineResult(
            **picked,
            num_steps=self.num_steps,
            trajectory=[pick(s) for s in self.trajectory],
            x_enc=self.x_enc,
            state=state,
        )


# --------------------------------------------------------------------------- the loop
def _map_state(fn, state: InnerState) -> InnerState:
    return InnerState(fn(state.slots), state.step, tuple(fn(a) for a in state.aux))


def _detach(t):
    return t.detach() if torch.is_tensor(t) else t


def _hint(inner) -> str:
    hint = getattr(inner, "divergence_hint", None)
    return hint() if callable(hint) else "lower the step size or check the model"


def _check_elbo(inner, elbo: torch.Tensor, step: int, recorded: bool = True):
    bad = ~torch.isfinite(elbo) if recorded else elbo.isinf()
    if bad.any():
        idx = bad.nonzero().flatten()[:8].tolist()
        raise InnerLoopError(
            f"inner step {step}: the ELBO is not finite for datapoints {idx} "
            f"(values {elbo[bad][:8].tolist()}); {_hint(inner)}"
        )


def _check_slots(inner, slots: torch.Tensor, step: int):
    bad = ~torch.isfinite(slots.detach()).flatten(1).all(1)
    if bad.any():
        idx = bad.nonzero().flatten()[:8].tolist()
        raise InnerLoopError(
            f"inner step {step}: the update produced non-finite slots for datapoints {idx}; "
            f"{_hint(inner)}"
        )


def _step(inner, state, problem, create_graph: bool, t: int):
    """One step; a distribution rejecting its parameters becomes an error naming the step."""
    try:
        with torch.set_grad_enabled(create_graph):
            return inner.step(state, problem, create_graph=create_graph)
    except ValueError as e:
        if "Expected parameter" not in str(e):
            raise
        raise InnerLoopError(
            f"inner step {t}: a distribution of the model got invalid parameters "
            f"({str(e).splitlines()[0]}); {_hint(inner)}"
        ) from e


class _Trace:
    """Per-step records of the whole batch while only an active subset of it may step."""

    def __init__(self, batch: int, keep_trajectory: bool):
        self.batch = batch
        self.history, self.residuals, self.relres = [], [], []
        self.trajectory = [] if keep_trajectory else None

    def record(self, elbo, old_slots, new_slots, active, frozen_elbo, full_slots):
        with torch.no_grad():
            delta = (new_slots.detach() - old_slots.detach()).flatten(1).norm(dim=1)
            rel = delta / (old_slots.detach().flatten(1).norm(dim=1) + 1e-8)
            elbo = elbo.detach()
            if active is not None:
                delta = delta.new_zeros(self.batch).index_copy(0, active, delta)
                rel = rel.new_zeros(self.batch).index_copy(0, active, rel)
                elbo = frozen_elbo.index_copy(0, active, elbo.to(frozen_elbo.dtype))
        self.history.append(elbo)
        self.residuals.append(delta)
        self.relres.append(rel)
        if self.trajectory is not None:
            self.trajectory.append(full_slots)
        return delta


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
    estimator: ELBOEstimator | None = None,
    record_history: bool = True,
    responsibilities: bool = False,
    straight_through: bool = False,
    rows: torch.Tensor | None = None,
    num_rows: int | None = None,
    num_restarts: int = 1,
    keep_best_after: int | dict[int, int] | None = None,
    detach_between: bool = False,
) -> RefineResult:
    """Run the inner loop from λ_0 = ``slots``: the one loop of the library.

    Three phases, each over the whole batch ``(batch, ...)`` of ``x_enc``:

    1. ``num_steps - backprop_steps`` steps **without** an autograd graph (λ detached). Here
       every datapoint stops on its own (``tol`` / ``elbo_tol``): a datapoint whose residual
       ``‖λ_{t+1} - λ_t‖`` fell below ``tol``, or whose ELBO changed by less than ``elbo_tol``
       per measurement in its last step, is *frozen* — its slots and rule state stay put and
       the following steps run on the datapoints still active only, so the cost is the sum of
       the datapoints' step counts. The phase ends when every datapoint is frozen.
    2. ``backprop_steps`` steps **with** the graph (``create_graph=True``), on every datapoint,
       from where phase 1 left each of them (unrolled and truncated gradients).
    3. With ``implicit`` (a callable ``(out, lam) -> out``), one differentiable step from the
       detached fixed point, wrapped for implicit differentiation (:mod:`pyro_slots.nested`).

    The result has a restart axis of size 1 (:class:`RefineResult`); :func:`refine` runs
    restarts by stacking them into the batch and splitting them afterwards.

    :param bool responsibilities: also return the posterior of the model's assignment site at
        the final slots (computed with the final ELBO, from one evaluation of the program).
    :param bool straight_through: phase 2 starts from ``sg(λ) + λ_0 - sg(λ_0)`` (the value of
        λ, the gradient of λ_0 = ``slots``, which keeps its graph): the straight-through
        gradient to the initialization (:class:`~pyro_slots.NestedSVI`).
    :param rows: with ``num_rows``, where the datapoints sit in the batch that rules draw
        random numbers for (:class:`InnerProblem`): a chunk or shard of a larger batch.
    :param bool detach_between: every differentiated step starts from the detached state of
        the step before, ``λ_{t+1} = f(sg(λ_t))``: each iterate keeps the graph of its own step
        only (first-order gradients at every iterate, :class:`~pyro_slots.NestedSVI` with
        ``gradient="first_order"`` and ``iteration_weights`` other than ``"last"``); with
        ``straight_through`` every step starts from ``sg(λ_t) + λ_0 - sg(λ_0)``.
    :param keep_best_after: ``{step: kept}`` (an int ``S``: ``{S: 1}``), with ``num_restarts``
        (the batch holds that many restarts of every datapoint, restart-major): before
        graph-free step ``step`` every datapoint keeps only its ``kept`` restarts of highest ELBO
        at λ_t running; the others are frozen there, as a converged datapoint is
        (:func:`refine`, which checks the schedule). The ELBO at λ_t is the one step ``step``
        reports where the rule's step is an ELBO evaluation
        (:attr:`~pyro_slots.inner.InnerRule.step_is_elbo_evaluation`: the step runs on every
        running row and only the winners' updates are kept), else a separate evaluation.
    """
    batch, num_points = x_enc.shape[:2]
    free_steps = num_steps - backprop_steps
    record_history = record_history or elbo_tol is not None  # elbo_tol reads every step's ELBO
    problem_graph = InnerProblem(model, x_enc, estimator, record_history, rows, num_rows)
    # The same tensor when there is no graph: what the estimator checked about it holds.
    x_free = versioned(None, x_enc.detach() if x_enc.requires_grad else x_enc)
    problem_free = InnerProblem(model, x_free, estimator, record_history, rows, num_rows)
    problem = problem_free
    state = inner.init(problem_graph if free_steps <= 0 else problem, slots)
    start_slots = state.slots.detach()
    trace = _Trace(batch, keep_trajectory)
    if keep_trajectory:
        trace.trajectory.append(state.slots)
    steps = torch.zeros(batch, dtype=torch.long, device=x_enc.device)
    stopping = tol is not None or elbo_tol is not None
    t = 0

    # Phase 1: graph-free steps over the active datapoints.
    # Every datapoint's latest state; unrolled (no free steps) keeps λ_0's graph.
    full = state if free_steps <= 0 else _map_state(_detach, state)
    active = None  # None: every datapoint is active (no indexing on the common path)
    state, previous = full, None
    previous_retry = None  # the datapoints whose last step was a rejected one, retried
    pruned = None  # (rows, ELBO at the slots they were frozen at) of the restarts pruned
    pruned_at_start = None  # every row's ELBO at λ_0 where the restarts are pruned there
    if keep_best_after is None or isinstance(keep_best_after, dict):
        schedule = keep_best_after or {}
    else:  # an int S, as refine's: {S: 1}
        schedule = {keep_best_after: 1}
    while t < free_steps:
        stepped = None  # the step already taken at a pruning stage, on every running row
        just_pruned = None  # (rows, ELBO at λ_t) of the rows this stage froze at λ_t
        if t in schedule:
            frozen_elbo = trace.history[-1] if trace.history else None
            if inner.step_is_elbo_evaluation:
                stepped = _step(inner, state, problem, False, t)
                elbo_now = stepped[1].elbo
            else:
                with torch.no_grad():
                    elbo_now = problem.elbo(state.slots).detach()
            _check_elbo(inner, elbo_now, t)
            keep = _best_restarts(elbo_now, active, frozen_elbo, batch, num_restarts, schedule[t])
            rows_now = torch.arange(batch, device=steps.device) if active is None else active
            lost = just_pruned = (rows_now[~keep], elbo_now[~keep])
            if pruned is not None:  # an earlier stage's losers stay where they lost
                lost = (torch.cat([pruned[0], lost[0]]), torch.cat([pruned[1], lost[1]]))
            pruned = lost
            if not trace.history:  # the rows frozen at λ_0 are recorded with this ELBO
                pruned_at_start = elbo_now
            if not bool(keep.any()):
                break
            active = rows_now[keep]
            pick = lambda a, keep=keep: a[keep] if torch.is_tensor(a) else a  # noqa: E731
            state = _map_state(pick, state)
            if stepped is not None:  # the losers' updates are dropped: they stay at λ_t
                new_state, info = _map_state(pick, stepped[0]), stepped[1]
                retry = None if info.retry is None else info.retry[keep]
                info = StepInfo(info.elbo[keep], None, retry)  # (no responsibilities read)
            previous = None if previous is None else previous[keep]
            previous_retry = None if previous_retry is None else previous_retry[keep]
            problem = problem_free.subset(active)
        if stepped is None:
            new_state, info = _step(inner, state, problem, False, t)
        _check_elbo(inner, info.elbo, t, record_history)
        _check_slots(inner, new_state.slots, t)
        if active is None:
            full = new_state
        else:
            full = InnerState(
                full.slots.index_copy(0, active, new_state.slots),
                new_state.step,
                tuple(
                    f.index_copy(0, active, a) if torch.is_tensor(f) else a
                    for f, a in zip(full.aux, new_state.aux)
                ),
            )
        frozen_elbo = trace.history[-1] if trace.history else pruned_at_start
        if just_pruned is not None and trace.history:
            # They sit at λ_t: their history row t is L(λ_t), which a later stage ranks them by
            # (history[-1] would be L(λ_{t-1}), stale for a rule that can lower the ELBO).
            frozen_elbo = frozen_elbo.index_copy(0, *just_pruned)
        delta = trace.record(
            info.elbo, state.slots, new_state.slots, active, frozen_elbo, full.slots
        )
        if active is None:
            steps += 1
        else:
            steps.index_add_(0, active, torch.ones_like(active))
        t += 1
        if not stopping:
            state = new_state
            continue
        local = delta if active is None else delta[active]
        converged = torch.zeros_like(local, dtype=torch.bool)
        if tol is not None:  # a rejected step to retry has a zero residual, not convergence
            converged |= (local < tol) if info.retry is None else (local < tol) & ~info.retry
        if elbo_tol is not None and previous is not None:
            flat = (info.elbo - previous).abs() / num_points < elbo_tol
            converged |= flat if previous_retry is None else flat & ~previous_retry
        state, previous, previous_retry = new_state, info.elbo, info.retry
        if bool(converged.any()):
            if bool(converged.all()):
                break
            keep = ~converged
            active = (torch.arange(batch, device=steps.device) if active is None else active)[keep]
            state, previous = (
                _map_state(lambda a, keep=keep: a[keep] if torch.is_tensor(a) else a, state),
                previous[keep],
            )
            previous_retry = None if previous_retry is None else previous_retry[keep]
            problem = problem_free.subset(active)
    state = InnerState(full.slots, t, full.aux)

    # Phase 2: the differentiated steps, on the whole batch.
    if straight_through and free_steps > 0:
        if slots.shape != state.slots.shape:
            raise ValueError(
                f"straight_through: the rule's slots {tuple(state.slots.shape)} do not have the "
                f"shape of λ_0 {tuple(slots.shape)}"
            )
        state = InnerState(state.slots.detach() + (slots - slots.detach()), state.step, state.aux)
    for k in range(backprop_steps):
        if detach_between and k > 0:
            lam = state.slots.detach()
            if straight_through:
                lam = lam + (slots - slots.detach())
            state = InnerState(lam, state.step, tuple(_detach(a) for a in state.aux))
        new_state, info = _step(inner, state, problem_graph, True, t)
        _check_elbo(inner, info.elbo, t, record_history)
        _check_slots(inner, new_state.slots, t)
        trace.record(info.elbo, state.slots, new_state.slots, None, None, new_state.slots)
        state = new_state
        steps += 1
        t += 1

    # Phase 3: one differentiable step at the detached fixed point (implicit gradients).
    if implicit is not None:
        lam = state.slots.detach().requires_grad_()
        fixed = InnerState(lam, state.step, tuple(_detach(a) for a in state.aux))
        new_state, info = _step(inner, fixed, problem_graph, True, t)
        _check_elbo(inner, info.elbo, t, record_history)
        out = implicit(new_state.slots, lam)
        trace.record(info.elbo, lam, new_state.slots, None, None, out)
        state = InnerState(out, new_state.step, new_state.aux)
        steps += 1
        t += 1

    final_problem = InnerProblem(model, x_free, estimator)
    with torch.no_grad():
        slots_final = state.slots.detach()
        resp = None
        if responsibilities and getattr(model, "assignment_site", None) is not None:
            final, resp = final_problem.elbo_and_responsibilities(slots_final)
        elif pruned is not None and pruned[0].numel() > 0:
            # A pruned restart sits where its ELBO was evaluated: only the others are needed.
            others = torch.ones(batch, dtype=torch.bool, device=steps.device)
            others[pruned[0]] = False
            others = others.nonzero().flatten()
            final = pruned[1].new_empty(batch).index_copy_(0, pruned[0], pruned[1])
            if others.numel() > 0:
                part = InnerProblem(model, x_free[others], estimator).elbo(slots_final[others])
                final.index_copy_(0, others, part.to(final.dtype))
        else:
            final = final_problem.elbo(slots_final)
    _check_elbo(inner, final, t)
    history = trace.history + [final]
    if (stopping or pruned is not None) and t > 0:
        # A frozen datapoint sits at λ_{steps_n} from then on: its ELBO is the final one.
        history = torch.stack(history)
        rows = torch.arange(t + 1, device=history.device).unsqueeze(1)
        history = torch.where(rows >= steps.unsqueeze(0), final.unsqueeze(0), history)
    else:
        history = torch.stack(history)

    def stacked(rows):
        return torch.stack(rows) if rows else final.new_zeros(0, batch)

    def one(t):
        return t.unsqueeze(0) if torch.is_tensor(t) else t

    return RefineResult(
        slots=one(state.slots),
        elbo=one(final),
        history=history.unsqueeze(1),
        residuals=stacked(trace.residuals).unsqueeze(1),
        relative_residuals=stacked(trace.relres).unsqueeze(1),
        initial_slots=one(start_slots),
        steps=one(steps),
        num_steps=t,
        responsibilities=one(resp),
        trajectory=[one(s) for s in trace.trajectory or []],
        x_enc=x_enc,
        state=_map_state(one, state),
    )


def _prune_schedule(keep_best_after, num_restarts: int, num_steps: int) -> dict[int, int]:
    """``refine``'s ``keep_best_after`` (an int ``S`` or ``{step: kept}``) as a checked dict
    ordered by step."""
    if num_restarts < 2:
        raise ValueError(
            f"keep_best_after: prunes restarts, expected num_restarts > 1, got {num_restarts}"
        )
    if isinstance(keep_best_after, dict):
        if not keep_best_after:
            raise ValueError("keep_best_after: expected a non-empty dict {step: kept}, got {}")
        schedule = {}
        for step, kept in keep_best_after.items():
            step = check_positive_int(step, "keep_best_after: a step", minimum=0)
            schedule[step] = check_positive_int(kept, f"keep_best_after[{step}]")
        schedule = dict(sorted(schedule.items()))
    else:
        schedule = {check_positive_int(keep_best_after, "keep_best_after", minimum=0): 1}
    last = num_restarts
    for step, kept in schedule.items():
        if step >= num_steps:
            raise ValueError(
                f"keep_best_after: expected 0 <= keep_best_after < num_steps = {num_steps}, "
                f"got {step}"
            )
        if not kept < last:
            raise ValueError(
                f"keep_best_after: the restarts kept must decrease from {num_restarts} stage by "
                f"stage, got {kept} at step {step} after {last}"
            )
        last = kept
    return schedule


def best_restart(scores: torch.Tensor) -> torch.Tensor:
    """``(batch,)`` index of the best of ``scores`` ``(restarts, batch)`` (an ELBO) per column;
    of restarts tied up to rounding (within ``16 ε |best|``) the first.

    Restarts that reach the same optimum have ELBOs equal but for the order of their sums'
    roundings, which differs between devices and thread counts: a plain ``argmax`` then keeps
    one restart on the CPU and another on a GPU. NaN never wins; all NaN: restart 0.
    """
    scores = scores.nan_to_num(nan=-math.inf, posinf=math.inf, neginf=-math.inf)
    best = scores.amax(0)
    eps = torch.finfo(scores.dtype).eps if scores.is_floating_point() else 0.0
    tied = (scores >= best - 16 * eps * best.abs()) | (scores == best)
    return (tied.cumsum(0) == 0).sum(0)


def _best_restarts(elbo, active, frozen_elbo, batch: int, num_restarts: int, kept: int = 1):
    """Which of the running rows ``active`` (``None``: all ``batch`` rows) are among their
    datapoint's ``kept`` best restarts.

    The running rows compete with their ELBO ``elbo`` at their slots, a frozen row with its last
    recorded ELBO (``frozen_elbo``, over the whole batch). Rows are restart-major: row
    ``r * n + i`` is restart ``r`` of datapoint ``i``. The winners are drawn one at a time by
    :func:`best_restart` (ties up to rounding go to the first restart).

    :returns: a mask over the running rows.
    """
    if active is None:
        current = elbo
    else:
        current = frozen_elbo.index_copy(0, active, elbo.to(frozen_elbo.dtype))
    per_datapoint = batch // num_restarts
    scores = current.reshape(num_restarts, per_datapoint)
    columns = torch.arange(per_datapoint, device=scores.device)
    is_winner = torch.zeros(num_restarts, per_datapoint, dtype=torch.bool, device=scores.device)
    for _ in range(kept):
        winner = best_restart(scores.masked_fill(is_winner, -math.inf))
        is_winner[winner, columns] = True
    is_winner = is_winner.flatten()
    return is_winner if active is None else is_winner[active]


# --------------------------------------------------------------------------- refine
def initial_slots(model, x_enc, num_slots, *, inner=None, init=None, generator=None, rows=None):
    """λ_0 ``(batch, num_slots, slot_dim)``: from ``init``, else the rule's, else the model's.

    :param rows: only the slots of these datapoints of ``x_enc`` (an index tensor), equal to
        those rows of the whole draw: a random initializer draws for the whole batch (cheap),
        a conditional one reads only those datapoints (equal up to the rounding of its batched
        products), and the model's ``init_slots`` gets ``rows`` when it takes them (k-means++
        then seeds those datapoints only).
    """
    if init is None:
        init = getattr(inner, "slot_init", None)
    if init is not None:
        if getattr(init, "conditional", False):
            x_rows = x_enc if rows is None else x_enc[rows]
            return init(x_rows.shape[0], num_slots, generator=generator, dtype=x_enc.dtype,
                        x_enc=x_rows)  # fmt: skip
        slots = init(
            x_enc.shape[0], num_slots, generator=generator, dtype=x_enc.dtype, device=x_enc.device
        )
        return slots if rows is None else slots[rows]
    if rows is None:
        return model.init_slots(x_enc, num_slots, generator=generator)
    if "rows" in inspect.signature(model.init_slots).parameters:
        return model.init_slots(x_enc, num_slots, generator=generator, rows=rows)
    return model.init_slots(x_enc, num_slots, generator=generator)[rows]


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
    return torch.Generator().manual_seed(check_seed(seed))


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
    keep_best_after: int | dict[int, int] | None = None,
    tol: float | None = None,
    elbo_tol: float | None = None,
    keep_trajectory: bool = False,
    estimator: ELBOEstimator | None = None,
    record_history: bool = True,
    chunk_size: int | None = None,
    distributed: bool = False,
    gather: bool = True,
    responsibilities: bool = True,
) -> RefineResult:
    """Run the inner loop alone: maximize every datapoint's ELBO over its slots.

    No shared weight receives a gradient: the loop's own gradients are taken with
    :func:`torch.autograd.grad` w.r.t. the slots only, and the result is detached.

    Example::

        gmm = GaussianMixture(num_slots=4, dim=2)
        result = refine(gmm, x, EM(num_steps=50), seed=0, num_restarts=4)
        result.slots, result.elbo, result.history  # (4, B, 4, 5), (4, B), (51, 4, B)
        best = result.best()  # the best restart per datapoint: best.slots is (1, B, 4, 5)

    :param SlotModel model: the model (its ``encode`` is applied to ``x`` first).
    :param torch.Tensor x: datapoints, as the model's ``encode`` expects them.
    :param InnerRule inner: the rule, fixed or learned.
    :param int num_slots: K; defaults to ``model.num_slots``. Test-time K may differ from
        training K for every rule whose weights do not depend on K.
    :param int num_steps: T; defaults to ``inner.num_steps``.
    :param slots: explicit λ_0, ``(num_restarts, batch, num_slots, slot_dim)`` (with
        ``num_restarts = 1`` also ``(batch, num_slots, slot_dim)``), or a dict of named parts.
    :param init: a :class:`~pyro_slots.init.SlotInitializer` to draw λ_0 from.
    :param int seed: seed of the slot initialization (or pass ``generator``).
    :param int num_restarts: R independent initializations per datapoint, run side by side.
    :param keep_best_after: prune the restarts after this many steps (an int): at λ_t, t =
        ``keep_best_after``, the ELBO of every restart is evaluated and only each datapoint's
        best restart runs on; the others stay there, frozen as a converged datapoint is (their
        ``steps`` is ``keep_best_after``, their final ELBO the one they were compared by). The
        restarts then cost ``R`` times the first steps only, not the whole loop. For a rule
        that ascends the ELBO monotonically (EM) :meth:`RefineResult.best` then returns the
        restart that ran on; otherwise it returns whichever ended highest. Needs
        ``num_restarts > 1`` and ``0 <= keep_best_after < num_steps``. A dict ``{step: kept}``
        prunes in stages (successive halving): e.g. ``{0: 2, 1: 1}`` keeps each datapoint's
        2 best restarts at λ_0 and the best of those 2 at λ_1, so the full ``R`` restarts cost
        one ELBO evaluation, not a step (for EM, whose E-step is that evaluation, one step
        whose update is kept for the winners only); ``kept`` decreases from stage to stage, within
        ``1 <= kept < num_restarts``, and an int ``S`` is ``{S: 1}``.
    :param float tol: stop a datapoint once its residual ``‖λ_{t+1} - λ_t‖`` is below ``tol``;
        later steps run on the datapoints still active only (:func:`run_inner`).
    :param float elbo_tol: stop a datapoint once its ELBO changed by less than ``elbo_tol`` per
        measurement in one step (scikit-learn's criterion for EM).
    :param bool keep_trajectory: keep λ_t of every step in ``result.trajectory``.
    :param bool record_history: with ``False``, rules whose update does not need the ELBO
        (slot attention) skip evaluating it at every step: ``history`` is NaN for those steps
        (its last row, the final ELBO, is always computed). Saves one model evaluation per
        step at test time. ``elbo_tol`` needs every step's ELBO, so with it the ELBO is
        evaluated (and recorded) at every step whatever ``record_history`` says.
    :param int chunk_size: run the loop on consecutive chunks of at most ``chunk_size``
        datapoints (each with its ``num_restarts`` restarts) and concatenate their results. λ_0
        is drawn for the whole batch first, as without chunks, and a rule that draws per
        datapoint (:class:`~pyro_slots.inner.Reinitialize`) gives every chunk its rows of the
        whole batch's draw, so the result is the unchunked one (a chunk whose datapoints all
        stopped early is padded as :func:`run_inner` pads a stopped datapoint). The loop's
        working memory is then that of one chunk; the input, the result and the drawing of
        λ_0 still scale with the batch.
    :param bool distributed: split the datapoints over the ranks of the initialized
        ``torch.distributed`` process group: every rank draws the random numbers of λ_0 for the
        whole batch (pass a ``seed`` so that the ranks draw the same ones and the result equals
        the single-process one, up to rounding for a conditional initializer such as
        :class:`~pyro_slots.AmortizedInit`) but computes λ_0 (e.g. k-means++) for its own
        contiguous shard only (:func:`initial_slots` ``rows``), runs the loop on it (in chunks
        with ``chunk_size``; per-datapoint draws of the rule as in the whole batch) and
        all-gathers the shards, so every rank returns the whole
        :class:`RefineResult`. Every rank must call it with the same arguments; an error in one
        rank's loop is raised on every rank.
    :param bool gather: with ``distributed``, all-gather the shards (the default), or, with
        ``False``, return every rank's own shard only (``result.datapoints`` says which
        datapoints): nothing is sent between the ranks but the check that every rank's loop ran,
        and each rank holds ``1 / world_size`` of the result. For many datapoints the gather,
        not the loop, is then the larger cost (see ``benchmarks/results/sets_scaling.md``): a
        rank that writes or reduces its own results should not gather them. Without
        ``distributed`` it must be ``True``.
    :param bool responsibilities: return the posterior of the model's assignment site at the
        final slots (``result.responsibilities``, ``(R, batch, K, M)``). ``False`` leaves it
        ``None``: the largest tensor of the result for many measurements is then neither kept
        nor, with ``distributed``, gathered.
    :returns: a :class:`RefineResult` with restart axis ``R = num_restarts``.
    """
    if not isinstance(inner, InnerRule):
        raise TypeError(f"inner: expected an InnerRule, got {type(inner).__name__}")
    if chunk_size is not None:
        chunk_size = check_positive_int(chunk_size, "chunk_size")
    for name, value in (("distributed", distributed), ("responsibilities", responsibilities),
                        ("gather", gather), ("record_history", record_history),
                        ("keep_trajectory", keep_trajectory)):  # fmt: skip
        check_bool(value, name)
    if not gather and not distributed:
        raise ValueError("gather: False splits a distributed result, expected distributed=True")
    world_size, rank = process_group(distributed) or (1, 0)
    inner.check_model(model)
    num_steps = check_positive_int(inner.num_steps if num_steps is None else num_steps, "num_steps")
    num_restarts = check_positive_int(num_restarts, "num_restarts")
    if keep_best_after is not None:
        keep_best_after = _prune_schedule(keep_best_after, num_restarts, num_steps)
    if tol is not None:
        tol = check_positive_float(tol, "tol")
    if elbo_tol is not None:
        elbo_tol = check_positive_float(elbo_tol, "elbo_tol")
    generator = make_generator(seed, generator)
    check_data(x, "x", model, inner)
    with torch.no_grad():
        x_enc = model.encode(x)
    check_num_measurements(x_enc, num_slots or getattr(model, "num_slots", None))
    batch = x_enc.shape[0]
    if batch < world_size:
        raise ValueError(
            f"x: distributed=True splits the datapoints over {world_size} ranks, expected at "
            f"least {world_size} datapoints, got {batch}"
        )
    if isinstance(slots, dict):
        slots = model.slot_spec.pack(slots)
    if slots is not None:
        given, requested = tuple(getattr(slots, "shape", ())), num_slots
        if torch.is_tensor(slots) and slots.dim() == 3 and num_restarts == 1:
            slots = slots.unsqueeze(0)
        if (
            not torch.is_tensor(slots)
            or slots.dim() != 4
            or slots.shape[:2] != (num_restarts, batch)
            or slots.shape[-1] != model.slot_dim
        ):
            raise ValueError(
                f"slots: expected shape ({num_restarts}, {batch}, num_slots, {model.slot_dim})"
                + (f" or ({batch}, num_slots, {model.slot_dim})" if num_restarts == 1 else "")
                + f", got {given}"
            )
        num_slots = slots.shape[-2]
        slots = slots.reshape(num_restarts * batch, *slots.shape[2:])
        check_slots(slots, "slots", num_restarts * batch, model.slot_dim, requested, like=x_enc)
    else:
        num_slots = getattr(model, "num_slots", None) if num_slots is None else num_slots
        if num_slots is None:
            raise ValueError("num_slots: required, since the model has no default num_slots")
        num_slots = check_positive_int(num_slots, "num_slots")
    x_rep = versioned(lambda t: t.repeat(num_restarts, 1, 1), x_enc) if num_restarts > 1 else x_enc
    start, stop = _shard(batch, world_size, rank)
    rows = None  # a rank's λ_0 only: its datapoints' rows r * batch + i of every restart r
    if world_size > 1:
        rows = (torch.arange(num_restarts)[:, None] * batch + torch.arange(start, stop)).flatten()
        rows = rows.to(x_enc.device)
    error = None  # a rank's failure, raised on every rank together (_raise_together)
    try:
        if slots is None:
            with torch.no_grad():
                slots = initial_slots(
                    model, x_rep, num_slots, inner=inner, init=init, generator=generator, rows=rows
                )
        elif rows is not None:
            slots = slots[rows]
        slots = check_finite(slots.detach(), "initial slots")
    except Exception as e:
        if world_size == 1:
            raise
        error = e
    options = dict(
        tol=tol,
        elbo_tol=elbo_tol,
        keep_trajectory=keep_trajectory,
        estimator=estimator,
        record_history=record_history,
        responsibilities=responsibilities,
        num_restarts=num_restarts,
        keep_best_after=keep_best_after,
    )
    if chunk_size is None and world_size == 1:
        result = run_inner(model, x_rep, inner, slots, num_steps, **options)
        result = _split_restarts(result, num_restarts, batch, x_enc)
    else:
        del x_rep  # chunks repeat their own datapoints for the restarts
        result = None
        try:
            if error is None:
                result = _run_chunks(
                    model, x_enc, inner, slots, num_steps, num_restarts, start, stop, chunk_size,
                    options,
                )  # fmt: skip
        except Exception as e:  # raised below, once every rank knows
            if world_size == 1:
                raise
            error = e
        if world_size > 1:
            _raise_together(error, rank, x_enc.device)
            if gather:
                result = _all_gather_result(result, batch, world_size)
        result.x_enc = x_enc if gather else x_enc[start:stop]
    if not gather:
        result.datapoints = slice(start, stop)
    return result


# --------------------------------------------------------------------------- chunks and ranks
def _raise_together(error: Exception | None, rank: int, device) -> None:
    """Every rank raises if one rank's loop failed, instead of the others waiting for it in the
    all-gather until the process group's timeout."""
    import torch.distributed as dist

    failed = torch.tensor([-1 if error is None else rank], device=device)
    dist.all_reduce(failed, op=dist.ReduceOp.MAX)
    if error is not None:
        raise error
    if int(failed.item()) >= 0:
        raise InnerLoopError(
            f"distributed: the inner loop failed on rank {int(failed.item())} (its own error "
            "says why); this rank's shard ran"
        )


def _shard(batch: int, world_size: int, rank: int) -> tuple[int, int]:
    """The contiguous datapoints ``[start, stop)`` of ``rank``; shard sizes differ by at most 1."""
    return batch * rank // world_size, batch * (rank + 1) // world_size


def _batch_tensors(result: RefineResult) -> list:
    """The result's tensors whose batch axis is axis 1 (after the restart axis) and whose shape
    does not depend on the number of steps, in a fixed order."""
    tensors = [result.slots, result.elbo, result.initial_slots, result.steps]
    if result.responsibilities is not None:
        tensors.append(result.responsibilities)
    tensors.append(result.state.slots)
    return tensors + [a for a in result.state.aux if torch.is_tensor(a)]


def _with_batch_tensors(result: RefineResult, tensors: list, **changes) -> RefineResult:
    """``result`` with the tensors of :func:`_batch_tensors` replaced by ``tensors``."""
    tensors = iter(tensors)
    slots, elbo, initial, steps = (next(tensors) for _ in range(4))
    resp = next(tensors) if result.responsibilities is not None else None
    state_slots = next(tensors)
    aux = tuple(next(tensors) if torch.is_tensor(a) else a for a in result.state.aux)
    state = InnerState(state_slots, changes.pop("num_steps", result.num_steps), aux)
    return RefineResult(
        slots=slots,
        elbo=elbo,
        history=changes.pop("history", result.history),
        residuals=changes.pop("residuals", result.residuals),
        relative_residuals=changes.pop("relative_residuals", result.relative_residuals),
        initial_slots=initial,
        steps=steps,
        num_steps=state.step,
        responsibilities=resp,
        trajectory=changes.pop("trajectory", result.trajectory),
        x_enc=result.x_enc,
        state=state,
    )


def _pad_steps(history, residuals, relres, trajectory, num_steps: int):
    """The step records of a loop that ran fewer than ``num_steps`` steps, padded as
    :func:`run_inner` records a stopped datapoint: the final ELBO and slots repeat, the
    residuals are zero."""
    extra = num_steps - residuals.shape[0]
    if extra == 0:
        return history, residuals, relres, trajectory
    zeros = residuals.new_zeros(extra, *residuals.shape[1:])
    return (
        torch.cat([history, history[-1:].expand(extra, *history.shape[1:])]),
        torch.cat([residuals, zeros]),
        torch.cat([relres, zeros]),
        trajectory + trajectory[-1:] * extra,
    )


def _run_chunks(
    model, x_enc, inner, slots, num_steps, num_restarts, start, stop, chunk_size, options
) -> RefineResult:
    """The loop on datapoints ``[start, stop)`` of ``x_enc``, ``chunk_size`` at a time (all of
    them at once with ``None``), from their λ_0 ``slots`` ``(R * (stop - start), K, D)``
    (restart-major).

    The result covers ``[start, stop)`` (restart axis first, as :func:`refine` returns it); the
    tensors whose shape does not depend on the number of steps are written into preallocated
    ones chunk by chunk, so no chunk's intermediates outlive it.
    """
    size = stop - start
    chunk_size = size if chunk_size is None else chunk_size
    slots = slots.reshape(num_restarts, size, *slots.shape[1:])
    out, template, records = None, None, []
    for lo in range(start, stop, chunk_size):
        hi = min(lo + chunk_size, stop)
        x = x_enc[lo:hi]
        x_rep = versioned(lambda t: t.repeat(num_restarts, 1, 1), x) if num_restarts > 1 else x
        lam = slots[:, lo - start : hi - start].reshape(num_restarts * (hi - lo), *slots.shape[2:])
        # Where the chunk's rows sit in the batch of every datapoint and restart (restart-major,
        # as unchunked): a rule's random draws are those of the unchunked loop.
        rows = torch.arange(num_restarts)[:, None] * x_enc.shape[0] + torch.arange(lo, hi)
        rows = rows.flatten().to(x_enc.device)
        num_rows = num_restarts * x_enc.shape[0]
        try:
            part = run_inner(
                model, x_rep, inner, lam, num_steps, rows=rows, num_rows=num_rows, **options
            )
        except InnerLoopError as e:
            raise InnerLoopError(
                f"in the chunk of datapoints [{lo}, {hi}) (chunk_size={chunk_size}; the "
                f"datapoint indices count within the chunk, restarts stacked): {e}"
            ) from e
        part = _split_restarts(part, num_restarts, hi - lo, None)
        tensors = _batch_tensors(part)
        if out is None:
            out = [t.new_empty((t.shape[0], size, *t.shape[2:])) for t in tensors]
            template = _with_batch_tensors(part, out)  # not the chunk's own tensors
        for buffer, t in zip(out, tensors):
            buffer[:, lo - start : hi - start] = t
        records.append((part.history, part.residuals, part.relative_residuals, part.trajectory))
        del part, tensors, x_rep, lam
    steps_run = max(r[1].shape[0] for r in records)
    records = [_pad_steps(*r, steps_run) for r in records]
    history, residuals, relres, trajectory = zip(*records)
    trajectory = [torch.cat(at_step, 1) for at_step in zip(*trajectory)]
    return _with_batch_tensors(
        template,
        out,
        history=torch.cat(history, 2),
        residuals=torch.cat(residuals, 2),
        relative_residuals=torch.cat(relres, 2),
        trajectory=trajectory,
        num_steps=steps_run,
    )


def _all_gather(t: torch.Tensor, axis: int, batch: int, world_size: int) -> torch.Tensor:
    """Every rank's shard of ``t`` (its datapoints along ``axis``, as :func:`_shard` splits
    ``batch``) concatenated in rank order, on every rank."""
    import torch.distributed as dist

    counts = [_shard(batch, world_size, r)[1] - _shard(batch, world_size, r)[0]
              for r in range(world_size)]  # fmt: skip
    size = max(counts)
    local = t.movedim(axis, 0)
    if local.shape[0] < size:  # all_gather needs one shape: pad the smaller shards
        local = torch.cat([local, local.new_zeros(size - local.shape[0], *local.shape[1:])])
    local = local.contiguous()
    gathered = local.new_empty((world_size, *local.shape))
    dist.all_gather(list(gathered.unbind(0)), local)
    if all(c == size for c in counts):
        full = gathered.flatten(0, 1)
    else:
        full = torch.cat([gathered[r, :c] for r, c in enumerate(counts)])
    return full.movedim(0, axis).contiguous()


def _all_gather_result(result: RefineResult, batch: int, world_size: int) -> RefineResult:
    """The whole batch's :class:`RefineResult` from every rank's shard of it."""
    import torch.distributed as dist

    steps_run = torch.tensor([result.num_steps], device=result.slots.device)
    dist.all_reduce(steps_run, op=dist.ReduceOp.MAX)
    steps_run = int(steps_run.item())
    history, residuals, relres, trajectory = _pad_steps(
        result.history,
        result.residuals,
        result.relative_residuals,
        result.trajectory,
        steps_run,
    )

    def gather(t, axis):
        return _all_gather(t, axis, batch, world_size)

    return _with_batch_tensors(
        result,
        [gather(t, 1) for t in _batch_tensors(result)],
        history=gather(history, 2),
        residuals=gather(residuals, 2),
        relative_residuals=gather(relres, 2),
        trajectory=[gather(s, 1) for s in trajectory],
        num_steps=steps_run,
    )


def refine_video(
    model,
    video: torch.Tensor,
    inner: InnerRule,
    *,
    carry: bool = True,
    transition=None,
    num_slots: int | None = None,
    num_steps: int | None = None,
    init=None,
    seed: int | None = None,
    generator: torch.Generator | None = None,
    **kwargs,
) -> list[RefineResult]:
    """Run the inner loop frame by frame, each frame starting from the slots of the one before.

    Frame ``t + 1``'s inner loop starts from ``transition(λ*_t)`` (the identity by default; any
    module or callable ``(batch, K, D) -> (batch, K, D)``, e.g. a learned dynamics model as in
    SAVi, Kipf et al. 2021), so a slot that explains an object in one frame starts the next
    frame on it: slots track objects (R-NEM, van Steenkiste et al. 2018; OP3, Veerapaneni et
    al. 2020). Frame 0 starts from the usual initialization. With ``carry=False`` every frame
    starts afresh (the per-frame baseline).

    :param torch.Tensor video: ``(batch, frames, ...)``; frame ``t`` is ``video[:, t]``, as the
        model's ``encode`` expects a batch.
    :param bool carry: carry the slots over from frame to frame.
    :param transition: maps the slots of frame ``t`` to the start of frame ``t + 1``.
    :param kwargs: the other arguments of :func:`refine` (``num_restarts`` excepted: one
        trajectory of slots per clip).
    :returns: one :class:`RefineResult` per frame.
    """
    if not torch.is_tensor(video) or video.dim() < 3 or video.shape[1] < 1:
        raise ValueError(
            "video: expected a tensor (batch, frames >= 1, ...), got "
            f"{tuple(getattr(video, 'shape', ())) if torch.is_tensor(video) else type(video)}"
        )
    carry = check_bool(carry, "carry")
    if kwargs.get("num_restarts", 1) != 1:
        raise ValueError("num_restarts: refine_video carries one trajectory of slots per clip")
    if transition is not None and not callable(transition):
        raise TypeError(f"transition: expected a callable, got {type(transition).__name__}")
    generator = make_generator(seed, generator)
    results, carried, shard = [], None, None
    for t in range(video.shape[1]):
        slots = None
        if carry and carried is not None:
            with torch.no_grad():
                slots = carried if transition is None else transition(carried)
            if shard is not None:  # gather=False: this rank's rows; the others are never read
                slots = slots.new_zeros(video.shape[0], *slots.shape[1:]).index_copy_(
                    0, torch.arange(shard.start, shard.stop, device=slots.device), slots
                )
        result = refine(
            model,
            video[:, t],
            inner,
            num_slots=num_slots,
            num_steps=num_steps,
            slots=slots,
            init=init,
            generator=generator,
            **kwargs,
        )
        results.append(result)
        carried, shard = result.slots[0], result.datapoints
    return results


def _split_restarts(result: RefineResult, num_restarts: int, batch: int, x_enc) -> RefineResult:
    """The loop's ``(1, R * batch, ...)`` tensors as ``(R, batch, ...)``, detached."""

    def split(t, step_first=False):
        if not torch.is_tensor(t):
            return t
        t = t.detach()
        if step_first:
            return t.reshape(t.shape[0], num_restarts, batch, *t.shape[3:])
        return t.reshape(num_restarts, batch, *t.shape[2:])

    state = result.state
    return RefineResult(
        slots=split(result.slots),
        elbo=split(result.elbo),
        history=split(result.history, True),
        residuals=split(result.residuals, True),
        relative_residuals=split(result.relative_residuals, True),
        initial_slots=split(result.initial_slots),
        steps=split(result.steps),
        num_steps=result.num_steps,
        responsibilities=split(result.responsibilities),
        trajectory=[split(s) for s in result.trajectory],
        x_enc=x_enc,
        state=InnerState(split(state.slots), state.step, tuple(split(a) for a in state.aux)),
    )
