"""pyro_slots: object-centric and mixture-model inference as nested optimization, in Pyro."""

from .elbo import PerDatapointELBO, per_datapoint_elbo
from .init import GaussianInit, SlotInitializer
from .model import SlotModel, SlotSpec

__version__ = "0.1.0"

__all__ = [
    "GaussianInit",
    "PerDatapointELBO",
    "SlotInitializer",
    "SlotModel",
    "SlotSpec",
    "per_datapoint_elbo",
]
