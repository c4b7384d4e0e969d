"""``torchrun -m pyro_slots train``: two CPU ranks match one process with the global batch, and a
job whose rank dies or stalls fails instead of hanging.

Two CPU ranks on loopback with ``gloo``. Rank 1 is found by its ``RANK`` variable among the
children of the ``torchrun`` process (``/proc``), so the library needs no fault-injection hook.
A rank killed by SIGKILL closes its sockets and the survivor fails at its next ``all_reduce``; a
rank that stops without closing them (SIGSTOP: a frozen node) is only noticed when the collective
times out, which ``--dist-timeout`` bounds (torch's default is 30 minutes).
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from pyro_slots.checkpoint import load_checkpoint
from pyro_slots.cli import main

linux_only = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="finds the ranks' processes through /proc"
)

CHECKPOINT_EVERY = 5
DIST_TIMEOUT = 5  # seconds
#: torchrun gives the other workers 30 s to exit after SIGTERM; a job must end well within this.
JOB_LIMIT = 90  # seconds

OPTIONS = [
    "--batch-size", "4", "--num-points", "30", "--eval-every", "0",
    "--checkpoint-every", str(CHECKPOINT_EVERY), "--threads", "1", "--no-progress",
    "--no-pictures", "--dist-timeout", str(DIST_TIMEOUT),
]  # fmt: skip


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(args, log):
    """Start ``torchrun --nproc-per-node 2 -m pyro_slots ARGS`` on loopback; output to ``log``."""
    env = dict(os.environ, OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME="lo")
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
        "--master-addr", "127.0.0.1", "--master-port", str(_free_port()),
        "-m", "pyro_slots", *map(str, args),
    ]  # fmt: skip
    with open(log, "w") as f:
        return subprocess.Popen(command, stdout=f, stderr=subprocess.STDOUT, env=env)


def _children(launcher_pid):
    """``{pid: RANK}`` of the live child processes of ``launcher_pid``."""
    children = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                # The command name (in parentheses) may hold spaces: split after it.
                state, parent = f.read().rsplit(")", 1)[1].split()[:2]
            if int(parent) != launcher_pid or state == "Z":
                continue
            with open(f"/proc/{entry}/environ", "rb") as f:
                environ = dict(v.split(b"=", 1) for v in f.read().split(b"\0") if b"=" in v)
        except (OSError, ValueError):
            continue  # exited meanwhile
        children[int(entry)] = environ.get(b"RANK", b"").decode()
    return children


def _worker(launcher_pid, rank):
    """Pid of the child of ``launcher_pid`` whose environment says ``RANK=rank``."""
    pids = [pid for pid, r in _children(launcher_pid).items() if r == str(rank)]
    if len(pids) != 1:
        pytest.fail(f"expected one child of torchrun with RANK={rank}, found {pids}")
    return pids[0]


def _running(pid):
    """False once ``pid`` has exited (zombie or reaped)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _wait_for(condition, proc, limit, what):
    deadline = time.monotonic() + limit
    while not condition():
        if proc.poll() is not None:
            pytest.fail(f"torchrun exited ({proc.returncode}) before {what}")
        if time.monotonic() > deadline:
            pytest.fail(f"no {what} after {limit} s")
        time.sleep(0.05)


def _start_and_wait_for_a_checkpoint(out, log):
    """A long two-rank run; returns ``(torchrun process, pid of rank 1)`` after a checkpoint."""
    proc = _torchrun(["train", *OPTIONS, "--steps", "5000", "--out", out], log)
    _wait_for((out / "checkpoint.pt").exists, proc, 120, "checkpoint")
    return proc, _worker(proc.pid, 1)


def _stop(proc):
    """After a failed assertion: end torchrun and its workers (this test's processes only)."""
    if proc.poll() is None:
        for pid in _children(proc.pid):
            for sig in (signal.SIGCONT, signal.SIGKILL):
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
        proc.kill()
    proc.wait()


def _train_steps(out):
    with open(out / "metrics.jsonl") as f:
        return [r["step"] for r in map(json.loads, f) if r["split"] == "train"]


@linux_only
def test_killed_rank_fails_the_job_and_leaves_a_resumable_checkpoint(tmp_path):
    out = tmp_path / "run"
    proc, victim = _start_and_wait_for_a_checkpoint(out, tmp_path / "killed.log")
    try:
        os.kill(victim, signal.SIGKILL)
        killed = time.monotonic()
        returncode = proc.wait(timeout=JOB_LIMIT)
    finally:
        _stop(proc)
    log = (tmp_path / "killed.log").read_text()
    assert returncode != 0, log
    # The survivor fails at its next all_reduce (closed connection) or at the timeout at worst,
    # and torchrun gives it 30 s to exit after SIGTERM.
    assert time.monotonic() - killed < DIST_TIMEOUT + 30, log

    payload = load_checkpoint(out / "checkpoint.pt")
    step = payload["step"]
    assert step > 0 and step % CHECKPOINT_EVERY == 0
    assert step <= max(_train_steps(out))

    # Both ranks resume from it (only --steps changes) and finish the run.
    target = step + 3
    resumed = _torchrun(["train", "--resume", out, "--steps", target, "--no-progress",
                         "--no-pictures"], tmp_path / "resumed.log")  # fmt: skip
    try:
        returncode = resumed.wait(timeout=120)
    finally:
        _stop(resumed)
    assert returncode == 0, (tmp_path / "resumed.log").read_text()
    assert load_checkpoint(out / "checkpoint.pt")["step"] == target
    # The records logged after the checkpoint by the killed run were dropped.
    assert _train_steps(out) == list(range(1, target + 1))


@linux_only
def test_stalled_rank_fails_the_others_after_dist_timeout(tmp_path):
    out = tmp_path / "run"
    proc, victim = _start_and_wait_for_a_checkpoint(out, tmp_path / "stalled.log")
    rank0 = _worker(proc.pid, 0)
    try:
        os.kill(victim, signal.SIGSTOP)  # alive, connections open, silent
        stopped = time.monotonic()
        _wait_for(lambda: not _running(rank0), proc, JOB_LIMIT, "exit of rank 0")
        waited = time.monotonic() - stopped
        # torchrun's SIGTERM to the stopped rank is delivered once it continues.
        os.kill(victim, signal.SIGCONT)
        returncode = proc.wait(timeout=JOB_LIMIT)
    finally:
        _stop(proc)
    log = (tmp_path / "stalled.log").read_text()
    assert returncode != 0, log
    assert DIST_TIMEOUT * 0.9 < waited < DIST_TIMEOUT + 20, log
    assert "timed out" in log.lower(), log
    load_checkpoint(out / "checkpoint.pt")


def test_dist_timeout_must_be_positive(tmp_path, capsys):
    assert main(["train", "--dist-timeout", "0", "--out", str(tmp_path / "run")]) == 2
    assert "dist_timeout: expected finite seconds > 0, got 0.0" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


MATCH_OPTIONS = ["--num-points", "30", "--eval-every", "3", "--eval-size", "4", "--no-progress",
                 "--no-pictures", "--steps", "3"]  # fmt: skip


def _j(folder):
    with open(folder / "metrics.jsonl") as f:
        return [r["J"] for r in map(json.loads, f) if r["split"] == "train"]


@pytest.mark.slow
def test_torchrun_two_ranks_match_one_process(tmp_path, cli):
    # torchrun's module ships with torch: no skip needed.
    torchrun = [sys.executable, "-m", "torch.distributed.run"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    two = tmp_path / "two"
    subprocess.run(
        [*torchrun, "--nproc-per-node", "2", "-m", "pyro_slots", "train", "--batch-size", "4",
         *MATCH_OPTIONS, "--out", str(two)],
        check=True, env=env, capture_output=True, timeout=300,
    )  # fmt: skip
    one = tmp_path / "one"
    cli("train", "--batch-size", 8, *MATCH_OPTIONS, "--out", one)
    # The same global batches and slot draws: J agrees up to float32 reduction order.
    assert _j(two) == pytest.approx(_j(one), rel=1e-4)
    assert sorted(p.name for p in two.iterdir()) == ["checkpoint.pt", "config.yaml",
                                                    "metrics.jsonl"]  # fmt: skip
