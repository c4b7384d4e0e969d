"""Argument checks shared by the public entry points.

Every check raises :class:`ValueError` or :class:`TypeError` naming the argument, the expected
shape or range and what was received, before any work starts.
"""

from __future__ import annotations

import math

import torch

__all__ = [
    "CapabilityError",
    "check_finite",
    "check_measurements",
    "check_positive_float",
    "check_positive_int",
    "check_slots",
]


class CapabilityError(TypeError):
    """A model or rule was asked for something it does not provide (e.g. EM without M-step)."""


def check_positive_int(value, name: str, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int | torch.SymInt):
        try:
            if int(value) != value:
                raise TypeError
        except (TypeError, ValueError):
            raise TypeError(f"{name}: expected an integer >= {minimum}, got {value!r}") from None
    if int(value) < minimum:
        raise ValueError(f"{name}: expected an integer >= {minimum}, got {value}")
    return int(value)


def check_positive_float(value, name: str, allow_zero: bool = False) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise TypeError(f"{name}: expected a positive number, got {value!r}") from None
    if not math.isfinite(v) or v < 0 or (v == 0 and not allow_zero):
        rng = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{name}: expected a finite number {rng}, got {value}")
    return v


def check_finite(x: torch.Tensor, name: str) -> torch.Tensor:
    if not torch.isfinite(x).all():
        bad = (~torch.isfinite(x)).sum().item()
        raise ValueError(f"{name}: contains {bad} NaN or infinite values")
    return x


def check_measurements(x, name: str = "x", feature_dim: int | None = None) -> torch.Tensor:
    """``x`` must be a finite floating tensor of shape ``(batch, measurements, features)``."""
    if not torch.is_tensor(x):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 3:
        raise ValueError(
            f"{name}: expected shape (batch, measurements, features), got {tuple(x.shape)}"
        )
    if not x.is_floating_point():
        raise TypeError(f"{name}: expected a floating-point tensor, got dtype {x.dtype}")
    if x.shape[0] < 1 or x.shape[1] < 1:
        raise ValueError(
            f"{name}: expected at least one datapoint and measurement, got {tuple(x.shape)}"
        )
    if feature_dim is not None and x.shape[-1] != feature_dim:
        raise ValueError(
            f"{name}: expected {feature_dim} features per measurement (last dim), "
            f"got shape {tuple(x.shape)}"
        )
    return check_finite(x, name)


def check_slots(slots, name: str, batch: int, slot_dim: int, num_slots: int | None = None):
    """``slots`` must be a finite ``(batch, num_slots, slot_dim)`` tensor."""
    if not torch.is_tensor(slots):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(slots).__name__}")
    expected = f"({batch}, {'num_slots' if num_slots is None else num_slots}, {slot_dim})"
    if (
        slots.dim() != 3
        or slots.shape[0] != batch
        or slots.shape[2] != slot_dim
        or (num_slots is not None and slots.shape[1] != num_slots)
        or slots.shape[1] < 1
    ):
        raise ValueError(f"{name}: expected shape {expected}, got {tuple(slots.shape)}")
    return check_finite(slots, name)
