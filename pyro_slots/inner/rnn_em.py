"""RNN-EM: the learned rule of Neural EM (Greff et al. 2017)."""

from __future__ import annotations

import torch
from torch import nn

from ..validation import CapabilityError, check_positive_int
from .base import InnerProblem, InnerRule, InnerState, StepInfo

__all__ = ["RNNEM"]


class RNNEM(InnerRule):
    r"""``θ_{t+1} = cell(enc(γ_t ⊙ (ψ_t - x) / σ²), θ_t)``: RNN-EM (Greff et al. 2017, §3).

    The E-step is exact, the responsibilities ``γ_t`` of the model's ``assignment_site`` at
    ``θ_t`` (from the Pyro program); the M-step is learned: the responsibility-weighted error of
    every component, ``γ^k ⊙ (ψ^k - x) / σ²`` (minus the gradient of the expected complete
    log-likelihood w.r.t. the component's pixel means ``ψ^k = model.component_means(θ)``), is
    encoded by ``enc`` and fed to a recurrent cell whose hidden state is the slot itself. The
    same cell serves every slot, so the rule is permutation-equivariant in the slots and works
    for any ``K``. Neural EM's fixed rule, the gradient step this replaces, is
    ``GeneralizedEM(ascent_steps=1, safeguarded=False)``.

    Needs a model with ``assignment_site``, ``component_means(slots) -> (batch, K, M, C)`` and
    a Gaussian ``pixel_scale`` (e.g. :class:`~pyro_slots.models.NeuralEM`).

    :param int num_steps: default number of steps.
    :param int slot_dim: size of a slot (the cell's hidden state).
    :param int num_measurements: ``M``, pixels per image (the encoder's input is ``M · C``).
    :param int channels: ``C``, features per measurement.
    :param int hidden_dim: width of the encoded error.
    :param str cell: ``"gru"`` or ``"rnn"`` (tanh; the paper's is a sigmoid RNN).
    :param torch.nn.Module encoder: replaces the default ``Linear(M · C, hidden_dim) -> ELU``;
        maps ``(batch · K, M, C)`` to ``(batch · K, hidden_dim)``.
    """

    CELLS = ("gru", "rnn")

    def __init__(
        self,
        num_steps: int = 5,
        *,
        slot_dim: int,
        num_measurements: int,
        channels: int = 3,
        hidden_dim: int = 128,
        cell: str = "gru",
        encoder: nn.Module | None = None,
    ):
        super().__init__(num_steps)
        self.slot_dim = check_positive_int(slot_dim, "slot_dim")
        self.num_measurements = check_positive_int(num_measurements, "num_measurements")
        self.channels = check_positive_int(channels, "channels")
        hidden_dim = check_positive_int(hidden_dim, "hidden_dim")
        if cell not in self.CELLS:
            raise ValueError(f"cell: expected one of {self.CELLS}, got {cell!r}")
        self.cell_kind = cell
        self.encoder = encoder or nn.Sequential(
            nn.Flatten(), nn.Linear(self.num_measurements * self.channels, hidden_dim), nn.ELU()
        )
        self.cell = (nn.GRUCell if cell == "gru" else nn.RNNCell)(hidden_dim, self.slot_dim)

    def check_model(self, model) -> None:
        self._require_slot_dim(model, self.slot_dim)
        for needed in ("assignment_site", "component_means", "pixel_scale"):
            if getattr(model, needed, None) is None:
                raise CapabilityError(
                    f"RNNEM needs a model with {needed} (a spatial mixture such as "
                    f"pyro_slots.models.NeuralEM); {type(model).__name__} has none"
                )

    def weighted_error(self, problem: InnerProblem, slots: torch.Tensor):
        """``(elbo, γ, γ ⊙ (ψ - x) / σ²)``, the last of shape ``(batch, K, M, C)``."""
        elbo, resp = problem.elbo_and_responsibilities(slots)
        means = problem.model.component_means(slots)
        if means.shape[2:] != (self.num_measurements, self.channels):
            raise ValueError(
                f"RNNEM was built for {self.num_measurements} measurements of {self.channels} "
                f"features, the model decodes {tuple(means.shape[2:])}"
            )
        error = (means - problem.x.unsqueeze(1)) / problem.model.pixel_scale**2
        return elbo, resp, resp.unsqueeze(-1) * error

    def step(self, state: InnerState, problem: InnerProblem, create_graph: bool = False):
        elbo, resp, error = self.weighted_error(problem, state.slots)
        batch, num_slots = state.slots.shape[:2]
        inputs = self.encoder(error.reshape(batch * num_slots, *error.shape[2:]))
        slots = self.cell(inputs, state.slots.reshape(batch * num_slots, -1))
        slots = slots.reshape(batch, num_slots, -1)
        return InnerState(slots, state.step + 1, state.aux), StepInfo(elbo.detach(), resp.detach())

    def extra_repr(self) -> str:
        return f"num_steps={self.num_steps}, slot_dim={self.slot_dim}, cell={self.cell_kind!r}"
