"""Inner rules: fixed (gradient ascent, EM, soft k-means) and learned update rules.

Every rule has the same interface (:class:`InnerRule`), so swapping fixed for learned inference
is one argument of :func:`pyro_slots.refine` or :class:`pyro_slots.NestedSVI`.
"""

from .base import InnerProblem, InnerRule, InnerState, StepInfo
from .em import EM, SoftKMeans
from .gradient import GradientAscent
from .hybrid import Hybrid
from .learned_gradient import LearnedGradient
from .safeguard import Safeguarded
from .slot_attention import GaussianFeatures, SlotAttention

__all__ = [
    "EM",
    "GaussianFeatures",
    "GradientAscent",
    "Hybrid",
    "InnerProblem",
    "InnerRule",
    "InnerState",
    "LearnedGradient",
    "Safeguarded",
    "SlotAttention",
    "SoftKMeans",
    "StepInfo",
]
