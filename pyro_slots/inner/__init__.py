"""Inner rules: fixed (gradient ascent, EM, generalized EM, soft k-means) and learned update rules,
and wrappers (Safeguarded, Hybrid, Reinitialize).

Every rule has the same interface (:class:`InnerRule`), so swapping fixed for learned inference
is one argument of :func:`pyro_slots.refine` or :class:`pyro_slots.NestedSVI`.
"""

from .base import InnerProblem, InnerRule, InnerState, StepInfo
from .em import EM, GeneralizedEM, SoftKMeans, expected_log_joint
from .gradient import GradientAscent, trust_region
from .hybrid import Hybrid
from .learned_gradient import LearnedGradient
from .mstep import DerivedMStep
from .reinit import Reinitialize, decoder_masks, duplicate_mask, masks_of, posterior_masks
from .rnn_em import RNNEM
from .safeguard import Safeguarded
from .slot_attention import GaussianFeatures, SlotAttention

__all__ = [
    "EM",
    "DerivedMStep",
    "GaussianFeatures",
    "GeneralizedEM",
    "GradientAscent",
    "Hybrid",
    "InnerProblem",
    "InnerRule",
    "InnerState",
    "LearnedGradient",
    "RNNEM",
    "Reinitialize",
    "Safeguarded",
    "SlotAttention",
    "SoftKMeans",
    "StepInfo",
    "decoder_masks",
    "duplicate_mask",
    "expected_log_joint",
    "masks_of",
    "posterior_masks",
    "trust_region",
]
