"""Tetrominoes-like scenes: three non-overlapping Tetris pieces on black, 35×35 RGB.

A scene holds :data:`NUM_PIECES` ``= 3`` pieces, each one of the 19 fixed orientations of the
seven tetrominoes (:data:`PIECES`, types :data:`TETROMINO_NAMES` ``= I, O, T, S, Z, J, L``),
uniformly, in one of the 6 colours of :data:`PALETTE` (:data:`COLOR_NAMES`), uniformly (colours
may repeat). A piece is made of four :data:`BLOCK_SIZE` ``= 5`` pixel blocks; its top-left pixel
is uniform over the positions that keep it inside the image, redrawn until it overlaps none of
the pieces placed before it (pieces may touch). Piece ``j`` has mask id ``j + 1``.

Items and batches hold (``M = 3``, no padding: every scene has three pieces):

==================  =====================  ==================================================
key                 shape, dtype           meaning
==================  =====================  ==================================================
``image``           (3, 35, 35) float32    RGB in [0, 1]
``mask``            (35, 35) int64         0 = background, ``j + 1`` = piece ``j``
``num_objects``     int                    always 3
``present``         (M,) bool              all true
``visible``         (M,) bool              all true (pieces never overlap)
``attr_piece``      (M,) int64             index into :data:`PIECES` (0..18)
``attr_shape``      (M,) int64             tetromino type, index into :data:`TETROMINO_NAMES`
``attr_color``      (M,) int64             index into :data:`COLOR_NAMES`
``attr_rgb``        (M, 3) float32         the exact rendered colour
``attr_position``   (M, 2) float32         ``(x, y)`` centroid of the piece's pixel centres,
                                           in units of the image size (``x`` right, ``y`` down)
``background``      (3,) float32           zeros
==================  =====================  ==================================================

Scene ``i`` depends only on ``(seed, i)`` (see :mod:`pyro_slots.data._scene`).
"""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import Dataset

from ..validation import check_positive_int
from ._scene import check_index_range, check_seed, dataset_index, scene_rng, unstack_item
from .shapes import COLOR_NAMES as _SHAPE_COLOR_NAMES
from .shapes import PALETTE as _SHAPE_PALETTE

__all__ = [
    "BLOCK_SIZE",
    "COLOR_NAMES",
    "IMAGE_SIZE",
    "NUM_PIECES",
    "PALETTE",
    "PIECES",
    "PIECE_TYPES",
    "TETROMINO_NAMES",
    "TetrominoesDataset",
    "generate_tetrominoes",
]

IMAGE_SIZE = 35
BLOCK_SIZE = 5
NUM_PIECES = 3
TETROMINO_NAMES = ("I", "O", "T", "S", "Z", "J", "L")
# The first six colours of the shapes palette (red, green, blue, yellow, magenta, cyan).
COLOR_NAMES = _SHAPE_COLOR_NAMES[:6]
PALETTE = _SHAPE_PALETTE[:6]

# The 19 fixed tetrominoes as (row, col) block cells, grouped by type (rotations clockwise).
_PIECES_BY_TYPE = {
    "I": [((0, 0), (0, 1), (0, 2), (0, 3)), ((0, 0), (1, 0), (2, 0), (3, 0))],
    "O": [((0, 0), (0, 1), (1, 0), (1, 1))],
    "T": [
        ((0, 0), (0, 1), (0, 2), (1, 1)),
        ((0, 1), (1, 0), (1, 1), (2, 1)),
        ((0, 1), (1, 0), (1, 1), (1, 2)),
        ((0, 0), (1, 0), (1, 1), (2, 0)),
    ],
    "S": [((0, 1), (0, 2), (1, 0), (1, 1)), ((0, 0), (1, 0), (1, 1), (2, 1))],
    "Z": [((0, 0), (0, 1), (1, 1), (1, 2)), ((0, 1), (1, 0), (1, 1), (2, 0))],
    "J": [
        ((0, 0), (1, 0), (1, 1), (1, 2)),
        ((0, 0), (0, 1), (1, 0), (2, 0)),
        ((0, 0), (0, 1), (0, 2), (1, 2)),
        ((0, 1), (1, 1), (2, 0), (2, 1)),
    ],
    "L": [
        ((0, 2), (1, 0), (1, 1), (1, 2)),
        ((0, 0), (1, 0), (2, 0), (2, 1)),
        ((0, 0), (0, 1), (0, 2), (1, 0)),
        ((0, 0), (0, 1), (1, 1), (2, 1)),
    ],
}
PIECES = tuple(cells for name in TETROMINO_NAMES for cells in _PIECES_BY_TYPE[name])
PIECE_TYPES = tuple(t for t, name in enumerate(TETROMINO_NAMES) for _ in _PIECES_BY_TYPE[name])

_MAX_TRIES = 10_000


def _place_pieces(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Piece ids, colour ids and block top-left pixels ``(3, 4, 2)`` of one scene."""
    occupied = np.zeros((IMAGE_SIZE, IMAGE_SIZE), dtype=bool)
    pieces = np.zeros(NUM_PIECES, dtype=np.int64)
    colors = np.zeros(NUM_PIECES, dtype=np.int64)
    blocks = np.zeros((NUM_PIECES, 4, 2), dtype=np.int64)
    for j in range(NUM_PIECES):
        for _ in range(_MAX_TRIES):
            u = rng.random(4)
            piece = min(int(u[0] * len(PIECES)), len(PIECES) - 1)
            cells = np.array(PIECES[piece]) * BLOCK_SIZE
            height, width = cells.max(axis=0) + BLOCK_SIZE
            # Top-left pixel uniform over the IMAGE_SIZE - extent + 1 in-image positions.
            row = min(int(u[2] * (IMAGE_SIZE - height + 1)), IMAGE_SIZE - height)
            col = min(int(u[3] * (IMAGE_SIZE - width + 1)), IMAGE_SIZE - width)
            corners = cells + np.array([row, col])
            if not any(occupied[r : r + BLOCK_SIZE, c : c + BLOCK_SIZE].any() for r, c in corners):
                break
        else:  # pragma: no cover - three pieces always fit in 35x35
            raise RuntimeError("could not place a tetromino without overlap")
        for r, c in corners:
            occupied[r : r + BLOCK_SIZE, c : c + BLOCK_SIZE] = True
        pieces[j] = piece
        colors[j] = min(int(u[1] * len(COLOR_NAMES)), len(COLOR_NAMES) - 1)
        blocks[j] = corners
    return pieces, colors, blocks


def generate_tetrominoes(num_images: int, seed: int = 0, start: int = 0) -> dict[str, torch.Tensor]:
    """Scenes ``start .. start + num_images - 1`` of the tetrominoes generator, stacked.

    :param int num_images: number of scenes ``N``.
    :param int seed: the generator's seed.
    :param int start: index of the first scene.
    :returns: dict of the keys in the module docstring, each stacked along a leading ``N``
        dimension; ``num_objects`` is an int64 tensor ``(N,)``.
    """
    seed = check_seed(seed)
    num_images, start = check_index_range(num_images, start)
    n, size = num_images, IMAGE_SIZE
    pieces = np.zeros((n, NUM_PIECES), dtype=np.int64)
    colors = np.zeros((n, NUM_PIECES), dtype=np.int64)
    mask = np.zeros((n, size, size), dtype=np.int64)
    for i in range(n):
        pieces[i], colors[i], blocks = _place_pieces(scene_rng(seed, start + i))
        for j in range(NUM_PIECES):
            for r, c in blocks[j]:
                mask[i, r : r + BLOCK_SIZE, c : c + BLOCK_SIZE] = j + 1
    rgb = PALETTE[colors].astype(np.float32)
    background = np.zeros((n, 3), dtype=np.float32)
    table = np.concatenate([background[:, None, :], rgb], axis=1).reshape(-1, 3)
    flat = mask + (NUM_PIECES + 1) * np.arange(n)[:, None, None]
    image = np.ascontiguousarray(table[flat].transpose(0, 3, 1, 2))
    # Centroid of each piece's pixel centres; pieces never overlap, so the mask holds them all.
    counts = np.bincount(flat.ravel(), minlength=n * (NUM_PIECES + 1))
    counts = counts.reshape(n, NUM_PIECES + 1)[:, 1:]
    grid = np.arange(size, dtype=np.float64) + 0.5
    rows = np.stack([(mask == j + 1).sum(axis=2) @ grid for j in range(NUM_PIECES)], axis=1)
    cols = np.stack([(mask == j + 1).sum(axis=1) @ grid for j in range(NUM_PIECES)], axis=1)
    position = np.stack([cols, rows], axis=-1) / (counts[..., None] * size)
    return {
        "image": torch.from_numpy(image),
        "mask": torch.from_numpy(mask),
        "num_objects": torch.full((n,), NUM_PIECES, dtype=torch.int64),
        "present": torch.ones(n, NUM_PIECES, dtype=torch.bool),
        "visible": torch.from_numpy(counts > 0),
        "attr_piece": torch.from_numpy(pieces),
        "attr_shape": torch.from_numpy(np.array(PIECE_TYPES, dtype=np.int64)[pieces]),
        "attr_color": torch.from_numpy(colors),
        "attr_rgb": torch.from_numpy(rgb),
        "attr_position": torch.from_numpy(position.astype(np.float32)),
        "background": torch.from_numpy(background),
    }


class TetrominoesDataset(Dataset):
    """Tetrominoes-like scenes generated on the fly (see the module docstring).

    Item ``i`` is scene ``i`` of :func:`generate_tetrominoes` with the same seed, a dict of
    unbatched tensors (``num_objects`` a Python int).

    :param int num_images: number of scenes in the dataset.
    :param int seed: the generator's seed.
    """

    def __init__(self, num_images: int, seed: int = 0):
        self.num_images = check_positive_int(num_images, "num_images", minimum=0)
        self.seed = check_seed(seed)

    def __len__(self) -> int:
        return self.num_images

    def __getitem__(self, index) -> dict:
        index = dataset_index(index, self.num_images)
        return unstack_item(generate_tetrominoes(1, seed=self.seed, start=index), 0)
