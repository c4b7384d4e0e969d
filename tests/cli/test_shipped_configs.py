"""Every recipe shipped in pyro_slots/configs trains (tiny sizes, by flags) and evaluates."""

import json
import os

import h5py
import numpy as np
import pytest
import torch

from pyro_slots.cli import main
from pyro_slots.cli.config import (
    CONFIGS_DIR,
    ConfigError,
    config_path,
    list_configs,
    load_config_file,
)
from pyro_slots.cli.evaluate import EvalData, evaluate_run
from pyro_slots.cli.runs import load_run, weights_path
from pyro_slots.cli.streams import Batch

NAMES = [name for name, _ in list_configs()]

#: Flags that shrink every recipe to seconds (the recipe's architecture and gradient stay).
TINY = ["--steps", "2", "--batch-size", "2", "--eval-every", "1", "--eval-size", "2",
        "--test-size", "3", "--checkpoint-every", "1", "--no-progress", "--no-pictures",
        "--threads", "1"]  # fmt: skip


def test_the_recipes_are_the_results_rows():
    assert NAMES == [
        "amortized-clustering",
        "gmm-em",
        "moving-shapes-neural-em",
        "moving-shapes-slot-attention",
        "shapes-slot-attention",
        "tetrominoes-iodine",
        "tetrominoes-neural-em",
        "tetrominoes-rnn-em",
        "tetrominoes-slot-attention",
    ]
    for name, description in list_configs():
        assert description and "\n" not in description, name


@pytest.mark.parametrize("name", NAMES)
def test_every_shipped_config_trains_and_evaluates(name, tmp_path, capsys):
    """Train a few updates from the recipe (sizes overridden by flags), then
    ``pyro-slots evaluate`` on the same held-out data at the recipe's test-time T scores what
    the run's own final test wrote (final weights); image recipes are also scored on an HDF5
    file written here."""
    out = tmp_path / name
    extra = ["--num-points", "20"] if "gmm" in name or "clustering" in name else []
    if name == "shapes-slot-attention":
        extra = ["--image-size", "32"]
    assert main(["train", "--config", name, *TINY, *extra, "--out", str(out)]) == 0
    report = json.loads((out / "test.json").read_text())
    tested = report["metrics"]  # evaluate RUN loads the tested weights (best.pt if any)
    config = load_config_file(config_path(name))
    steps = str(config.get("eval_inner_steps") or tested["inner_steps"])
    restarts = ["--restarts", str(config.get("eval_restarts", 1)),
                "--restart-criterion", config.get("restart_criterion", "elbo")]  # fmt: skip
    if config.get("eval_reinitialize"):
        restarts.append("--reinitialize")
    capsys.readouterr()
    argv = ["evaluate", str(out), "--json", "--num", "3", "--inner-steps", steps, *restarts]
    assert main(argv) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert metrics["step"] == report["step"]
    for key in ("fg_ari", "ari", "mse", "loglik_per_point", "elbo", "video_fg_ari",
                "slot_keeping"):  # fmt: skip
        if key in tested:
            assert metrics[key] == pytest.approx(tested[key], rel=1e-5, abs=1e-6), key
    if config["dataset"] in ("shapes", "tetrominoes"):
        _check_on_an_hdf5_file(out, tmp_path / "test.h5", int(steps), restarts, capsys)


def _check_on_an_hdf5_file(out, path, steps, restarts, capsys):
    """``pyro-slots evaluate RUN --dataset hdf5:FILE`` on a file the test writes (the
    object-centric-library layout: uint8 images, label masks) scores what evaluate_run gives on
    the same images and masks passed directly."""
    run = load_run(weights_path(out))  # the weights evaluate RUN loads
    batch = run.components.stream.held_out(3)
    images = (batch.x.permute(0, 2, 3, 1) * 255).round().clamp(0, 255).to(torch.uint8).numpy()
    mask = batch.truth["mask"].numpy().astype(np.uint8)[..., None]
    with h5py.File(path, "w") as f:
        f.create_dataset("image", data=images)
        f.create_dataset("mask", data=mask)
        f.create_dataset("num_actual_objects", data=mask.reshape(3, -1).max(1, keepdims=True))
        f.create_dataset("visibility", data=np.ones((3, 6), np.uint8))
    capsys.readouterr()
    argv = ["evaluate", str(out), "--json", "--dataset", f"hdf5:{path}", "--inner-steps",
            str(steps), *restarts]  # fmt: skip
    assert main(argv) == 0
    on_file = json.loads(capsys.readouterr().out)
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
    truth = torch.from_numpy(mask[..., 0]).long()
    data = EvalData("direct", 3, lambda i, j: Batch(x[i:j], {"mask": truth[i:j]}))
    run = load_run(weights_path(out))  # restores its generator state, as the command does
    direct = evaluate_run(run, data, inner_steps=steps, restarts=int(restarts[1]),
                          criterion=restarts[3],
                          reinitialize="--reinitialize" in restarts)  # fmt: skip
    assert on_file["num_datapoints"] == 3
    for key in ("fg_ari", "ari", "mse", "elbo"):
        assert on_file[key] == pytest.approx(direct[key], rel=1e-5, abs=1e-6), key


def test_config_by_name_by_path_and_flags_override(tmp_path, capsys):
    """A name and the file's path give the same recipe; a flag overrides a key; an unknown name
    lists the shipped ones; --list-configs prints every name with its description."""
    path = os.path.join(CONFIGS_DIR, "gmm-em.yaml")
    assert config_path("gmm-em") == path and config_path(path) == path
    with pytest.raises(ConfigError, match="neither a config file nor a shipped recipe.*gmm-em"):
        config_path("no-such-recipe")
    out = tmp_path / "run"
    argv = ["train", "--config", "gmm-em", *TINY, "--num-points", "20", "--lr", "0.01"]
    assert main([*argv, "--out", str(out)]) == 0
    saved = (out / "config.yaml").read_text()
    assert "lr: 0.01" in saved and "inner: em" in saved and "inner_steps: 5" in saved
    capsys.readouterr()
    assert main(["train", "--list-configs"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines] == NAMES


def test_headline_recipe_is_the_published_one():
    """The tetrominoes recipe holds the hyperparameters of the headline runs
    (examples/results/objects.md)."""
    config = load_config_file(config_path("tetrominoes-slot-attention"))
    expected = dict(
        model="slot-autoencoder", inner="slot-attention", dataset="tetrominoes",
        gradient="first_order", inner_steps=5, batch_size=32, lr=4e-4, warmup_steps=500,
        lr_schedule="cosine", min_lr_ratio=0.05, max_minutes=60.0, select_best=True,
        eval_every=500, eval_size=256, test_size=1000, eval_inner_steps=10, num_slots=4,
        slot_dim=64,
    )  # fmt: skip
    assert {k: config[k] for k in expected} == expected


def test_the_image_demo_is_the_headline_recipe_cut_to_its_budget():
    """pyro-slots demo trains the headline's recipe (first-order T = 5, warm-up, cosine, T = 10
    at test) over its 9 minutes, or over --steps when given."""
    from pyro_slots.cli.demo import IMAGE_DEMO_SECONDS, demo_config

    headline = load_config_file(config_path("tetrominoes-slot-attention"))
    config = demo_config("slot-autoencoder", None, "runs/demo", 0).to_dict()
    shared = ("model", "inner", "dataset", "gradient", "inner_steps", "batch_size", "lr",
              "warmup_steps", "lr_schedule", "min_lr_ratio", "eval_inner_steps", "num_slots",
              "slot_dim")  # fmt: skip
    assert {k: config[k] for k in shared} == {k: headline[k] for k in shared}
    assert config["max_minutes"] == IMAGE_DEMO_SECONDS / 60 == 9.0
    assert demo_config("slot-autoencoder", 300, "runs/demo", 0).max_minutes is None
