"""Fused CPU kernels for the lean estimator's two passes over a mixture's ``(K, ..., M)`` tensor.

Where autograd records nothing (an evaluation, the E-step of EM, the last ELBO of an inner loop),
a mixture's log-likelihood is, with torch's operations, about fifteen passes over a tensor of
``K`` log-densities per point that no longer fits the cache: per feature a subtraction, a
scaling and a multiply-add for the components' log-densities (:func:`~pyro_slots.elbo.kernels.
diag_normal_log_prob`), then the maximum, the shift, the clamp, ``exp``, the sum and the
division of the log-sum-exp over the components (:func:`~pyro_slots.elbo.kernels.
stable_logsumexp_parts`). The two kernels here make one pass each:

* :func:`outer_diag_normal` — the log-densities ``(A, B, M)`` of points ``(B, M, F)`` under
  ``A`` diagonal Normals per datapoint ``(A, B, F)``, each tile of points read once for every
  component;
* :func:`logsumexp_first` — per column of ``t`` ``(K, N)``, the maximum and the sum of the
  shifted exponentials over ``K`` (the log-sum-exp is ``log(sum) + max``), and on request the
  softmax written over ``t``; float32, with :func:`~pyro_slots._native.SIMD_PRELUDE`'s ``exp2``.

Both give the torch path's numbers to float rounding (the differences clamped at -80 before
``exp`` the same way; non-finite columns on a scalar path with the same results). They are C++
compiled at first use (:class:`~pyro_slots._native.NativeExtension`);
``PYRO_SLOTS_FUSED_LOGPROB=0`` turns them off, and where they do not apply the callers keep
torch's operations.
"""

from __future__ import annotations

import math

import torch

from pyro_slots._native import SIMD_PRELUDE, NativeExtension

__all__ = [
    "available",
    "logsumexp_first",
    "logsumexp_first_applies",
    "outer_diag_normal",
    "outer_layout",
]

_SOURCE = (
    SIMD_PRELUDE
    + r"""
#include <ATen/Parallel.h>
#include <limits>
#include <vector>

namespace {
// Points per tile of the log-density kernel: the tile's features, made feature-major, stay in
// L1 while every component reads them.
constexpr int64_t TM = 128;

// Points interleaved (x[b, m, f] at b * sb + m * FF + f) with FF features known at compile
// time: each component's row is one vectorized loop over the points, reading them in place.
template <typename T, int FF>
void outer_rows_fixed(const T* x, int64_t sb, const T* mu, const T* r, const T* c, int64_t A,
                      int64_t B, int64_t M, int64_t b, T* out) {
  const T* xb = x + b * sb;
  for (int64_t a = 0; a < A; ++a) {
    const int64_t ab = a * B + b;
    const T c0 = -c[ab];
    T u[FF], s[FF];
    for (int f = 0; f < FF; ++f) { u[f] = mu[ab * FF + f]; s[f] = r[ab * FF + f]; }
    T* o = out + ab * M;
#pragma GCC ivdep
    for (int64_t i = 0; i < M; ++i) {
      T acc = c0;
#pragma GCC unroll 4
      for (int f = 0; f < FF; ++f) {
        const T d = (xb[i * FF + f] - u[f]) * s[f];
        acc -= d * d;
      }
      o[i] = acc;
    }
  }
}

// Any strides and number of features: a tile of TM points made feature-major, then read by
// every component while it is in L1.
template <typename T>
void outer_rows(const T* x, int64_t sb, int64_t sm, int64_t sf, const T* mu, const T* r,
                const T* c, int64_t A, int64_t B, int64_t M, int64_t F, int64_t b, T* out) {
  std::vector<T> xf(F * TM);
  T acc[TM];
  for (int64_t m0 = 0; m0 < M; m0 += TM) {
    const int64_t n = std::min(TM, M - m0);
    const T* xb = x + b * sb + m0 * sm;
    for (int64_t f = 0; f < F; ++f)
      for (int64_t i = 0; i < n; ++i) xf[f * TM + i] = xb[i * sm + f * sf];
    for (int64_t a = 0; a < A; ++a) {
      const int64_t ab = a * B + b;
      const T c0 = -c[ab];
      for (int64_t i = 0; i < n; ++i) acc[i] = c0;
      for (int64_t f = 0; f < F; ++f) {
        const T u = mu[ab * F + f], s = r[ab * F + f];
        const T* xr = xf.data() + f * TM;
#pragma GCC ivdep
        for (int64_t i = 0; i < n; ++i) {
          const T d = (xr[i] - u) * s;
          acc[i] -= d * d;
        }
      }
      std::memcpy(out + ab * M + m0, acc, n * sizeof(T));
    }
  }
}

template <typename T>
void outer_row(const T* x, int64_t sb, int64_t sm, int64_t sf, const T* mu, const T* r,
               const T* c, int64_t A, int64_t B, int64_t M, int64_t F, int64_t b, T* out) {
  if (sf == 1 && sm == F && F <= 4) {
    switch (F) {
      case 1: return outer_rows_fixed<T, 1>(x, sb, mu, r, c, A, B, M, b, out);
      case 2: return outer_rows_fixed<T, 2>(x, sb, mu, r, c, A, B, M, b, out);
      case 3: return outer_rows_fixed<T, 3>(x, sb, mu, r, c, A, B, M, b, out);
      default: return outer_rows_fixed<T, 4>(x, sb, mu, r, c, A, B, M, b, out);
    }
  }
  outer_rows<T>(x, sb, sm, sf, mu, r, c, A, B, M, F, b, out);
}

// Scalar column n of t (K, N): the torch path's numbers where the column holds NaN or +inf.
void lse_column(float* t, int64_t K, int64_t N, int64_t n, bool probs, float* mx, float* sum) {
  float m = -std::numeric_limits<float>::infinity();
  bool nan = false;
  for (int64_t k = 0; k < K; ++k) {
    const float v = t[k * N + n];
    nan = nan || v != v;
    m = v > m ? v : m;
  }
  const float shift = (nan || !std::isfinite(m)) ? 0.0f : m;
  float s = 0.0f;
  for (int64_t k = 0; k < K; ++k) {
    float d = t[k * N + n] - shift;
    d = d < -80.0f ? -80.0f : d;
    s += std::exp(d);
  }
  if (probs)
    for (int64_t k = 0; k < K; ++k) {
      float d = t[k * N + n] - shift;
      d = d < -80.0f ? -80.0f : d;
      t[k * N + n] = std::exp(d) / s;
    }
  mx[n] = nan ? std::numeric_limits<float>::quiet_NaN() : m;  // the log-sum-exp adds it
  sum[n] = s;
}

void lse_tiles(float* t, int64_t K, int64_t N, int64_t j0, int64_t j1, bool probs, float* mx,
               float* sum) {
  const float log2e = 1.4426950408889634f;
  const vf lo = splat(-80.0f);
  for (int64_t j = j0; j < j1; ++j) {
    const int64_t n = j * L;
    if (n + L > N) {  // the last, partial tile
      for (int64_t i = n; i < N; ++i) lse_column(t, K, N, i, probs, mx, sum);
      continue;
    }
    vf m = splat(-std::numeric_limits<float>::infinity());
    vi special = vi{};
    for (int64_t k = 0; k < K; ++k) {
      const vf v = load(t + k * N + n);
      special |= (vi)(v != v);
      m = v > m ? v : m;
    }
    special |= (vi)(m == std::numeric_limits<float>::infinity());
    uint64_t words[L / 2];
    std::memcpy(words, &special, sizeof(words));
    uint64_t any = 0;
    for (int i = 0; i < L / 2; ++i) any |= words[i];
    if (any) {
      for (int64_t i = n; i < n + L; ++i) lse_column(t, K, N, i, probs, mx, sum);
      continue;
    }
    const vf top = m;  // what the log-sum-exp adds: -inf for a column that is -inf throughout
    m = m == -std::numeric_limits<float>::infinity() ? splat(0.0f) : m;  // shift it by 0
    vf s = vf{};
    for (int64_t k = 0; k < K; ++k) {
      vf d = load(t + k * N + n) - m;
      d = d < lo ? lo : d;
      const vf e = exp2v(d * log2e);
      s += e;
      if (probs) store(t + k * N + n, e);
    }
    if (probs)
      for (int64_t k = 0; k < K; ++k) store(t + k * N + n, load(t + k * N + n) / s);
    store(mx + n, top);
    store(sum + n, s);
  }
}
}  // namespace

torch::Tensor outer_diag_normal(torch::Tensor x, torch::Tensor mu, torch::Tensor r,
                                torch::Tensor c) {
  const int64_t B = x.size(0), M = x.size(1), F = x.size(2), A = mu.size(0);
  auto out = torch::empty({A, B, M}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "outer_diag_normal", [&] {
    const scalar_t *xp = x.data_ptr<scalar_t>(), *mp = mu.data_ptr<scalar_t>(),
                   *rp = r.data_ptr<scalar_t>(), *cp = c.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    const int64_t sb = x.stride(0), sm = x.stride(1), sf = x.stride(2);
    const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(1, A * M));
    at::parallel_for(0, B, grain, [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b)
        outer_row<scalar_t>(xp, sb, sm, sf, mp, rp, cp, A, B, M, F, b, op);
    });
  });
  return out;
}

std::vector<torch::Tensor> logsumexp_first(torch::Tensor t, bool probs) {
  const int64_t K = t.size(0), N = t.size(1);
  auto mx = torch::empty({N}, t.options()), sum = torch::empty({N}, t.options());
  float *tp = t.data_ptr<float>(), *mp = mx.data_ptr<float>(), *sp = sum.data_ptr<float>();
  const int64_t tiles = (N + L - 1) / L;
  const int64_t grain = std::max<int64_t>(1, 4096 / std::max<int64_t>(1, K * L));
  at::parallel_for(0, tiles, grain, [&](int64_t j0, int64_t j1) {
    lse_tiles(tp, K, N, j0, j1, probs, mp, sp);
  });
  return {mx, sum};
}
"""
)

EXTENSION = NativeExtension(
    "fused_logprob",
    _SOURCE,
    ["outer_diag_normal", "logsumexp_first"],
    switch="PYRO_SLOTS_FUSED_LOGPROB",
    what="fused log-density kernel",
)


def available() -> bool:
    """Whether the kernels are built (building them at the first call) and not turned off by
    ``PYRO_SLOTS_FUSED_LOGPROB=0``."""
    return EXTENSION.available()


def _padded(shape, n: int) -> tuple:
    return (1,) * (n - len(shape)) + tuple(shape)


def outer_layout(value_shape, param_shapes) -> tuple | None:
    """``(kinds, shape)``: the broadcast batch shape of points with batch shape ``value_shape``
    and parameters with batch shapes ``param_shapes`` (right-aligned, as torch broadcasts), and
    the kind of each of its dimensions: ``"A"`` (a component: only parameters vary along it),
    ``"B"`` (a datapoint: both do), ``"M"`` (a point: only the points do) or ``""`` (size one);
    ``None`` where the kinds are not in the order components, datapoints, points (the kernel's
    ``(A, B, M)``) or a shape does not broadcast."""
    n = max([len(value_shape)] + [len(s) for s in param_shapes])
    value = _padded(value_shape, n)
    params = [_padded(s, n) for s in param_shapes]
    kinds, full, last = [], [], 0
    for i in range(n):
        size = max([value[i]] + [p[i] for p in params])
        if any(s[i] not in (1, size) for s in [value] + params):
            return None
        full.append(size)
        if size == 1:
            kinds.append("")
            continue
        by_params = any(p[i] == size for p in params)
        kind = ("B" if by_params else "M") if value[i] == size else "A"
        if "ABM".index(kind) < last:
            return None
        last = "ABM".index(kind)
        kinds.append(kind)
    return kinds, tuple(full)


def outer_diag_normal(value, loc, log_scale, const) -> torch.Tensor | None:
    """``-const - ½ Σ_f (value_f - loc_f)² exp(-2 log_scale_f)`` over the last axis, the
    broadcast batch shape of the four, in one pass; ``None`` where the kernel does not apply
    (not built, not the CPU, mixed dtypes, or dimensions not in the order of
    :func:`outer_layout`). No graph: for tensors autograd records nothing for.

    :param value: points ``(..., F)``.
    :param loc: means ``(..., F)`` or ``(..., 1)``.
    :param log_scale: log standard deviations ``(..., F)`` or ``(..., 1)``.
    :param const: ``(...)``, subtracted.
    """
    tensors = (value, loc, log_scale, const)
    if (
        any(t.device.type != "cpu" or t.dtype != value.dtype for t in tensors)
        or value.dtype not in (torch.float32, torch.float64)
        or value.shape[-1] == 0
        or not available()
    ):
        return None
    layout = outer_layout(value.shape[:-1], [loc.shape[:-1], log_scale.shape[:-1], const.shape])
    if layout is None:
        return None
    kinds, full = layout
    sizes = {kind: math.prod(s for s, k in zip(full, kinds) if k == kind) for kind in "ABM"}
    a, b, m, features = sizes["A"], sizes["B"], sizes["M"], value.shape[-1]
    # The parameters over (components, datapoints): 1 along the point dimensions.
    head = tuple(1 if k == "M" else s for s, k in zip(full, kinds))
    mu = loc.expand(head + (features,)).reshape(a, b, features).contiguous()
    root = (-log_scale).exp().mul_(math.sqrt(0.5))
    root = root.expand(head + (features,)).reshape(a, b, features).contiguous()
    c = const.expand(head).reshape(a, b).contiguous()
    out = EXTENSION.module.outer_diag_normal(value.reshape(b, m, features), mu, root, c)
    return out.view(full)


def logsumexp_first_applies(t: torch.Tensor) -> bool:
    """Whether :func:`logsumexp_first` computes for ``t``: float32 on the CPU, contiguous, not
    empty, the kernels built."""
    return (
        t.device.type == "cpu"
        and t.dtype == torch.float32
        and t.dim() >= 1
        and t.numel() > 0
        and t.is_contiguous()
        and available()
    )


def logsumexp_first(t: torch.Tensor, probs: bool = False):
    """``(max, sum)`` over the first axis of float32 ``t`` ``(K, ...)`` on the CPU: the column's
    maximum (NaN where the column holds one; the log-sum-exp is ``log(sum) + max``, ``-inf``
    for a column that is ``-inf`` throughout) and ``Σ_k exp(max(t_k - shift, -80))`` with the
    shift that maximum, 0 where it is not finite,
    each ``t``'s shape without the first axis; with ``probs`` the softmax over the first axis is
    written over ``t``. ``None`` where the kernel does not apply (not built, not float32 on the
    CPU, ``t`` not contiguous). No graph."""
    if not logsumexp_first_applies(t):
        return None
    shape = t.shape[1:]
    mx, total = EXTENSION.module.logsumexp_first(t.view(t.shape[0], -1), bool(probs))
    return mx.view(shape), total.view(shape)
