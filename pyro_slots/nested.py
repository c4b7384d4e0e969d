"""The outer loop: fit the shared weights w on a task objective J through the inner loop."""

from __future__ import annotations

import inspect
import itertools
import warnings
from typing import NamedTuple

import pyro
import torch
from pyro.optim import PyroOptim

from .elbo import ELBOEstimator
from .inner.base import InnerRule
from .model import SlotModel
from .objectives.base import Objective
from .refine import RefineResult, initial_slots, make_generator, run_inner
from .validation import (
    check_bool,
    check_data,
    check_num_measurements,
    check_positive_float,
    check_positive_int,
    process_group,
)

__all__ = [
    "GRADIENT_MODES",
    "ITERATION_WEIGHTS",
    "ImplicitAdjoint",
    "ImplicitGradientWarning",
    "NestedSVI",
    "NestedStep",
    "RankFailedError",
]

GRADIENT_MODES = ("unrolled", "truncated", "first_order", "implicit")
ITERATION_WEIGHTS = ("last", "uniform", "linear")


_INSTANCES = itertools.count()


class ImplicitGradientWarning(RuntimeWarning):
    """The adjoint solve of an implicit gradient failed; that step used first-order gradients."""


class ImplicitAdjoint:
    r"""Implicit differentiation at a fixed point ``λ* = f(λ*, w)``.

    By the implicit function theorem ``dλ*/dw = (I - ∂f/∂λ)^{-1} ∂f/∂w``, so the gradient of
    J reaching ``λ* = f(λ*, w)`` is replaced by the solution ``u`` of the adjoint system
    ``(I - (∂f/∂λ)^T) u = g`` (``g = ∂J/∂λ*``), with vector-Jacobian products only (Bai et al.
    2019, DEQ; Amos & Kolter 2017). ``u`` then flows into ``w`` through the one differentiable
    step. Two solvers:

    * ``"gmres"`` (default) — GMRES (Saad & Schultz 1986) on the Krylov space of the
      vector-Jacobian product: converges whenever ``I - ∂f/∂λ`` is invertible, also where the
      update is expansive (spectral radius >= 1) and the fixed-point iteration diverges;
    * ``"fixed_point"`` — the Neumann iteration ``u ← g + (∂f/∂λ)^T u``, which needs a
      contraction.

    Both cost one vector-Jacobian product per iteration. If the solve does not reach ``tol``
    in ``max_iter`` iterations or produces non-finite values, ``g`` is passed through unchanged
    (the first-order gradient) with an :class:`ImplicitGradientWarning`.

    :param int max_iter: adjoint iterations (GMRES: the Krylov dimension, without restarts).
    :param float tol: stop when the residual ``‖g - (I - J^T) u‖`` (GMRES) or the step
        ``‖u_{i+1} - u_i‖`` (fixed point) is at most ``tol · ‖g‖``.
    :param str solver: ``"gmres"`` or ``"fixed_point"``.
    """

    SOLVERS = ("gmres", "fixed_point")

    def __init__(self, max_iter: int = 100, tol: float = 1e-6, solver: str = "gmres"):
        self.max_iter = check_positive_int(max_iter, "max_iter")
        self.tol = check_positive_float(tol, "tol")
        if solver not in self.SOLVERS:
            raise ValueError(f"solver: expected one of {self.SOLVERS}, got {solver!r}")
        self.solver = solver
        self.last_iterations = 0
        self.num_fallbacks = 0

    def __call__(self, out: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
        """Wrap ``out = f(lam)`` so that its incoming gradient is replaced by the adjoint."""
        if not out.requires_grad:
            return out
        return _AdjointSolve.apply(out, lambda g: self.solve(g, out, lam))

    def solve(self, g: torch.Tensor, out: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
        def vjp(u):
            (v,) = torch.autograd.grad(out, lam, u, retain_graph=True, allow_unused=True)
            return torch.zeros_like(u) if v is None else v

        solve = self._gmres if self.solver == "gmres" else self._fixed_point
        u, iterations = solve(vjp, g)
        if u is not None:
            self.last_iterations = iterations
            return u
        self.num_fallbacks += 1
        self.last_iterations = self.max_iter
        warnings.warn(
            f"implicit gradient: the adjoint solve ({self.solver}) did not converge in "
            f"{self.max_iter} iterations (or diverged); using the first-order gradient for "
            "this step",
            ImplicitGradientWarning,
            stacklevel=2,
        )
        return g

    def _fixed_point(self, vjp, g):
        u = g
        scale = g.norm() + 1e-30
        for i in range(self.max_iter):
            u_next = g + vjp(u)
            if not torch.isfinite(u_next).all():
                return None, i + 1
            if (u_next - u).norm() <= self.tol * scale:
                return u_next, i + 1
            u = u_next
        return None, self.max_iter

    def _gmres(self, vjp, g):
        """GMRES without restarts: Arnoldi with modified Gram-Schmidt, the small least-squares
        problem in float64 (the Hessenberg matrix is at most ``(max_iter + 1) x max_iter``)."""
        beta = g.norm()
        if beta == 0:
            return g, 0
        basis = [g / beta]
        hess = torch.zeros(self.max_iter + 1, self.max_iter, dtype=torch.float64)
        for j in range(self.max_iter):
            w = basis[j] - vjp(basis[j])  # (I - J^T) v_j
            if not torch.isfinite(w).all():
                return None, j + 1
            for i, v in enumerate(basis):
                hess[i, j] = (w * v).sum().double()
                w = w - hess[i, j].to(w.dtype) * v
            hess[j + 1, j] = w.norm().double()
            rhs = torch.zeros(j + 2, dtype=torch.float64)
            rhs[0] = beta.double()
            h = hess[: j + 2, : j + 1]
            y = torch.linalg.lstsq(h, rhs.unsqueeze(-1)).solution.squeeze(-1)
            residual = (rhs - h @ y).norm()
            if residual <= self.tol * beta.double():
                u = sum(c.to(g.dtype) * v for c, v in zip(y, basis))
                return (u, j + 1) if torch.isfinite(u).all() else (None, j + 1)
            if hess[j + 1, j] <= 1e-12 * beta.double():
                # Breakdown: the Krylov space is invariant, and the least-squares residual above
                # is the smallest any u reaches in it. Above tol, (I - J^T) u = g has no
                # solution there (a singular system, g outside its range): not a solve.
                return None, j + 1
            basis.append(w / hess[j + 1, j].to(w.dtype))
        return None, self.max_iter


class RankFailedError(RuntimeError):
    """Another rank's update failed (its own error says why); no rank changed its weights."""


class _AdjointSolve(torch.autograd.Function):
    """Identity in the forward pass; the backward pass maps ``g`` to ``solve(g)``."""

    @staticmethod
    def forward(ctx, out, solve):
        ctx.solve = solve
        return out.view_as(out)

    @staticmethod
    def backward(ctx, g):
        return ctx.solve(g), None


class NestedSVI:
    r"""Nested stochastic variational inference: Eq. 4-5 of the seed paper.

    For every batch, the inner rule maximizes each datapoint's ELBO over its slots
    (``λ*^n = argmax L(x̃^n, λ^n)``), then one step of ``optim`` lowers the task objective
    ``J(x^n, w, λ*^n)`` averaged over the batch, w.r.t. the shared weights ``w`` — the
    parameters of the model (encoder, decoder), of the inner rule (when learned), of the slot
    initializer and of the objective's heads. Shaped like :class:`pyro.infer.SVI`.

    Gradient modes (how ``dJ/dw`` flows through the inner loop):

    * ``"unrolled"`` — backpropagate through every inner step (exact for the finite loop);
    * ``"truncated"`` — through the last ``truncate`` steps only;
    * ``"first_order"`` — through the last step only, λ detached before it;
    * ``"implicit"`` — implicit differentiation at the fixed point (:class:`ImplicitAdjoint`),
      memory independent of the number of steps.

    ``"first_order"``, and ``"truncated"`` with fewer differentiated steps than T, detach λ
    before the differentiated steps, so J's gradient reaches no parameter of a learned slot
    initialization (``init``, or an initializer of the model or rule): it stays where it starts.
    The constructor warns (``UserWarning``) when such an initializer has trainable parameters,
    unless ``straight_through=True``: λ enters the differentiated steps as
    ``sg(λ) + λ_0 - sg(λ_0)`` (its value unchanged), so the initializer receives the gradient
    of J w.r.t. the slots where differentiation starts — the bi-level straight-through gradient
    of BO-QSA (Jia et al. 2023), with which learned queries (:class:`~pyro_slots.LearnedQueries`)
    train under first-order gradients.

    Inner-loop gradients are taken with :func:`torch.autograd.grad`; only J's gradient is ever
    written into the shared weights' ``.grad``.

    :param SlotModel model: the model.
    :param InnerRule inner: the inner rule.
    :param Objective objective: the task objective J.
    :param PyroOptim optim: a :mod:`pyro.optim` optimizer, e.g. ``pyro.optim.Adam({"lr": 1e-3})``,
        or one of its learning-rate scheduler wrappers (e.g. ``pyro.optim.LambdaLR``), which the
        caller steps with ``optim.step()`` as in Pyro. :meth:`step` calls ``optim(params)``;
        :meth:`state_dict` saves its state through ``optim.get_state()``, keyed by the names
        of :meth:`named_parameters`.
    :param gradient: one of :data:`GRADIENT_MODES`, or an :class:`ImplicitAdjoint` (implicit
        gradients with that solver; ``"implicit"`` is ``ImplicitAdjoint()``).
    :param int num_slots: K during training; defaults to ``model.num_slots``.
    :param int num_steps: T during training; defaults to ``inner.num_steps``.
    :param int truncate: number of differentiated steps for ``"truncated"``.
    :param str iteration_weights: how J weights the inner iterates: ``"last"`` (J at λ_T),
        ``"uniform"`` (``1 / T``) or ``"linear"`` (``t / (1 + ... + T)``: IODINE's ``t / T``
        normalized to sum to one, so that J keeps the scale of ``"last"``) over λ_1..λ_T. With
        ``gradient="first_order"`` every iterate then keeps the graph of its own step,
        ``λ_t = f(sg(λ_{t-1}))``, so each term trains the rule through one step (IODINE's loss
        with the gradient stopped between iterations); T one-step graphs instead of one.
    :param float tol: per-datapoint stopping tolerance of the graph-free inner steps
        (:func:`~pyro_slots.refine.run_inner`); the differentiated steps always run.
    :param init: optional slot initializer (its parameters are trained too).
    :param int seed: seed of the slot initializations.
    :param float clip_norm: clip the global gradient norm of w to this value.
    :param ELBOEstimator estimator: how the inner ELBO is computed.
    :param bool distributed: average J's gradients over the ranks of ``torch.distributed``
        (default: whenever a process group is initialized). The inner loop stays local to each
        rank; only the shared weights' gradients are communicated, by one ``all_reduce`` per
        step. Weights are broadcast from rank 0 at construction. Every rank draws λ_0 from the
        same stream, the random numbers of the global batch, and computes its own rows (also
        k-means++): with a rank's share of each global batch, N processes draw the
        single-process λ_0, and rank 0's checkpoint resumes every rank. Plain ``all_reduce`` rather
        than ``DistributedDataParallel``: J's gradients are taken with
        :func:`torch.autograd.grad`, which DDP's backward hooks do not see.
    :param bool sequence: ``x`` holds clips ``(batch, frames, ...)``: frame ``t + 1``'s inner
        loop starts from ``transition(λ*_t)`` (as :func:`~pyro_slots.refine_video`) and J is
        the sum over frames. The carried slots keep their graph exactly where the initial slots
        do: with ``"unrolled"`` the gradient flows back through every frame, the other modes
        detach λ before the differentiated steps of each frame. :meth:`step` then returns one
        inner result per frame.
    :param transition: ``(batch, K, D) -> (batch, K, D)`` between frames (identity by
        default); an ``nn.Module``'s parameters are trained with the rest (``transition.*``)
        where J's gradient reaches each frame's starting slots (``"unrolled"``, or
        ``straight_through``; otherwise a warning says they stay where they start).
    :param bool straight_through: with ``"first_order"`` or ``"truncated"`` (fewer differentiated
        steps than T), pass J's gradient at the first differentiated step on to λ_0 (see above;
        on clips, to each frame's starting slots). Refused where the gradient already reaches
        λ_0 (``"unrolled"``) or has no first differentiated step (``"implicit"``).
    :param float init_regression: ``β ≥ 0``: J gains ``β · mean_{n,k,d} (λ_0 - sg(λ_T))²``, the
        starting slots regressed onto the inner loop's solution (semi-amortized inference: an
        :class:`~pyro_slots.AmortizedInit` learns to guess what the loop finds; on clips, the
        first frame's). Its gradient reaches λ_0's parameters whatever the gradient mode.
    :param float slot_sparsity: ``λ ≥ 0``: J gains ``λ · mean_n (1/K) Σ_k π^{n,k}``, the mean
        keep probability of the final slots under the model's
        :class:`~pyro_slots.models.SlotSelector` (``model.slot_selector``, e.g.
        ``SlotAutoencoder(active_slots=True)``): AdaSlot's sparsity penalty (Fan et al. 2024);
        a slot's keep probability costs its datapoint ``λ / K`` per unit, so slots are kept
        where they lower that datapoint's J by more. On clips, every frame's. Its gradient
        reaches the selector's weights and, through the final slots, what the gradient mode
        differentiates.
    """

    def __init__(
        self,
        model,
        inner: InnerRule,
        objective: Objective,
        optim: PyroOptim,
        *,
        gradient: str | ImplicitAdjoint = "unrolled",
        num_slots: int | None = None,
        num_steps: int | None = None,
        truncate: int = 1,
        iteration_weights: str = "last",
        tol: float | None = None,
        init=None,
        seed: int | None = None,
        clip_norm: float | None = None,
        estimator: ELBOEstimator | None = None,
        distributed: bool | None = None,
        sequence: bool = False,
        transition=None,
        straight_through: bool = False,
        init_regression: float = 0.0,
        slot_sparsity: float = 0.0,
    ):
        if not isinstance(inner, InnerRule):
            raise TypeError(f"inner: expected an InnerRule, got {type(inner).__name__}")
        if not isinstance(objective, Objective):
            raise TypeError(f"objective: expected an Objective, got {type(objective).__name__}")
        if not isinstance(optim, PyroOptim):
            raise TypeError(
                f"optim: expected a pyro.optim optimizer (e.g. pyro.optim.Adam), "
                f"got {type(optim).__name__}"
            )
        if isinstance(gradient, ImplicitAdjoint):
            self.implicit, gradient = gradient, "implicit"
        elif gradient in GRADIENT_MODES:
            self.implicit = ImplicitAdjoint() if gradient == "implicit" else None
        else:
            raise ValueError(
                f"gradient: expected one of {GRADIENT_MODES} or an ImplicitAdjoint, "
                f"got {gradient!r}"
            )
        if iteration_weights not in ITERATION_WEIGHTS:
            raise ValueError(
                f"iteration_weights: expected one of {ITERATION_WEIGHTS}, got {iteration_weights!r}"
            )
        if gradient == "implicit" and not inner.implicit_differentiable:
            raise ValueError(
                f"gradient: 'implicit' needs a rule whose step is one map λ ↦ f(λ), and "
                f"{type(inner).__name__} accepts or rejects each step (a rejected step is the "
                "identity, where the implicit function theorem's adjoint does not exist); use "
                "'unrolled', 'truncated' or 'first_order', or an unsafeguarded rule "
                "(e.g. GeneralizedEM(safeguarded=False))"
            )
        inner.check_model(model)
        self.model = model
        self.inner = inner
        self.objective = objective
        self.optim = optim
        self.gradient = gradient
        self.num_slots = check_positive_int(
            num_slots if num_slots is not None else getattr(model, "num_slots", 0), "num_slots"
        )
        self.num_steps = check_positive_int(
            num_steps if num_steps is not None else inner.num_steps, "num_steps"
        )
        self.truncate = check_positive_int(truncate, "truncate")
        self.iteration_weights = iteration_weights
        self.tol = None if tol is None else check_positive_float(tol, "tol")
        self.init = init
        self.clip_norm = None if clip_norm is None else check_positive_float(clip_norm, "clip_norm")
        self.estimator = estimator
        if transition is not None and not callable(transition):
            raise TypeError(f"transition: expected a callable, got {type(transition).__name__}")
        if transition is not None and not sequence:
            raise ValueError("transition: needs sequence=True (slots carried between frames)")
        self.sequence = check_bool(sequence, "sequence")
        self.transition = transition
        self.straight_through = check_bool(straight_through, "straight_through")
        self.init_regression = check_positive_float(
            init_regression, "init_regression", allow_zero=True
        )
        self.slot_sparsity = check_positive_float(slot_sparsity, "slot_sparsity", allow_zero=True)
        if self.slot_sparsity and getattr(model, "slot_selector", None) is None:
            raise ValueError(
                f"slot_sparsity: penalizes the keep probabilities of a slot selector, but "
                f"{type(model).__name__} has none (model.slot_selector); use a model with one, "
                "e.g. SlotAutoencoder(active_slots=True), or slot_sparsity=0"
            )
        if self.straight_through and not 0 < self._backprop_steps() < self.num_steps:
            raise ValueError(
                f"straight_through: only where λ is detached before differentiated steps "
                f"(gradient='first_order', or 'truncated' with truncate < T = {self.num_steps}),"
                f" not gradient={self.gradient!r}"
                + (f" with truncate={self.truncate}" if self.gradient == "truncated" else "")
            )
        self.generator = make_generator(0 if seed is None else seed)
        self.num_updates = 0
        self._store_prefix = f"NestedSVI{next(_INSTANCES)}"
        self._pending_optim_state = {}
        self._pending_handed = False  # the pending states are with pyro.optim already
        self._setup_distributed(distributed)
        self._warn_if_init_is_frozen()

    def _slot_initializer(self):
        """What draws λ_0: ``init``, else the rule's ``slot_init``; ``None`` leaves it to the
        model's ``init_slots`` (:func:`~pyro_slots.refine.initial_slots`)."""
        return self.init if self.init is not None else getattr(self.inner, "slot_init", None)

    def _reaches_init(self) -> bool:
        """Whether J's gradient reaches λ_0 (so the initializer, and on clips the transition
        that makes each frame's λ_0): every step differentiated, or the straight-through
        gradient. ``"first_order"`` never does, whatever T (λ is detached before its step)."""
        if self.straight_through:
            return True
        return self.gradient != "first_order" and self._backprop_steps() >= self.num_steps

    def _warn_if_init_is_frozen(self) -> None:
        if self._reaches_init():
            return
        if self.sequence and isinstance(self.transition, torch.nn.Module):
            trainable = [p for p in self.transition.parameters() if p.requires_grad]
            if trainable:
                warnings.warn(
                    f"NestedSVI: gradient={self.gradient!r} detaches each frame's starting "
                    f"slots, so J's gradient reaches none of the "
                    f"{sum(p.numel() for p in trainable)} trainable parameters of the "
                    f"transition {type(self.transition).__name__}: they stay where they start "
                    f"(use gradient='unrolled' or straight_through=True to train it)",
                    UserWarning,
                    stacklevel=3,
                )
        if self.init_regression:  # trained by the regression term
            return
        # SlotModel.init_slots draws from the model's slot_init when nothing else does.
        init = self._slot_initializer()
        if init is None:
            init = getattr(self.model, "slot_init", None)
        params = getattr(init, "parameters", None)
        trainable = [p for p in params() if p.requires_grad] if callable(params) else []
        if trainable:
            warnings.warn(
                f"NestedSVI: gradient={self.gradient!r} detaches λ before the differentiated "
                f"steps ({self._backprop_steps()} of T={self.num_steps}), so J's gradient "
                f"reaches none of the {sum(p.numel() for p in trainable)} trainable "
                f"parameters of the slot initializer {type(init).__name__}: they stay where "
                f"they start (use gradient='unrolled', straight_through=True, "
                f"init_regression > 0, or a fixed initializer, e.g. "
                f"GaussianInit(..., learnable=False), to silence this)",
                UserWarning,
                stacklevel=3,
            )

    # ------------------------------------------------------------------ parameters
    def _named_modules(self):
        pairs = [("model", self.model), ("inner", self.inner), ("objective", self.objective)]
        if self.init is not None:
            pairs.append(("init", self.init))
        if isinstance(self.transition, torch.nn.Module):
            pairs.append(("transition", self.transition))
        return pairs

    def modules(self):
        return [mod for _, mod in self._named_modules()]

    def named_parameters(self):
        """Unique trainable shared weights, named ``model.*``, ``inner.*``, ``objective.*``,
        ``init.*``, ``transition.*``."""
        seen, out = set(), []
        for prefix, mod in self._named_modules():
            for name, p in mod.named_parameters():
                if p.requires_grad and id(p) not in seen:
                    seen.add(id(p))
                    out.append((f"{prefix}.{name}", p))
        return out

    def parameters(self):
        return [p for _, p in self.named_parameters()]

    # ---------------------------------------------------------------- the objective
    def _backprop_steps(self) -> int:
        return {
            "unrolled": self.num_steps,
            "truncated": min(self.truncate, self.num_steps),
            "first_order": 1,
            "implicit": 0,
        }[self.gradient]

    def _iterate_weights(self, num: int) -> list[tuple[int, float]]:
        if self.iteration_weights == "last":
            return [(num, 1.0)]
        if self.iteration_weights == "uniform":
            return [(t, 1.0 / num) for t in range(1, num + 1)]
        total = num * (num + 1) / 2
        return [(t, t / total) for t in range(1, num + 1)]

    def loss(self, x, *targets, differentiable: bool = True) -> torch.Tensor:
        """The task objective J of this batch (a scalar), differentiable in w."""
        return self.loss_and_result(x, *targets, differentiable=differentiable)[0]

    def loss_and_result(self, x, *targets, differentiable: bool = True):
        """``(J, result)``: the task objective (a scalar tensor, differentiable in w unless
        ``differentiable=False``) and the batch's inner :class:`~pyro_slots.RefineResult`
        (restart axis of size 1; its slots and trajectory keep their graph), or with
        ``sequence=True`` the list of every frame's."""
        check_data(x, "x", self.model, self.inner)
        for t in targets:
            if torch.is_tensor(t) and t.shape[:1] != x.shape[:1]:
                raise ValueError(
                    f"targets: expected leading (batch,) dimension {x.shape[0]}, "
                    f"got shape {tuple(t.shape)}"
                )
        with torch.set_grad_enabled(differentiable):
            if not self.sequence:
                x_enc = self.model.encode(x)
                check_num_measurements(x_enc, self.num_slots)
                # Reparameterized draws: a learned initializer receives gradients in its mean
                # and scale when the first step is differentiated (unrolled mode).
                return self._frame(x, x_enc, self._initial_slots(x_enc), targets, differentiable)
            if targets:
                raise ValueError("targets: not supported with sequence=True")
            if x.dim() < 3:
                raise ValueError(f"x: expected clips (batch, frames, ...), got {tuple(x.shape)}")
            loss, results, slots = 0.0, [], None
            for t in range(x.shape[1]):
                x_enc = self.model.encode(x[:, t])
                check_num_measurements(x_enc, self.num_slots)
                if slots is None:
                    slots0 = self._initial_slots(x_enc)
                else:
                    slots0 = slots if self.transition is None else self.transition(slots)
                # The regression term is for the initializer: frame 0 (the carried slots' graph
                # runs into the previous frame's steps, which it must not pull).
                frame_loss, result = self._frame(
                    x[:, t], x_enc, slots0, (), differentiable, regress=t == 0
                )
                loss = loss + frame_loss
                results.append(result)
                slots = result.slots[0]
        return loss, results

    def _frame(self, x, x_enc, slots0, targets, differentiable, regress=True):
        """J and the inner result of one batch of inputs from the initial slots ``slots0``;
        ``slots0`` keeps its graph only where the first inner step is differentiated."""
        steps = self.num_steps
        backprop = self._backprop_steps() if differentiable else 0
        implicit = self.implicit if differentiable and self.gradient == "implicit" else None
        keep = self.iteration_weights != "last"
        # First-order with J over the iterates: every iterate's own step is differentiated,
        # λ_t = f(sg(λ_{t-1})), so each weighted term trains the rule (not the decoder alone).
        every_step = keep and self.gradient == "first_order" and backprop > 0
        if every_step:
            backprop = steps
        reach_init = self._reaches_init() if differentiable else False
        result = run_inner(
            self.model,
            x_enc,
            self.inner,
            slots0 if reach_init else slots0.detach(),
            steps - 1 if implicit is not None else steps,
            backprop_steps=backprop,
            straight_through=self.straight_through and backprop > 0,
            implicit=implicit,
            tol=self.tol,
            keep_trajectory=keep,
            estimator=self.estimator,
            detach_between=every_step,
        )
        if keep:
            terms = [
                (result.trajectory[t][0], w) for t, w in self._iterate_weights(result.num_steps)
            ]
        else:
            terms = [(result.slots[0], 1.0)]
        loss = 0.0
        for slots, weight in terms:
            per_datapoint = self.objective(self.model, x, x_enc, slots, *targets)
            if per_datapoint.shape != (x.shape[0],):
                raise ValueError(
                    f"{type(self.objective).__name__} returned shape "
                    f"{tuple(per_datapoint.shape)}, expected ({x.shape[0]},)"
                )
            loss = loss + weight * per_datapoint.mean()
        if self.init_regression and regress:
            target = result.slots[0].detach()
            loss = loss + self.init_regression * (slots0 - target).pow(2).mean()
        if self.slot_sparsity:
            probs = self.model.slot_selector.probabilities(result.slots[0])  # (batch, K)
            loss = loss + self.slot_sparsity * probs.mean()
        return loss, result

    def _initial_slots(self, x_enc):
        # Every rank draws from the same stream (rank 0's checkpoint resumes every rank exactly).
        init = self._slot_initializer()
        if self.world_size > 1 and not getattr(init, "conditional", False):
            if init is None and type(self.model).init_slots is SlotModel.init_slots:
                init = getattr(self.model, "slot_init", None)  # the default: data-independent
            reads_data = init is None
            if not reads_data or "rows" in inspect.signature(self.model.init_slots).parameters:
                # This rank's rows of the global batch's draw (initial_slots ``rows``): N
                # processes see exactly the single-process draws.
                batch, shape = x_enc.shape[0], x_enc.shape[1:]
                start = self.rank * batch
                if reads_data:  # k-means++: this shard at its rows; the others are never read
                    pad = x_enc.detach().new_zeros(1, *shape)
                    after = batch * (self.world_size - 1) - start
                    whole = torch.cat([pad.expand(start, *shape), x_enc, pad.expand(after, *shape)])
                else:  # a data-independent draw reads the batch's size only
                    whole = x_enc.detach()[:1].expand(batch * self.world_size, *shape)
                rows = torch.arange(start, start + batch, device=x_enc.device)
                return initial_slots(self.model, whole, self.num_slots, inner=self.inner,
                                     init=init, generator=self.generator, rows=rows)  # fmt: skip
        return initial_slots(
            self.model,
            x_enc,
            self.num_slots,
            inner=self.inner,
            init=init,
            generator=self.generator,
        )

    # ------------------------------------------------------------- distributed
    def _setup_distributed(self, distributed):
        import torch.distributed as dist

        group = process_group(distributed)
        self.distributed = group is not None
        self.world_size, self.rank = group or (1, 0)
        if self.distributed:
            # Identical starting state on every rank: every parameter (frozen ones too), every
            # buffer and every module's own random generator (SlotSelector's noise), rank 0's.
            with torch.no_grad():
                seen = set()
                for mod in self.modules():
                    for t in (*mod.parameters(), *mod.buffers()):
                        if id(t) not in seen:
                            seen.add(id(t))
                            dist.broadcast(t.data, src=0)
                    for m in mod.modules():
                        for value in vars(m).values():
                            if isinstance(value, torch.Generator) and id(value) not in seen:
                                seen.add(id(value))
                                state = value.get_state()
                                dist.broadcast(state, src=0)
                                value.set_state(state)
            # Modules that draw per datapoint (AdaSlot's SlotSelector) draw this rank's rows of
            # the global batch's numbers, as the slot initialization does.
            for mod in self.modules():
                for m in mod.modules():
                    if callable(getattr(m, "shard_draws", None)):
                        m.shard_draws(self.rank, self.world_size)

    def _all_reduce_mean(self, loss, grads, params, batch: int, failed: bool = False):
        """Average J and its gradients over ranks in one collective, which also tells every
        rank whether one failed (then all raise) and whether the local batches differ."""
        import torch.distributed as dist

        parts = [loss.detach().reshape(1)]
        parts += [
            (g if g is not None else torch.zeros_like(p)).reshape(-1) for g, p in zip(grads, params)
        ]
        # The same collective carries which ranks failed and the local batch sizes (their
        # sum and sum of squares: equal sizes iff (Σ n)² = world · Σ n²).
        status = torch.zeros(self.world_size + 2, dtype=parts[0].dtype, device=parts[0].device)
        if failed:
            status[self.rank] = 1.0
        status[-2], status[-1] = float(batch), float(batch) ** 2
        flat = torch.cat([*parts, status])
        dist.all_reduce(flat)
        status = flat[-(self.world_size + 2) :]
        failures = [r for r in range(self.world_size) if status[r] > 0]
        if failures:
            raise RankFailedError(
                f"NestedSVI: update {self.num_updates + 1} failed on rank(s) {failures} (their "
                "own errors say why); the weights were not changed on any rank"
            )
        total, squares = float(status[-2]), float(status[-1])
        if abs(total * total - self.world_size * squares) > 0.5:
            raise ValueError(
                f"x: every rank's local batch must have the same size under torch.distributed "
                f"(J and its gradient are the mean of the ranks' means, and each rank draws its "
                f"rows of λ_0 at rank · batch); this rank has {batch} of {int(total)}"
            )
        flat = flat[: -(self.world_size + 2)] / self.world_size
        out, offset = [], 1
        for g, p in zip(grads, params):
            n = p.numel()
            out.append(flat[offset : offset + n].view_as(p) if g is not None else None)
            offset += n
        return flat[0], out

    # -------------------------------------------------------------------- steps
    def loss_and_grads(self, x, *targets) -> float:
        """Compute J and write ``dJ/dw`` into ``.grad`` of the shared weights; returns J.

        Under ``torch.distributed`` J and ``dJ/dw`` are averaged over ranks (equal local batch
        sizes make this the gradient of the global batch); every rank sees the same values, so
        a non-finite J or gradient stops all ranks together instead of hanging the others.
        """
        return self._loss_and_grads(x, *targets)[0]

    def _local_loss_and_grads(self, x, targets, params):
        loss, result = self.loss_and_result(x, *targets)
        if not loss.requires_grad:
            raise ValueError(
                f"NestedSVI: the task objective does not depend on any shared weight under "
                f"gradient={self.gradient!r} (e.g. the differentiated steps are closed-form "
                "steps of a model without trainable weights); use gradient='unrolled' or a rule "
                "with weights"
            )
        return loss, result, torch.autograd.grad(loss, params, allow_unused=True)

    def _loss_and_grads(self, x, *targets):
        params = self.parameters()
        # A failed update leaves no trace: the weights unchanged and the generator where it
        # was (on every rank alike, whichever failed and however far each got).
        generator = self.generator.get_state()
        try:
            return self._update_grads(x, targets, params)
        except BaseException:
            self.generator.set_state(generator)
            raise

    def _update_grads(self, x, targets, params):
        if not self.distributed:
            loss, result, grads = self._local_loss_and_grads(x, targets, params)
        else:
            # A rank whose batch fails (a diverged inner loop, a bad target) still joins the
            # collective, so that every rank raises at this update instead of the others
            # pairing this update's gradients with its next one's.
            try:
                loss, result, grads = self._local_loss_and_grads(x, targets, params)
                error = None
            except Exception as e:
                error, result = e, None
                loss = (params[0] if params else x).new_zeros(())
                grads = [None] * len(params)
            try:
                loss, grads = self._all_reduce_mean(
                    loss, grads, params, batch=int(x.shape[0]), failed=error is not None
                )
            except RankFailedError:
                if error is not None:
                    raise error from None  # the failing rank: its own error
                raise
        if not torch.isfinite(loss):
            raise FloatingPointError(
                f"NestedSVI: the task objective is {loss.item()} at update {self.num_updates}; "
                "the weights were not changed"
            )
        for p, g in zip(params, grads):
            if g is not None and not torch.isfinite(g).all():
                name = next(n for n, q in self.named_parameters() if q is p)
                raise FloatingPointError(
                    f"NestedSVI: non-finite gradient in {name} at update {self.num_updates}; "
                    "the weights were not changed"
                )
            p.grad = g
        if self.clip_norm is not None:
            torch.nn.utils.clip_grad_norm_(
                [p for p in params if p.grad is not None], self.clip_norm
            )
        return loss.item(), _detached(result)

    def step(self, x, *targets) -> NestedStep:
        """One optimizer step on the shared weights.

        :returns: a :class:`NestedStep` ``(loss, result)``: the task loss J before the step and
            the inner loop's :class:`~pyro_slots.RefineResult` of this batch (detached, restart
            axis of size 1).
        """
        loss, result = self._loss_and_grads(x, *targets)
        params = [p for p in self.parameters() if p.grad is not None]
        names = self._name_parameters()
        pending = self._pending_optim_state
        if pending and not self._pending_handed:
            # pyro.optim hands a saved state to a parameter's optimizer when it first meets
            # the parameter, by its param-store name: set it under the names of this moment.
            self.optim.set_state({names[n]: _from_v01(s) for n, s in pending.items()})
            self._pending_handed = True
        self.optim(params)
        if pending:
            # A state stays pending (and in state_dict) until its parameter has had a gradient:
            # pyro.optim keeps it waiting unreported, and a checkpoint taken before would lose it.
            met = self.optim.get_state()
            self._pending_optim_state = {n: s for n, s in pending.items() if names[n] not in met}
        for p in self.parameters():
            p.grad = None
        self.num_updates += 1
        return NestedStep(loss, result)

    def evaluate_loss(self, x, *targets) -> float:
        """J on a batch without gradients or weight updates (slots still refined), with every
        module in evaluation mode (e.g. :class:`~pyro_slots.models.SlotSelector` keeps its
        thresholded slots instead of drawing Gumbel noise); the modules' modes and the outer
        loop's generator are restored afterwards."""
        state = self.generator.get_state()
        modes = [(m, m.training) for mod in self.modules() for m in mod.modules()]
        try:
            for mod in self.modules():
                mod.eval()
            with torch.no_grad():
                return self.loss(x, *targets, differentiable=False).item()
        finally:
            for m, training in modes:
                m.training = training
            self.generator.set_state(state)

    # -------------------------------------------------------------- checkpoints
    def _name_parameters(self) -> dict:
        """``{name: param-store name}`` of the shared weights.

        :class:`pyro.optim.PyroOptim` keys its state by the Pyro param store's names
        (``get_state``/``set_state``). Weights of a :class:`~pyro.nn.PyroModule` are in the
        store once the module has run; any other weight is registered under its name here
        (``pyro.param`` with the tensor itself, so it stays the same leaf).
        """
        store = pyro.get_param_store()
        names = {}
        for name, p in self.named_parameters():
            stored = store.param_name(p)
            if stored is None:
                stored = f"{self._store_prefix}.{name}"
                with torch.no_grad():
                    pyro.param(stored, p)
                if store.param_name(p) != stored:
                    raise RuntimeError(
                        f"NestedSVI: could not register {name} in the Pyro param store"
                    )
            names[name] = stored
        return names

    def state_dict(self) -> dict:
        """Optimizer states keyed by parameter name, RNG state and update count."""
        names = self._name_parameters()
        optim_state = self.optim.get_state()
        # Loaded but not handed to pyro.optim yet (no step since load_state_dict).
        optim = {n: _from_v01(s) for n, s in self._pending_optim_state.items()}
        optim.update({n: optim_state[s] for n, s in names.items() if s in optim_state})
        return {
            "optim": optim,
            "generator": self.generator.get_state(),
            "num_updates": self.num_updates,
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict`; call it before the first :meth:`step` (as with Pyro's
        ``set_state``, the optimizer states are handed over when a parameter is first met, at
        the next step)."""
        if self.num_updates:
            raise ValueError(
                "state: load_state_dict needs a NestedSVI that has not stepped yet "
                f"(this one made {self.num_updates} updates)"
            )
        names = self._name_parameters()
        unknown = set(state["optim"]) - set(names)
        if unknown:
            raise ValueError(f"state: optimizer state for unknown parameters {sorted(unknown)}")
        self._pending_optim_state = dict(state["optim"])
        self._pending_handed = False
        self.generator.set_state(state["generator"])
        self.num_updates = int(state["num_updates"])


def _from_v01(state: dict) -> dict:
    """Checkpoints of v0.1 wrapped a plain optimizer's state as ``{"optimizer": ...}``."""
    if "optimizer" in state and "scheduler" not in state:
        return state["optimizer"]
    return state


class NestedStep(NamedTuple):
    """What :meth:`NestedSVI.step` returns.

    :ivar float loss: the task objective J of the batch, before the update.
    :ivar RefineResult result: the inner loop of the batch (detached, restart axis of size 1).
    """

    loss: float
    result: RefineResult


def _detached(result):
    if isinstance(result, list):  # one result per frame (sequence=True)
        return [_detached(r) for r in result]

    def d(t):
        return t.detach() if torch.is_tensor(t) else t

    result.slots = d(result.slots)
    result.trajectory = [d(t) for t in result.trajectory]
    result.x_enc = d(result.x_enc)
    state = result.state
    result.state = type(state)(d(state.slots), state.step, tuple(d(a) for a in state.aux))
    return result
