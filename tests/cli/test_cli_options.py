"""Options: --help lists them all, config files and flags combine, bad names are refused."""

import dataclasses

import pytest
import yaml

from pyro_slots.cli import build_parser, main
from pyro_slots.cli.config import TrainConfig


def _subparsers():
    parser = build_parser()
    action = next(a for a in parser._actions if a.dest == "command")
    return action.choices


@pytest.mark.parametrize("command", ["train", "evaluate", "diagnose", "demo"])
def test_help_lists_every_option(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    options = [s for a in _subparsers()[command]._actions for s in a.option_strings]
    assert options, command
    for option in options:
        assert option in text, f"{command} --help does not list {option}"
    if command == "train":
        for f in dataclasses.fields(TrainConfig):
            assert "--" + f.name.replace("_", "-") in text


def test_config_file_and_flag_override(cli, tiny, tmp_path):
    config = tmp_path / "train.yaml"
    options = {"steps": 4, "batch-size": 3, "lr": 0.01, "seed": 5, "select-best": True}
    config.write_text(yaml.safe_dump(options))
    out = tmp_path / "run"
    # tiny: --steps 6; --no-select-best turns off the file's true
    cli("train", "--config", config, *tiny, "--out", out, "--no-pictures", "--no-select-best")
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["steps"] == 6 and saved["select_best"] is False  # the flags win over the file
    assert saved["lr"] == 0.01 and saved["seed"] == 5  # the file wins over the defaults
    assert saved["batch_size"] == 4  # tiny sets --batch-size 4
    # The saved configuration is itself a valid --config file.
    argv = ["train", "--config", str(out / "config.yaml"), "--steps", "1", "--out",
            str(tmp_path / "again"), "--no-progress", "--no-pictures"]  # fmt: skip
    assert main(argv) == 0
    again = yaml.safe_load((tmp_path / "again" / "config.yaml").read_text())
    assert {k: v for k, v in again.items() if k not in ("steps", "out")} == {
        k: v for k, v in saved.items() if k not in ("steps", "out")
    }


def test_toml_config(tmp_path, capsys):
    from pyro_slots.cli.config import load_config_file

    path = tmp_path / "c.toml"
    path.write_text('[train]\nmodel = "gmm"\nnum-points = 50\nlr = 1\n')
    assert load_config_file(path) == {"model": "gmm", "num_points": 50, "lr": 1.0}


def _error(argv, capsys):
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("pyro-slots: error: ") and err.count("\n") == 1, err
    return err


@pytest.mark.parametrize(
    "argv, expected",
    [
        (
            ["--model", "vae"],
            "valid choices are ['gmm', 'slot-autoencoder', 'iodine', 'neural-em']",
        ),
        (["--inner", "newton"], "'em', 'soft-kmeans', 'gradient', 'slot-attention'"),
        (["--dataset", "mnist"], "'points', 'shapes', 'tetrominoes', 'moving-shapes', 'hdf5:PATH'"),
        (["--gradient", "backprop"], "'unrolled', 'truncated', 'first_order', 'implicit'"),
        (["--model", "iodine", "--inner", "em"], "needs a closed-form M-step"),
        (["--model", "gmm", "--dataset", "tetrominoes"], "use --dataset points"),
        (["--model", "slot-autoencoder", "--dataset", "points"], "works on images"),
        (["--inner", "em", "--gradient", "implicit"], "never reaches the learned initialization"),
        (["--init", "model"], "no weights to train"),
        (["--steps", "0"], "steps: expected an integer >= 1"),
        (["--model", "iodine", "--pixel-scale", "0"], "pixel_scale: expected a finite number > 0"),
        (["--lr", "inf"], "lr: expected a finite number > 0, got inf"),
        (["--lr", "nan"], "lr: expected a finite number > 0, got nan"),
        # Checked by the constructors (NestedSVI, the rules), reported in one line:
        (["--inner-steps", "0"], "inner_steps (num_steps): expected an integer >= 1, got 0"),
        (["--num-slots", "0"], "num_slots: expected an integer >= 1, got 0"),
        (
            ["--gradient", "truncated", "--inner", "slot-attention", "--truncate", "0"],
            "truncate: expected an integer >= 1, got 0",
        ),
        (["--clip-norm", "inf"], "clip_norm: expected a finite number > 0, got inf"),
        (["--iteration-weights", "cubic"], "iteration_weights: expected one of"),
        (["--model", "gmm", "--pixel-scale", "0.5"], "pixel_scale: only for --model iodine"),
        (["--model", "slot-autoencoder", "--dataset", "hdf5:/no/such.h5"], "no HDF5 file"),
    ],
)
def test_bad_options_are_refused_before_training(argv, expected, capsys, tmp_path):
    err = _error(["train", *argv, "--out", str(tmp_path / "run"), "--no-progress"], capsys)
    assert expected in err
    assert not (tmp_path / "run" / "checkpoint.pt").exists()


def test_tensorboard_without_the_package(tmp_path, capsys):
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        pass
    else:
        # This checks the refusal when tensorboard is absent (it is not a project dependency);
        # with it installed there is nothing to refuse.
        pytest.skip("tensorboard is installed")
    err = _error(["train", "--tensorboard", "--out", str(tmp_path / "run")], capsys)
    assert "pip install tensorboard" in err
    assert not (tmp_path / "run").exists()


def test_bad_config_file_keys(tmp_path, capsys):
    path = tmp_path / "c.yaml"
    path.write_text("stepz: 3\n")
    err = _error(["train", "--config", str(path)], capsys)
    assert "unknown option 'stepz'" in err and "batch_size" in err
    path.write_text("steps: many\n")
    assert "steps expects a int" in _error(["train", "--config", str(path)], capsys)
    assert "no such config file" in _error(["train", "--config", str(tmp_path / "x.yaml")], capsys)


def test_existing_run_is_not_overwritten(gmm_run, capsys):
    err = _error(["train", "--out", str(gmm_run)], capsys)
    assert "--resume" in err and "--overwrite" in err


def test_resume_refuses_changed_options(gmm_run, capsys):
    err = _error(["train", "--resume", str(gmm_run), "--lr", "0.1"], capsys)
    assert "cannot change --lr" in err


def test_divergence_is_one_line_and_exit_1(tmp_path, capsys):
    argv = ["train", "--inner", "gradient", "--step-size", "1e6", "--steps", "2", "--batch-size",
            "2", "--num-points", "10", "--out", str(tmp_path), "--no-progress"]  # fmt: skip
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert err.startswith("pyro-slots: training failed: update 1 diverged") and err.count("\n") == 1


COMBINATIONS = (
    [
        ("gmm", inner, "unrolled")
        for inner in ("em", "soft-kmeans", "gradient", "slot-attention", "learned-gradient")
    ]
    + [("gmm", "slot-attention", mode) for mode in ("truncated", "first_order")]
    + [("slot-autoencoder", inner, "unrolled") for inner in ("slot-attention", "em", "soft-kmeans")]
    + [("iodine", "learned-gradient", "unrolled")]
)


@pytest.mark.parametrize("model, inner, gradient", COMBINATIONS)
def test_every_compatible_combination_trains(model, inner, gradient, tmp_path):
    from pyro_slots.checkpoint import load_checkpoint

    argv = ["train", "--model", model, "--inner", inner, "--gradient", gradient, "--steps", "1",
            "--batch-size", "2", "--eval-every", "0", "--out", str(tmp_path), "--no-progress",
            "--no-pictures"]  # fmt: skip
    argv += ["--num-points", "10"] if model == "gmm" else ["--slot-dim", "4"]
    assert main(argv) == 0
    saved = load_checkpoint(tmp_path / "checkpoint.pt")
    assert (saved["step"], saved["config"]["inner"]) == (1, inner)


def test_pixel_scale_reaches_iodines_likelihood():
    """--pixel-scale is the sigma_x of the IODINE that the command line builds (default 0.1)."""
    from pyro_slots.cli.registry import build, resolve

    def model(scale):
        config = TrainConfig(model="iodine", pixel_scale=scale, batch_size=2, steps=1)
        return build(resolve(config)).model

    assert TrainConfig().pixel_scale is None
    assert model(None).pixel_scale == 0.1
    assert model(0.5).pixel_scale == 0.5
