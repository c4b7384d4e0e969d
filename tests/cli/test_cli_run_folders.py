"""Run folders (issue 19, case 3): one run at a time, a fresh log per fresh run, --overwrite that
never loses the previous run before the new one has a checkpoint."""

import json
import os
import shutil
import socket
import subprocess
import sys

import pytest

from pyro_slots.checkpoint import load_checkpoint
from pyro_slots.cli import main
from pyro_slots.cli.runs import ASIDE_NAME, LOCK_NAME

TINY = ["--steps", "4", "--batch-size", "2", "--num-points", "20", "--eval-every", "0",
        "--checkpoint-every", "2", "--threads", "1", "--no-progress", "--no-pictures"]  # fmt: skip
#: A run that diverges at its first update (a huge gradient step).
DIVERGING = ["--inner", "gradient", "--step-size", "1e6", "--steps", "2", "--batch-size", "2",
             "--num-points", "10", "--no-progress", "--no-pictures"]  # fmt: skip


def _train_steps(folder):
    with open(folder / "metrics.jsonl") as f:
        return [r["step"] for r in map(json.loads, f) if r["split"] == "train"]


def _files(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def _one_line(capsys):
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    return err


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished tiny run (copied before any test writes into it)."""
    out = tmp_path_factory.mktemp("finished") / "run"
    assert main(["train", *TINY, "--out", str(out)]) == 0
    return out


def test_lock_of_a_live_process_is_refused(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (out / LOCK_NAME).write_text(f"{holder.pid} {socket.gethostname()}\n")
        assert main(["train", *TINY, "--out", str(out)]) == 2
        err = _one_line(capsys)
        assert f"in use by the run of process {holder.pid}" in err
        assert sorted(os.listdir(out)) == [LOCK_NAME]  # nothing written
    finally:
        holder.kill()
        holder.wait()


@pytest.mark.parametrize("hard_links", [True, False])
def test_two_runs_taking_one_folder_at_once_leave_one_owner(tmp_path, monkeypatch, hard_links):
    """The lock appears whole (written under a private name, then hard-linked): a run that
    looks while another is taking the folder finds no lock or a complete one, never an empty
    one it would take for stale (both runs then owned the folder). The first run is paused
    just before its lock appears; the second takes the folder; the first is then refused.
    Without hard links (os.link failing) the lock is created exclusively, as before."""
    import threading

    from pyro_slots.cli import runs as runs_module
    from pyro_slots.cli.config import ConfigError

    if not hard_links:
        monkeypatch.setattr(os, "link", lambda *a: (_ for _ in ()).throw(PermissionError()))
    real = runs_module._link_or_create
    paused, go_on, errors = threading.Event(), threading.Event(), []

    def slow(source, target):
        if threading.current_thread().name == "first":
            paused.set()
            go_on.wait(10)
        return real(source, target)

    monkeypatch.setattr(runs_module, "_link_or_create", slow)
    first, second = runs_module.RunFolder(str(tmp_path)), runs_module.RunFolder(str(tmp_path))

    def take():
        try:
            first.acquire()
        except ConfigError as error:
            errors.append(str(error))

    thread = threading.Thread(target=take, name="first")
    thread.start()
    assert paused.wait(10)
    second.acquire()  # nothing there yet: the second run takes the folder
    go_on.set()
    thread.join(10)
    assert second.owned and not first.owned
    assert errors and f"in use by the run of process {os.getpid()}" in errors[0]
    text = (tmp_path / LOCK_NAME).read_text()
    assert text == f"{os.getpid()} {socket.gethostname()}\n"
    assert sorted(os.listdir(tmp_path)) == [LOCK_NAME]  # no private copy left behind
    second.release()
    assert os.listdir(tmp_path) == []


def test_stale_lock_is_reclaimed_and_released(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (out / LOCK_NAME).write_text(f"{dead.pid} {socket.gethostname()}\n")
    assert main(["train", *TINY, "--out", str(out)]) == 0
    assert load_checkpoint(out / "checkpoint.pt")["step"] == 4
    assert not (out / LOCK_NAME).exists()  # released at the end


def test_lock_is_held_while_the_run_trains(tmp_path, monkeypatch):
    """During an update the folder's lock names this process: a second run is refused."""
    train_module = sys.modules["pyro_slots.cli.train"]
    out = tmp_path / "run"
    seen = []
    original = train_module._inner_elbo

    def probe(svi):
        seen.append((out / LOCK_NAME).read_text().split()[0])
        if len(seen) == 1:
            assert main(["train", *TINY, "--out", str(out)]) == 2
        return original(svi)

    monkeypatch.setattr(train_module, "_inner_elbo", probe)
    assert main(["train", *TINY, "--out", str(out)]) == 0
    assert set(seen) == {str(os.getpid())}
    assert _train_steps(out) == [1, 2, 3, 4]  # the refused run wrote nothing into the log


def test_fresh_run_starts_a_fresh_log(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    # A run that died before its first checkpoint left a log (and no checkpoint).
    (out / "metrics.jsonl").write_text(
        "".join(json.dumps({"step": s, "split": "train", "J": 1.0}) + "\n" for s in (1, 2, 3))
    )
    assert main(["train", *TINY, "--out", str(out)]) == 0
    assert _train_steps(out) == [1, 2, 3, 4]


def test_failed_overwrite_keeps_the_previous_run(finished, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(finished, out)
    before = _files(out)
    assert main(["train", *DIVERGING, "--overwrite", "--out", str(out)]) == 1
    err = _one_line(capsys)
    assert "update 1 diverged" in err
    assert f"{out} keeps the previous run (the --overwrite is undone)" in err
    assert _files(out) == before  # the previous run, byte for byte
    assert not (out / ASIDE_NAME).exists()


def test_overwrite_deletes_the_previous_run_after_the_first_checkpoint(finished, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(finished, out)
    old = load_checkpoint(out / "checkpoint.pt")
    assert main(["train", *TINY, "--seed", "3", "--overwrite", "--out", str(out)]) == 0
    new = load_checkpoint(out / "checkpoint.pt")
    assert new["config"]["seed"] == 3 and old["config"]["seed"] == 0
    assert _train_steps(out) == [1, 2, 3, 4]
    assert not (out / ASIDE_NAME).exists()


def test_run_moved_aside_by_a_killed_overwrite_is_put_back(finished, tmp_path, capsys):
    """A kill between the move and the first checkpoint leaves the previous run aside: the next
    run puts it back before anything else (and then needs --overwrite or --resume)."""
    out = tmp_path / "run"
    out.mkdir()
    shutil.copytree(finished, out / ASIDE_NAME)
    before = _files(out / ASIDE_NAME)
    assert main(["train", *TINY, "--out", str(out)]) == 2
    assert "already holds a checkpoint" in _one_line(capsys)
    assert _files(out) == before and not (out / ASIDE_NAME).exists()


def test_divergence_without_a_checkpoint_says_so(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", *DIVERGING, "--out", str(out)]) == 1
    assert f"no checkpoint was written to {out}" in _one_line(capsys)


def test_divergence_after_a_checkpoint_names_it(finished, tmp_path, capsys, monkeypatch):
    from pyro_slots import NestedSVI

    out = tmp_path / "run"
    shutil.copytree(finished, out)
    step = NestedSVI.step

    def failing(self, x, *targets):
        if self.num_updates >= 5:
            raise FloatingPointError("NestedSVI: the task objective is nan")
        return step(self, x, *targets)

    monkeypatch.setattr(NestedSVI, "step", failing)
    argv = ["train", "--resume", str(out), "--steps", "8", "--no-progress", "--no-pictures"]
    assert main(argv) == 1
    err = _one_line(capsys)
    assert "update 6 diverged" in err and f"{out} keeps the checkpoint of update 4" in err
    assert load_checkpoint(out / "checkpoint.pt")["step"] == 4


def test_resume_cannot_lower_steps(finished, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(finished, out)
    before = _files(out)
    assert main(["train", "--resume", str(out), "--steps", "2", "--no-progress"]) == 2
    err = _one_line(capsys)
    assert "steps: the run is at step 4" in err and "cannot go below it (got 2)" in err
    assert _files(out) == before  # config.yaml not rewritten
