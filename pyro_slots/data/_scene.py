"""Helpers shared by the scene generators: per-scene random streams, argument checks, items.

Every scene ``i`` of a generator with seed ``seed`` is drawn from its own
``numpy.random.default_rng([seed, i])`` (a PCG64 stream keyed by a
:class:`numpy.random.SeedSequence`), so that scene ``i`` does not depend on how many scenes are
generated at once, in which chunks, or on which worker. The generators only call
:meth:`numpy.random.Generator.random` (uniform doubles, whose stream is stable across numpy
versions and platforms) and derive every other draw from those uniforms.
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = [
    "check_index_range",
    "check_seed",
    "pixel_centers",
    "scene_rng",
    "unstack_item",
]


def check_seed(seed) -> int:
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer):
        raise TypeError(f"seed: expected a non-negative integer, got {seed!r}")
    if seed < 0:
        raise ValueError(f"seed: expected a non-negative integer, got {seed}")
    return int(seed)


def check_index_range(num_images, start) -> tuple[int, int]:
    for name, value, minimum in (("num_images", num_images, 0), ("start", start, 0)):
        if isinstance(value, bool) or not isinstance(value, int | np.integer):
            raise TypeError(f"{name}: expected an integer >= {minimum}, got {value!r}")
        if value < minimum:
            raise ValueError(f"{name}: expected an integer >= {minimum}, got {value}")
    return int(num_images), int(start)


def scene_rng(seed: int, index: int) -> np.random.Generator:
    """The random stream of scene ``index`` of a generator seeded with ``seed``."""
    return np.random.default_rng([seed, index])


def pixel_centers(size: int, dtype=np.float32) -> np.ndarray:
    """Normalized coordinates ``(j + 0.5) / size`` of the pixel centres, shape ``(size,)``."""
    return ((np.arange(size, dtype=np.float64) + 0.5) / size).astype(dtype)


def unstack_item(batch: dict[str, torch.Tensor], index: int) -> dict:
    """Item ``index`` of a dict of stacked tensors; ``num_objects`` becomes a Python int."""
    item = {key: value[index] for key, value in batch.items()}
    item["num_objects"] = int(item["num_objects"])
    return item


def dataset_index(index, length: int) -> int:
    """``index`` as a non-negative position in a dataset of ``length`` items (negative allowed)."""
    if isinstance(index, bool) or not isinstance(index, int | np.integer):
        raise TypeError(f"index: expected an integer, got {type(index).__name__}")
    if not -length <= index < length:
        raise IndexError(f"index {index} is out of range for a dataset of {length} items")
    return int(index) % length
