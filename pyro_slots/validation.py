"""Argument checks shared by the public entry points.

Every check raises :class:`ValueError` or :class:`TypeError` naming the argument, the expected
shape or range and what was received, before any work starts.
"""

from __future__ import annotations

import math

import numpy as np
import torch

__all__ = [
    "CapabilityError",
    "NonFiniteError",
    "check_data",
    "check_finite",
    "check_measurements",
    "check_num_measurements",
    "check_positive_float",
    "check_positive_int",
    "check_slots",
    "process_group",
]


class CapabilityError(TypeError):
    """A model or rule was asked for something it does not provide (e.g. EM without M-step)."""


class NonFiniteError(ValueError, FloatingPointError):
    """A tensor holds NaN or infinite values.

    A :class:`ValueError` (bad input) and a :class:`FloatingPointError` (a diverging
    computation, e.g. slots that became NaN during training), so both kinds of handler see it.
    """


def check_positive_int(value, name: str, minimum: int = 1) -> int:
    # bools of every kind (NumPy's and a torch bool tensor too) are switches, not counts
    if isinstance(value, bool | np.bool_) or (torch.is_tensor(value) and value.dtype == torch.bool):
        raise TypeError(f"{name}: expected an integer >= {minimum}, got {value!r}")
    if not isinstance(value, int | torch.SymInt):
        try:
            if int(value) != value:
                raise TypeError
        except (TypeError, ValueError, OverflowError):  # (OverflowError: inf)
            raise TypeError(f"{name}: expected an integer >= {minimum}, got {value!r}") from None
    if int(value) < minimum:
        raise ValueError(f"{name}: expected an integer >= {minimum}, got {value}")
    return int(value)


def check_bool(value, name: str) -> bool:
    """``value`` must be ``True`` or ``False`` (NumPy's too; a switch given ``"no"`` or ``0`` is
    refused, not read through ``bool()``)."""
    if not isinstance(value, bool | np.bool_):
        raise TypeError(f"{name}: expected True or False, got {value!r}")
    return bool(value)


def check_seed(value, name: str = "seed") -> int:
    """``value`` must be an integer >= 0 (not a bool, not a fractional number)."""
    return check_positive_int(value, name, minimum=0)


def check_positive_float(value, name: str, allow_zero: bool = False) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise TypeError(f"{name}: expected a positive number, got {value!r}") from None
    if not math.isfinite(v) or v < 0 or (v == 0 and not allow_zero):
        rng = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{name}: expected a finite number {rng}, got {value}")
    return v


#: Elements per piece when :func:`check_finite` counts the non-finite values.
FINITE_CHECK_CHUNK = 2**22


def check_finite(x: torch.Tensor, name: str) -> torch.Tensor:
    """:raises NonFiniteError: naming ``name`` and counting the NaN or infinite values.

    A NaN or an infinity anywhere makes the sum NaN or infinite, so a finite sum proves the
    tensor finite without a boolean copy of it (95 MiB for 10⁵ sets of 500 2-D points); only
    a sum that is not finite (bad values, or finite ones whose sum overflows) is followed by
    counting, a piece at a time.
    """
    with torch.no_grad():
        if bool(torch.isfinite(x.sum())):
            return x
        rows = max(1, FINITE_CHECK_CHUNK // max(1, x[0].numel())) if x.dim() else 1
        pieces = x.split(rows) if x.dim() else (x,)
        bad = sum(int((~torch.isfinite(piece)).sum()) for piece in pieces)
    if bad:
        raise NonFiniteError(f"{name}: contains {bad} NaN or infinite values")
    return x


def check_data(x, name: str = "x", model=None, *modules) -> torch.Tensor:
    """``x`` must be a floating-point tensor (before a model's ``encode``); with ``model`` (and
    any further ``modules``, e.g. a learned inner rule), of the dtype and on the device of
    their floating-point weights, if they have any.

    :raises TypeError: for another type, an integer tensor (e.g. ``uint8`` images) or a dtype
        other than the weights', naming ``name`` and the expected dtype.
    :raises ValueError: for data on another device than the weights.
    """
    if not torch.is_tensor(x):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in (torch.float32, torch.float64):
        # (half precision: the inner loop's ELBOs and k-means++ lose tens of nats or overflow)
        hint = " (images: x.float() / 255)" if x.dtype == torch.uint8 else ""
        raise TypeError(
            f"{name}: expected a floating-point tensor (torch.float32 or torch.float64), got "
            f"dtype {x.dtype}{hint}"
        )
    for i, module in enumerate((model, *modules)):
        weight = _first_weight(module) if i == 0 else _first_weight(module, skip_initializers=True)
        if weight is None:
            continue
        owner = "the model's" if i == 0 else f"{type(module).__name__}'s"
        if x.dtype != weight.dtype:
            raise TypeError(
                f"{name}: expected dtype {weight.dtype} (the dtype of {owner} weights), got "
                f"{x.dtype}; convert the data (x.to({weight.dtype})) or the "
                + ("model" if i == 0 else f"rule ({type(module).__name__}(...).to({x.dtype}))")
            )
        if x.device != weight.device:
            raise ValueError(
                f"{name}: expected device {weight.device} (the device of {owner} weights), got "
                f"{x.device}"
            )
    return x


def _first_weight(module, skip_initializers: bool = False):
    """The first floating-point parameter of ``module`` (``None`` if it has none); with
    ``skip_initializers``, none of a slot initializer's inside it (an inner rule's replacement
    draws, :class:`~pyro_slots.inner.Reinitialize`): initializers draw in the dtype asked for."""
    parameters = getattr(module, "named_parameters", None)
    if not callable(parameters):
        return None
    skipped = ()
    if skip_initializers:
        from .init import SlotInitializer

        skipped = tuple(
            name + "." for name, sub in module.named_modules() if isinstance(sub, SlotInitializer)
        )
        if "." in skipped:  # the module is an initializer
            return None
    for name, p in parameters():
        if p.is_floating_point() and not name.startswith(skipped):
            return p
    return None


def check_num_measurements(x_enc: torch.Tensor, num_slots: int | None, name: str = "x"):
    """Every datapoint needs at least 2 measurements (``x_enc`` ``(batch, M, features)``): with
    one, a fitted slot has no spread and the ELBO is unbounded.

    :raises ValueError: naming ``name`` and the number of measurements.
    """
    if x_enc.dim() >= 2 and x_enc.shape[1] < 2:
        slots = "" if num_slots is None else f" for {num_slots} slots"
        raise ValueError(
            f"{name}: needs at least 2 measurements per datapoint{slots}, got {x_enc.shape[1]} "
            f"(encoded shape {tuple(x_enc.shape)})"
        )
    return x_enc


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


def check_slots(
    slots,
    name: str,
    batch: int,
    slot_dim: int,
    num_slots: int | None = None,
    like: torch.Tensor | None = None,
    finite: bool = True,
):
    """``slots`` must be a finite ``(batch, num_slots, slot_dim)`` tensor; with ``like``, of its
    dtype and on its device (the data the slots are refined on).

    :param bool finite: whether to check the values too (a pass over them). A Pyro program
        passes ``pyro.distributions.is_validation_enabled()``: its shapes are always checked,
        its values while Pyro validates (the lean estimator turns that off after a program's
        first call per signature; a NaN then shows as a non-finite ELBO, which the inner loop
        and ``NestedSVI`` refuse).
    """
    if not torch.is_tensor(slots):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(slots).__name__}")
    if like is not None and slots.dtype != like.dtype:
        raise TypeError(
            f"{name}: expected dtype {like.dtype} (the dtype of the data), got {slots.dtype}"
        )
    if like is not None and slots.device != like.device:
        raise ValueError(
            f"{name}: expected device {like.device} (the device of the data), got {slots.device}"
        )
    expected = f"({batch}, {'num_slots' if num_slots is None else num_slots}, {slot_dim})"
    if (
        slots.dim() != 3
        or slots.shape[0] != batch
        or slots.shape[2] != slot_dim
        or (num_slots is not None and slots.shape[1] != num_slots)
        or slots.shape[1] < 1
    ):
        raise ValueError(f"{name}: expected shape {expected}, got {tuple(slots.shape)}")
    return check_finite(slots, name) if finite else slots


def process_group(distributed) -> tuple[int, int] | None:
    """``(world_size, rank)`` of the default ``torch.distributed`` process group when
    ``distributed`` asks for it, else ``None``: ``True`` requires an initialized group, ``None``
    takes the group if one is initialized, ``False`` never does."""
    if distributed is not None and not isinstance(distributed, bool):
        raise TypeError(f"distributed: expected True or False, got {distributed!r}")
    import torch.distributed as dist

    available = dist.is_available() and dist.is_initialized()
    if distributed and not available:
        raise ValueError(
            "distributed: True needs torch.distributed.init_process_group() to be called "
            "first (e.g. under torchrun)"
        )
    if not (available if distributed is None else distributed):
        return None
    return dist.get_world_size(), dist.get_rank()
