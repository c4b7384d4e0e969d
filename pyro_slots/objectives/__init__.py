"""Task objectives J for the outer loop."""

from .base import Objective
from .combined import WeightedSum
from .elbo import NegativeELBO
from .reconstruction import Reconstruction
from .set_prediction import SetPrediction

__all__ = ["NegativeELBO", "Objective", "Reconstruction", "SetPrediction", "WeightedSum"]
