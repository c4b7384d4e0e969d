"""Data streams of the command line: batch s depends on (seed, s) only; ranks shard it."""

import h5py
import numpy as np
import pytest
import torch

from pyro_slots.cli import main
from pyro_slots.cli.streams import HDF5Stream, ImageStream, PointStream


def _shards(make, step, world_size):
    parts = []
    for rank in range(world_size):
        stream = make()
        stream.shard(rank, world_size)
        parts.append(stream.batch(step).x)
    return torch.cat(parts)


def test_point_batches_depend_on_seed_and_step_only():
    stream = PointStream(seed=3, batch_size=4, num_points=10, num_components=2, dim=2)
    first = stream.batch(5).x
    stream.batch(0), stream.batch(9)
    assert torch.equal(stream.batch(5).x, first)
    assert not torch.equal(stream.batch(4).x, first)
    other = PointStream(seed=4, batch_size=4, num_points=10, num_components=2, dim=2)
    assert not torch.equal(other.batch(5).x, first)
    # Held-out sets are never training sets.
    held = stream.held_out(4)
    assert not any(torch.equal(held.x[0], stream.batch(s).x[0]) for s in range(20))


@pytest.mark.parametrize("world_size", [2, 4])
def test_rank_shards_make_the_single_process_batch(world_size):
    single = PointStream(seed=0, batch_size=8, num_points=5, num_components=2, dim=2)
    shards = _shards(lambda: PointStream(0, 8 // world_size, 5, 2, 2), 3, world_size)
    assert torch.equal(shards, single.batch(3).x)
    images = _shards(lambda: ImageStream("tetrominoes", 0, 2), 1, 2)
    assert torch.equal(images, ImageStream("tetrominoes", 0, 4).batch(1).x)


def _write_hdf5(path, n=12, size=8, layout="ok", width=None):
    rng = np.random.default_rng(0)
    width = size if width is None else width
    with h5py.File(path, "w") as f:
        f["image"] = rng.integers(0, 256, (n, size, width, 3), dtype=np.uint8)
        mask = rng.integers(0, 3, (n, size, width, 1))
        f["mask"] = mask if layout == "ok" else mask[..., 0]
        f["num_actual_objects"] = np.full((n, 1), 2)
        f["visibility"] = np.ones((n, 3))


def _hdf5_train(path, out, eval_every, test_size):
    """``pyro-slots train`` arguments of a one-update slot-autoencoder run on an HDF5 file."""
    return ["train", "--model", "slot-autoencoder", "--dataset", f"hdf5:{path}", "--steps", "1",
            "--batch-size", "2", "--slot-dim", "8", "--eval-size", "3",
            "--eval-every", str(eval_every), "--test-size", str(test_size), "--out", str(out),
            "--no-progress", "--no-pictures"]  # fmt: skip


def test_hdf5_stream_visits_every_training_image_once_per_epoch(tmp_path):
    path = tmp_path / "d.h5"
    _write_hdf5(path)
    stream = HDF5Stream(str(path), seed=0, batch_size=3, held_out_size=3)
    seen = torch.cat([stream.batch(s).x for s in range(3)])  # 9 training images, one epoch
    assert len({tuple(x.flatten().tolist()) for x in seen}) == 9
    held = stream.held_out(3).x
    assert not any(torch.equal(h, x) for h in held for x in seen)
    assert torch.equal(stream.batch(1).x, HDF5Stream(str(path), 0, 3, 3).batch(1).x)


def test_hdf5_runs_hold_out_enough_images_for_their_test(tmp_path):
    """The trainer holds out the larger of eval_size and test_size (the final test scored
    eval_size images when test_size was larger, and said test_size); asking a stream for more
    held-out images than it holds out is an error naming num."""
    from pyro_slots.cli.config import TrainConfig
    from pyro_slots.cli.registry import build, resolve

    path = tmp_path / "d.h5"
    _write_hdf5(path, n=20)
    for eval_size, test_size, held in ((3, 8, 8), (6, 2, 6)):
        config = resolve(TrainConfig(model="slot-autoencoder", dataset=f"hdf5:{path}",
                                     eval_size=eval_size, test_size=test_size, batch_size=2,
                                     slot_dim=8))  # fmt: skip
        stream = build(config).stream
        assert stream.held_out_size == held and stream.num_train == 20 - held
        assert stream.held_out(test_size).x.shape[0] == test_size
    with pytest.raises(ValueError, match="num: 7 held-out images asked for, but the file's last 6"):
        stream.held_out(7)


def test_resuming_an_hdf5_run_keeps_its_held_out_split(tmp_path, capsys):
    """The last max(eval_size, test_size) images of an HDF5 file are held out: a resume that
    would change that number (moving trained-on images into the test split) is refused; one
    that keeps it (a smaller eval_size under the same test_size) goes on."""
    path = tmp_path / "d.h5"
    _write_hdf5(path, n=20, size=16)
    out = tmp_path / "run"
    argv = _hdf5_train(path, out, eval_every=1, test_size=4)
    assert main(argv) == 0
    resume = ["train", "--resume", str(out), "--steps", "2", "--no-progress", "--no-pictures"]
    assert main([*resume, "--eval-size", "6"]) == 2
    err = capsys.readouterr().err
    assert "eval_size, test_size: the run holds out the last 4 images of its file" in err
    assert main([*resume, "--eval-size", "2"]) == 0


def test_hdf5_layout_errors_name_what_was_expected(tmp_path, capsys):
    path = tmp_path / "bad.h5"
    _write_hdf5(path, layout="bad")
    code = main(["train", "--model", "slot-autoencoder", "--dataset", f"hdf5:{path}",
                 "--out", str(tmp_path / "run")])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and "dataset 'mask'" in err and "expected" in err


def test_train_on_hdf5_file(tmp_path):
    path = tmp_path / "d.h5"
    _write_hdf5(path, size=16)
    out = tmp_path / "run"
    argv = ["train", "--model", "slot-autoencoder", "--dataset", f"hdf5:{path}", "--steps", "2",
            "--batch-size", "2", "--slot-dim", "8", "--eval-size", "3", "--eval-every", "2",
            "--out", str(out), "--no-progress", "--no-pictures"]  # fmt: skip
    assert main(argv) == 0
    assert (out / "checkpoint.pt").exists()


def test_train_on_hdf5_images_that_are_not_square(tmp_path, capsys):
    """12 x 16 images: the stream reported the width alone, a 16 x 16 model was built and the
    first update failed on the images' shape. The model takes the file's (H, W); an
    --image-size beside an hdf5 file is refused (it was ignored, and written to config.yaml)."""
    from pyro_slots.cli.runs import load_run

    path = tmp_path / "rect.h5"
    _write_hdf5(path, size=12, width=16)
    out = tmp_path / "run"
    argv = _hdf5_train(path, out, eval_every=0, test_size=3)
    assert main(argv) == 0
    model = load_run(out / "checkpoint.pt", {"tensorboard": False}).components.model
    assert tuple(model.image_size) == (12, 16)
    recon = model.decode(torch.zeros(1, model.num_slots, model.slot_dim))[0]
    assert recon.shape == (1, 3, 12, 16)
    assert main([*_hdf5_train(path, tmp_path / "other", eval_every=0, test_size=3),
                 "--image-size", "20"]) == 2  # fmt: skip
    assert "image_size: an hdf5 run's images have the size of the file's" in capsys.readouterr().err
