"""Helpers for the command-line tests: run ``python -m pyro_slots`` in a subprocess."""

import os
import subprocess
import sys

import pytest

#: Tiny gmm training options: a run takes well under a second of compute.
TINY = [
    "--steps", "6", "--batch-size", "4", "--num-points", "30", "--eval-every", "3",
    "--eval-size", "4", "--checkpoint-every", "3", "--threads", "1", "--no-progress",
]  # fmt: skip


def run_cli(*args, timeout=120, check=True, **kwargs):
    """Run ``python -m pyro_slots ARGS``; returns the CompletedProcess (text mode)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", MPLBACKEND="Agg")
    proc = subprocess.run(
        [sys.executable, "-m", "pyro_slots", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        **kwargs,
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"pyro-slots {' '.join(map(str, args))} exited {proc.returncode}\n"
            f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
        )
    return proc


@pytest.fixture(scope="session")
def gmm_run(tmp_path_factory):
    """A tiny gmm run (6 updates) shared by the tests (read it, never write into it)."""
    out = tmp_path_factory.mktemp("gmm_run")
    run_cli("train", *TINY, "--out", out)
    return out


@pytest.fixture
def cli():
    """``cli(*args, check=True)`` runs ``python -m pyro_slots`` in a subprocess."""
    return run_cli


@pytest.fixture
def tiny():
    """Tiny gmm training options (a list of strings)."""
    return list(TINY)
