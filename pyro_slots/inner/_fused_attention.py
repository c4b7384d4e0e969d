"""A fused CPU kernel for slot attention's attention and weighted sums.

:class:`~pyro_slots.inner.slot_attention._AttendPool` computes, per datapoint, the logits of
``K`` queries against ``M`` inputs, their softmax over the slots and the attention-weighted sums
of the inputs; its backward the mirror image. With torch's operations these are batched matrix
products of ``K`` rows each (about 30 GFLOP/s for 7 rows on this project's CPUs) with the
softmax in passes between them. The kernel here makes two passes over each datapoint's inputs,
kept in a blocked feature-major layout ``(batch, M' / L, F, L)`` (:func:`blocked`, made once per
problem; a tile of ``L`` = :func:`tile` inputs is one vector register, 16 floats with AVX-512,
else 8; ``M'`` is ``M`` rounded up to the tile with zero inputs, :func:`padded`): the first
computes a tile's ``K`` logits in vector registers and applies the softmax (in the backward,
the softmax's backward) to them there; the second accumulates the weighted sums over all tiles
in registers, two features at a time, while the datapoint's inputs are still in the cache.

The input LayerNorm that precedes the attention is fused too (:func:`normalize`,
:func:`normalize_backward`, used by
:class:`~pyro_slots.inner.slot_attention._NormalizeShared`): its forward writes the normalized
inputs and their blocked copy in one pass, and its backward sums the inputs' deferred gradient
``Σ_t left_tᵀ right_t`` per input in registers and applies the LayerNorm's backward to it there,
so that gradient is never written.

It is C++ compiled at first use (about half a minute, cached by torch afterwards; GCC's vector
extensions, ``-march=native``, OpenMP over the batch; :class:`~pyro_slots._native.NativeExtension`).
Where it cannot be built (no compiler, no ninja) or does not apply (:func:`supported`),
:class:`_AttendPool` keeps torch's operations; ``PYRO_SLOTS_FUSED_ATTENTION=0`` turns it off.
"""

from __future__ import annotations

import torch
from torch.utils.weak import WeakIdKeyDictionary

from pyro_slots._native import SIMD_PRELUDE, NativeExtension

__all__ = [
    "available", "backward", "blocked", "forward", "gaussian_features", "normalize",
    "normalize_backward",
    "normalize_supported", "padded", "remember_blocked", "supported", "tile",
]  # fmt: skip

#: Inputs per tile of the blocked layout where the kernel is not built (:func:`tile`).
TILE = 8
#: The largest number of slots the kernel is compiled for.
MAX_SLOTS = 16
#: The most features of the fused input LayerNorm (:func:`normalize`), in tiles.
MAX_NORM_VECTORS = 16

_SOURCE = (
    SIMD_PRELUDE
    + r"""
#include <ATen/Parallel.h>
#include <vector>

namespace {
// The dot products w_k . n_m of slots K0..K0+N-1 for two tiles of L inputs at once (each row
// of the inputs loaded once for N slots of both tiles: 2 loads and N broadcasts per 2N FMAs).
template <int K0, int N>
inline void dots2(const float* w, const float* t0, const float* t1, int64_t F, vf* a0, vf* a1) {
  vf x0[N], x1[N];
  for (int k = 0; k < N; ++k) { x0[k] = vf{}; x1[k] = vf{}; }
  for (int64_t f = 0; f < F; ++f) {
    const vf r0 = load(t0 + f * L), r1 = load(t1 + f * L);
#pragma GCC unroll 8
    for (int k = 0; k < N; ++k) {
      const float c = w[(K0 + k) * F + f];
      x0[k] += c * r0;
      x1[k] += c * r1;
    }
  }
  for (int k = 0; k < N; ++k) { a0[K0 + k] = x0[k]; a1[K0 + k] = x1[k]; }
}

// All K slots in groups of at most 4 (2 x 4 accumulators, 2 rows and a broadcast fit the 16
// vector registers of AVX2).
template <int K, int K0 = 0>
inline void dots2_all(const float* w, const float* t0, const float* t1, int64_t F, vf* a0, vf* a1) {
  if constexpr (K0 < K) {
    constexpr int N = (K - K0) < 4 ? (K - K0) : 4;
    dots2<K0, N>(w, t0, t1, F, a0, a1);
    dots2_all<K, K0 + N>(w, t0, t1, F, a0, a1);
  }
}

// Forward epilogue: attn = softmax_K in base 2 + eps, stored (K, M).
// Backward epilogue: g = the products (+ d_attn), p = attn - eps, d_logits = p (g - sum_K p g),
// stored (K, M) with row stride `out_stride` (rows of the caller's left factor).
template <int K, bool BACKWARD>
inline void epilogue(vf* acc, int64_t m, int64_t M, float eps, const float* attn,
                     const float* d_attn, int64_t da_k, int64_t da_m, float* out,
                     int64_t out_stride) {
  if (!BACKWARD) {
    vf mx = acc[0];
    for (int k = 1; k < K; ++k) mx = acc[k] > mx ? acc[k] : mx;
    vf sum = vf{};
    for (int k = 0; k < K; ++k) {
      vf d = acc[k] - mx;
      d = d < -115.4f ? splat(-115.4f) : d;
      acc[k] = exp2v(d);
      sum += acc[k];
    }
    const vf inv = 1.0f / sum;
    for (int k = 0; k < K; ++k) store(out + k * out_stride + m, acc[k] * inv + eps);
  } else {
    vf p[K], s = vf{};
    for (int k = 0; k < K; ++k) {
      if (d_attn != nullptr)  // (an attention sum's gradient is constant along M)
        acc[k] += da_m == 0 ? splat(d_attn[k * da_k]) : load(d_attn + k * da_k + m);
      p[k] = load(attn + k * M + m) - eps;
      acc[k] *= p[k];
      s += acc[k];
    }
    for (int k = 0; k < K; ++k) store(out + k * out_stride + m, acc[k] - p[k] * s);
  }
}

// Pass 1: for every tile of L inputs the K dot products w_k . n_m (two tiles at a time), then
// the epilogue on them while they are in registers.
template <int K, bool BACKWARD>
void rows_pass(const float* w, const float* nb, int64_t M, int64_t F, float eps,
               const float* attn, const float* d_attn, int64_t da_k, int64_t da_m, float* out,
               int64_t out_stride) {
  int64_t m = 0;
  for (; m + 2 * L <= M; m += 2 * L) {
    vf a0[K], a1[K];
    dots2_all<K>(w, nb + m * F, nb + (m + L) * F, F, a0, a1);
    epilogue<K, BACKWARD>(a0, m, M, eps, attn, d_attn, da_k, da_m, out, out_stride);
    epilogue<K, BACKWARD>(a1, m + L, M, eps, attn, d_attn, da_k, da_m, out, out_stride);
  }
  for (; m < M; m += L) {
    const float* tile = nb + m * F;
    vf acc[K];
    for (int k = 0; k < K; ++k) acc[k] = vf{};
    for (int64_t f = 0; f < F; ++f) {
      const vf row = load(tile + f * L);
#pragma GCC unroll 16
      for (int k = 0; k < K; ++k) acc[k] += w[k * F + f] * row;
    }
    epilogue<K, BACKWARD>(acc, m, M, eps, attn, d_attn, da_k, da_m, out, out_stride);
  }
}

// Pass 2: out_k = sum_m a_km n_m for rows a (K, M) with row stride a_stride, two features at a
// time with the K rows' accumulators in registers over all tiles.
template <int K>
void sums_pass(const float* a, int64_t a_stride, const float* nb, int64_t M, int64_t F,
               float* out) {
  for (int64_t f = 0; f < F; f += 2) {
    vf p0[K], p1[K];
    for (int k = 0; k < K; ++k) { p0[k] = vf{}; p1[k] = vf{}; }
    for (int64_t m = 0; m < M; m += L) {
      const vf r0 = load(nb + m * F + f * L), r1 = load(nb + m * F + (f + 1) * L);
#pragma GCC unroll 16
      for (int k = 0; k < K; ++k) {
        const vf ak = load(a + k * a_stride + m);
        p0[k] += ak * r0;
        p1[k] += ak * r1;
      }
    }
    for (int k = 0; k < K; ++k) {
      float s0 = 0.f, s1 = 0.f;
      for (int l = 0; l < L; ++l) { s0 += p0[k][l]; s1 += p1[k][l]; }
      out[k * F + f] = s0;
      out[k * F + f + 1] = s1;
    }
  }
}

template <int K>
void forward_k(const float* q, const float* nb, float* attn, float* pooled, int64_t B,
               int64_t M, int64_t F, float eps) {
  at::parallel_for(0, B, 1, [&](int64_t lo, int64_t hi) {
    for (int64_t b = lo; b < hi; ++b) {
      float* ab = attn + b * K * M;
      rows_pass<K, false>(q + b * K * F, nb + b * M * F, M, F, eps, nullptr, nullptr, 0, 0, ab,
                         M);
      sums_pass<K>(ab, M, nb + b * M * F, M, F, pooled + b * K * F);
    }
  });
}

template <int K>
void backward_k(const float* d_pooled, const float* attn, const float* d_attn, int64_t da_b,
                int64_t da_k, int64_t da_m, const float* nb,
                float* left, float* d_q, int64_t B, int64_t M, int64_t F, float eps,
                bool stacked) {
  at::parallel_for(0, B, 1, [&](int64_t lo, int64_t hi) {
    for (int64_t b = lo; b < hi; ++b) {
      // Rows 0..K-1: d_logits; K..2K-1 (if stacked): the attention.
      float* dl = left + b * (stacked ? 2 : 1) * K * M;
      const float* ab = attn + b * K * M;
      rows_pass<K, true>(d_pooled + b * K * F, nb + b * M * F, M, F, eps, ab,
                         d_attn == nullptr ? nullptr : d_attn + b * da_b, da_k, da_m, dl, M);
      if (stacked) std::memcpy(dl + K * M, ab, sizeof(float) * K * M);
      sums_pass<K>(dl, M, nb + b * M * F, M, F, d_q + b * K * F);
    }
  });
}


// ---- The input LayerNorm n = (h - mean) rstd w + b, fused with the kernel's blocked copy
// (forward) and with the inputs' deferred gradient sum_j left_j^T right_j (backward).

inline float hsum(vf v) { float s = 0.f; for (int l = 0; l < L; ++l) s += v[l]; return s; }

// One datapoint's rows: n (M, F), its blocked copy nb (M / L, F, L) if wanted, mean and rstd.
void norm_forward_rows(const float* h, const float* w, const float* bias, float eps, int64_t M,
                       int64_t F, float* n, float* nb, float* mean, float* rstd) {
  const float inv_f = 1.0f / F;
  for (int64_t m = 0; m < M; ++m) {
    const float* x = h + m * F;
    vf s0 = vf{}, s1 = vf{};
    int64_t f = 0;
    for (; f + 2 * L <= F; f += 2 * L) { s0 += load(x + f); s1 += load(x + f + L); }
    for (; f < F; f += L) s0 += load(x + f);
    const float mu = hsum(s0 + s1) * inv_f;
    s0 = vf{}; s1 = vf{};
    for (f = 0; f + 2 * L <= F; f += 2 * L) {
      const vf d0 = load(x + f) - mu, d1 = load(x + f + L) - mu;
      s0 += d0 * d0; s1 += d1 * d1;
    }
    for (; f < F; f += L) { const vf d = load(x + f) - mu; s0 += d * d; }
    const float rs = 1.0f / std::sqrt(hsum(s0 + s1) * inv_f + eps);
    mean[m] = mu;
    rstd[m] = rs;
    float* out = n + m * F;
    for (f = 0; f < F; f += L)
      store(out + f, (load(x + f) - mu) * rs * load(w + f) + load(bias + f));
    if (nb != nullptr && m % L == L - 1) {
      // The tile's L rows are in the cache: their blocked copy, one feature's column at a time.
      const float* rows = n + (m + 1 - L) * F;
      float* tile = nb + (m + 1 - L) * F;
      for (f = 0; f < F; ++f) {
        vf c;
        for (int l = 0; l < L; ++l) c[l] = rows[l * F + f];
        store(tile + f * L, c);
      }
    }
  }
}

constexpr int NREG =
#ifdef __AVX512F__
    32;
#else
    16;
#endif

// One datapoint's backward: per group of R rows, d_n = sum over the factor pairs of
// left[:, m]^T right (+ extra[m]) in registers, then the LayerNorm's backward on those rows:
// d_h = rstd (g - mean_f(g) - xhat mean_f(g xhat)) with g = d_n w; d_w += d_n xhat, d_b += d_n.
template <int NV, int R>
void norm_backward_rows(const float* h, const float* mean, const float* rstd, const float* w,
                        const float* const* lefts, const float* const* rights,
                        const int64_t* rows, int64_t pairs, const float* extra, int64_t M,
                        float* dh, vf* dw, vf* db) {
  constexpr int64_t F = NV * L;
  constexpr float inv_f = 1.0f / F;
  for (int64_t m = 0; m < M; m += R) {
    vf acc[R][NV];
    for (int r = 0; r < R; ++r)
      for (int v = 0; v < NV; ++v) acc[r][v] = vf{};
    for (int64_t p = 0; p < pairs; ++p) {
      const float* lp = lefts[p] + m;
      const float* rp = rights[p];
      for (int64_t j = 0; j < rows[p]; ++j) {
        float c[R];
        for (int r = 0; r < R; ++r) c[r] = lp[j * M + r];
#pragma GCC unroll 16
        for (int v = 0; v < NV; ++v) {
          const vf rv = load(rp + j * F + v * L);
          for (int r = 0; r < R; ++r) acc[r][v] += c[r] * rv;
        }
      }
    }
    for (int r = 0; r < R; ++r) {
      const int64_t row = m + r;
      const float* x = h + row * F;
      const float mu = mean[row], rs = rstd[row];
      vf s1 = vf{}, s2 = vf{};
      for (int v = 0; v < NV; ++v) {
        if (extra != nullptr) acc[r][v] += load(extra + row * F + v * L);
        const vf xh = (load(x + v * L) - mu) * rs;
        db[v] += acc[r][v];
        dw[v] += acc[r][v] * xh;
        const vf g = acc[r][v] * load(w + v * L);
        s1 += g;
        s2 += g * xh;
      }
      const float a = hsum(s1) * inv_f, c = hsum(s2) * inv_f;
      for (int v = 0; v < NV; ++v) {
        const vf xh = (load(x + v * L) - mu) * rs;
        store(dh + row * F + v * L, rs * (acc[r][v] * load(w + v * L) - a - xh * c));
      }
    }
  }
}

template <int NV>
void norm_backward_nv(const float* h, const float* mean, const float* rstd, const float* w,
                      const std::vector<const float*>& lefts,
                      const std::vector<const float*>& rights, const std::vector<int64_t>& rows,
                      const float* extra, int64_t B, int64_t M, float* dh, float* dw_out,
                      float* db_out) {
  // Rows per group: R x NV accumulators, a row of the right factor and R broadcasts in registers.
  constexpr int R = (4 * NV + 3 <= NREG) ? 4 : (2 * NV + 3 <= NREG) ? 2 : 1;
  constexpr int64_t F = NV * L;
  const int64_t pairs = rows.size();
  // Each datapoint's dw and db, summed in the datapoints' order afterwards: the same result
  // whatever the threads and their order.
  std::vector<float> parts(B * 2 * F);
  at::parallel_for(0, B, 1, [&](int64_t lo, int64_t hi) {
    std::vector<const float*> lb(pairs), rb(pairs);
    for (int64_t b = lo; b < hi; ++b) {
      vf dw[NV], db[NV];
      for (int v = 0; v < NV; ++v) { dw[v] = vf{}; db[v] = vf{}; }
      for (int64_t p = 0; p < pairs; ++p) {
        lb[p] = lefts[p] + b * rows[p] * M;
        rb[p] = rights[p] + b * rows[p] * F;
      }
      norm_backward_rows<NV, R>(h + b * M * F, mean + b * M, rstd + b * M, w, lb.data(),
                                rb.data(), rows.data(), pairs,
                                extra == nullptr ? nullptr : extra + b * M * F, M,
                                dh + b * M * F, dw, db);
      for (int v = 0; v < NV; ++v) {
        store(parts.data() + b * 2 * F + v * L, dw[v]);
        store(parts.data() + b * 2 * F + F + v * L, db[v]);
      }
    }
  });
  for (int64_t b = 0; b < B; ++b)
    for (int64_t f = 0; f < F; ++f) {
      dw_out[f] += parts[b * 2 * F + f];
      db_out[f] += parts[b * 2 * F + F + f];
    }
}

#define PYRO_SLOTS_DISPATCH(K_, CALL) \
  switch (K_) { \
    case 1: CALL(1); break; case 2: CALL(2); break; case 3: CALL(3); break; \
    case 4: CALL(4); break; case 5: CALL(5); break; case 6: CALL(6); break; \
    case 7: CALL(7); break; case 8: CALL(8); break; case 9: CALL(9); break; \
    case 10: CALL(10); break; case 11: CALL(11); break; case 12: CALL(12); break; \
    case 13: CALL(13); break; case 14: CALL(14); break; case 15: CALL(15); break; \
    case 16: CALL(16); break; \
    default: TORCH_CHECK(false, "expected 1..16 slots or feature vectors"); }
}  // namespace

std::vector<torch::Tensor> attend_forward(torch::Tensor q, torch::Tensor nb, double eps) {
  const int64_t B = q.size(0), K = q.size(1), F = q.size(2), M = nb.size(1) * nb.size(3);
  TORCH_CHECK(nb.size(3) == L && F % 2 == 0, "attend_forward: expected (B, M / tile, F, tile)");
  auto attn = torch::empty({B, K, M}, q.options());
  auto pooled = torch::empty({B, K, F}, q.options());
#define PYRO_SLOTS_FORWARD(k) forward_k<k>(q.data_ptr<float>(), nb.data_ptr<float>(), \
    attn.data_ptr<float>(), pooled.data_ptr<float>(), B, M, F, (float)eps)
  PYRO_SLOTS_DISPATCH(K, PYRO_SLOTS_FORWARD)
  return {attn, pooled};
}

std::vector<torch::Tensor> attend_backward(torch::Tensor d_pooled, torch::Tensor attn,
                                           c10::optional<torch::Tensor> d_attn,
                                           torch::Tensor nb, double eps, bool stacked) {
  const int64_t B = attn.size(0), K = attn.size(1), M = attn.size(2), F = d_pooled.size(2);
  TORCH_CHECK(nb.size(3) == L && M % L == 0, "attend_backward: expected (B, M / tile, F, tile)");
  auto left = torch::empty({B, stacked ? 2 * K : K, M}, attn.options());
  auto d_q = torch::empty({B, K, F}, attn.options());
  const float* da = d_attn.has_value() ? d_attn->data_ptr<float>() : nullptr;
  const int64_t da_b = da ? d_attn->stride(0) : 0, da_k = da ? d_attn->stride(1) : 0;
  const int64_t da_m = da ? d_attn->stride(2) : 0;
#define PYRO_SLOTS_BACKWARD(k) backward_k<k>(d_pooled.data_ptr<float>(), attn.data_ptr<float>(), \
    da, da_b, da_k, da_m, nb.data_ptr<float>(), left.data_ptr<float>(), d_q.data_ptr<float>(), \
    B, M, F, (float)eps, stacked)
  PYRO_SLOTS_DISPATCH(K, PYRO_SLOTS_BACKWARD)
  return {d_q, left};
}

int64_t tile() { return L; }

namespace {
// Σ_m r[m] (center = 0 and plain) or Σ_m (r[m] - center)^2 over a row of n floats: L lanes of
// float partial sums, added in double.
inline double row_sum(const float* r, int64_t n, float center, bool squares) {
  vf acc = vf{};
  const vf c = splat(center);
  int64_t m = 0;
  for (; m + L <= n; m += L) {
    const vf v = load(r + m) - c;
    acc += squares ? v * v : v;
  }
  double total = 0.0;
  for (int i = 0; i < L; ++i) total += acc[i];
  for (; m < n; ++m) {
    const double v = static_cast<double>(r[m] - center);
    total += squares ? v * v : v;
  }
  return total;
}
}  // namespace

// GaussianFeatures without a graph: per datapoint the mean and unbiased variance of the D
// features of its M points (row_sum), z = (x - mean) / (std + eps), and the 2D + 1
// features (1, z, z^2) written feature-major (B, 2D + 1, M) and, with `blocked`, in the
// attention kernel's padded blocked layout (B, M' / L, F', L) from the same pass.
std::vector<torch::Tensor> gaussian_features(torch::Tensor x, double eps, bool blocked) {
  TORCH_CHECK(x.dim() == 3 && x.is_contiguous(), "gaussian_features: expected (B, M, D)");
  const int64_t B = x.size(0), M = x.size(1), D = x.size(2), F = 2 * D + 1, Fp = F + F % 2;
  const int64_t tiles = (M + L - 1) / L;
  auto features = torch::empty({B, F, M}, x.options());
  auto nb = torch::empty({blocked ? B : 0, tiles, Fp, L}, x.options());
  auto mean = torch::empty({B, 1, D}, x.options()), scale = torch::empty({B, 1, D}, x.options());
  const float* xp = x.data_ptr<float>();
  float *fp = features.data_ptr<float>(), *np = nb.data_ptr<float>();
  float *mp = mean.data_ptr<float>(), *sp = scale.data_ptr<float>();
  at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const float* xb = xp + b * M * D;
      float* fb = fp + b * F * M;
      for (int64_t d = 0; d < D; ++d) {
        float* z = fb + (1 + d) * M;
        float* z2 = fb + (1 + D + d) * M;
        for (int64_t m = 0; m < M; ++m) z[m] = xb[m * D + d];  // the feature's row
        const float mu = static_cast<float>(row_sum(z, M, 0.0f, false) / static_cast<double>(M));
        const double dev = row_sum(z, M, mu, true);
        const float var = static_cast<float>(dev / static_cast<double>(M > 1 ? M - 1 : 1));
        const float sc = std::sqrt(var) + static_cast<float>(eps);
        mp[b * D + d] = mu;
        sp[b * D + d] = sc;
        for (int64_t m = 0; m < M; ++m) {
          const float v = (z[m] - mu) / sc;
          z[m] = v;
          z2[m] = v * v;
        }
      }
      for (int64_t m = 0; m < M; ++m) fb[m] = 1.0f;
      if (!blocked) continue;
      float* nbb = np + b * tiles * Fp * L;
      const int64_t full = M / L;
      for (int64_t j = 0; j < full; ++j) {
        for (int64_t f = 0; f < F; ++f) store(nbb + (j * Fp + f) * L, load(fb + f * M + j * L));
        for (int64_t f = F; f < Fp; ++f) store(nbb + (j * Fp + f) * L, vf{});
      }
      for (int64_t j = full; j < tiles; ++j)
        for (int64_t f = 0; f < Fp; ++f)
          for (int64_t i = 0; i < L; ++i) {
            const int64_t m = j * L + i;
            nbb[(j * Fp + f) * L + i] = (m < M && f < F) ? fb[f * M + m] : 0.0f;
          }
    }
  });
  return {features, nb, mean, scale};
}

std::vector<torch::Tensor> norm_forward(torch::Tensor h, torch::Tensor w, torch::Tensor bias,
                                        double eps, bool blocked) {
  const int64_t B = h.size(0), M = h.size(1), F = h.size(2);
  TORCH_CHECK(F % L == 0 && M % L == 0, "norm_forward: M and F must be multiples of the tile");
  auto n = torch::empty_like(h);
  auto nb = blocked ? torch::empty({B, M / L, F, L}, h.options()) : torch::empty({0}, h.options());
  auto mean = torch::empty({B, M}, h.options());
  auto rstd = torch::empty({B, M}, h.options());
  const float *hp = h.data_ptr<float>(), *wp = w.data_ptr<float>(), *bp = bias.data_ptr<float>();
  float *np_ = n.data_ptr<float>(), *nbp = blocked ? nb.data_ptr<float>() : nullptr;
  float *mp = mean.data_ptr<float>(), *rp = rstd.data_ptr<float>();
  at::parallel_for(0, B, 1, [&](int64_t lo, int64_t hi) {
    for (int64_t b = lo; b < hi; ++b)
      norm_forward_rows(hp + b * M * F, wp, bp, (float)eps, M, F, np_ + b * M * F,
                        nbp == nullptr ? nullptr : nbp + b * M * F, mp + b * M, rp + b * M);
  });
  return {n, nb, mean, rstd};
}

std::vector<torch::Tensor> norm_backward(torch::Tensor h, torch::Tensor mean, torch::Tensor rstd,
                                         torch::Tensor w, std::vector<torch::Tensor> lefts,
                                         std::vector<torch::Tensor> rights,
                                         c10::optional<torch::Tensor> extra) {
  const int64_t B = h.size(0), M = h.size(1), F = h.size(2);
  TORCH_CHECK(F % L == 0 && M % L == 0, "norm_backward: M and F must be multiples of the tile");
  auto dh = torch::empty_like(h);
  auto dw = torch::zeros({F}, h.options());
  auto db = torch::zeros({F}, h.options());
  std::vector<const float*> lp, rp;
  std::vector<int64_t> rows;
  for (size_t i = 0; i < lefts.size(); ++i) {
    lp.push_back(lefts[i].data_ptr<float>());
    rp.push_back(rights[i].data_ptr<float>());
    rows.push_back(lefts[i].size(1));
  }
  const float* ep = extra.has_value() ? extra->data_ptr<float>() : nullptr;
#define PYRO_SLOTS_NORM_BACKWARD(nv) norm_backward_nv<nv>(h.data_ptr<float>(), \
    mean.data_ptr<float>(), rstd.data_ptr<float>(), w.data_ptr<float>(), lp, rp, rows, ep, B, M, \
    dh.data_ptr<float>(), dw.data_ptr<float>(), db.data_ptr<float>())
  PYRO_SLOTS_DISPATCH(F / L, PYRO_SLOTS_NORM_BACKWARD)
  return {dh, dw, db};
}

"""
)

EXTENSION = NativeExtension(
    "fused_attention",
    _SOURCE,
    [
        "attend_forward",
        "attend_backward",
        "norm_forward",
        "norm_backward",
        "tile",
        "gaussian_features",
    ],
    switch="PYRO_SLOTS_FUSED_ATTENTION",
    what="fused attention kernel",
)
_blocked_cache = WeakIdKeyDictionary()
_tile: dict = {}


def available() -> bool:
    """Whether the kernel is built (building it at the first call) and not turned off by
    ``PYRO_SLOTS_FUSED_ATTENTION=0`` (:class:`~pyro_slots._native.NativeExtension`)."""
    return EXTENSION.available()


def tile() -> int:
    """Inputs per tile of the kernel's blocked layout ``(batch, M / tile, F, tile)``: one vector
    register, 16 floats where the CPU has AVX-512, else 8 (:data:`TILE` where the kernel is
    not built)."""
    module = EXTENSION.module
    if module is None:
        return TILE
    if module not in _tile:
        _tile[module] = int(module.tile())
    return _tile[module]


def supported(q: torch.Tensor, n: torch.Tensor) -> bool:
    """Whether the kernel applies to queries ``q`` ``(batch, heads, K, F)`` and inputs ``n``
    ``(batch, M, F)``: float32 on the CPU, one head, ``K <= 16`` and ``M > 0`` (else torch's
    operations run). ``M`` need not be a multiple of :func:`tile` nor ``F`` even (the kernel
    takes two features at a time): the blocked copy is padded with zero inputs
    (:func:`padded`) and a zero feature, which the callers of :func:`forward` and
    :func:`backward` add to the queries and drop from the sums."""
    return (
        q.device.type == "cpu"
        and n.device.type == "cpu"
        and q.dtype == torch.float32
        and n.dtype == torch.float32
        and q.shape[1] == 1
        and 1 <= q.shape[2] <= MAX_SLOTS
        and n.shape[1] > 0
        and available()
    )


def padded(num_inputs: int) -> int:
    """``num_inputs`` rounded up to a multiple of :func:`tile`: the inputs the kernel runs on.

    The padding inputs are zero vectors: their logits are zero, so their attention (``1 / K``,
    in the kernel's buffers only) adds nothing to the weighted sums, and in the backward their
    logits' gradient multiplies zero inputs, so it adds nothing to the queries' gradient
    either. The caller sees the first ``num_inputs`` columns.
    """
    size = tile()
    return -(-num_inputs // size) * size


def blocked(n: torch.Tensor) -> torch.Tensor:
    """``n`` ``(batch, M, F)`` in the kernel's layout ``(batch, M' / tile, F', tile)``, zero
    inputs appended up to ``M' =`` :func:`padded` ``(M)`` and a zero feature to an odd ``F``
    (``F' = F + F % 2``), without its graph, made once per tensor (and version): the inner loop
    attends over the same inputs at every step."""
    version = None if n.is_inference() else n._version
    entry = _blocked_cache.get(n)
    if entry is not None and entry[0] == version:
        return entry[1]
    batch, num_inputs, features = n.shape
    with torch.no_grad():
        size, total = tile(), padded(num_inputs)
        source, extra = n.detach(), features % 2
        if total == num_inputs and not extra:  # one copy, transposing every tile
            out = source.reshape(batch, total // size, size, features).transpose(2, 3)
            out = out.contiguous()
        else:  # zeros, then one copy of the full tiles and one of the last, partial one
            out = source.new_zeros(batch, total // size, features + extra, size)
            full = num_inputs // size
            if full:
                tiles = source[:, : full * size].reshape(batch, full, size, features)
                out[:, :full, :features].copy_(tiles.transpose(2, 3))
            if num_inputs > full * size:
                out[:, full, :features, : num_inputs - full * size].copy_(
                    source[:, full * size :].transpose(1, 2)
                )
    _blocked_cache[n] = (version, out)
    return out


def forward(q: torch.Tensor, nb: torch.Tensor, eps: float):
    """``(attn (B, K, M'), pooled (B, K, F))`` for base-2 queries ``q`` ``(B, K, F)`` and the
    blocked inputs ``nb`` of :func:`blocked` (``M'`` inputs, the padded ones included)."""
    return EXTENSION.module.attend_forward(q.contiguous(), nb, float(eps))


def backward(d_pooled, attn, d_attn, nb, eps: float, stacked: bool = True):
    """``(d_q (B, K, F), left (B, 2K, M'))``: the queries' gradient and the left factor
    ``[d_logits; attn]`` of the inputs' gradient, from ``d_pooled`` ``(B, K, F)``, the
    attention ``(B, K, M')`` of :func:`forward` (with ``eps``) and its gradient ``(B, K, M)``
    (or ``None``; zero on the padding inputs); without ``stacked`` ``left`` is ``d_logits``
    alone ``(B, K, M')`` (the attention not copied under it)."""
    total = attn.shape[-1]
    if d_attn is not None and d_attn.shape[-1] != total and d_attn.stride(-1) != 0:
        d_attn = torch.nn.functional.pad(d_attn, (0, total - d_attn.shape[-1]))
    elif d_attn is not None and d_attn.shape[-1] != total:  # constant along M: any length
        d_attn = d_attn[..., :1].expand(*d_attn.shape[:-1], total)
    if d_attn is not None and d_attn.stride(-1) not in (0, 1):
        d_attn = d_attn.contiguous()  # else read in place: contiguous along M, or constant there
    return EXTENSION.module.attend_backward(
        d_pooled.contiguous(), attn.contiguous(), d_attn, nb, float(eps), bool(stacked)
    )


def normalize_supported(h: torch.Tensor, weight, bias) -> bool:
    """Whether :func:`normalize` applies to inputs ``h`` ``(batch, M, F)`` and a LayerNorm's
    ``weight`` and ``bias`` ``(F,)``: float32 on the CPU, ``F`` a multiple of :func:`tile` up
    to :data:`MAX_NORM_VECTORS` tiles and ``M`` a positive multiple of :func:`tile`."""
    features = h.shape[-1]
    return (
        h.dim() == 3
        and h.device.type == "cpu"
        and h.dtype == torch.float32
        and h.shape[1] > 0
        and all(
            t is not None and t.shape == (features,) and t.dtype == h.dtype and t.device == h.device
            for t in (weight, bias)
        )
        and available()
        and features % tile() == 0
        and 0 < features <= MAX_NORM_VECTORS * tile()
        and h.shape[1] % tile() == 0
    )


def normalize(h: torch.Tensor, weight, bias, eps: float, blocked: bool = True):
    """``LayerNorm(h)`` over the last dimension in one pass over ``h`` ``(B, M, F)``:
    ``(n (B, M, F), nb, mean (B, M), rstd (B, M))`` with ``nb`` the kernel's blocked copy of ``n``
    (:func:`blocked`'s layout; an empty tensor without ``blocked``). No graph."""
    return EXTENSION.module.norm_forward(
        h.detach().contiguous(), weight.detach().contiguous(), bias.detach().contiguous(),
        float(eps), bool(blocked),
    )  # fmt: skip


def normalize_backward(h, mean, rstd, weight, factors, extra=None):
    """``(d_h, d_weight, d_bias)`` of :func:`normalize` for the gradient of ``n``
    ``Σ_i left_iᵀ right_i (+ extra)``, from the factors ``[(left (B, J_i, M), right (B, J_i, F))]``
    that :class:`~pyro_slots.inner.slot_attention._AttendPool` leaves, summed per input in
    registers and put through the LayerNorm's backward there (no ``(B, M, F)`` gradient of ``n``
    written or read). No graph."""
    lefts = [left.detach().contiguous() for left, _ in factors]
    rights = [right.detach().contiguous() for _, right in factors]
    if extra is not None:
        extra = extra.detach().contiguous()
    return EXTENSION.module.norm_backward(
        h.detach().contiguous(), mean, rstd, weight.detach().contiguous(), lefts, rights, extra
    )


def gaussian_features(x: torch.Tensor, eps: float, blocked: bool):
    """:meth:`~pyro_slots.inner.slot_attention.GaussianFeatures.standardize` without a graph in
    one pass over float32 points ``x`` ``(B, M, D)`` on the CPU: ``(features, mean, scale)`` as
    it returns them (the features a ``(B, M, 2D + 1)`` view of a feature-major tensor), with
    ``blocked`` the kernel's blocked copy of the features remembered for :func:`blocked`.
    ``None`` where the kernel is not built or ``x`` is not float32 on the CPU."""
    if x.device.type != "cpu" or x.dtype != torch.float32 or x.dim() != 3 or not available():
        return None
    features, nb, mean, scale = EXTENSION.module.gaussian_features(
        x.detach().contiguous(), float(eps), bool(blocked)
    )
    n = features.transpose(1, 2)
    if blocked:
        remember_blocked(n, nb)
    return n, mean, scale


def remember_blocked(n: torch.Tensor, nb: torch.Tensor) -> None:
    """Keeps ``nb`` as :func:`blocked`'s copy of ``n`` (made by :func:`normalize`)."""
    _blocked_cache[n] = (None if n.is_inference() else n._version, nb)
