"""``pyro-slots evaluate RUN --dataset hdf5:FILE``: scores on a file the run never saw, the
per-image CSV, restarts, and the one-line errors for files that do not fit the run."""

import csv
import json
import math
import os
import re
import subprocess
import sys

import h5py
import numpy as np
import pytest
import torch
from sklearn.metrics import adjusted_rand_score

from pyro_slots import refine
from pyro_slots.cli import main
from pyro_slots.cli.config import ConfigError
from pyro_slots.cli.evaluate import evaluate_run
from pyro_slots.cli.runs import load_run

#: A tiny Slot Attention autoencoder on 16x16 shapes (untrained weights suffice: every score is
#: checked against a computation from the same slots).
SA_RUN = [
    "--model", "slot-autoencoder", "--dataset", "shapes", "--image-size", "16", "--steps", "1",
    "--batch-size", "2", "--eval-size", "2", "--eval-every", "0", "--checkpoint-every", "1",
    "--slot-dim", "8", "--hidden-dim", "8", "--num-slots", "3", "--inner-steps", "2",
    "--threads", "1", "--no-progress", "--no-pictures",
]  # fmt: skip


@pytest.fixture(scope="module")
def image_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("sa_run")
    env = dict(os.environ, OMP_NUM_THREADS="1", MPLBACKEND="Agg")
    command = [sys.executable, "-m", "pyro_slots", "train", *SA_RUN, "--out", str(out)]
    subprocess.run(command, check=True, capture_output=True, env=env, timeout=300)
    return out


def write_file(path, num=5, size=16, channels=3, seed=0, **overrides):
    """An object-centric-library file: masks of up to 3 objects on a background."""
    rng = np.random.default_rng(seed)
    mask = np.zeros((num, size, size, 1), np.uint8)
    for i in range(num):
        for k in range(1, 1 + rng.integers(1, 4)):
            r, c = rng.integers(0, size - 5, 2)
            mask[i, r : r + 5, c : c + 5, 0] = k
    data = {
        "image": rng.integers(0, 256, (num, size, size, channels), dtype=np.uint8),
        "mask": mask,
        "num_actual_objects": mask.reshape(num, -1).max(1, keepdims=True),
        "visibility": np.ones((num, 4), np.uint8),
    }
    data.update(overrides)
    with h5py.File(path, "w") as f:
        for name, value in data.items():
            if value is not None:
                f.create_dataset(name, data=value)
    return data


def read_csv(path):
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    return {key: np.array([float(r[key]) for r in rows]) for key in rows[0]}


def test_scores_on_a_file_equal_a_direct_computation(image_run, tmp_path, capsys):
    data = write_file(tmp_path / "test.h5", num=5)
    per_image = tmp_path / "rows.csv"
    status = main(
        ["evaluate", str(image_run), "--dataset", f"hdf5:{tmp_path / 'test.h5'}", "--json"]
        + ["--per-image", str(per_image), "--threads", "1"]
    )
    assert status == 0
    metrics = json.loads(capsys.readouterr().out)
    rows = read_csv(per_image)
    assert metrics["num_datapoints"] == 5 and list(rows["index"]) == [0, 1, 2, 3, 4]

    # Independent answer: the same refinement by hand, scored with scikit-learn and numpy.
    run = load_run(image_run)
    c = run.components
    x = torch.from_numpy(data["image"]).permute(0, 3, 1, 2).float() / 255
    result = refine(c.model, x, c.inner, num_slots=3, num_steps=2, init=c.init, seed=0)
    with torch.no_grad():
        recon, _, masks = c.model.decode(result.slots[0])
    pred = masks.reshape(5, 3, -1).argmax(1).numpy()
    true = data["mask"].reshape(5, -1)
    fg = [adjusted_rand_score(t[t > 0], p[t > 0]) for t, p in zip(true, pred)]
    whole = [adjusted_rand_score(t, p) for t, p in zip(true, pred)]
    mse = ((x - recon) ** 2).reshape(5, -1).mean(1).numpy()
    objects = [len(np.unique(t[t > 0])) for t in true]
    np.testing.assert_allclose(rows["fg_ari"], fg, atol=1e-10)
    np.testing.assert_allclose(rows["ari"], whole, atol=1e-10)
    np.testing.assert_allclose(rows["mse"], mse, rtol=1e-5)
    np.testing.assert_allclose(rows["elbo"], result.elbo[0].numpy(), rtol=1e-5)
    np.testing.assert_array_equal(rows["num_objects"], objects)
    # The CSV's numbers are the JSON's means.
    for key, column in rows.items():
        if key != "index":
            assert metrics[key] == pytest.approx(float(np.nanmean(column)), abs=1e-12), key
    assert metrics["fg_ari"] == pytest.approx(np.mean(fg), abs=1e-10)


def test_restarts_keep_the_best_inner_elbo_per_image(image_run, tmp_path):
    write_file(tmp_path / "test.h5", num=4)
    rows_path = tmp_path / "rows.csv"
    metrics = evaluate_run(
        image_run, dataset=f"hdf5:{tmp_path / 'test.h5'}", restarts=3, per_image=rows_path
    )
    assert metrics["restarts"] == 3
    run = load_run(image_run)
    c = run.components
    with h5py.File(tmp_path / "test.h5") as f:
        x = torch.from_numpy(f["image"][:]).permute(0, 3, 1, 2).float() / 255
    result = refine(
        c.model, x, c.inner, num_slots=3, num_steps=2, init=c.init, seed=0, num_restarts=3
    )
    best = result.elbo.max(0).values.numpy()  # (batch,): max over the restart axis
    np.testing.assert_allclose(read_csv(rows_path)["elbo"], best, rtol=1e-5)
    assert metrics["elbo"] == pytest.approx(best.mean(), rel=1e-5)


def test_num_takes_the_first_images_of_the_file(image_run, tmp_path):
    path = tmp_path / "test.h5"
    data = write_file(path, num=6)
    rows = tmp_path / "rows.csv"
    metrics = evaluate_run(image_run, dataset=f"hdf5:{path}", num=4, per_image=rows, chunk_size=3)
    assert metrics["num_datapoints"] == 4
    objects = [len(np.unique(m[m > 0])) for m in data["mask"][:4]]
    np.testing.assert_array_equal(read_csv(rows)["num_objects"], objects)
    np.testing.assert_array_equal(read_csv(rows)["index"], [0, 1, 2, 3])


def test_the_python_api_takes_a_path_and_the_default_is_the_held_out_split(image_run):
    metrics = evaluate_run(image_run, num=3)
    assert metrics["dataset"] == "shapes/held-out" and metrics["num_datapoints"] == 3
    assert 0 <= metrics["mean_iou"] <= 1 and metrics["mse"] > 0


def _bad(tmp_path, name, **kwargs):
    write_file(tmp_path / name, **kwargs)
    return f"hdf5:{tmp_path / name}"


BAD_FILES = {
    "no image": (lambda p: _bad(p, "a.h5", image=None), [], "missing dataset 'image'"),
    "no mask": (lambda p: _bad(p, "b.h5", mask=None), [], "missing dataset 'mask'"),
    "mask rank": (
        lambda p: _bad(p, "c.h5", mask=np.zeros((5, 16, 16), np.uint8)),
        [],
        r"'mask' has shape \(5, 16, 16\)",
    ),
    "image rank": (
        lambda p: _bad(p, "d.h5", image=np.zeros((5, 16, 48), np.uint8)),
        [],
        r"'image' has shape \(5, 16, 48\)",
    ),
    "fewer than --num": (lambda p: _bad(p, "e.h5"), ["--num", "6"], "6 images.*only 5"),
    "other size": (lambda p: _bad(p, "f.h5", size=8), [], "8x8 pixels.*trained on 16x16"),
    "other channels": (
        lambda p: _bad(p, "g.h5", channels=1),
        [],
        "1 channels.*takes 3-channel images",
    ),
    "missing file": (lambda p: f"hdf5:{p / 'nowhere.h5'}", [], "no HDF5 file at"),
    "not hdf5": (
        lambda p: (p / "text.h5").write_text("hello") and f"hdf5:{p / 'text.h5'}",
        [],
        "not a readable HDF5 file",
    ),
    "no path": (lambda p: "hdf5:", [], "must be followed by the file's path"),
    "restarts": (lambda p: _bad(p, "h.h5"), ["--restarts", "0"], "restarts: expected"),
}


@pytest.mark.parametrize("case", list(BAD_FILES))
def test_bad_files_give_one_line_and_status_2_before_any_work(image_run, tmp_path, capsys, case):
    make, extra, match = BAD_FILES[case]
    dataset = make(tmp_path)
    rows = tmp_path / "rows.csv"
    argv = ["evaluate", str(image_run), "--dataset", dataset, "--per-image", str(rows), *extra]
    assert main(argv) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("pyro-slots: error: "), captured.err
    assert re.search(match, lines[0]), lines[0]
    assert captured.out == "" and not rows.exists()


def test_a_gmm_run_refuses_an_image_file(gmm_run, tmp_path, capsys):
    dataset = _bad(tmp_path, "i.h5")
    assert main(["evaluate", str(gmm_run), "--dataset", dataset]) == 2
    line = capsys.readouterr().err.strip()
    assert "\n" not in line and "trained on point sets, not images" in line


def test_the_console_command_exits_2_on_a_wrong_layout(image_run, tmp_path, cli):
    proc = cli("evaluate", image_run, "--dataset", _bad(tmp_path, "j.h5", mask=None), check=False)
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "missing dataset 'mask'" in proc.stderr


def test_other_generators_and_wrong_kinds(image_run, gmm_run):
    with pytest.raises(ConfigError, match="holds points, but --model slot-autoencoder"):
        evaluate_run(image_run, dataset="points")
    with pytest.raises(ConfigError, match="tetrominoes are 35x35, got 16"):
        evaluate_run(image_run, dataset="tetrominoes")
    with pytest.raises(ConfigError, match="unknown name 'clevr'"):
        evaluate_run(gmm_run, dataset="clevr")
    metrics = evaluate_run(gmm_run, dataset="points", num=3)
    assert metrics["num_datapoints"] == 3 and not math.isnan(metrics["loglik_per_point"])


def test_a_run_trained_on_a_file_is_scored_on_its_held_out_images(tmp_path, capsys):
    write_file(tmp_path / "train.h5", num=6)
    args = [a if a != "shapes" else f"hdf5:{tmp_path / 'train.h5'}" for a in SA_RUN]
    for flag in ("--image-size", "--threads"):  # (--threads would change this process)
        del args[args.index(flag) : args.index(flag) + 2]
    assert main(["train", *args, "--out", str(tmp_path / "run")]) == 0
    capsys.readouterr()
    metrics = evaluate_run(tmp_path / "run")  # --eval-size 2: the file's last 2 images
    assert metrics["num_datapoints"] == 2
    assert main(["evaluate", str(tmp_path / "run"), "--num", "3"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "3 images asked for" in err and "held out only 2" in err


def test_pictures_show_the_images_of_the_file(image_run, tmp_path, capsys):
    write_file(tmp_path / "test.h5", num=3)
    pictures = tmp_path / "pictures"
    argv = ["evaluate", str(image_run), "--dataset", f"hdf5:{tmp_path / 'test.h5'}"]
    assert main([*argv, "--pictures", str(pictures)]) == 0
    written = sorted(p.name for p in pictures.iterdir())
    # metrics.jsonl of the run exists, so its training curve is drawn too.
    assert written == ["inner_elbo.png", "slots.png", "training_curve.png"]
    out = capsys.readouterr().out
    assert re.search(r"num_datapoints\s+3\b", out)
