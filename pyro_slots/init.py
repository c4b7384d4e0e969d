"""Slot initialization: every λ^{n,k} drawn independently from one shared distribution.

Randomness is explicit: every initializer takes a :class:`torch.Generator` (or draws from the
global RNG when none is given), never a hidden ``torch.randn`` inside ``forward`` of a rule.
"""

from __future__ import annotations

import torch
from pyro.nn import PyroModule
from torch import nn

from .validation import check_bool, check_positive_float, check_positive_int

__all__ = ["AmortizedInit", "GaussianInit", "LearnedQueries", "SlotInitializer", "SlotTransition"]


def draw(sampler, *args, generator=None, device=None, **kwargs) -> torch.Tensor:
    """``sampler(*args, ...)`` (``torch.rand``, ``torch.randn``, ``torch.randint``) drawn on the
    device of ``generator`` and moved to ``device``.

    The library seeds CPU generators (checkpointable, and the same stream whatever the data's
    device), so data on a GPU gets the very draws it would get on the CPU.
    """
    source = generator.device if generator is not None else device
    return sampler(*args, generator=generator, device=source, **kwargs).to(device)


class SlotInitializer(PyroModule):
    """Base class: ``init(batch, num_slots, generator) -> (batch, num_slots, dim)``.

    A *conditional* initializer (``conditional = True``) also reads the datapoints: it is
    called with ``x_enc=`` the encoded measurements ``(batch, M, F)`` (:class:`AmortizedInit`).
    """

    dim: int
    conditional: bool = False

    def forward(
        self,
        batch: int,
        num_slots: int,
        generator: torch.Generator | None = None,
        dtype: torch.dtype | None = None,
        device=None,
    ) -> torch.Tensor:
        raise TypeError(f"{type(self).__name__} must define forward()")


class GaussianInit(SlotInitializer):
    r"""Slots drawn i.i.d. from ``Normal(loc, exp(log_scale))``, shared by all slots.

    The draw is reparameterized, ``λ = loc + exp(log_scale) · ε`` with ``ε ~ N(0, I)`` from the
    given generator, so that gradients reach both the mean and the scale and the scale can never
    be negative (two bugs seen in public slot-attention ports: a raw ``sigma`` parameter that goes
    negative, and ``torch.normal(mu, sigma)`` which blocks the gradient to ``sigma``).

    :param int dim: slot dimension.
    :param float loc: initial mean (all coordinates).
    :param float scale: initial standard deviation (> 0).
    :param bool learnable: whether ``loc`` and ``log_scale`` are trainable parameters.
    """

    def __init__(self, dim: int, loc: float = 0.0, scale: float = 1.0, learnable: bool = True):
        learnable = check_bool(learnable, "learnable")
        super().__init__()
        self.dim = check_positive_int(dim, "dim")
        scale = check_positive_float(scale, "scale")
        loc_t = torch.full((self.dim,), float(loc))
        log_scale_t = torch.full((self.dim,), float(torch.tensor(scale).log()))
        if learnable:
            self.loc = nn.Parameter(loc_t)
            self.log_scale = nn.Parameter(log_scale_t)
        else:
            self.register_buffer("loc", loc_t)
            self.register_buffer("log_scale", log_scale_t)

    def forward(self, batch, num_slots, generator=None, dtype=None, device=None):
        batch = check_positive_int(batch, "batch")
        num_slots = check_positive_int(num_slots, "num_slots")
        loc, log_scale = self.loc, self.log_scale
        dtype = dtype or loc.dtype
        eps = draw(
            torch.randn,
            (batch, num_slots, self.dim),
            generator=generator,
            dtype=dtype,
            device=device or loc.device,
        )
        return loc.to(dtype) + log_scale.to(dtype).exp() * eps


class LearnedQueries(SlotInitializer):
    r"""``K`` learned starting slots, the same for every datapoint: λ_0^{n,k} = q_k.

    The learnable queries of BO-QSA (Jia et al. 2023): no noise, so the slots are told apart by
    their starting points rather than by a draw, and the inner loop is deterministic. Trained
    through every inner step (``gradient="unrolled"``) or, under first-order gradients, with
    ``NestedSVI(straight_through=True)``. Unlike :class:`GaussianInit` the slots are no longer
    exchangeable: slot ``k`` tends to the same kind of object in every image.

    :param int num_slots: ``K``; a draw of another number of slots is refused.
    :param int dim: slot dimension.
    :param float scale: standard deviation of the queries' random starting values (> 0), drawn
        from torch's global generator at construction, like ``nn.Linear``'s weights.
    """

    def __init__(self, num_slots: int, dim: int, scale: float = 1.0):
        super().__init__()
        self.num_slots = check_positive_int(num_slots, "num_slots")
        self.dim = check_positive_int(dim, "dim")
        scale = check_positive_float(scale, "scale")
        self.queries = nn.Parameter(scale * torch.randn(self.num_slots, self.dim))

    def forward(self, batch, num_slots, generator=None, dtype=None, device=None):
        batch = check_positive_int(batch, "batch")
        if num_slots != self.num_slots:
            raise ValueError(
                f"num_slots: LearnedQueries holds {self.num_slots} queries, got {num_slots}"
            )
        queries = self.queries.to(dtype=dtype or self.queries.dtype)
        if device is not None:
            queries = queries.to(device)
        return queries.expand(batch, -1, -1)


class AmortizedInit(SlotInitializer):
    r"""Starting slots predicted from the datapoint: ``λ_0 = ρ(mean_m φ(x̃_m))`` as ``(K, D)``.

    The amortized half of semi-amortized inference: a permutation-invariant network (DeepSets:
    ``φ`` per measurement, mean pooling, ``ρ``) guesses every datapoint's slots, and the inner
    loop refines the guess. Trained by J through the inner loop, or — under first-order
    gradients — by regressing its guess onto the inner loop's own solution
    (``NestedSVI(init_regression=β)``: ``β · mean (λ_0 - sg(λ_T))²``, SmoothSA / DIAS's
    self-distillation), so fewer inner steps are needed at test time. Deterministic: restarts
    from it coincide.

    :param int feature_dim: ``F``, the size of an encoded measurement.
    :param int num_slots: ``K``; a call with another number of slots is refused.
    :param int dim: slot dimension ``D``.
    :param int hidden_dim: width of ``φ`` and ``ρ`` (default ``max(64, 2 D)``).
    """

    conditional = True

    def __init__(self, feature_dim: int, num_slots: int, dim: int, hidden_dim: int | None = None):
        super().__init__()
        self.feature_dim = check_positive_int(feature_dim, "feature_dim")
        self.num_slots = check_positive_int(num_slots, "num_slots")
        self.dim = check_positive_int(dim, "dim")
        hidden = max(64, 2 * self.dim) if hidden_dim is None else hidden_dim
        hidden = check_positive_int(hidden, "hidden_dim")
        self.phi = nn.Sequential(nn.Linear(self.feature_dim, hidden), nn.ReLU(),
                                 nn.Linear(hidden, hidden))  # fmt: skip
        self.rho = nn.Sequential(nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                                 nn.Linear(hidden, self.num_slots * self.dim))  # fmt: skip

    def forward(self, batch, num_slots, generator=None, dtype=None, device=None, x_enc=None):
        if x_enc is None:
            raise ValueError(
                "x_enc: AmortizedInit predicts the slots from the datapoints; got None"
            )
        if x_enc.dim() != 3 or x_enc.shape[0] != batch or x_enc.shape[-1] != self.feature_dim:
            raise ValueError(
                f"x_enc: expected shape ({batch}, M, {self.feature_dim}), got {tuple(x_enc.shape)}"
            )
        if num_slots != self.num_slots:
            raise ValueError(f"num_slots: AmortizedInit predicts {self.num_slots}, got {num_slots}")
        pooled = self.phi(x_enc.to(self.rho[-1].weight.dtype)).mean(1)
        slots = self.rho(pooled).reshape(batch, self.num_slots, self.dim)
        return slots.to(dtype or slots.dtype)


class SlotTransition(PyroModule):
    r"""A learned transition of the slots between frames: ``λ ↦ λ + MLP(LayerNorm(λ))``.

    The slots found for frame ``t`` start frame ``t + 1``'s inner loop through this map (the
    ``transition`` of :func:`~pyro_slots.refine_video` and of ``NestedSVI(sequence=True)``):
    SAVi's predictor (Kipf et al. 2021) acting on each slot alone, so the map stays
    permutation-equivariant. The last layer starts at zero, so an untrained transition is the
    identity (the carried slots unchanged).

    :param int dim: slot size ``D``.
    :param int hidden_dim: width of the MLP (default ``2 D``).
    """

    def __init__(self, dim: int, hidden_dim: int | None = None):
        super().__init__()
        self.dim = check_positive_int(dim, "dim")
        hidden = (
            2 * self.dim if hidden_dim is None else check_positive_int(hidden_dim, "hidden_dim")
        )
        self.norm = nn.LayerNorm(self.dim)
        self.mlp = nn.Sequential(
            nn.Linear(self.dim, hidden), nn.ReLU(), nn.Linear(hidden, self.dim)
        )
        nn.init.zeros_(self.mlp[-1].weight)
        nn.init.zeros_(self.mlp[-1].bias)

    def forward(self, slots: torch.Tensor) -> torch.Tensor:
        if slots.dim() != 3 or slots.shape[-1] != self.dim:
            raise ValueError(
                f"slots: expected shape (batch, num_slots, {self.dim}), got {tuple(slots.shape)}"
            )
        return slots + self.mlp(self.norm(slots))
