"""pyro_slots: object-centric and mixture-model inference as nested optimization, in Pyro.

Data flows one way: data -> model (Pyro) -> per-datapoint ELBO -> inner rule -> λ* ->
objective J -> outer optimizer.
"""

from . import data, inner, metrics, objectives
from ._allocator import tune_allocator
from .elbo import PerDatapointELBO, per_datapoint_elbo
from .init import GaussianInit, SlotInitializer
from .model import SlotModel, SlotSpec
from .nested import (
    GRADIENT_MODES,
    ImplicitAdjoint,
    ImplicitGradientWarning,
    NestedStep,
    NestedSVI,
)
from .refine import InnerLoopError, RefineResult, refine
from .validation import CapabilityError

__version__ = "0.1.0"

__all__ = [
    "GRADIENT_MODES",
    "CapabilityError",
    "GaussianInit",
    "ImplicitAdjoint",
    "ImplicitGradientWarning",
    "InnerLoopError",
    "NestedSVI",
    "NestedStep",
    "PerDatapointELBO",
    "RefineResult",
    "SlotInitializer",
    "SlotModel",
    "SlotSpec",
    "data",
    "inner",
    "metrics",
    "objectives",
    "per_datapoint_elbo",
    "refine",
    "tune_allocator",
]
