"""A per-datapoint number of active slots: AdaSlot's slot selection for mixture decoders.

Fan et al. (CVPR 2024), *Adaptive Slot Attention: Object Discovery with Dynamic Slot Number*:
the inner loop produces ``K`` slots, a small MLP gives each a keep probability, a hard keep mask
is drawn with the straight-through Gumbel-softmax, and the decoder's mixture over slots is
restricted to the kept ones (:func:`masked_softmax`). The sparsity penalty on the keep
probabilities, which makes a slot pay for itself in the task objective, is
:class:`~pyro_slots.NestedSVI`'s ``slot_sparsity``.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from pyro_slots.validation import check_positive_float, check_positive_int, check_slots

__all__ = ["SlotSelection", "SlotSelector", "masked_softmax"]


class SlotSelection(NamedTuple):
    """What :class:`SlotSelector` returns.

    :ivar torch.Tensor keep: the keep mask ``z`` ``(batch, K)``, 0 or 1 in value; in training it
        carries the straight-through gradient of the relaxed sample.
    :ivar torch.Tensor probs: the keep probabilities ``π`` ``(batch, K)``.
    """

    keep: torch.Tensor
    probs: torch.Tensor

    @property
    def num_kept(self) -> torch.Tensor:
        """Kept slots of every datapoint, ``(batch,)`` int64 in ``[1, K]``."""
        return (self.keep.detach() > 0.5).sum(-1)


def masked_softmax(logits: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    r"""The softmax over slots (dim 1) of mixing logits, restricted to the kept slots.

    ``α_k = z_k e_k / Σ_j z_j e_j`` with ``e_k = exp(min(l_k, m))`` and ``m`` the largest kept
    logit (held constant): with a hard mask ``z`` it is the softmax with the dropped slots'
    logits at ``-∞`` (AdaSlot's masked decoder), written as the renormalized product so that a
    straight-through gradient reaches ``z``. The cap at ``m`` changes no value (a kept logit is
    at most ``m``, a dropped term is multiplied by 0) but bounds the derivative in ``z_k`` by 1:
    without it, a dropped slot whose logit dominates a pixel by ``d`` gave ``e^d`` (up to
    ``e^30``), which wrecked a trained autoencoder within 100 updates of AdaSlot fine-tuning
    (gradient norm 4,000 against 0.5). Computed relative to ``m``, so no kept term underflows.

    :param torch.Tensor logits: ``(batch, K, ...)``, e.g. the decoder's mask logits per pixel.
    :param torch.Tensor keep: ``(batch, K)``, 0 or 1 in value, at least one 1 per datapoint.
    :returns: masks of the shape of ``logits``, summing to 1 over dim 1, exactly 0 where dropped.
    """
    if keep.dim() != 2 or logits.dim() < 2 or tuple(keep.shape) != tuple(logits.shape[:2]):
        raise ValueError(
            f"keep: expected shape (batch, K) = {tuple(logits.shape[:2])} (the first two dims "
            f"of logits), got {tuple(keep.shape)}"
        )
    if not bool((keep.detach() > 0.5).any(1).all()):
        raise ValueError("keep: every datapoint must keep at least one slot")
    z = keep.reshape(*keep.shape, *([1] * (logits.dim() - 2)))
    kept = z.detach() > 0.5
    shift = logits.detach().masked_fill(~kept, -torch.inf).amax(1, keepdim=True)
    weights = torch.exp((logits - shift).clamp(max=0.0)) * z
    return weights / weights.sum(1, keepdim=True)


class SlotSelector(nn.Module):
    r"""Keep or drop every slot of a datapoint (AdaSlot, Fan et al. 2024).

    Keep probabilities from a two-layer MLP shared by the slots, ``π_k = sigmoid(MLP(λ_k))``.

    * **Training** (``module.training``): a hard Gumbel-softmax sample over {keep, drop} with
      logits ``(log π_k, log(1 - π_k))`` (Jang et al. 2017; Maddison et al. 2017), passed
      straight through::

          y_k = softmax((log π_k + g_k1, log(1 - π_k) + g_k2) / τ)[keep],  g ~ Gumbel(0, 1)
          z_k = 1[y_k > 1/2] + y_k - sg(y_k)

      hard in the forward pass, the gradient of the relaxed sample ``y_k`` in the backward pass.
    * **Evaluation**: ``z_k = 1[π_k > 1/2]``, deterministic.

    Either way a datapoint keeps at least one slot: when every slot is dropped, its most
    probable one is kept. The Gumbel noise is drawn from the selector's own generator, seeded
    with ``seed``; its state is part of :meth:`state_dict`, so a resumed run draws what the
    uninterrupted run would have drawn.

    Example::

        selector = SlotSelector(slot_dim=64)
        selection = selector(slots)  # slots (batch, K, 64)
        masks = masked_softmax(mask_logits, selection.keep)  # mask_logits (batch, K, H, W)
        selection.num_kept  # (batch,)

    :param int slot_dim: size of a slot.
    :param int hidden_dim: width of the MLP's hidden layer; default ``slot_dim``.
    :param float temperature: ``τ > 0`` of the relaxed sample.
    :param int seed: seed of the Gumbel noise; default drawn from torch's global random state
        (as the weights' initialization is).
    """

    def __init__(
        self,
        slot_dim: int,
        hidden_dim: int | None = None,
        temperature: float = 1.0,
        seed: int | None = None,
    ):
        super().__init__()
        self.slot_dim = check_positive_int(slot_dim, "slot_dim")
        hidden_dim = (
            slot_dim if hidden_dim is None else check_positive_int(hidden_dim, "hidden_dim")
        )
        self.temperature = check_positive_float(temperature, "temperature")
        self.scorer = nn.Sequential(
            nn.Linear(self.slot_dim, hidden_dim), nn.ReLU(), nn.Linear(hidden_dim, 1)
        )
        if seed is None:
            seed = int(torch.randint(2**62, ()).item())
        self._generator = torch.Generator().manual_seed(check_positive_int(seed, "seed", 0))
        self._shard = (0, 1)

    def shard_draws(self, rank: int, world_size: int) -> None:
        """Draw the noise of this rank's share of a global batch: each draw from the selector's
        own generator is made for ``world_size`` times the batch (the same numbers on every
        rank) and rows ``rank * batch`` on are kept, so ``world_size`` data-parallel processes
        draw the single process's noise and rank 0's checkpoint resumes every rank.
        :class:`~pyro_slots.NestedSVI` calls it under ``torch.distributed``."""
        world_size = check_positive_int(world_size, "world_size")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank: expected 0 <= rank < {world_size}, got {rank}")
        self._shard = (rank, world_size)

    def get_extra_state(self) -> torch.Tensor:
        return self._generator.get_state()

    def set_extra_state(self, state: torch.Tensor) -> None:
        self._generator.set_state(state.cpu())

    def logits(self, slots: torch.Tensor) -> torch.Tensor:
        """``logit π`` of every slot, ``(batch, K)`` from slots ``(batch, K, slot_dim)``."""
        if not torch.is_tensor(slots):
            raise TypeError(f"slots: expected a torch.Tensor, got {type(slots).__name__}")
        check_slots(slots, "slots", slots.shape[0] if slots.dim() else 0, self.slot_dim)
        return self.scorer(slots).squeeze(-1)

    def probabilities(self, slots: torch.Tensor) -> torch.Tensor:
        """Keep probabilities ``π`` ``(batch, K)`` of slots ``(batch, K, slot_dim)``."""
        return torch.sigmoid(self.logits(slots))

    def gumbel_noise(self, shape, dtype=None, device=None, generator=None) -> torch.Tensor:
        """Standard Gumbel draws of ``shape`` from ``generator`` (default the selector's own,
        this rank's rows of the global batch's draw after :meth:`shard_draws`)."""
        rank, world_size = (0, 1) if generator is not None else self._shard
        generator = self._generator if generator is None else generator
        dtype = torch.get_default_dtype() if dtype is None else dtype
        shape = tuple(shape)
        full = (shape[0] * world_size, *shape[1:])
        u = torch.rand(full, generator=generator, dtype=dtype, device=generator.device)
        if world_size > 1:
            u = u[rank * shape[0] : (rank + 1) * shape[0]]
        tiny = torch.finfo(dtype).tiny
        return -torch.log(-torch.log(u.clamp(tiny, 1.0 - torch.finfo(dtype).eps))).to(device)

    def forward(
        self,
        slots: torch.Tensor,
        noise: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> SlotSelection:
        """The keep mask and probabilities of slots ``(batch, K, slot_dim)``.

        :param torch.Tensor noise: training only: the Gumbel noise ``g`` ``(batch, K, 2)`` (keep,
            drop); default drawn from ``generator``.
        :param torch.Generator generator: where the noise is drawn from; default the selector's.
        :returns: a :class:`SlotSelection` of ``(batch, K)`` tensors.
        """
        logits = self.logits(slots)
        probs = torch.sigmoid(logits)
        if not self.training:
            keep = _at_least_one(probs > 0.5, probs)
            return SlotSelection(keep.to(probs.dtype), probs)
        shape = (*logits.shape, 2)
        if noise is None:
            noise = self.gumbel_noise(shape, logits.dtype, logits.device, generator)
        elif not torch.is_tensor(noise) or tuple(noise.shape) != shape:
            got = tuple(noise.shape) if torch.is_tensor(noise) else type(noise).__name__
            raise ValueError(f"noise: expected Gumbel draws of shape {shape}, got {got}")
        log_probs = torch.stack([F.logsigmoid(logits), F.logsigmoid(-logits)], -1)
        relaxed = torch.softmax((log_probs + noise) / self.temperature, -1)[..., 0]
        hard = _at_least_one(relaxed.detach() > 0.5, probs)
        keep = hard.to(relaxed.dtype) + (relaxed - relaxed.detach())  # straight-through, exact
        return SlotSelection(keep, probs)


def _at_least_one(keep: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
    """``keep`` (bool ``(batch, K)``) with the most probable slot of every empty row kept."""
    top = F.one_hot(probs.detach().argmax(-1), probs.shape[-1]).bool()
    return keep | (top & ~keep.any(-1, keepdim=True))
