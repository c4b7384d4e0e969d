"""Slot alignment across restarts: undo label switching by Hungarian matching.

Slots are exchangeable, so two restarts of the inner loop that found the same solution usually
list its slots in different orders (the label-switching problem of mixture models, Stephens
2000). Before comparing restarts (R-hat, ESS) every restart is permuted to match a reference
restart, datapoint by datapoint, with the assignment that minimizes the summed squared
distance between matched slots (Kuhn 1955, via :func:`scipy.optimize.linear_sum_assignment`).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

from ..refine import best_restart

__all__ = [
    "align_slots",
    "apply_permutation",
    "invert_permutation",
    "match_slots",
    "slot_distance",
]


def slot_distance(slots: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Squared Euclidean distances between every slot and every reference slot.

    :param torch.Tensor slots: ``(..., num_slots, dim)``.
    :param torch.Tensor reference: ``(..., num_slots, dim)``, same shape as ``slots``.
    :returns: ``(..., num_slots, num_slots)``, entry ``[..., i, j] = ‖reference_i - slots_j‖²``.
    """
    if slots.shape != reference.shape:
        raise ValueError(
            f"reference: expected the shape of slots {tuple(slots.shape)}, "
            f"got {tuple(reference.shape)}"
        )
    return ((reference.unsqueeze(-2) - slots.unsqueeze(-3)) ** 2).sum(-1)


def match_slots(cost: torch.Tensor | np.ndarray) -> np.ndarray:
    """Hungarian matching of every ``(num_slots, num_slots)`` cost matrix in a batch.

    :param cost: ``(..., K, K)`` costs, ``cost[..., i, j]`` of giving reference slot ``i`` the
        slot ``j``.
    :returns: ``(..., K)`` integer array ``perm`` minimizing ``Σ_i cost[..., i, perm[i]]``.
    """
    cost = cost.detach().cpu().numpy() if torch.is_tensor(cost) else np.asarray(cost)
    if cost.ndim < 2 or cost.shape[-1] != cost.shape[-2]:
        raise ValueError(f"cost: expected shape (..., K, K), got {cost.shape}")
    if not np.all(np.isfinite(cost)):
        raise ValueError("cost: contains NaN or infinite values")
    flat = cost.reshape(-1, *cost.shape[-2:])
    perms = np.empty(flat.shape[:2], dtype=np.int64)
    for i, c in enumerate(flat):
        rows, cols = linear_sum_assignment(c)
        perms[i, rows] = cols
    return perms.reshape(cost.shape[:-1])


def apply_permutation(t: torch.Tensor, perm, slot_dim: int) -> torch.Tensor:
    """Reorder the slot axis: ``out[r, n, ..., j, ...] = t[r, n, ..., perm[r, n, j], ...]``.

    :param torch.Tensor t: a tensor whose leading dims match ``perm``'s leading dims
        ``(restarts, batch)`` and whose axis ``slot_dim`` indexes slots.
    :param perm: ``(restarts, batch, num_slots)`` integers (array or tensor).
    :param int slot_dim: the slot axis of ``t`` (``>= perm.ndim - 1``; negative counts from the
        end).
    """
    perm = torch.as_tensor(np.asarray(perm), device=t.device, dtype=torch.long)
    lead = perm.dim() - 1
    slot_dim = slot_dim % t.dim()
    if tuple(t.shape[:lead]) != tuple(perm.shape[:lead]) or slot_dim < lead:
        raise ValueError(
            f"perm: leading shape {tuple(perm.shape[:lead])} must match the leading dims of a "
            f"tensor of shape {tuple(t.shape)} whose slot axis is {slot_dim}"
        )
    if t.shape[slot_dim] != perm.shape[-1]:
        raise ValueError(
            f"perm: {perm.shape[-1]} slots, but axis {slot_dim} of the tensor has "
            f"{t.shape[slot_dim]}"
        )
    view = (
        *perm.shape[:lead],
        *([1] * (slot_dim - lead)),
        perm.shape[-1],
        *([1] * (t.dim() - slot_dim - 1)),
    )
    return torch.gather(t, slot_dim, perm.reshape(view).expand(t.shape))


def invert_permutation(perm) -> np.ndarray:
    """``inv`` with ``inv[..., perm[..., j]] = j``: undoes :func:`apply_permutation`."""
    perm = np.asarray(perm)
    return np.argsort(perm, axis=-1)


def align_slots(
    slots: torch.Tensor,
    *,
    reference: str | int = "best",
    elbo: torch.Tensor | None = None,
    fields: Sequence[str] | None = None,
    slot_spec=None,
) -> tuple[torch.Tensor, np.ndarray, np.ndarray]:
    """Permute the slots of every restart to match a reference restart, per datapoint.

    Example::

        result = refine(gmm, x, EM(50), num_restarts=4, seed=0)
        aligned, perm, ref = align_slots(result.slots, elbo=result.elbo)

    :param torch.Tensor slots: ``(restarts, batch, num_slots, dim)``.
    :param reference: ``"best"`` (per datapoint, the restart with the highest ``elbo``),
        ``"first"`` (restart 0) or a restart index.
    :param torch.Tensor elbo: ``(restarts, batch)`` final ELBOs; required for ``"best"``.
    :param fields: match on these fields of ``slot_spec`` only (e.g. ``("loc",)``); all of λ by
        default.
    :param SlotSpec slot_spec: layout of a slot; required with ``fields``.
    :returns: ``(aligned, perm, ref)``: aligned slots of the shape of ``slots``, the permutation
        ``perm (restarts, batch, num_slots)`` with ``aligned = apply_permutation(slots, perm, 2)``
        and the reference restart of every datapoint ``ref (batch,)``.
    """
    if not torch.is_tensor(slots) or slots.dim() != 4:
        shape = tuple(slots.shape) if torch.is_tensor(slots) else type(slots).__name__
        raise ValueError(f"slots: expected shape (restarts, batch, num_slots, dim), got {shape}")
    num_restarts, batch = slots.shape[:2]
    ref = _reference_index(reference, elbo, num_restarts, batch)
    features = slots.detach()
    if fields is not None:
        if slot_spec is None:
            raise ValueError("slot_spec: required when fields are given")
        parts = slot_spec.split(features)
        unknown = [f for f in fields if f not in parts]
        if unknown or not fields:
            raise ValueError(f"fields: expected a non-empty subset of {list(parts)}, got {fields}")
        features = torch.cat([parts[f].reshape(*features.shape[:3], -1) for f in fields], -1)
    ref_features = features[torch.as_tensor(ref), torch.arange(batch)]  # (batch, K, dim)
    cost = slot_distance(features, ref_features.expand_as(features))
    perm = match_slots(cost)
    return apply_permutation(slots, perm, 2), perm, ref


def _reference_index(reference, elbo, num_restarts: int, batch: int) -> np.ndarray:
    if reference == "best":
        if elbo is None:
            raise ValueError('elbo: required with reference="best"')
        if tuple(elbo.shape) != (num_restarts, batch):
            raise ValueError(
                f"elbo: expected shape ({num_restarts}, {batch}), got {tuple(elbo.shape)}"
            )
        return best_restart(elbo.detach()).cpu().numpy()
    if reference == "first":
        return np.zeros(batch, dtype=np.int64)
    if isinstance(reference, int | np.integer) and not isinstance(reference, bool):
        if not 0 <= reference < num_restarts:
            raise ValueError(
                f"reference: expected a restart in [0, {num_restarts}), got {reference}"
            )
        return np.full(batch, int(reference), dtype=np.int64)
    raise ValueError(f'reference: expected "best", "first" or a restart index, got {reference!r}')
