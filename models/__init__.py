"""The pyro_slots model zoo (installed as :mod:`pyro_slots.models`)."""

from .blocks import CNNEncoder, SoftPositionEmbed, SpatialBroadcastDecoder
from .gmm import GaussianMixture, kmeans_plus_plus, random_from_data
from .iodine import IODINE, RefinementInputs
from .neural_em import NeuralEM
from .slot_autoencoder import SlotAutoencoder
from .slot_selection import SlotSelection, SlotSelector, masked_softmax

__all__ = [
    "CNNEncoder",
    "GaussianMixture",
    "IODINE",
    "NeuralEM",
    "RefinementInputs",
    "SlotAutoencoder",
    "SlotSelection",
    "SlotSelector",
    "SoftPositionEmbed",
    "SpatialBroadcastDecoder",
    "kmeans_plus_plus",
    "masked_softmax",
    "random_from_data",
]
