"""Checkpoints: exact resume after SIGKILL, clear errors for bad files, no code execution."""

import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from pyro_slots.checkpoint import (
    FORMAT,
    CheckpointError,
    load_checkpoint,
    payload_digest,
    save_checkpoint,
)
from pyro_slots.cli import main

RUN = [
    "train", "--batch-size", "4", "--num-points", "30", "--eval-every", "4", "--eval-size", "4",
    "--checkpoint-every", "2", "--warmup-steps", "10", "--threads", "1", "--no-progress",
    "--no-pictures",
]  # fmt: skip


def _assert_same_state(a, b):
    assert a.keys() == b.keys()
    for key in a:
        if isinstance(a[key], dict):
            _assert_same_state(a[key], b[key])
        elif torch.is_tensor(a[key]):
            assert torch.equal(a[key], b[key]), key
        elif isinstance(a[key], list):
            assert len(a[key]) == len(b[key])
            for x, y in zip(a[key], b[key]):
                _assert_same_state({"_": x}, {"_": y})
        else:
            assert a[key] == b[key], key


def _train_lines(folder):
    path = folder / "metrics.jsonl"
    if not path.exists():
        return []
    with open(path) as f:
        return [line for line in f if '"split": "train"' in line]


def test_sigkill_and_resume_is_bit_identical(cli, tmp_path):
    steps = 30
    full = tmp_path / "full"
    cli(*RUN, "--steps", steps, "--out", full)

    cut = tmp_path / "cut"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen(
        [sys.executable, "-m", "pyro_slots", *RUN, "--steps", str(steps), "--out", str(cut)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env,
    )  # fmt: skip
    deadline = time.monotonic() + 60
    while len(_train_lines(cut)) < 7 and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = load_checkpoint(cut / "checkpoint.pt")["step"]
    assert 2 <= killed_at < steps, "the run was not interrupted mid-way"

    proc = cli(*RUN[:1], "--resume", cut, "--no-progress", "--no-pictures", "--threads", 1)
    assert f"at step {killed_at} of {steps}" in proc.stdout
    a, b = load_checkpoint(full / "checkpoint.pt"), load_checkpoint(cut / "checkpoint.pt")
    assert a["step"] == b["step"] == steps
    for key in ("model", "inner", "objective", "init", "svi"):
        _assert_same_state({key: a[key]}, {key: b[key]})
    # The metrics of the resumed run continue without gaps or repeats.
    records = [json.loads(line) for line in _train_lines(cut)]
    assert [r["step"] for r in records] == list(range(1, steps + 1))
    full_records = [json.loads(line) for line in _train_lines(full)]
    assert [r["J"] for r in records] == [r["J"] for r in full_records]


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _assert_refused(cli, path, message, capsys=None):
    """``evaluate PATH`` exits 2 with one line naming the file, in a subprocess (``cli``) or in
    this process (``capsys``)."""
    if capsys is None:
        proc = cli("evaluate", path, check=False)
        code, err = proc.returncode, proc.stderr
    else:
        code, err = main(["evaluate", str(path)]), capsys.readouterr().err
    assert code == 2
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("pyro-slots: error: "), err
    assert str(path) in lines[0]
    assert message in lines[0]


def test_truncated_checkpoint(gmm_run, cli, tmp_path, capsys):
    data = (gmm_run / "checkpoint.pt").read_bytes()
    path = tmp_path / "truncated.pt"
    path.write_bytes(data[: len(data) // 2])
    _assert_refused(cli, path, "not a readable pyro-slots checkpoint")
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"\x00not a checkpoint at all")
    _assert_refused(cli, garbage, "not a readable pyro-slots checkpoint", capsys)
    _assert_refused(cli, tmp_path / "missing.pt", "no such checkpoint file", capsys)
    torch.save({"format": FORMAT, "step": 1}, tmp_path / "partial.pt")
    _assert_refused(cli, tmp_path / "partial.pt", "lacks the entries", capsys)


@pytest.mark.parametrize("container", ["pickle", "torch.save"])
def test_code_payload_is_not_run(cli, tmp_path, container, capsys):
    marker = tmp_path / "payload-ran"
    path = tmp_path / "evil.pt"
    evil = {"format": FORMAT, "model": _Payload(marker)}
    if container == "pickle":
        path.write_bytes(pickle.dumps(evil))
        _assert_refused(cli, path, "not a readable pyro-slots checkpoint")
    else:
        torch.save(evil, path)
        _assert_refused(cli, path, "not a readable pyro-slots checkpoint", capsys)
    assert not marker.exists()


def test_save_is_atomic_and_weights_only(tmp_path):
    path = tmp_path / "c.pt"
    save_checkpoint(path, {"format": "x", "w": torch.ones(3)})
    assert os.listdir(tmp_path) == ["c.pt"]  # no temporary file left behind
    with pytest.raises(CheckpointError, match="weights_only"):
        save_checkpoint(path, {"w": _Payload(tmp_path / "m")})
    assert torch.load(path, weights_only=True)["w"].sum() == 3  # the old file is intact
    with pytest.raises(CheckpointError, match="unknown checkpoint format"):
        load_checkpoint(path)


def test_resume_extends_a_finished_run(gmm_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(gmm_run, run)
    assert main(["train", "--resume", str(run), "--steps", "8", "--no-progress"]) == 0
    assert load_checkpoint(run / "checkpoint.pt")["step"] == 8
    steps = [json.loads(line)["step"] for line in _train_lines(run)]
    assert steps == list(range(1, 9))


def test_time_limit_stops_with_a_resumable_checkpoint(tmp_path):
    from pyro_slots.cli.config import TrainConfig
    from pyro_slots.cli.train import train

    config = TrainConfig(steps=50, batch_size=2, num_points=10, eval_every=0, out=str(tmp_path))
    run = train(config, progress=False, pictures=False, time_limit=0.0, echo=lambda *a: None)
    assert run.step == 1
    assert load_checkpoint(tmp_path / "checkpoint.pt")["step"] == 1


def test_flipped_byte_inside_a_weight_is_refused(gmm_run, cli, tmp_path, capsys):
    """torch.load does not check the zip records' CRCs; the saved SHA-256 catches the change."""
    payload = load_checkpoint(gmm_run / "checkpoint.pt")
    weight = payload["init"]["loc"]  # the learned initialization's mean: a trained weight
    data = (gmm_run / "checkpoint.pt").read_bytes()
    raw = weight.contiguous().view(torch.uint8).numpy().tobytes()
    at = data.index(raw) + len(raw) // 2
    flipped = data[:at] + bytes([data[at] ^ 0x10]) + data[at + 1 :]
    path = tmp_path / "flipped.pt"
    path.write_bytes(flipped)
    # The independent check: torch itself loads the altered file, with another weight.
    altered = torch.load(path, weights_only=True)["init"]["loc"]
    assert not torch.equal(altered, weight)
    _assert_refused(cli, path, "checksum mismatch")
    _assert_refused(cli, path, "checksum mismatch", capsys)


def _rewrite(source, target, change):
    """Copy the run ``source`` to ``target`` with its checkpoint changed by ``change(payload)``
    and saved with a valid checksum (an impossible but well-formed checkpoint)."""
    shutil.copytree(source, target)
    payload = load_checkpoint(target / "checkpoint.pt")
    change(payload)
    payload.pop("sha256")
    save_checkpoint(target / "checkpoint.pt", payload)
    return target


def _folder_state(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda p: p.update(step=-1), "impossible step -1"),
        (lambda p: p.update(step=5), "impossible step 5: the outer loop's state counts 6"),
        (
            lambda p: (
                p.update(step=9) or p["svi"].update(num_updates=9) or p["config"].update(steps=20)
            ),
            "impossible step 9: beyond the log, whose last update is 6",
        ),
        (
            lambda p: p.update(step=400) or p["svi"].update(num_updates=400),
            "impossible step 400: beyond the 6 steps of its configuration",
        ),
        (lambda p: p["init"]["loc"].fill_(float("nan")), "init.loc hold NaN"),
    ],
    ids=["negative", "svi-count", "beyond-log", "beyond-config", "nan-weights"],
)
def test_impossible_checkpoint_is_refused_before_any_file_is_touched(
    gmm_run, tmp_path, capsys, change, message
):
    run = _rewrite(gmm_run, tmp_path / "run", change)
    before = _folder_state(run)
    code = main(["train", "--resume", str(run), "--steps", "10", "--no-progress", "--no-pictures"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and message in err, err
    assert _folder_state(run) == before


def test_payload_digest_is_canonical():
    """Equal content gives equal digests whatever the dict order; any value change differs."""
    a = {"w": torch.arange(6.0).reshape(2, 3), "n": 3, "s": "x", "l": [1.5, None]}
    b = {"l": [1.5, None], "s": "x", "n": 3, "w": torch.arange(6.0).reshape(2, 3)}
    assert payload_digest(a) == payload_digest(b)
    for changed in (
        {**a, "w": a["w"].reshape(3, 2)},
        {**a, "w": a["w"].double()},
        {**a, "n": 4},
        {**a, "l": [1.5000001, None]},
    ):
        assert payload_digest(changed) != payload_digest(a)
