"""The interface every inner rule follows: ``init`` + ``step`` over an explicit state.

An inner rule improves the slots of every datapoint at once (vectorized over the batch); it sees
the per-datapoint ELBO through an :class:`InnerProblem` and never the task objective. Fixed rules
(:class:`GradientAscent`, :class:`EM`, :class:`SoftKMeans`) are parameter-free modules, learned
rules own weights; either way the outer loop can ask for ``rule.parameters()``.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from pyro.nn import PyroModule

from ..elbo import DEFAULT_ESTIMATOR, ELBOEstimator
from ..validation import CapabilityError, check_bool, check_positive_int

__all__ = ["InnerProblem", "InnerRule", "InnerState", "StepInfo"]


class InnerState(NamedTuple):
    """What the next step needs.

    :ivar slots: ``(batch, num_slots, slot_dim)``, the current λ_t.
    :ivar step: number of steps taken so far.
    :ivar aux: rule-specific tensors carried between steps (optimizer moments, recurrent
        hidden state), each with leading dims ``(batch, num_slots)``; permuted with the slots.
    """

    slots: torch.Tensor
    step: int = 0
    aux: tuple = ()


class StepInfo(NamedTuple):
    """Diagnostics of one step (never fed back into the rule).

    :ivar elbo: ``(batch,)`` ELBO at the slots *before* the step, ``L(λ_t)``, detached.
    :ivar responsibilities: ``(batch, num_slots, measurements)`` posterior assignment
        probabilities at ``λ_t`` where the rule computed them, else ``None``.
    :ivar retry: ``(batch,)`` bool: the datapoints that stayed at ``λ_t`` but will propose
        another step next time (a rejected step whose step size was halved, as
        :class:`~pyro_slots.inner.GeneralizedEM` does), or ``None`` where none did. Their zero
        residual is not convergence: ``tol`` and ``elbo_tol`` do not stop them on it.
    """

    elbo: torch.Tensor
    responsibilities: torch.Tensor | None = None
    retry: torch.Tensor | None = None


def versioned(fn, t: torch.Tensor) -> torch.Tensor:
    """``fn(t)`` (an index or a repeat of ``t``; ``None``: ``t`` itself) as a tensor with a
    version counter, also under :func:`torch.inference_mode`: computed outside it (grad mode
    unchanged), and copied only where it would still be an inference tensor.

    The estimator remembers that an observed tensor passed its support check for as long as its
    version is unchanged (:class:`~pyro_slots.elbo.ValidatedObservations`); an inference tensor
    has no version and is checked again at every evaluation, about a fifth of an EM step on
    point sets.
    """
    grad = torch.is_grad_enabled()
    with torch.inference_mode(False), torch.set_grad_enabled(grad):
        out = t if fn is None else fn(t)
        return out.clone() if out.is_inference() else out


class InnerProblem:
    """The inner objective of one batch: ``λ ↦ L(x̃^n, λ^n)`` for every datapoint ``n``.

    :param SlotModel model: the slot model.
    :param torch.Tensor x: encoded measurements ``(batch, M, features)``.
    :param ELBOEstimator estimator: how the ELBO is computed (default
        :data:`~pyro_slots.elbo.DEFAULT_ESTIMATOR`, shared by every problem).
    :param bool record_history: whether rules that do not need the ELBO for their update
        still evaluate it at every step for the history (see :meth:`history_elbo`).
    :param torch.Tensor rows: where this problem's datapoints sit in the batch that random
        choices are drawn for, ``(batch,)`` distinct indices in ``[0, num_rows)``; default
        ``None``, the problem is that batch. A rule that draws per datapoint
        (:class:`~pyro_slots.inner.Reinitialize`) draws by these rows (:meth:`row_index`), so
        a chunk, a rank's shard or the still-active datapoints of a batch get the numbers the
        whole batch draws for them (:func:`~pyro_slots.refine` sets them).
    :param int num_rows: the size of that batch (required with ``rows``).
    """

    def __init__(
        self,
        model,
        x: torch.Tensor,
        estimator: ELBOEstimator | None = None,
        record_history: bool = True,
        rows: torch.Tensor | None = None,
        num_rows: int | None = None,
    ):
        self.model = model
        self.x = x
        self.estimator = estimator or DEFAULT_ESTIMATOR
        self.record_history = check_bool(record_history, "record_history")
        if (rows is None) != (num_rows is None):
            raise ValueError("rows, num_rows: give both (a subset of a larger batch) or neither")
        if rows is not None:
            num_rows = check_positive_int(num_rows, "num_rows")
            if not torch.is_tensor(rows) or rows.dim() != 1 or rows.dtype != torch.long:
                raise ValueError(
                    f"rows: expected a 1-D tensor of int64 indices, got "
                    f"{tuple(rows.shape) if torch.is_tensor(rows) else type(rows).__name__}"
                )
            if rows.shape[0] != x.shape[0]:
                raise ValueError(
                    f"rows: expected one index per datapoint ({x.shape[0]}), got {rows.shape[0]}"
                )
            if rows.numel() and (int(rows.min()) < 0 or int(rows.max()) >= num_rows):
                raise ValueError(f"rows: expected indices in [0, {num_rows})")
            if torch.unique(rows).numel() != rows.numel():
                raise ValueError(
                    "rows: expected distinct indices (two datapoints at one row would share "
                    "their random draws)"
                )
        self.rows = rows
        self.num_rows = x.shape[0] if num_rows is None else num_rows

    def subset(self, index: torch.Tensor) -> InnerProblem:
        """The problem of the datapoints ``index`` (an index tensor into this batch), keeping
        where they sit in the batch of draws."""
        rows = index if self.rows is None else self.rows[index]
        x = versioned(lambda t: t[index], self.x)
        return InnerProblem(self.model, x, self.estimator, self.record_history, rows, self.num_rows)

    def row_index(self) -> torch.Tensor:
        """Where the datapoints sit in the batch of draws: ``rows``, or ``0, ..., batch - 1``
        where the problem is that batch (``(batch,)`` int64 on the CPU)."""
        if self.rows is None:
            return torch.arange(self.num_rows)
        return self.rows.cpu()

    def elbo(self, slots: torch.Tensor) -> torch.Tensor:
        """ELBO of every datapoint, ``(batch,)``, differentiable in slots and weights."""
        return self.estimator(self.model, self.x, slots)

    def history_elbo(self, slots: torch.Tensor) -> torch.Tensor:
        """``L(λ_t)`` for the history only (detached), or NaNs when the history is off.

        Rules whose update does not use the ELBO (e.g. slot attention) call this, so that
        ``refine(..., record_history=False)`` saves one model evaluation per step.
        """
        if not self.record_history:
            return torch.full(
                self.x.shape[:1], float("nan"), dtype=self.x.dtype, device=self.x.device
            )
        with torch.no_grad():
            return self.elbo(slots)

    def elbo_and_responsibilities(self, slots: torch.Tensor):
        """``(L(λ), p(z^{n,m} = k | x, λ))`` from one evaluation of the Pyro program.

        ``z`` is the model's enumerated assignment site (``model.assignment_site``); the
        responsibilities have shape ``(batch, num_slots, measurements)``.
        """
        site = getattr(self.model, "assignment_site", None)
        if site is None:
            raise CapabilityError(
                f"{type(self.model).__name__} declares no assignment_site (the enumerated "
                "sample site of the slot assignments)"
            )
        elbo, post = self.estimator.elbo_and_posterior(self.model, self.x, slots, site, probs=True)
        batch, num_points = self.x.shape[:2]
        resp = post.reshape(slots.shape[1], batch, num_points).movedim(0, 1)
        return elbo, resp

    def elbo_and_grad(self, slots: torch.Tensor, create_graph: bool = False):
        """``(L(λ), ∇_λ L(λ))`` per datapoint; the gradient has the shape of ``slots``.

        Datapoints are independent, so the gradient of the summed ELBO is the per-datapoint
        gradient. Taken with :func:`torch.autograd.grad`, so nothing accumulates in ``.grad`` of
        the shared weights. With ``create_graph=True`` the step stays differentiable (unrolling).
        """
        if not slots.requires_grad:
            slots = slots.detach().requires_grad_()
        with torch.enable_grad():
            elbo = self.elbo(slots)
            (grad,) = torch.autograd.grad(elbo.sum(), slots, create_graph=create_graph)
        if not create_graph:
            elbo = elbo.detach()
        return elbo, grad


class InnerRule(PyroModule):
    """Base class of inner rules: ``init(problem, slots) -> state``, ``step(...) -> (state, info)``.

    :param int num_steps: default number of steps :func:`pyro_slots.refine` runs.
    """

    #: Whether :meth:`step` differentiates the ELBO w.r.t. the slots.
    uses_elbo_gradient = False

    #: Whether a step costs about one evaluation of the ELBO at ``λ_t`` (the E-step of
    #: coordinate ascent, whose update is cheap beside it). :func:`pyro_slots.refine` then
    #: prunes restarts (``keep_best_after``) by the ELBO the step itself reports
    #: (:attr:`StepInfo.elbo`), running the step on every restart and keeping the winners'
    #: updates, instead of evaluating the ELBO first and stepping the winners.
    step_is_elbo_evaluation = False

    #: Whether the step is one map ``λ_{t+1} = f(λ_t)`` that implicit differentiation may take
    #: at its fixed point. ``False`` for steps that accept or reject a proposal per datapoint:
    #: a rejected step is the identity, where ``I - ∂f/∂λ`` is singular and the adjoint of the
    #: implicit function theorem does not exist (:class:`~pyro_slots.NestedSVI` refuses
    #: ``gradient="implicit"`` for them).
    implicit_differentiable = True

    def __init__(self, num_steps: int):
        super().__init__()
        self.num_steps = check_positive_int(num_steps, "num_steps")

    def init(self, problem: InnerProblem, slots: torch.Tensor) -> InnerState:
        """State at step 0 for the batch of ``problem`` from the initial slots."""
        return InnerState(slots=slots, step=0, aux=())

    def step(
        self,
        state: InnerState,
        problem: InnerProblem,
        create_graph: bool = False,
    ) -> tuple[InnerState, StepInfo]:
        """One update ``λ_{t+1} = f(λ_t, x)``; must not modify any tensor in place.

        :param InnerState state: current state.
        :param InnerProblem problem: the per-datapoint ELBO of this batch.
        :param bool create_graph: keep the step differentiable (unrolled gradients).
        """
        raise TypeError(f"{type(self).__name__} must define step()")

    def divergence_hint(self) -> str:
        """What to change when this rule's slots or ELBO became non-finite.

        :class:`~pyro_slots.InnerLoopError` messages end with it; rules with a step size
        override it to name that parameter and its value.
        """
        return (
            f"lower the step size of {type(self).__name__} or wrap it in "
            "pyro_slots.inner.Safeguarded(rule, fallback=...)"
        )

    def check_model(self, model) -> None:
        """Raise :class:`~pyro_slots.validation.CapabilityError` if ``model`` can't be used."""

    def _require_slot_dim(self, model, slot_dim: int) -> None:
        """For rules whose weights are sized for one slot dimension."""
        if getattr(model, "slot_dim", None) != slot_dim:
            raise CapabilityError(
                f"{type(self).__name__} was built for slot_dim={slot_dim}, but "
                f"{type(model).__name__} has slot_dim={getattr(model, 'slot_dim', None)}; build "
                "it with slot_dim=model.slot_dim"
            )

    def extra_repr(self) -> str:
        return f"num_steps={self.num_steps}"
