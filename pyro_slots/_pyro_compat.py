"""The one place pyro_slots touches Pyro's (and torch.distributions') private internals.

The per-datapoint ELBO reuses pieces of :class:`~pyro.infer.TraceEnum_ELBO` that Pyro does not
export: its trace builder, the model-factor split of ``_compute_dice_elbo``, the DiCE factor
lookup, the packed-tensor dimension names, the adjoint ``backward`` of its einsum ring, the
``_enumerate_dim`` mark of enumerated sites, the ``_postprocess_message`` hook of a
:class:`~pyro.poutine.messenger.Messenger`, and a distribution's ``_validate_sample``. Every such
use in the library goes through a function here, and ``tests/test_pyro_compat.py`` checks each
one on a tiny model against the answer of Pyro's public API, so a Pyro release that changes them
fails loudly there first. ``pyproject.toml`` pins the Pyro versions listed in
:data:`CHECKED_PYRO_VERSIONS`.
"""

from __future__ import annotations

import torch
from pyro.infer import TraceEnum_ELBO
from pyro.infer.traceenum_elbo import _compute_model_factors
from pyro.infer.util import Dice
from pyro.ops.einsum.adjoint import require_backward
from pyro.poutine.messenger import Messenger

#: The Pyro version range whose internals this module was checked against (``pyproject.toml``
#: pins the same range; ``tests/test_pyro_compat.py`` checks both).
CHECKED_PYRO_VERSIONS = ">=1.9,<1.10"

__all__ = [
    "CHECKED_PYRO_VERSIONS",
    "SampleMessenger",
    "backward_marginals",
    "compute_model_factors",
    "dice_log_factors",
    "get_traces",
    "is_enumerated",
    "packed_log_prob",
    "plate_symbols",
    "pyro_dims",
    "require_marginal",
    "set_pyro_dims",
    "validate_sample",
    "validates_args",
]


def get_traces(elbo: TraceEnum_ELBO, model, guide, args: tuple, kwargs: dict):
    """``TraceEnum_ELBO._get_traces``: yields one packed ``(model_trace, guide_trace)`` per
    particle (one pair for vectorized particles), enumerated sites expanded in the model trace."""
    return elbo._get_traces(model, guide, args, kwargs)


def compute_model_factors(model_trace, guide_trace):
    """``pyro.infer.traceenum_elbo._compute_model_factors``: the model's packed terms split into
    ``(marginal_costs, log_factors, ordering, sum_dims, scale)``, the first half of
    ``_compute_dice_elbo``."""
    return _compute_model_factors(model_trace, guide_trace)


def dice_log_factors(dice: Dice, ordinal: frozenset) -> list:
    """``Dice._get_log_factors``: the DiCE log-factors (tensors, and floats for scales) of the
    guide's non-reparameterized choices that the plate ``ordinal`` depends on."""
    return dice._get_log_factors(ordinal)


def pyro_dims(t: torch.Tensor) -> str:
    """The packed dimension names of ``t``, one character per axis (``pyro.ops.packed``)."""
    return t._pyro_dims


def set_pyro_dims(t: torch.Tensor, dims: str) -> torch.Tensor:
    """Names the axes of ``t`` for ``pyro.ops.packed``; returns ``t``."""
    t._pyro_dims = dims
    return t


def backward_marginals(root: torch.Tensor, queries: dict) -> dict:
    """Runs the adjoint backward pass of a ring contraction whose result is ``root`` and returns
    ``{key: log-marginal}`` of each query tensor (``require_backward`` must have been called on
    them before the contraction: use :func:`require_marginal`)."""
    root._pyro_backward()
    return {key: query._pyro_backward_result for key, query in queries.items()}


def require_marginal(query: torch.Tensor) -> None:
    """Marks ``query`` so that :func:`backward_marginals` yields its log-marginal."""
    require_backward(query)


def packed_log_prob(site: dict) -> torch.Tensor:
    """The packed log-density of a site of a trace packed by ``Trace.pack_tensors``."""
    return site["packed"]["log_prob"]


def plate_symbols(trace) -> dict:
    """``{plate name: packed dimension symbol}`` of a trace packed by ``Trace.pack_tensors``."""
    return trace.plate_to_symbol


def is_enumerated(msg: dict) -> bool:
    """Whether ``poutine.enum`` enumerated this sample site (it marks ``_enumerate_dim``)."""
    return msg["infer"].get("_enumerate_dim") is not None


def validates_args(fn) -> bool:
    """Whether the distribution ``fn`` checks its arguments and samples."""
    return bool(fn._validate_args)


def validate_sample(fn, value: torch.Tensor) -> None:
    """``fn._validate_sample(value)``: raises ``ValueError`` when ``value`` is outside the
    support of ``fn`` or has a shape that does not broadcast against it."""
    fn._validate_sample(value)


class SampleMessenger(Messenger):
    """A :class:`~pyro.poutine.messenger.Messenger` that hands every sample message, after the
    inner handlers ran (its value drawn or observed), to :meth:`postprocess_sample`."""

    def postprocess_sample(self, msg: dict) -> None:
        raise NotImplementedError

    def _postprocess_message(self, msg):
        if msg["type"] == "sample":
            self.postprocess_sample(msg)
