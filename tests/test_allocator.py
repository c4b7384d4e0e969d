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
