"""Lazy reader of the multi-object benchmarks (CLEVR6, Multi-dSprites, Tetrominoes) in HDF5.

Accepted layout: the files written by the object-centric-library (Dittadi et al. 2022,
"Generalization and Robustness Implications in Object-Centric Learning"). The datasets live at
the root of the file, or inside the group named by ``split``:

======================  ======================  ===============================================
dataset                 shape                   dtype and meaning
======================  ======================  ===============================================
``image``               (N, H, W, C)            uint8 RGB (``C = 3``) in 0..255
``mask``                (N, H, W, 1)            integer object ids, 0 = background
``num_actual_objects``  (N, 1) or (N,)          integer number of (foreground) objects
``visibility``          (N, O) or (N, O, 1)     whether mask id ``k`` is visible in the image,
                                                column ``k`` for id ``k`` (column 0 is the
                                                background); ``O - 1`` object ids at most
======================  ======================  ===============================================

Other datasets in the file (per-object attributes such as ``x``, ``shape``, ``color``) are
ignored. Items are dicts with the keys the generators use (see :mod:`pyro_slots.data.shapes`):
``image`` (3, H, W) float32 in [0, 1], ``mask`` (H, W) int64, ``num_objects`` int and ``visible``
(O - 1,) bool (``visible[j]`` for mask id ``j + 1``); there are no ``attr_*`` keys.

The file is opened once per process (so each :class:`~torch.utils.data.DataLoader` worker has its
own handle) and every item reads only its own slice, so a 10 GB file never loads into memory.
"""

from __future__ import annotations

import os

import h5py
import numpy as np
import torch
from torch.utils.data import Dataset

from ._scene import dataset_index

__all__ = ["HDF5Dataset", "REQUIRED_DATASETS", "open_hdf5"]

REQUIRED_DATASETS = ("image", "mask", "num_actual_objects", "visibility")


def open_hdf5(path: str | os.PathLike) -> h5py.File:
    """Open ``path`` read-only; a missing, unreadable or non-HDF5 file is one line of error.

    :raises FileNotFoundError: if ``path`` is not a file.
    :raises ValueError: if it cannot be read as HDF5 (h5py's reason appended).
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"path: no HDF5 file at {path!r}")
    try:
        return h5py.File(path, "r")
    except OSError as error:
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise ValueError(f"path: {path!r} is not a readable HDF5 file ({reason})") from None


def _validate(group, where: str) -> tuple[int, int]:
    """Check the layout of ``group``; return ``(num_images, max_objects_with_background)``."""
    for name in REQUIRED_DATASETS:
        if name not in group or not isinstance(group[name], h5py.Dataset):
            raise ValueError(
                f"{where}: missing dataset {name!r}; expected the datasets "
                f"{list(REQUIRED_DATASETS)} (see pyro_slots.data.hdf5), found {sorted(group)}"
            )
    image, mask = group["image"], group["mask"]
    counts, visibility = group["num_actual_objects"], group["visibility"]

    def fail(name, expected, dataset):
        raise ValueError(
            f"{where}: dataset {name!r} has shape {dataset.shape} and dtype {dataset.dtype}, "
            f"expected {expected}"
        )

    if image.ndim != 4 or image.shape[-1] != 3 or image.dtype != np.uint8:
        fail("image", "(N, H, W, 3) uint8", image)
    n, height, width, _ = image.shape
    if mask.shape != (n, height, width, 1) or mask.dtype.kind not in "iu":
        fail("mask", f"({n}, {height}, {width}, 1) integer", mask)
    if counts.shape not in ((n, 1), (n,)) or counts.dtype.kind not in "iuf":
        fail("num_actual_objects", f"({n}, 1) numeric", counts)
    if (
        visibility.ndim not in (2, 3)
        or visibility.shape[0] != n
        or visibility.shape[1] < 1
        or (visibility.ndim == 3 and visibility.shape[2] != 1)
        or visibility.dtype.kind not in "iufb"
    ):
        fail("visibility", f"({n}, max_objects) or ({n}, max_objects, 1) numeric", visibility)
    _check_mask_ids(mask, where)
    return n, visibility.shape[1]


#: Mask elements read at a time when a signed mask is scanned for negative ids.
MASK_SCAN_ELEMENTS = 1 << 24


def _check_mask_ids(mask, where: str) -> None:
    """Refuse negative object ids (0 is the background): scanned once, in blocks of images, for
    a signed mask (an unsigned one cannot hold them)."""
    if mask.dtype.kind != "i" or mask.shape[0] == 0:
        return
    per_image = max(1, int(np.prod(mask.shape[1:])))
    step = max(1, MASK_SCAN_ELEMENTS // per_image)
    for lo in range(0, mask.shape[0], step):
        block = mask[lo : lo + step]
        if block.min() < 0:
            first = lo + int(np.nonzero((block < 0).reshape(len(block), -1).any(1))[0][0])
            raise ValueError(
                f"{where}: dataset 'mask' holds negative object ids (image {first} has "
                f"{int(block.min())}); expected ids >= 0 with 0 the background"
            )


class HDF5Dataset(Dataset):
    """Multi-object images, masks and object counts read lazily from an HDF5 file.

    The layout is validated when the dataset is built (see the module docstring); each item
    then reads one slice of each dataset.

    :param str path: the HDF5 file.
    :param str split: name of the group holding the datasets, or ``None`` for the root.
    :param int start: first image to use (default 0).
    :param int stop: one past the last image to use (default: all).
    :raises FileNotFoundError: if ``path`` does not exist.
    :raises ValueError: if the file is not HDF5, or a dataset is missing or has the wrong shape
        or dtype.

    Example::

        >>> data = HDF5Dataset("clevr_10-full.hdf5", stop=70000)
        >>> item = data[0]
        >>> item["image"].shape, item["mask"].shape
        (torch.Size([3, 128, 128]), torch.Size([128, 128]))
    """

    def __init__(
        self,
        path: str | os.PathLike,
        split: str | None = None,
        start: int = 0,
        stop: int | None = None,
    ):
        path = os.fspath(path)
        if split is not None and not isinstance(split, str):
            raise TypeError(f"split: expected a group name or None, got {split!r}")
        self.path, self.split = path, split
        where = path if split is None else f"{path}[{split!r}]"
        with open_hdf5(path) as f:
            if split is not None and not isinstance(f.get(split), h5py.Group):
                raise ValueError(
                    f"split: no group {split!r} in {path!r}; groups: "
                    f"{sorted(k for k in f if isinstance(f[k], h5py.Group))}"
                )
            group = f if split is None else f[split]
            size, self.max_objects = _validate(group, where)
            #: ``(C, H, W)`` of every image.
            self.image_shape = (group["image"].shape[3], *group["image"].shape[1:3])
        stop = size if stop is None else stop
        for name, value in (("start", start), ("stop", stop)):
            if isinstance(value, bool) or not isinstance(value, int | np.integer):
                raise TypeError(f"{name}: expected an integer, got {value!r}")
        if not 0 <= start <= stop <= size:
            raise ValueError(
                f"start, stop: expected 0 <= start <= stop <= {size} (images in the file), "
                f"got start={start}, stop={stop}"
            )
        self.start, self.stop = int(start), int(stop)
        self._file = None
        self._pid = None

    def __len__(self) -> int:
        return self.stop - self.start

    def _group(self):
        # One handle per process: h5py handles must not cross a fork into DataLoader workers.
        if self._file is None or self._pid != os.getpid():
            self._file = h5py.File(self.path, "r")
            self._pid = os.getpid()
        return self._file if self.split is None else self._file[self.split]

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_file"] = state["_pid"] = None
        return state

    def __getitem__(self, index) -> dict:
        i = self.start + dataset_index(index, len(self))
        group = self._group()
        image = torch.from_numpy(group["image"][i]).permute(2, 0, 1).contiguous().float() / 255.0
        mask = torch.from_numpy(group["mask"][i, :, :, 0].astype(np.int64))
        visibility = np.asarray(group["visibility"][i]).reshape(-1)
        return {
            "image": image,
            "mask": mask,
            "num_objects": int(np.asarray(group["num_actual_objects"][i]).reshape(-1)[0]),
            "visible": torch.from_numpy(visibility[1:] > 0),
        }

    def close(self) -> None:
        """Close this process's file handle (it reopens on the next item)."""
        if self._file is not None:
            self._file.close()
            self._file = None
