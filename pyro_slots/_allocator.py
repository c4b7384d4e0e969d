"""Keep large CPU tensors in glibc's heap instead of mapping them afresh every step.

glibc's ``malloc`` serves every request above its mmap threshold (dynamic, at most 32 MiB by
default) with a fresh ``mmap`` and returns it with ``munmap`` on free, so a training step that
allocates the same large activations every iteration pays for mapping them and for the page
faults of touching them again, each time. Raising the mmap threshold keeps them in the heap, and
raising the trim threshold stops ``free`` from handing the top of the heap back to the kernel,
so the next step reuses the same pages. The cost is a resident set that stays at its peak.

Process-wide (``mallopt``), so call it once at start-up, e.g. in a training script::

    from pyro_slots._allocator import tune_allocator

    tune_allocator()
"""

from __future__ import annotations

import ctypes
import platform

__all__ = ["tune_allocator"]

# From glibc's <malloc.h>.
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3

_INT_MAX = 2**31 - 1


def _glibc():
    """The C library as a :class:`ctypes.CDLL` when it is glibc, else ``None``."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        libc = ctypes.CDLL(None)
    except OSError:
        return None
    if not hasattr(libc, "mallopt") or not hasattr(libc, "gnu_get_libc_version"):
        return None
    libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    libc.mallopt.restype = ctypes.c_int
    return libc


def tune_allocator(mmap_threshold: int = 2**30, trim_threshold: int = 2**30) -> bool:
    """Raise glibc's mmap and trim thresholds (``mallopt``); a no-op on other C libraries.

    Idempotent: calling it again sets the same values.

    :param int mmap_threshold: requests of at least this many bytes are still served by
        ``mmap`` (default 1 GiB), in ``[1, 2**31 - 1]``.
    :param int trim_threshold: free memory at the top of the heap above this many bytes is
        returned to the kernel (default 1 GiB), in ``[1, 2**31 - 1]``.
    :returns: ``True`` if both settings were applied, ``False`` where the C library is not glibc
        or refused a value.
    """
    for name, value in (("mmap_threshold", mmap_threshold), ("trim_threshold", trim_threshold)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{name}: expected an int (bytes), got {type(value).__name__}")
        if not 1 <= value <= _INT_MAX:
            raise ValueError(f"{name}: expected 1 <= {name} <= 2**31 - 1 bytes, got {value}")
    libc = _glibc()
    if libc is None:
        return False
    applied = libc.mallopt(M_MMAP_THRESHOLD, mmap_threshold) == 1
    applied = libc.mallopt(M_TRIM_THRESHOLD, trim_threshold) == 1 and applied
    return applied
