"""Inner rules: fixed (gradient ascent, EM, soft k-means) and learned update rules.

Every rule has the same interface (:class:`InnerRule`), so swapping fixed for learned inference
is one argument of :func:`pyro_slots.refine` or :class:`pyro_slots.NestedSVI`.
"""

from .base import InnerProblem, InnerRule, InnerState, StepInfo
from .em import EM, SoftKMeans
from .gradient import GradientAscent

__all__ = [
    "EM",
    "GradientAscent",
    "InnerProblem",
    "InnerRule",
    "InnerState",
    "SoftKMeans",
    "StepInfo",
]
