"""Data streams for the command line: batch ``s`` is a function of ``(seed, s)`` alone.

A resumed run therefore needs no replay of the data: the stream's whole state is the index of
the next batch. Held-out data are drawn from the same generators at indices far beyond any
training run (:data:`HELD_OUT_START`), so they never overlap the training batches.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from pyro_slots.data import (
    HDF5Dataset,
    generate_moving_shapes,
    sample_point_sets,
    shapes,
    tetrominoes,
)

__all__ = [
    "HELD_OUT_START",
    "VALIDATION_START",
    "Batch",
    "HDF5Stream",
    "ImageStream",
    "PointStream",
    "VideoStream",
]

#: First generator index of the held-out data (training would need 2**31 datapoints to reach it).
HELD_OUT_START = 2**31
#: First generator index of the validation data (2**30 after the held-out data's).
VALIDATION_START = HELD_OUT_START + 2**30


@dataclass
class Batch:
    """One batch: ``x`` as the model takes it, ``truth`` for the metrics (never for training).

    :ivar torch.Tensor x: points ``(batch, num_points, dim)``, images ``(batch, 3, H, W)`` or
        clips ``(batch, frames, 3, H, W)``.
    :ivar dict truth: ground truth, e.g. ``assignments`` ``(batch, num_points)`` and the true
        mixture parameters, or ``mask`` ``(batch, H, W)`` (``(batch, frames, H, W)`` for clips,
        the object ids consistent over time).
    """

    x: torch.Tensor
    truth: dict = field(default_factory=dict)


class _Stream:
    """Batch ``s`` of rank ``r`` out of ``W`` data-parallel processes holds the datapoints
    ``(s·W + r)·B .. (s·W + r)·B + B - 1`` of the generator: the ``W`` ranks together see exactly
    the batches of one process with batch size ``W·B``."""

    rank, world_size = 0, 1
    #: Index of the first training datapoint (``first_scene``): batch ``s`` starts that far on.
    first = 0

    def shard(self, rank: int, world_size: int) -> None:
        self.rank, self.world_size = rank, world_size

    def _start(self, step: int) -> int:
        return self.first + (step * self.world_size + self.rank) * self.batch_size

    def validation(self, num: int) -> Batch:
        """Validation data (the periodic evaluation, ``select_best``): generated from
        :data:`VALIDATION_START`, apart from the held-out test data and from training."""
        return self._draw(num, VALIDATION_START)

    def held_out(self, num: int) -> Batch:
        """Held-out test data (``pyro-slots evaluate``, ``test_size``)."""
        return self._draw(num, HELD_OUT_START)


class PointStream(_Stream):
    """Point sets of :func:`pyro_slots.data.sample_point_sets`; batch ``s`` is sets
    ``s·B .. s·B + B - 1`` of the generator seeded with ``seed`` (one process).
    """

    kind = "points"

    def __init__(self, seed: int, batch_size: int, num_points: int, num_components: int, dim: int):
        self.seed, self.batch_size = seed, batch_size
        self.kwargs = dict(num_points=num_points, num_components=num_components, dim=dim)
        self.num_objects = num_components
        self.dim = dim

    def _sets(self, num: int, start: int) -> Batch:
        sets = sample_point_sets(num, seed=self.seed, start=start, **self.kwargs)
        truth = {
            "assignments": sets.assignments,
            "means": sets.means,
            "scales": sets.scales,
            "weights": sets.weights,
        }
        return Batch(sets.x, truth)

    def batch(self, step: int) -> Batch:
        return self._sets(self.batch_size, self._start(step))

    def _draw(self, num: int, start: int) -> Batch:
        return self._sets(num, start)


class ImageStream(_Stream):
    """Scenes of a generator (``shapes`` or ``tetrominoes``); batch ``s`` is scenes
    ``s·B .. s·B + B - 1`` of the generator seeded with ``seed`` (one process).
    """

    kind = "images"

    def __init__(self, name: str, seed: int, batch_size: int, image_size: int | None = None):
        self.name, self.seed, self.batch_size = name, seed, batch_size
        if name == "tetrominoes":
            if image_size not in (None, tetrominoes.IMAGE_SIZE):
                raise ValueError(
                    f"image_size: tetrominoes are {tetrominoes.IMAGE_SIZE}x"
                    f"{tetrominoes.IMAGE_SIZE}, got {image_size}"
                )
            self.image_size = tetrominoes.IMAGE_SIZE
            self.num_objects = tetrominoes.NUM_PIECES
            self._kwargs = {}
        else:
            self.image_size = 64 if image_size is None else image_size
            self.num_objects = 5
            self._kwargs = {"image_size": self.image_size, "max_objects": self.num_objects}
        self._generate = (
            tetrominoes.generate_tetrominoes if name == "tetrominoes" else shapes.generate_shapes
        )

    def _scenes(self, num: int, start: int) -> Batch:
        scenes = self._generate(num, seed=self.seed, start=start, **self._kwargs)
        # Everything but the image is ground truth: the masks and the objects' attributes
        # (the targets of set prediction).
        return Batch(scenes["image"], {k: v for k, v in scenes.items() if k != "image"})

    def batch(self, step: int) -> Batch:
        return self._scenes(self.batch_size, self._start(step))

    def _draw(self, num: int, start: int) -> Batch:
        return self._scenes(num, start)


class VideoStream(_Stream):
    """Clips of :func:`pyro_slots.data.generate_moving_shapes` (``moving-shapes``): batch ``s``
    is clips ``s·B .. s·B + B - 1`` of the generator seeded with ``seed`` (one process); a
    frame is an image of the slot model, the clip is trained with the slots carried over."""

    kind = "videos"
    #: Objects per clip at most (``num_slots`` defaults to one more).
    MAX_OBJECTS = 3

    def __init__(
        self, seed: int, batch_size: int, num_frames: int = 8, image_size: int | None = None
    ):
        self.seed, self.batch_size = seed, batch_size
        self.num_frames = num_frames
        self.image_size = 32 if image_size is None else image_size
        self.num_objects = self.MAX_OBJECTS

    def _draw(self, num: int, start: int) -> Batch:
        clips = generate_moving_shapes(
            num,
            num_frames=self.num_frames,
            image_size=self.image_size,
            max_objects=self.MAX_OBJECTS,
            seed=self.seed,
            start=start,
        )
        return Batch(clips["video"], {k: v for k, v in clips.items() if k != "video"})

    def batch(self, step: int) -> Batch:
        return self._draw(self.batch_size, self._start(step))


class HDF5Stream(_Stream):
    """Images of a benchmark HDF5 file: the last ``held_out_size`` images are held out (the
    trainer holds out the larger of ``eval_size`` and ``test_size``); the rest are visited in a
    random order per epoch, drawn from ``(seed, epoch)``.
    """

    kind = "images"

    def __init__(self, path: str, seed: int, batch_size: int, held_out_size: int):
        self.data = HDF5Dataset(path)
        if len(self.data) <= held_out_size:
            raise ValueError(
                f"{path}: {len(self.data)} images, but {held_out_size} are held out for "
                "evaluation (the larger of --eval-size and --test-size); the file needs more "
                "images"
            )
        self.seed, self.batch_size = seed, batch_size
        self.held_out_size = held_out_size
        self.num_train = len(self.data) - held_out_size
        first = self.data[0]
        height, width = (int(s) for s in first["image"].shape[-2:])
        # (height, width) where the images are not square: the models take either
        self.image_size = width if height == width else (height, width)
        self.num_objects = int(self.data.max_objects) - 1
        self._order = {}

    def _permutation(self, epoch: int) -> torch.Tensor:
        if epoch not in self._order:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._order = {epoch: torch.randperm(self.num_train, generator=g)}
        return self._order[epoch]

    def _items(self, indices) -> Batch:
        items = [self.data[int(i)] for i in indices]
        x = torch.stack([item["image"] for item in items])
        return Batch(x, {"mask": torch.stack([item["mask"] for item in items])})

    def batch(self, step: int) -> Batch:
        first = self._start(step)
        positions = range(first, first + self.batch_size)
        indices = [self._permutation(p // self.num_train)[p % self.num_train] for p in positions]
        return self._items(indices)

    def held_out(self, num: int) -> Batch:
        if num > self.held_out_size:
            raise ValueError(
                f"num: {num} held-out images asked for, but the file's last "
                f"{self.held_out_size} are held out"
            )
        return self._items(range(self.num_train, self.num_train + num))

    def validation(self, num: int) -> Batch:
        """A file has no third split: validation is the held-out images (a run that selects
        on them, ``select_best``, should be tested on another file)."""
        return self.held_out(num)
