"""The pyro_slots model zoo (installed as :mod:`pyro_slots.models`)."""

from .gmm import GaussianMixture, kmeans_plus_plus

__all__ = ["GaussianMixture", "kmeans_plus_plus"]
