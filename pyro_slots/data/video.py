r"""Short videos of moving shapes: the objects of :mod:`pyro_slots.data.shapes` in motion.

Clip ``i`` of a generator with seed ``seed`` starts from scene ``i`` of
:func:`~pyro_slots.data.generate_shapes` with the same configuration (frame 0 *is* that scene),
and every object moves with its own constant velocity, bouncing off the walls of the position
box ``[0.1, 0.9]²`` (a reflection: the coordinate follows a triangle wave). Shape, colour,
scale and rotation stay fixed, and mask id ``j + 1`` is object ``j`` in every frame, so the
masks carry object identity over time (what tracking is scored against).

The velocity of object ``j`` is ``speed · (cos φ, sin φ)`` with ``speed ~ U(0, max_speed)``
(image sizes per frame) and ``φ ~ U(0, 2π)``, drawn from the clip's own stream
``numpy.random.default_rng([seed, i, 1])``.

==================  ==========================  ===========================================
key                 shape, dtype                meaning
==================  ==========================  ===========================================
``video``           (N, T, 3, H, W) float32     RGB frames in [0, 1]
``mask``            (N, T, H, W) int64          0 = background, ``j + 1`` = object ``j``
``position``        (N, T, M, 2) float32        ``(x, y)`` of every object in every frame
                                                (0 for absent objects, as in the scenes)
``velocity``        (N, M, 2) float32           per frame, before reflections
``visible``         (N, T, M) bool              object ``j`` owns a pixel of frame ``t``
``present``         (N, M) bool                 object ``j`` is part of the clip
``num_objects``     (N,) int64                  objects per clip
==================  ==========================  ===========================================
"""

from __future__ import annotations

import math

import numpy as np
import torch

from ..validation import check_positive_float, check_positive_int
from ._scene import check_index_range, check_seed
from .shapes import (
    POSITION_RANGE,
    _check_config,
    _draw_scenes,
    _paint,
    _render_masks,
    _visible,
)

__all__ = ["bounce", "generate_moving_shapes"]


def bounce(start: np.ndarray, velocity: np.ndarray, steps: np.ndarray, low, high) -> np.ndarray:
    """Positions after ``steps`` frames of constant ``velocity`` reflected off ``[low, high]``.

    The unfolded coordinate ``start + velocity · t`` is folded back by a triangle wave of
    period ``2 (high - low)``. Shapes broadcast: ``start``/``velocity`` ``(..., 2)`` and
    ``steps`` ``(T,)`` give ``(T, ..., 2)``.
    """
    width = high - low
    unfolded = start[None] - low + velocity[None] * steps.reshape(-1, *([1] * start.ndim))
    phase = np.mod(unfolded, 2 * width)
    return low + np.where(phase <= width, phase, 2 * width - phase)


def generate_moving_shapes(
    num_clips: int,
    num_frames: int = 8,
    image_size: int = 32,
    min_objects: int = 2,
    max_objects: int = 3,
    background: str = "plain",
    max_speed: float = 0.05,
    seed: int = 0,
    start: int = 0,
) -> dict[str, torch.Tensor]:
    """Clips ``start .. start + num_clips - 1`` (see the module docstring), stacked.

    :param int num_clips: ``N``.
    :param int num_frames: ``T``.
    :param int image_size: ``H = W``.
    :param int min_objects: fewest objects per clip.
    :param int max_objects: most objects per clip ``M``.
    :param str background: ``"plain"`` or ``"colored"``, as :func:`generate_shapes`.
    :param float max_speed: largest speed, in image sizes per frame (> 0).
    :param int seed: the generator's seed (clip ``i`` depends on ``(seed, i)`` only).
    :param int start: index of the first clip.
    """
    image_size, min_objects, max_objects = _check_config(
        image_size, min_objects, max_objects, background
    )
    num_frames = check_positive_int(num_frames, "num_frames")
    max_speed = check_positive_float(max_speed, "max_speed")
    seed = check_seed(seed)
    num_clips, start = check_index_range(num_clips, start)
    attrs = _draw_scenes(seed, start, num_clips, min_objects, max_objects, background)
    velocity = np.zeros((num_clips, max_objects, 2))
    for n in range(num_clips):
        u = np.random.default_rng([seed, start + n, 1]).random((max_objects, 2))
        speed, angle = max_speed * u[:, 0], 2 * math.pi * u[:, 1]
        velocity[n] = np.stack([speed * np.cos(angle), speed * np.sin(angle)], -1)
    velocity[~attrs["present"]] = 0
    steps = np.arange(num_frames, dtype=np.float64)
    position = bounce(attrs["attr_position"].astype(np.float64), velocity, steps, *POSITION_RANGE)
    position[:, ~attrs["present"]] = 0  # (the fold moved the absent objects' zeros into the box)
    position = position.astype(np.float32)  # (T, N, M, 2)
    masks, frames, visible = [], [], []
    for t in range(num_frames):
        frame_attrs = dict(attrs, attr_position=position[t])
        mask = _render_masks(frame_attrs, image_size)
        masks.append(mask)
        frames.append(_paint(mask, attrs["background"], attrs["attr_rgb"]))
        visible.append(_visible(mask, max_objects))
    out = {
        "video": np.stack(frames, 1),
        "mask": np.stack(masks, 1),
        "position": position.transpose(1, 0, 2, 3),
        "velocity": velocity.astype(np.float32),
        "visible": np.stack(visible, 1),
        "present": attrs["present"],
        "num_objects": attrs["num_objects"],
    }
    return {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in out.items()}
