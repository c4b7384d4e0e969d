"""pyro_slots: object-centric and mixture-model inference as nested optimization, in Pyro.

Data flows one way: data -> model (Pyro) -> per-datapoint ELBO -> inner rule -> λ* ->
objective J -> outer optimizer.

Every public subpackage is an attribute of ``pyro_slots``: ``data``, ``elbo``, ``inner``,
``metrics`` and ``objectives`` are imported with it; ``checkpoint``, ``cli``, ``diagnostics``
(ArviZ), ``models`` and ``plots`` (matplotlib) on first access (PEP 562), so that
``import pyro_slots`` stays as fast as the inference path needs.
"""

import importlib

from . import data, elbo, inner, metrics, objectives
from ._allocator import tune_allocator
from .elbo import PerDatapointELBO, per_datapoint_elbo
from .init import AmortizedInit, GaussianInit, LearnedQueries, SlotInitializer, SlotTransition
from .model import SlotCategorical, SlotModel, SlotSpec, select_component
from .nested import (
    GRADIENT_MODES,
    ImplicitAdjoint,
    ImplicitGradientWarning,
    NestedStep,
    NestedSVI,
    RankFailedError,
)
from .refine import InnerLoopError, RefineResult, refine, refine_video
from .validation import CapabilityError

__version__ = "0.1.0"

#: Subpackages imported on first access.
_LAZY_SUBPACKAGES = ("checkpoint", "cli", "diagnostics", "models", "plots")

__all__ = [
    "GRADIENT_MODES",
    "CapabilityError",
    "AmortizedInit",
    "GaussianInit",
    "LearnedQueries",
    "ImplicitAdjoint",
    "ImplicitGradientWarning",
    "InnerLoopError",
    "NestedSVI",
    "NestedStep",
    "RankFailedError",
    "PerDatapointELBO",
    "RefineResult",
    "SlotInitializer",
    "SlotModel",
    "SlotSpec",
    "SlotCategorical",
    "SlotTransition",
    "checkpoint",
    "cli",
    "data",
    "diagnostics",
    "elbo",
    "inner",
    "metrics",
    "models",
    "objectives",
    "per_datapoint_elbo",
    "select_component",
    "plots",
    "refine",
    "refine_video",
    "tune_allocator",
]


def __getattr__(name: str):
    if name in _LAZY_SUBPACKAGES:
        # import_module also binds the subpackage as an attribute: this runs once per name.
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(__all__))
