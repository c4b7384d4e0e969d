r"""Multi-dSprites-like scenes: squares, ellipses, hearts and triangles, with occlusion.

A scene has ``num_objects`` objects, drawn uniformly from ``min_objects..max_objects``, painted
in order onto a plain (black) or coloured background: object ``j`` (mask id ``j + 1``) covers
the objects drawn before it. Every object has

- a shape, :data:`SHAPE_NAMES` ``= ("square", "ellipse", "heart", "triangle")``, uniformly;
- a colour class, one of the 8 colours of :data:`PALETTE` (:data:`COLOR_NAMES`), uniformly,
  rendered as ``PALETTE[color] * brightness`` with ``brightness ~ U(0.75, 1)``. A coloured
  background is ``U(0, 0.5)^3``, so some channel of an object is always brighter than the
  background (objects never vanish into it);
- a scale ``s ~ U(0.08, 0.16)`` (half the side of its bounding square, in units of the image
  size), a rotation ``θ ~ U(0, 2π)`` and a position ``(x, y) ~ U(0.1, 0.9)^2`` (``x`` to the
  right, ``y`` down, in units of the image size; pixel ``(row, col)`` has its centre at
  ``((col + 0.5) / W, (row + 0.5) / H)``).

Rendering is hard (no anti-aliasing), so every pixel has exactly the colour of the object in its
mask. A pixel centre ``p`` belongs to an object when its local coordinates
``(u, v) = R(-θ) (p - (x, y)) / s`` satisfy

- square: ``max(|u|, |v|) <= 1``;
- ellipse: ``u^2 + (v / 0.5)^2 <= 1``;
- triangle (equilateral, circumradius 1, apex up, centroid at the position):
  ``v <= 1/2`` and ``±(√3/2) u - v/2 <= 1/2``;
- heart: ``(X^2 + Y^2 - 1)^3 - X^2 Y^3 <= 0`` with ``X = 1.139 u``, ``Y = 0.118 - 1.139 v``
  (the classic implicit heart, flipped to point down and fitted to the ``[-1, 1]^2`` box).

Items and batches hold (``M = max_objects``; attribute ``j`` describes mask id ``j + 1``; padded
entries are zero):

==================  =====================  ==================================================
key                 shape, dtype           meaning
==================  =====================  ==================================================
``image``           (3, H, W) float32      RGB in [0, 1]
``mask``            (H, W) int64           0 = background, ``j + 1`` = object ``j``
``num_objects``     int                    number of objects drawn (visible or not)
``present``         (M,) bool              ``j < num_objects``
``visible``         (M,) bool              object ``j`` owns at least one pixel
``attr_shape``      (M,) int64             index into :data:`SHAPE_NAMES`
``attr_color``      (M,) int64             index into :data:`COLOR_NAMES`
``attr_rgb``        (M, 3) float32         the exact rendered colour
``attr_scale``      (M,) float32           ``s``
``attr_rotation``   (M,) float32           ``θ`` in radians
``attr_position``   (M, 2) float32         ``(x, y)`` in [0, 1]
``background``      (3,) float32           background colour
==================  =====================  ==================================================
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch.utils.data import Dataset

from ..validation import check_positive_int
from ._scene import (
    check_index_range,
    check_seed,
    dataset_index,
    pixel_centers,
    scene_rng,
    unstack_item,
)

__all__ = [
    "COLOR_NAMES",
    "PALETTE",
    "SHAPE_NAMES",
    "ShapesDataset",
    "generate_shapes",
]

SHAPE_NAMES = ("square", "ellipse", "heart", "triangle")
COLOR_NAMES = ("red", "green", "blue", "yellow", "magenta", "cyan", "orange", "white")
PALETTE = np.array(
    [
        [1.0, 0.0, 0.0],
        [0.0, 1.0, 0.0],
        [0.0, 0.0, 1.0],
        [1.0, 1.0, 0.0],
        [1.0, 0.0, 1.0],
        [0.0, 1.0, 1.0],
        [1.0, 0.5, 0.0],
        [1.0, 1.0, 1.0],
    ]
)
BACKGROUNDS = ("plain", "colored")

BRIGHTNESS_RANGE = (0.75, 1.0)
BACKGROUND_MAX = 0.5
SCALE_RANGE = (0.08, 0.16)
POSITION_RANGE = (0.1, 0.9)
ELLIPSE_MINOR = 0.5
HEART_SCALE = 1.139  # half-width of the implicit heart's bounding box
HEART_SHIFT = 0.118  # centre of its bounding box in Y
_SQRT3_2 = math.sqrt(3.0) / 2.0

# Uniform draws per object: shape, colour, brightness, scale, rotation, x, y.
_PER_OBJECT = 7


def _check_config(image_size, min_objects, max_objects, background):
    image_size = check_positive_int(image_size, "image_size", minimum=4)
    min_objects = check_positive_int(min_objects, "min_objects", minimum=0)
    max_objects = check_positive_int(max_objects, "max_objects", minimum=1)
    if min_objects > max_objects:
        raise ValueError(
            f"min_objects: expected at most max_objects={max_objects}, got {min_objects}"
        )
    if background not in BACKGROUNDS:
        raise ValueError(f"background: expected one of {BACKGROUNDS}, got {background!r}")
    return image_size, min_objects, max_objects


def _draw_scenes(seed, start, num_images, min_objects, max_objects, background):
    """Attributes of scenes ``start .. start + num_images - 1`` as numpy arrays."""
    draws = np.empty((num_images, 4 + _PER_OBJECT * max_objects))
    for n in range(num_images):
        draws[n] = scene_rng(seed, start + n).random(draws.shape[1])
    num_choices = max_objects - min_objects + 1
    num_objects = min_objects + np.minimum(np.floor(draws[:, 0] * num_choices), num_choices - 1)
    num_objects = num_objects.astype(np.int64)
    if background == "plain":
        bg = np.zeros((num_images, 3))
    else:
        bg = BACKGROUND_MAX * draws[:, 1:4]
    obj = draws[:, 4:].reshape(num_images, max_objects, _PER_OBJECT)
    present = np.arange(max_objects)[None, :] < num_objects[:, None]

    def categorical(u, k):
        return np.minimum(np.floor(u * k), k - 1).astype(np.int64)

    def uniform(u, bounds):
        return bounds[0] + (bounds[1] - bounds[0]) * u

    shape = categorical(obj[..., 0], len(SHAPE_NAMES))
    color = categorical(obj[..., 1], len(COLOR_NAMES))
    rgb = PALETTE[color] * uniform(obj[..., 2], BRIGHTNESS_RANGE)[..., None]
    scale = uniform(obj[..., 3], SCALE_RANGE)
    rotation = 2.0 * math.pi * obj[..., 4]
    position = uniform(obj[..., 5:7], POSITION_RANGE)
    zero = ~present
    for a in (shape, color, rgb, scale, rotation, position):
        a[zero] = 0
    return {
        "num_objects": num_objects,
        "present": present,
        "background": bg.astype(np.float32),
        "attr_shape": shape,
        "attr_color": color,
        "attr_rgb": rgb.astype(np.float32),
        "attr_scale": scale.astype(np.float32),
        "attr_rotation": rotation.astype(np.float32),
        "attr_position": position.astype(np.float32),
    }


def _inside(shape_id: int, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Whether local coordinates ``(u, v)`` lie inside the unit shape ``shape_id``."""
    if shape_id == 0:  # square
        return (np.abs(u) <= 1) & (np.abs(v) <= 1)
    if shape_id == 1:  # ellipse
        w = v * np.float32(1.0 / ELLIPSE_MINOR)
        return u * u + w * w <= 1
    if shape_id == 2:  # heart
        x = u * np.float32(HEART_SCALE)
        y = np.float32(HEART_SHIFT) - v * np.float32(HEART_SCALE)
        x2 = x * x
        r = x2 + y * y - 1
        return r * r * r - x2 * y * y * y <= 0
    # triangle
    a = u * np.float32(_SQRT3_2)
    b = v * np.float32(0.5)
    return (v <= 0.5) & (a - b <= 0.5) & (-a - b <= 0.5)


def _render_masks(attrs: dict, image_size: int) -> np.ndarray:
    """Instance masks ``(n, H, W)`` int64 of drawn attributes, objects painted in order."""
    present = attrs["present"]
    n, max_objects = present.shape
    grid = pixel_centers(image_size)
    mask = np.zeros((n, image_size, image_size), dtype=np.int64)
    cos = np.cos(attrs["attr_rotation"].astype(np.float64))
    sin = np.sin(attrs["attr_rotation"].astype(np.float64))
    inv_scale = 1.0 / np.where(present, attrs["attr_scale"].astype(np.float64), 1.0)
    for j in range(max_objects):
        for shape_id in range(len(SHAPE_NAMES)):
            (idx,) = np.nonzero(present[:, j] & (attrs["attr_shape"][:, j] == shape_id))
            if idx.size == 0:
                continue
            c = (cos[idx, j] * inv_scale[idx, j]).astype(np.float32)
            s = (sin[idx, j] * inv_scale[idx, j]).astype(np.float32)
            dx = grid[None, :] - attrs["attr_position"][idx, j, 0][:, None]  # (m, W)
            dy = grid[None, :] - attrs["attr_position"][idx, j, 1][:, None]  # (m, H)
            # (u, v) = R(-θ) (p - position) / s
            u = (c[:, None] * dx)[:, None, :] + (s[:, None] * dy)[:, :, None]
            v = (c[:, None] * dy)[:, :, None] - (s[:, None] * dx)[:, None, :]
            inside = _inside(shape_id, u, v)
            sub = mask[idx]
            sub[inside] = j + 1
            mask[idx] = sub
    return mask


def _paint(mask: np.ndarray, background: np.ndarray, rgb: np.ndarray) -> np.ndarray:
    """Images ``(n, 3, H, W)`` float32: each pixel gets the colour of its mask id."""
    n, max_objects = rgb.shape[:2]
    colors = np.concatenate([background[:, None, :], rgb], axis=1).reshape(-1, 3)
    flat = mask + (max_objects + 1) * np.arange(n)[:, None, None]
    return np.ascontiguousarray(colors[flat].transpose(0, 3, 1, 2))


def _visible(mask: np.ndarray, max_objects: int) -> np.ndarray:
    n = mask.shape[0]
    flat = mask + (max_objects + 1) * np.arange(n)[:, None, None]
    counts = np.bincount(flat.ravel(), minlength=n * (max_objects + 1))
    return counts.reshape(n, max_objects + 1)[:, 1:] > 0


def generate_shapes(
    num_images: int,
    image_size: int = 64,
    min_objects: int = 2,
    max_objects: int = 5,
    background: str = "plain",
    seed: int = 0,
    start: int = 0,
    chunk_size: int = 512,
) -> dict[str, torch.Tensor]:
    """Scenes ``start .. start + num_images - 1`` of the shapes generator, stacked.

    Vectorized over scenes with numpy (10,000 64×64 scenes in 7-14 s on 2 cores, see
    ``benchmarks/results/data.md``). Scene ``i`` depends only on ``(seed, i)`` and the
    configuration, not on ``start`` or ``chunk_size``.

    :param int num_images: number of scenes ``N``.
    :param int image_size: height and width ``H = W`` in pixels.
    :param int min_objects: fewest objects per scene (>= 0).
    :param int max_objects: most objects per scene ``M``; also the padded attribute length.
    :param str background: ``"plain"`` (black) or ``"colored"`` (one random colour per scene).
    :param int seed: the generator's seed.
    :param int start: index of the first scene.
    :param int chunk_size: scenes rendered at once (bounds the temporary memory).
    :returns: dict of the keys in the module docstring, each stacked along a leading ``N``
        dimension; ``num_objects`` is an int64 tensor ``(N,)``.
    """
    image_size, min_objects, max_objects = _check_config(
        image_size, min_objects, max_objects, background
    )
    seed = check_seed(seed)
    num_images, start = check_index_range(num_images, start)
    chunk_size = check_positive_int(chunk_size, "chunk_size")
    chunks = []
    for lo in range(0, num_images, chunk_size):
        count = min(chunk_size, num_images - lo)
        attrs = _draw_scenes(seed, start + lo, count, min_objects, max_objects, background)
        mask = _render_masks(attrs, image_size)
        attrs["mask"] = mask
        attrs["image"] = _paint(mask, attrs["background"], attrs["attr_rgb"])
        attrs["visible"] = _visible(mask, max_objects)
        chunks.append(attrs)
    if not chunks:
        empty = _draw_scenes(seed, start, 0, min_objects, max_objects, background)
        empty["mask"] = np.zeros((0, image_size, image_size), dtype=np.int64)
        empty["image"] = np.zeros((0, 3, image_size, image_size), dtype=np.float32)
        empty["visible"] = np.zeros((0, max_objects), dtype=bool)
        chunks.append(empty)
    keys = chunks[0].keys()
    return {k: torch.from_numpy(np.concatenate([c[k] for c in chunks])) for k in keys}


class ShapesDataset(Dataset):
    """Multi-dSprites-like scenes generated on the fly (see the module docstring).

    Item ``i`` is scene ``i`` of :func:`generate_shapes` with the same configuration and seed,
    a dict of unbatched tensors (``num_objects`` a Python int).

    :param int num_images: number of scenes in the dataset.
    :param int image_size: height and width in pixels.
    :param int min_objects: fewest objects per scene.
    :param int max_objects: most objects per scene (the padded attribute length).
    :param str background: ``"plain"`` or ``"colored"``.
    :param int seed: the generator's seed.

    Example::

        >>> data = ShapesDataset(1000, seed=0)
        >>> item = data[3]
        >>> item["image"].shape, item["mask"].shape, item["attr_position"].shape
        (torch.Size([3, 64, 64]), torch.Size([64, 64]), torch.Size([5, 2]))
    """

    def __init__(
        self,
        num_images: int,
        image_size: int = 64,
        min_objects: int = 2,
        max_objects: int = 5,
        background: str = "plain",
        seed: int = 0,
    ):
        self.image_size, self.min_objects, self.max_objects = _check_config(
            image_size, min_objects, max_objects, background
        )
        self.num_images = check_positive_int(num_images, "num_images", minimum=0)
        self.background = background
        self.seed = check_seed(seed)

    def __len__(self) -> int:
        return self.num_images

    def __getitem__(self, index) -> dict:
        index = dataset_index(index, self.num_images)
        batch = generate_shapes(
            1,
            image_size=self.image_size,
            min_objects=self.min_objects,
            max_objects=self.max_objects,
            background=self.background,
            seed=self.seed,
            start=index,
        )
        return unstack_item(batch, 0)
