"""Iterative amortized inference: a learned update driven by the ELBO gradient."""

from __future__ import annotations

import math

import torch
from torch import nn

from ..validation import check_bool, check_positive_float, check_positive_int
from .base import InnerProblem, InnerRule, InnerState, StepInfo
from .gradient import trust_region

__all__ = ["LearnedGradient"]

CELLS = ("gru", "lstm", "mlp")
PREPROCESSING = ("log_sign", "layernorm")


def log_sign(grad: torch.Tensor, p: float = 10.0) -> torch.Tensor:
    r"""Andrychowicz et al. (2016, App. A) gradient preprocessing, ``(..., D) -> (..., 2 D)``.

    Every coordinate ``g`` becomes ``(log|g| / p, sign g)`` when ``|g| >= e^{-p}`` and
    ``(-1, e^p g)`` otherwise: magnitude and direction on comparable scales whatever the size of
    the gradient.
    """
    big = grad.abs() >= math.exp(-p)
    # The tiny clamp only keeps the unused branch of torch.where finite (no NaN gradients).
    magnitude = torch.where(big, grad.abs().clamp_min(1e-30).log() / p, -torch.ones_like(grad))
    direction = torch.where(big, torch.sign(grad), math.exp(p) * grad)
    return torch.cat([magnitude, direction], dim=-1)


class LearnedGradient(InnerRule):
    r"""``λ_{t+1} = λ_t + α ⊙ τ(g_t) + W_o h_{t+1}``, ``h_{t+1} = cell([λ_t, pre(g_t), e_t], h_t)``.

    The update network of iterative amortized inference (Marino et al. 2018; IODINE, Greff et al.
    2019): every slot is refined from its current value and the gradient of the per-datapoint
    ELBO, ``g_t = ∇_λ L(x̃^n, λ^n_t)`` — computed by Pyro through
    :meth:`~pyro_slots.inner.InnerProblem.elbo_and_grad` and divided by the number of
    measurements when ``per_measurement=True``. The gradient enters the network normalized:
    ``"log_sign"`` (Andrychowicz et al. 2016: log-magnitude and sign of every coordinate) or
    ``"layernorm"`` (IODINE: a LayerNorm over the slot's gradient vector). The update adds a
    learned per-coordinate step ``α = exp(log_step_size)`` on the gradient, so the rule
    starts near gradient ascent, and the cell's correction ``W_o h``. The gradient term goes
    through the soft trust region ``τ = trust_region(·, trust_radius)`` of
    :class:`~pyro_slots.inner.GradientAscent` (unchanged for short gradients, at most
    ``trust_radius`` long per slot): without it the first steps of an untrained rule on tight
    clusters, whose gradient grows like ``1/σ²``, produced non-finite slots and a NaN
    objective at the first outer update of :class:`~pyro_slots.NestedSVI`.

    The cell is shared by all slots (a GRU, an LSTM or a two-layer MLP), so the rule is
    equivariant under permutations of the slots, its weights do not depend on ``K``, and it is
    vectorized over the batch. The recurrent state ``h`` (and the LSTM's ``c``) of shape
    ``(batch, K, hidden_dim)`` lives in ``InnerState.aux``, zero at ``t = 0``. The slots interact
    only through the ELBO gradient, as in IODINE.

    :param int num_steps: default number of refinement steps.
    :param int slot_dim: size of one slot (``model.slot_dim``).
    :param int hidden_dim: width of the cell.
    :param str cell: one of ``"gru"``, ``"lstm"``, ``"mlp"``.
    :param str preprocessing: one of ``"log_sign"``, ``"layernorm"``.
    :param float step_size: initial ``α`` (every coordinate), > 0.
    :param bool per_measurement: divide the gradient by the number of measurements.
    :param float trust_radius: longest gradient term per slot (> 0), or ``None`` for the raw
        gradient.
    :param callable features: optional extra inputs ``features(problem, slots) -> (batch, K,
        extra_dim)`` (e.g. per-slot statistics of the posterior, as IODINE's auxiliary inputs);
        an ``nn.Module`` here is trained with the rule.
    :param int extra_dim: size of the extra inputs (0 without ``features``).
    :param slot_init: optional :class:`~pyro_slots.init.SlotInitializer` drawing λ_0.
    """

    uses_elbo_gradient = True

    def __init__(
        self,
        num_steps: int = 5,
        *,
        slot_dim: int,
        hidden_dim: int = 64,
        cell: str = "gru",
        preprocessing: str = "log_sign",
        step_size: float = 0.1,
        per_measurement: bool = True,
        trust_radius: float | None = 1.0,
        features=None,
        extra_dim: int = 0,
        slot_init=None,
    ):
        super().__init__(num_steps)
        self.slot_dim = check_positive_int(slot_dim, "slot_dim")
        self.hidden_dim = check_positive_int(hidden_dim, "hidden_dim")
        if cell not in CELLS:
            raise ValueError(f"cell: expected one of {CELLS}, got {cell!r}")
        if preprocessing not in PREPROCESSING:
            raise ValueError(
                f"preprocessing: expected one of {PREPROCESSING}, got {preprocessing!r}"
            )
        step_size = check_positive_float(step_size, "step_size")
        self.extra_dim = check_positive_int(extra_dim, "extra_dim", minimum=0)
        if features is not None and not callable(features):
            raise TypeError(f"features: expected a callable, got {type(features).__name__}")
        if (features is None) != (self.extra_dim == 0):
            raise ValueError(
                f"extra_dim: must be > 0 exactly when features is given, got extra_dim="
                f"{self.extra_dim} with features={'set' if features is not None else None}"
            )
        if slot_init is not None and getattr(slot_init, "dim", self.slot_dim) != self.slot_dim:
            raise ValueError(
                f"slot_init: expected an initializer of dimension slot_dim={self.slot_dim}, "
                f"got dim={slot_init.dim}"
            )
        self.cell_type = cell
        self.preprocessing = preprocessing
        self.per_measurement = check_bool(per_measurement, "per_measurement")
        self.trust_radius = (
            None if trust_radius is None else check_positive_float(trust_radius, "trust_radius")
        )
        self.features = features
        self.slot_init = slot_init

        d = self.hidden_dim
        grad_dim = 2 * self.slot_dim if preprocessing == "log_sign" else self.slot_dim
        in_dim = self.slot_dim + grad_dim + self.extra_dim
        self.grad_norm = nn.LayerNorm(self.slot_dim) if preprocessing == "layernorm" else None
        if cell == "gru":
            self.cell = nn.GRUCell(in_dim, d)
        elif cell == "lstm":
            self.cell = nn.LSTMCell(in_dim, d)
        else:
            self.cell = nn.Sequential(nn.Linear(in_dim, d), nn.ReLU(), nn.Linear(d, d), nn.ReLU())
        self.to_update = nn.Linear(d, self.slot_dim)
        # Start near plain gradient ascent: a small correction on top of α g.
        with torch.no_grad():
            self.to_update.weight.mul_(0.1)
            self.to_update.bias.zero_()
        self.log_step_size = nn.Parameter(torch.full((self.slot_dim,), math.log(step_size)))

    def check_model(self, model):
        self._require_slot_dim(model, self.slot_dim)

    def divergence_hint(self) -> str:
        alpha = self.log_step_size.detach().exp()
        return (
            f"LearnedGradient(step_size={alpha.max().item():.3g} (largest coordinate of "
            f"exp(log_step_size)), trust_radius={self.trust_radius}) diverged: lower step_size "
            f"(e.g. {alpha.max().item() / 10:.3g}) or trust_radius, or wrap it in "
            "pyro_slots.inner.Safeguarded(rule, fallback=...)"
        )

    def init(self, problem: InnerProblem, slots: torch.Tensor) -> InnerState:
        if slots.dim() != 3 or slots.shape[-1] != self.slot_dim:
            raise ValueError(
                f"slots: expected shape (batch, num_slots, {self.slot_dim}), "
                f"got {tuple(slots.shape)}"
            )
        num = {"gru": 1, "lstm": 2, "mlp": 0}[self.cell_type]
        zeros = slots.new_zeros(*slots.shape[:2], self.hidden_dim)
        return InnerState(slots=slots, step=0, aux=(zeros,) * num)

    def step(self, state: InnerState, problem: InnerProblem, create_graph: bool = False):
        slots = state.slots
        elbo, grad = problem.elbo_and_grad(slots, create_graph=create_graph)
        if self.per_measurement:
            grad = grad / problem.x.shape[1]
        inputs = [slots, log_sign(grad) if self.grad_norm is None else self.grad_norm(grad)]
        if self.features is not None:
            extra = self.features(problem, slots)
            if extra.shape != (*slots.shape[:2], self.extra_dim):
                raise ValueError(
                    f"features: expected shape {(*slots.shape[:2], self.extra_dim)}, "
                    f"got {tuple(extra.shape)}"
                )
            inputs.append(extra)
        inputs = torch.cat(inputs, dim=-1)
        batch, num_slots, _ = slots.shape
        flat = inputs.reshape(batch * num_slots, -1)

        def unflat(t):
            return t.reshape(batch, num_slots, self.hidden_dim)

        def flatten(t):
            return t.reshape(batch * num_slots, self.hidden_dim)

        if self.cell_type == "gru":
            h = self.cell(flat, flatten(state.aux[0]))
            aux = (unflat(h),)
        elif self.cell_type == "lstm":
            h, c = self.cell(flat, (flatten(state.aux[0]), flatten(state.aux[1])))
            aux = (unflat(h), unflat(c))
        else:
            h = self.cell(flat)
            aux = ()
        step = self.log_step_size.exp() * trust_region(grad, self.trust_radius)
        update = step + self.to_update(unflat(h))
        new_state = InnerState(slots + update, state.step + 1, aux)
        return new_state, StepInfo(elbo=elbo.detach())

    def extra_repr(self):
        return (
            f"num_steps={self.num_steps}, slot_dim={self.slot_dim}, hidden_dim={self.hidden_dim}, "
            f"cell={self.cell_type!r}, preprocessing={self.preprocessing!r}"
        )
