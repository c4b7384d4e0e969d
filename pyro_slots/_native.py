"""The package's C++ CPU kernels: built at first use, cached by torch, optional.

A kernel module (:mod:`pyro_slots.inner._fused_attention`, :mod:`pyro_slots.models._fused_kmeans`)
declares one :class:`NativeExtension` with its C++ source; the extension is compiled with
:func:`torch.utils.cpp_extension.load_inline` the first time :meth:`NativeExtension.available`
is asked (tens of seconds once, then loaded from torch's extensions folder,
``TORCH_EXTENSIONS_DIR``), with ``-O3 -march=native`` and OpenMP. The build is named after this
CPU's feature flags, so a folder shared by different machines keeps one build per kind of CPU.
Where it cannot be built (no compiler, no ninja, a failed compilation) the failure is logged
once, never retried, and the caller keeps torch's operations; the extension's environment
switch set to ``0`` (e.g. ``PYRO_SLOTS_FUSED_ATTENTION=0``) turns it off, and
``PYRO_SLOTS_NATIVE=0`` turns every one off.
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import warnings

__all__ = ["NativeExtension", "cpu_tag"]

logger = logging.getLogger(__name__)


def cpu_tag() -> str:
    """A short hash of this CPU's feature flags: the builds are ``-march=native``."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith(("flags", "Features"))), "")
    except OSError:
        flags = ""
    return hashlib.sha1((flags or platform.processor()).encode()).hexdigest()[:10]


class NativeExtension:
    """One lazily built C++ extension.

    :param str name: the extension's name (``pyro_slots_<name>_<cpu tag>`` in torch's folder).
    :param str source: its C++ source (with ``#include <torch/extension.h>``).
    :param functions: the names of the source's functions that Python calls.
    :param str switch: the environment variable that turns it off when ``0``.
    :param str what: how a failed build's warning names it.
    """

    def __init__(self, name: str, source: str, functions, switch: str, what: str):
        self.name, self.source, self.functions = name, source, list(functions)
        self.switch, self.what = switch, what
        self.module = None  # the built module, or None
        self.error = None  # why the build failed, or None

    def _build(self):
        from torch.utils.cpp_extension import load_inline

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return load_inline(
                f"pyro_slots_{self.name}_{cpu_tag()}",
                cpp_sources=[self.source],
                functions=self.functions,
                extra_cflags=["-O3", "-march=native", "-fopenmp"],
                extra_ldflags=["-fopenmp"],
                verbose=False,
            )

    def available(self) -> bool:
        """Whether the extension is built (building it at the first call) and not switched
        off. A failed build is logged once and not retried."""
        if "0" in (os.environ.get(self.switch, "1"), os.environ.get("PYRO_SLOTS_NATIVE", "1")):
            return False
        if self.module is None and self.error is None:
            try:
                self.module = self._build()
            except Exception as e:  # no compiler, no ninja, a failed compilation: torch's path
                self.error = e
                logger.warning("pyro_slots: the %s was not built (%s)", self.what, e)
        return self.module is not None
