import pickle
import tracemalloc

import h5py
import numpy as np
import pytest
import torch

from pyro_slots.data import HDF5Dataset, make_dataset


def _write(path, num=20, size=16, max_objects=6, group=None, seed=0, **overrides):
    """A file in the object-centric-library layout; ``overrides`` replace datasets (None drops)."""
    rng = np.random.default_rng(seed)
    data = {
        "image": rng.integers(0, 256, (num, size, size, 3), dtype=np.uint8),
        "mask": rng.integers(0, max_objects, (num, size, size, 1), dtype=np.uint8),
        "num_actual_objects": rng.integers(1, max_objects, (num, 1), dtype=np.uint8),
        "visibility": rng.integers(0, 2, (num, max_objects), dtype=np.uint8),
        "x": rng.random((num, max_objects)),  # an attribute the reader ignores
    }
    data.update(overrides)
    with h5py.File(path, "w") as f:
        target = f if group is None else f.create_group(group)
        for name, value in data.items():
            if value is not None:
                target.create_dataset(name, data=value)
    return data


@pytest.mark.parametrize("group", [None, "train"])
def test_round_trip(tmp_path, group):
    path = tmp_path / "data.h5"
    data = _write(path, group=group)
    dataset = HDF5Dataset(path, split=group, start=3, stop=15)
    assert len(dataset) == 12 and dataset.max_objects == 6
    for i in (0, 5, -1):
        n = 3 + i % 12
        item = dataset[i]
        assert item["image"].dtype == torch.float32 and item["image"].shape == (3, 16, 16)
        np.testing.assert_allclose(
            item["image"].numpy(), data["image"][n].transpose(2, 0, 1) / 255.0, rtol=1e-6
        )
        np.testing.assert_array_equal(item["mask"].numpy(), data["mask"][n, :, :, 0])
        assert item["mask"].dtype == torch.int64
        assert item["num_objects"] == int(data["num_actual_objects"][n, 0])
        np.testing.assert_array_equal(item["visible"].numpy(), data["visibility"][n, 1:] > 0)
    with pytest.raises(IndexError):
        dataset[12]


def test_factory_and_dataloader_workers(tmp_path):
    path = tmp_path / "data.h5"
    data = _write(path, num=8)
    dataset = make_dataset(f"hdf5:{path}", 6)
    assert isinstance(dataset, HDF5Dataset) and len(dataset) == 6
    dataset[0]  # opens a handle; pickling for workers must drop it
    clone = pickle.loads(pickle.dumps(dataset))
    assert torch.equal(clone[1]["mask"], dataset[1]["mask"])
    loader = torch.utils.data.DataLoader(dataset, batch_size=3, num_workers=2)
    masks = torch.cat([batch["mask"] for batch in loader])
    np.testing.assert_array_equal(masks.numpy(), data["mask"][:6, :, :, 0])
    assert len(make_dataset(f"hdf5:{path}")) == 8


def test_reads_lazily(tmp_path):
    path = tmp_path / "big.h5"
    num, size = 2400, 64
    with h5py.File(path, "w") as f:
        image = f.create_dataset("image", (num, size, size, 3), dtype=np.uint8)
        mask = f.create_dataset("mask", (num, size, size, 1), dtype=np.uint8)
        block = np.random.default_rng(0).integers(0, 256, (200, size, size, 3), dtype=np.uint8)
        for lo in range(0, num, 200):
            image[lo : lo + 200] = block
            mask[lo : lo + 200] = block[..., :1] % 4
        f.create_dataset("num_actual_objects", data=np.full((num, 1), 3, dtype=np.uint8))
        f.create_dataset("visibility", data=np.ones((num, 4), dtype=np.uint8))
    file_size = path.stat().st_size
    assert file_size > 35e6

    tracemalloc.start()
    try:
        dataset = HDF5Dataset(path)
        for i in range(0, num, 100):
            dataset[i]
        _, peak_items = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        # Sanity check of the probe: reading the whole image dataset is seen by tracemalloc.
        with h5py.File(path, "r") as f:
            whole = f["image"][:]
        _, peak_full = tracemalloc.get_traced_memory()
        del whole
    finally:
        tracemalloc.stop()
    assert peak_full > 0.7 * file_size
    assert peak_items < 0.01 * file_size


#: A signed mask whose images 7.. hold the id -1.
NEGATIVE_FROM_7 = np.where(np.arange(20) >= 7, -1, 0).reshape(20, 1, 1, 1) + np.zeros(
    (1, 16, 16, 1), np.int16
)


@pytest.mark.parametrize(
    "overrides, match",
    [
        (dict(visibility=None), "missing dataset 'visibility'"),
        (dict(image=None), "missing dataset 'image'"),
        (
            dict(mask=np.zeros((20, 16, 16), dtype=np.uint8)),
            r"'mask' has shape \(20, 16, 16\).*expected \(20, 16, 16, 1\)",
        ),
        (
            dict(mask=np.zeros((19, 16, 16, 1), dtype=np.uint8)),
            r"'mask' has shape \(19, 16, 16, 1\)",
        ),
        (dict(image=np.zeros((20, 16, 16, 3), dtype=np.float32)), r"'image'.*float32.*uint8"),
        (dict(num_actual_objects=np.zeros((20, 2), dtype=np.uint8)), "'num_actual_objects'"),
        (dict(visibility=np.zeros((20,), dtype=np.uint8)), "'visibility'"),
        (
            dict(mask=NEGATIVE_FROM_7),
            r"'mask' holds negative object ids \(image 7 has -1\)",
        ),
    ],
)
def test_rejects_missing_or_misshaped_datasets(tmp_path, overrides, match):
    path = tmp_path / "bad.h5"
    _write(path, **overrides)
    with pytest.raises(ValueError, match=match):
        HDF5Dataset(path)


def test_missing_file_and_bad_split(tmp_path):
    path = tmp_path / "nowhere.h5"
    with pytest.raises(FileNotFoundError, match="nowhere.h5"):
        HDF5Dataset(path)
    _write(tmp_path / "d.h5", group="train")
    with pytest.raises(ValueError, match="no group 'test'.*train"):
        HDF5Dataset(tmp_path / "d.h5", split="test")
    with pytest.raises(ValueError, match="missing dataset 'image'"):
        HDF5Dataset(tmp_path / "d.h5")
    with pytest.raises(ValueError, match="stop"):
        HDF5Dataset(tmp_path / "d.h5", split="train", stop=21)
