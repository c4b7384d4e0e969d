import hashlib

import numpy as np
import pytest
import torch

from pyro_slots.data import TetrominoesDataset, generate_tetrominoes, make_dataset
from pyro_slots.data.tetrominoes import (
    BLOCK_SIZE,
    PALETTE,
    PIECE_TYPES,
    PIECES,
    TETROMINO_NAMES,
)


def _normalize(cells):
    r0 = min(r for r, _ in cells)
    c0 = min(c for _, c in cells)
    return tuple(sorted((r - r0, c - c0) for r, c in cells))


def _bitmap(cells):
    cells = np.array(cells)
    grid = np.zeros(cells.max(0) + 1, dtype=bool)
    grid[cells[:, 0], cells[:, 1]] = True
    return grid


def test_the_19_fixed_tetrominoes():
    assert len(PIECES) == 19
    assert len({_normalize(p) for p in PIECES}) == 19
    # Each type's orientations are exactly the distinct rotations of its first one.
    expected_counts = {"I": 2, "O": 1, "T": 4, "S": 2, "Z": 2, "J": 4, "L": 4}
    for t, name in enumerate(TETROMINO_NAMES):
        members = {_normalize(p) for p, pt in zip(PIECES, PIECE_TYPES) if pt == t}
        first = next(p for p, pt in zip(PIECES, PIECE_TYPES) if pt == t)
        grid, orbit = _bitmap(first), set()
        for _ in range(4):
            orbit.add(_normalize(list(zip(*np.nonzero(grid)))))
            grid = np.rot90(grid)
        assert members == orbit and len(members) == expected_counts[name]
    for cells in PIECES:  # four 4-connected cells
        assert len(set(cells)) == 4
        adjacent = sum(abs(a[0] - b[0]) + abs(a[1] - b[1]) == 1 for a in cells for b in cells)
        assert adjacent >= 6  # at least 3 edges in a connected 4-cell polyomino


def test_masks_pixels_and_attributes_agree():
    scenes = generate_tetrominoes(100, seed=4)
    assert scenes["image"].shape == (100, 3, 35, 35)
    assert (
        (scenes["num_objects"] == 3).all() and scenes["present"].all() and scenes["visible"].all()
    )
    for i in range(100):
        image, mask = scenes["image"][i].numpy(), scenes["mask"][i].numpy()
        assert (image[:, mask == 0] == 0).all()
        for j in range(3):
            rows, cols = np.nonzero(mask == j + 1)
            # The object's pixels are its piece's blocks, upscaled, unoccluded (no overlap).
            piece = PIECES[int(scenes["attr_piece"][i, j])]
            block = np.ones((BLOCK_SIZE, BLOCK_SIZE), dtype=bool)
            expected = np.kron(_bitmap(piece), block)
            region = mask[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1] == j + 1
            np.testing.assert_array_equal(region, expected)
            colour = PALETTE[int(scenes["attr_color"][i, j])]
            np.testing.assert_array_equal(image[:, rows, cols], np.repeat(colour[:, None], 100, 1))
            np.testing.assert_array_equal(scenes["attr_rgb"][i, j].numpy(), colour)
            np.testing.assert_allclose(
                scenes["attr_position"][i, j].numpy(),
                [(cols.mean() + 0.5) / 35, (rows.mean() + 0.5) / 35],
                rtol=1e-6,
            )
            assert int(scenes["attr_shape"][i, j]) == PIECE_TYPES[int(scenes["attr_piece"][i, j])]
    # All 19 orientations and 6 colours occur.
    assert set(scenes["attr_piece"].unique().tolist()) == set(range(19))
    assert set(scenes["attr_color"].unique().tolist()) == set(range(6))


# sha256 of scenes 0..3 with seed 0 (uint8 images, masks, piece and colour ids).
TETROMINOES_CHECKSUM = "2e0578f18c46e03f0315063276e3e9f348e05f4e445c3246ae490ae3c14f1e81"


def test_same_seed_same_scenes():
    scenes = generate_tetrominoes(4, seed=0)
    h = hashlib.sha256()
    h.update((scenes["image"] * 255).round().to(torch.uint8).numpy().tobytes())
    for key in ("mask", "attr_piece", "attr_color"):
        h.update(scenes[key].numpy().tobytes())
    assert h.hexdigest() == TETROMINOES_CHECKSUM
    later = generate_tetrominoes(3, seed=0, start=2)
    data = TetrominoesDataset(6, seed=0)
    for key in scenes:
        assert torch.equal(later[key][:2], scenes[key][2:])
        assert torch.equal(torch.as_tensor(data[3][key]), scenes[key][3])
    assert not torch.equal(generate_tetrominoes(4, seed=1)["mask"], scenes["mask"])


def test_factory_and_arguments():
    data = make_dataset("tetrominoes", 7, seed=2)
    assert isinstance(data, TetrominoesDataset) and len(data) == 7
    assert data[6]["num_objects"] == 3
    with pytest.raises(TypeError, match="tetrominoes"):
        make_dataset("tetrominoes", 7, image_size=64)
    with pytest.raises(ValueError, match="num_images"):
        generate_tetrominoes(-1)
    with pytest.raises(TypeError, match="seed"):
        TetrominoesDataset(3, seed=1.5)


def test_zero_scenes_give_empty_tensors_of_the_right_shapes():
    """num_images=0 is a valid (empty) range, as for the shapes generator."""
    empty, one = generate_tetrominoes(0), generate_tetrominoes(1)
    assert set(empty) == set(one)
    for key, value in empty.items():
        assert value.shape == (0, *one[key].shape[1:]), key
        assert value.dtype == one[key].dtype, key
