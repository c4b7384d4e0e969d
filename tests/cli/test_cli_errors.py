"""One-line errors with exit status 2 (issue 19, cases 4-6): folders that cannot be written,
counts below 1, no silent fallback to defaults, duplicate YAML keys, devices, a diverging image
model."""

import os
import shutil

import pytest
import torch

from pyro_slots.cli import main
from pyro_slots.cli.runs import distributed_backend, resolve_device

TINY = ["--steps", "2", "--batch-size", "2", "--num-points", "20", "--eval-every", "0",
        "--checkpoint-every", "2", "--threads", "1", "--no-progress", "--no-pictures"]  # fmt: skip


def _error(argv, capsys, code=2):
    assert main(argv) == code
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert err.startswith("pyro-slots: error: " if code == 2 else "pyro-slots: training failed")
    return err


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("errors") / "run"
    assert main(["train", *TINY, "--out", str(out)]) == 0
    return out


def test_diagnose_with_draws_the_model_cannot_give_is_refused_before_any_work(
    run, tmp_path, capsys, monkeypatch
):
    """--draws guide on a gmm run (its guide samples nothing: every latent is enumerated) is a
    one-line error naming --draws, raised before the inner loop runs (it used to end in a
    traceback after refining every datapoint)."""
    import pyro_slots.diagnostics.report as report

    refined = []
    monkeypatch.setattr(report, "refine", lambda *a, **k: refined.append(1))
    out = tmp_path / "report"
    err = _error(["diagnose", str(run), "--out", str(out), "--num", "2", "--draws", "guide"],
                 capsys)  # fmt: skip
    assert 'error: --draws: draws="guide": the guide of GaussianMixture has no sample sites' in err
    assert refined == [] and not (out / "report.md").exists()


def _read_only_folder(tmp_path):
    """A folder no file can be written into: chmod 500, or /sys for root (which ignores modes)."""
    if os.geteuid() != 0:
        folder = tmp_path / "ro"
        folder.mkdir()
        folder.chmod(0o500)
        return str(folder)
    if not os.path.isdir("/sys"):
        pytest.skip("needs /sys (a read-only folder for root)")
    return "/sys"


@pytest.mark.parametrize("kind", ["file", "below-file", "read-only"])
def test_unwritable_folders(run, tmp_path, capsys, kind):
    afile = tmp_path / "afile"
    afile.write_text("x")
    folder = {
        "file": str(afile),
        "below-file": str(afile / "sub"),
        "read-only": _read_only_folder(tmp_path),
    }[kind]
    expected = {
        "file": "is a file, not a folder",
        "below-file": "lies below a file",
        "read-only": "cannot be written into",
    }[kind]
    err = _error(["train", *TINY, "--out", folder], capsys)
    assert f"--out: {folder}" in err and expected in err
    err = _error(["diagnose", str(run), "--out", folder, "--num", "2"], capsys)
    assert f"out: {folder}" in err and expected in err
    err = _error(["evaluate", str(run), "--num", "2", "--pictures", folder], capsys)
    assert f"--pictures: {folder}" in err and expected in err


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["evaluate", "RUN", "--num", "0"], "num: expected an integer >= 1, got 0"),
        (
            ["evaluate", "RUN", "--inner-steps", "0"],
            "--inner-steps: expected positive integers like 10 or 1,3,5,10,20, got '0'",
        ),
        (
            ["evaluate", "RUN", "--inner-steps", "5,x"],
            "--inner-steps: expected positive integers like 10 or 1,3,5,10,20, got '5,x'",
        ),
        (["diagnose", "RUN", "--num", "0"], "num: expected an integer >= 1, got 0"),
        (["diagnose", "RUN", "--restarts", "0"], "restarts: expected an integer >= 1, got 0"),
        (["diagnose", "RUN", "--inner-steps", "0"], "inner_steps: expected an integer >= 1"),
        (["demo", "--steps", "0", "--out", "OUT"], "steps: expected an integer >= 1, got 0"),
        (["evaluate", "RUN", "--device", "tpu"], "device: expected cpu or cuda, got 'tpu'"),
        # The run has no best.pt (no select_best); a file leaves nothing to choose.
        (["evaluate", "RUN", "--weights", "best"], "weights: best needs RUN/best.pt"),
        (["diagnose", "RUN", "--weights", "best"], "weights: best needs RUN/best.pt"),
        (
            ["evaluate", "RUN/checkpoint.pt", "--weights", "last"],
            "weights: chooses among a run folder's checkpoints, got the file RUN/checkpoint.pt",
        ),
    ],
)
def test_counts_below_one_are_refused(run, tmp_path, capsys, argv, expected):
    out = tmp_path / "demo"
    argv = [a.replace("RUN", str(run)) if a != "OUT" else str(out) for a in argv]
    assert expected.replace("RUN", str(run)) in _error(argv, capsys)
    assert not out.exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal without CUDA")
@pytest.mark.parametrize("command", ["train", "evaluate", "diagnose"])
def test_cuda_without_cuda_is_one_line(run, tmp_path, capsys, command):
    argv = {
        "train": ["train", *TINY, "--out", str(tmp_path / "new")],
        "evaluate": ["evaluate", str(run)],
        "diagnose": ["diagnose", str(run)],
    }[command]
    err = _error([*argv, "--device", "cuda"], capsys)
    assert "device: cuda was asked for, but CUDA is not available here" in err
    assert not (tmp_path / "new").exists()


def test_backend_follows_the_device():
    assert distributed_backend(torch.device("cpu")) == "gloo"
    assert distributed_backend(torch.device("cuda", 1)) == "nccl"
    assert distributed_backend("cpu") == "gloo"  # also on a machine with GPUs
    assert resolve_device(None) == torch.device("cpu")
    assert resolve_device("cpu") == torch.device("cpu")


def test_duplicate_yaml_keys_are_refused(tmp_path, capsys):
    path = tmp_path / "c.yaml"
    path.write_text("steps: 3\nlr: 0.1\nsteps: 4\n")
    err = _error(["train", "--config", str(path), "--out", str(tmp_path / "run")], capsys)
    assert "duplicate key 'steps' (lines 1 and 3)" in err
    path.write_text("batch-size: 3\nbatch_size: 4\n")
    assert "option 'batch_size' is given twice" in _error(["train", "--config", str(path)], capsys)
    path.write_text("train:\n  seed: 1\n  seed: 2\n")
    assert "duplicate key 'seed'" in _error(["train", "--config", str(path)], capsys)
    assert not (tmp_path / "run").exists()


def test_resume_with_overwrite_is_refused(run, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(run, out)
    err = _error(["train", "--resume", str(out), "--overwrite"], capsys)
    assert "--overwrite: a resumed run continues its folder" in err


def test_diverging_image_model_is_one_line_naming_the_update(tmp_path, capsys):
    """A slot-autoencoder whose weights blow up: the encoder's features turn NaN and the
    inner loop's Pyro program refuses them (a ValueError, not a FloatingPointError)."""
    argv = ["train", "--model", "slot-autoencoder", "--slot-dim", "4", "--batch-size", "2",
            "--steps", "4", "--lr", "1e4", "--eval-every", "0", "--out", str(tmp_path / "run"),
            "--no-progress", "--no-pictures", "--threads", "1"]  # fmt: skip
    err = _error(argv, capsys, code=1)
    assert "diverged" in err and err.startswith("pyro-slots: training failed: update ")
