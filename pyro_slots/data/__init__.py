"""Multi-object data: seeded scene generators, an HDF5 reader and Gaussian-mixture point sets.

Every image dataset returns dicts with at least ``image`` (3, H, W) float32 in [0, 1], ``mask``
(H, W) int64 (0 = background, ``j + 1`` = object ``j``) and ``num_objects`` (int); the generators
add padded per-object attributes for set prediction (``present``, ``attr_*``), documented in
:mod:`pyro_slots.data.shapes` and :mod:`pyro_slots.data.tetrominoes`.
"""

from __future__ import annotations

from torch.utils.data import Dataset

from .hdf5 import HDF5Dataset
from .points import GaussianMixturePoints, PointSets, sample_point_sets, true_log_likelihood
from .shapes import ShapesDataset, generate_shapes
from .tetrominoes import TetrominoesDataset, generate_tetrominoes
from .video import generate_moving_shapes

__all__ = [
    "DATASET_NAMES",
    "GaussianMixturePoints",
    "HDF5Dataset",
    "PointSets",
    "ShapesDataset",
    "TetrominoesDataset",
    "generate_moving_shapes",
    "generate_shapes",
    "generate_tetrominoes",
    "make_dataset",
    "sample_point_sets",
    "true_log_likelihood",
]

DATASET_NAMES = ("shapes", "tetrominoes", "hdf5:PATH")


def make_dataset(name: str, num_images: int | None = None, seed: int = 0, **kwargs) -> Dataset:
    """Build an image dataset by name, e.g. from a command-line flag.

    :param str name: ``"shapes"``, ``"tetrominoes"`` or ``"hdf5:PATH"`` (the benchmark file at
        ``PATH`` in the layout of :mod:`pyro_slots.data.hdf5`).
    :param int num_images: number of images; required for the generators; for ``hdf5`` the first
        ``num_images`` images of the file (``None``: all of them).
    :param int seed: the generators' seed (ignored by ``hdf5``).
    :param kwargs: passed on to :class:`ShapesDataset` (``image_size``, ``min_objects``,
        ``max_objects``, ``background``) or :class:`HDF5Dataset` (``split``, ``start``).
    :raises ValueError: for an unknown name; the message lists the valid choices.

    Example::

        >>> make_dataset("shapes", 1000, seed=1, background="colored")[0]["image"].shape
        torch.Size([3, 64, 64])
    """
    if not isinstance(name, str):
        raise TypeError(f"name: expected a string, one of {DATASET_NAMES}, got {name!r}")
    if name.startswith("hdf5:"):
        path = name[len("hdf5:") :]
        if not path:
            raise ValueError("name: 'hdf5:' must be followed by the file's path, e.g. hdf5:x.h5")
        start = kwargs.pop("start", 0)
        stop = None if num_images is None else start + num_images
        return HDF5Dataset(path, start=start, stop=stop, **kwargs)
    if name not in ("shapes", "tetrominoes"):
        raise ValueError(f"name: unknown dataset {name!r}; valid choices are {DATASET_NAMES}")
    if num_images is None:
        raise ValueError(f"num_images: required for the generated dataset {name!r}, got None")
    if name == "shapes":
        return ShapesDataset(num_images, seed=seed, **kwargs)
    if kwargs:
        raise TypeError(f"tetrominoes takes no options besides num_images and seed, got {kwargs}")
    return TetrominoesDataset(num_images, seed=seed)
