"""tune_allocator: glibc's mallopt through ctypes (process-wide, so tested in subprocesses)."""

import json
import platform
import subprocess
import sys
import textwrap

import pytest

from pyro_slots._allocator import tune_allocator

glibc_only = pytest.mark.skipif(
    platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
    reason="mallopt is glibc's",
)

# Counts the bytes glibc currently serves by mmap (mallinfo2().hblkhd, glibc >= 2.33) around a
# 64 MiB allocation: with the default thresholds it is mapped, after tuning it comes from the heap.
_SCRIPT = textwrap.dedent(
    """
    import ctypes, json, sys
    from pyro_slots._allocator import tune_allocator

    libc = ctypes.CDLL(None)
    fields = "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost"

    class MallInfo2(ctypes.Structure):
        _fields_ = [(f, ctypes.c_size_t) for f in fields.split()]

    libc.mallinfo2.restype = MallInfo2
    libc.malloc.restype = ctypes.c_void_p
    libc.free.argtypes = [ctypes.c_void_p]
    results = [tune_allocator() for _ in range(int(sys.argv[1]))]
    before = libc.mallinfo2().hblkhd
    p = libc.malloc(64 << 20)
    mapped = libc.mallinfo2().hblkhd - before
    libc.free(p)
    print(json.dumps({"results": results, "mapped": mapped}))
    """
)


def _run(num_calls: int) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", _SCRIPT, str(num_calls)],
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(out.stdout)


@glibc_only
def test_tune_allocator_applies_and_is_idempotent():
    untuned = _run(0)
    assert untuned["mapped"] >= 64 << 20  # glibc's default: a fresh mapping
    tuned = _run(2)
    assert tuned["results"] == [True, True]
    assert tuned["mapped"] == 0  # served from the heap


@pytest.mark.parametrize(
    "kwargs, error",
    [
        ({"mmap_threshold": 0}, ValueError),
        ({"trim_threshold": 2**31}, ValueError),
        ({"mmap_threshold": 1.5}, TypeError),
        ({"trim_threshold": True}, TypeError),
    ],
)
def test_tune_allocator_validates_thresholds(kwargs, error):
    with pytest.raises(error, match="threshold"):
        tune_allocator(**kwargs)


# A library call (main() in this process, as a test or a notebook would run it) leaves glibc's
# thresholds alone: a 64 MiB allocation is still mapped afresh afterwards.
_LIBRARY_SCRIPT = textwrap.dedent(
    """
    import ctypes, json, sys, tempfile
    from pyro_slots.cli import main

    out = tempfile.mkdtemp()
    code = main(["train", "--steps", "1", "--batch-size", "2", "--num-points", "10",
                 "--eval-every", "0", "--no-progress", "--no-pictures", "--out", out])
    libc = ctypes.CDLL(None)
    fields = "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost"

    class MallInfo2(ctypes.Structure):
        _fields_ = [(f, ctypes.c_size_t) for f in fields.split()]

    libc.mallinfo2.restype = MallInfo2
    libc.malloc.restype = ctypes.c_void_p
    libc.free.argtypes = [ctypes.c_void_p]
    before = libc.mallinfo2().hblkhd
    p = libc.malloc(64 << 20)
    mapped = libc.mallinfo2().hblkhd - before
    libc.free(p)
    print(json.dumps({"code": code, "mapped": mapped}))
    """
)


@glibc_only
def test_library_main_does_not_tune_the_allocator():
    out = subprocess.run(
        [sys.executable, "-c", _LIBRARY_SCRIPT], capture_output=True, text=True, check=True
    )
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["code"] == 0
    assert result["mapped"] >= 64 << 20  # glibc's default threshold: still a fresh mapping


def test_only_the_console_script_tunes_for_training(monkeypatch, tmp_path):
    import pyro_slots.cli as cli

    calls = []
    monkeypatch.setattr(cli, "tune_allocator", lambda: calls.append(1) or True)
    bad = ["--dist-timeout", "0", "--out", str(tmp_path / "run")]  # refused before any work
    assert cli.main(["train", *bad]) == 2
    assert calls == []  # main() is a library call
    assert cli.console_main(["train", *bad]) == 2
    assert calls == [1]
    assert cli.console_main(["evaluate", str(tmp_path / "none.pt")]) == 2
    assert calls == [1]  # evaluate does not train: untouched
