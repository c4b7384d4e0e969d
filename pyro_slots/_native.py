"""The package's C++ CPU kernels: built at first use, cached by torch, optional.

A kernel module (:mod:`pyro_slots.inner._fused_attention`, :mod:`pyro_slots.models._fused_kmeans`,
:mod:`pyro_slots.elbo._fused_logprob`) declares one :class:`NativeExtension` with its C++
source (the vectorized ones start with :data:`SIMD_PRELUDE`); the extension is compiled with
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

__all__ = ["SIMD_PRELUDE", "NativeExtension", "cpu_tag"]

logger = logging.getLogger(__name__)

#: The C++ every kernel's source starts with: torch's extension header and, in an anonymous
#: namespace, one vector of ``L`` floats ``vf`` (16 with AVX-512's 64-byte registers, else 8; GCC's
#: vector extensions), its ``load``/``store``/``splat`` and ``exp2v``, a vectorized ``2^d``.
SIMD_PRELUDE = r"""
#include <torch/extension.h>
#include <cmath>
#include <cstring>

namespace {
#if defined(__AVX512F__)
constexpr int L = 16;
typedef float vf __attribute__((vector_size(64)));
typedef int vi __attribute__((vector_size(64)));
#else
constexpr int L = 8;
typedef float vf __attribute__((vector_size(32)));
typedef int vi __attribute__((vector_size(32)));
#endif

inline vf load(const float* p) { vf v; std::memcpy(&v, p, sizeof(v)); return v; }
inline void store(float* p, vf v) { std::memcpy(p, &v, sizeof(v)); }
inline vf splat(float x) { return vf{} + x; }

// 2^d for d in [-115.4, 0]: 2^floor(d) from the exponent bits times a degree-6 polynomial of the
// fraction (relative error below 2e-7).
inline vf exp2v(vf d) {
  vi t = __builtin_convertvector(d, vi);  // toward zero
  t = t + (vi)(d < __builtin_convertvector(t, vf));  // floor: -1 where the truncation is above
  const vf f = d - __builtin_convertvector(t, vf);
  vf p = splat(1.535336188319500e-4f);
  p = p * f + 1.339887440266574e-3f;
  p = p * f + 9.618437357674640e-3f;
  p = p * f + 5.550332471162809e-2f;
  p = p * f + 2.402264791363012e-1f;
  p = p * f + 6.931472028550421e-1f;
  p = p * f + 1.0f;
  return p * (vf)((t + 127) << 23);
}
}  // namespace
"""


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
