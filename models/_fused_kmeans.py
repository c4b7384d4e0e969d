"""A C++ CPU kernel for :func:`~pyro_slots.models.gmm.kmeans_plus_plus`'s discrete part.

Greedy k-means++ seeding, the Lloyd iterations and the final hard assignment make a few dozen
passes over each datapoint's ``M`` points with only ``K`` centers and ``D`` features each; as
torch operations every pass is a separate ``(B, T or K, M)`` tensor (the candidates' distances,
their ``cumsum``, ``searchsorted``, ``minimum``, the assignment's scores and one-hot
memberships), about 20 ms for 1,536 sets of 500 points. The kernel runs the same algorithm per
datapoint with the datapoint's points in the cache (OpenMP over the batch), on the same random
numbers, and returns what the torch path would: the seeds, the final assignment and centers,
and, where no gradient is wanted, the cluster statistics themselves. The choices are the same
as the torch path's up to rounding: distances are summed directly (not as
``|c|² - 2 c·x + |x|²``), sums and potentials are accumulated in double precision, so a
near-tie can go the other way.

Built at first use (:class:`~pyro_slots._native.NativeExtension`); ``PYRO_SLOTS_FUSED_KMEANS=0``
turns it off (torch's operations run, as where it cannot be built).
"""

from __future__ import annotations

import torch

from pyro_slots._native import NativeExtension

__all__ = ["available", "kmeans", "supported"]

_SOURCE = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

namespace {

// Squared distances of the D x M feature-major points x to center c, into out[M].
template <typename T>
inline void distances(const T* x, const T* c, int64_t D, int64_t M, T* out) {
  const T c0 = c[0];
#pragma omp simd
  for (int64_t m = 0; m < M; ++m) {
    const T d = x[m] - c0;
    out[m] = d * d;
  }
  for (int64_t d = 1; d < D; ++d) {
    const T* row = x + d * M;
    const T cd = c[d];
#pragma omp simd
    for (int64_t m = 0; m < M; ++m) {
      const T e = row[m] - cd;
      out[m] += e * e;
    }
  }
}

// The nearest of the K centers (K x D) for every point, ties to the lower index; work: K x M.
template <typename T>
inline void assign(const T* x, const T* centers, int64_t K, int64_t D, int64_t M, T* work,
                   int32_t* nearest) {
  distances(x, centers, D, M, work);
  std::fill(nearest, nearest + M, 0);
  for (int64_t k = 1; k < K; ++k) {
    T* row = work + M;
    distances(x, centers + k * D, D, M, row);
#pragma omp simd
    for (int64_t m = 0; m < M; ++m) {
      const bool closer = row[m] < work[m];
      work[m] = closer ? row[m] : work[m];
      nearest[m] = closer ? (int32_t)k : nearest[m];
    }
  }
}

// Per cluster: the number of points and the sums of the features, each a masked vector
// reduction in T (a scatter-add by the cluster index is a chain of dependent loads and stores;
// a reduction in double of float points does not vectorize as well).
template <typename T>
inline void cluster_sums(const T* x, const int32_t* nearest, int64_t K, int64_t D, int64_t M,
                         double* counts, double* sums) {
  for (int64_t k = 0; k < K; ++k) {
    T n = 0;
    const int32_t kk = (int32_t)k;
#pragma omp simd reduction(+ : n)
    for (int64_t m = 0; m < M; ++m) n += nearest[m] == kk ? T(1) : T(0);
    counts[k] = n;
    for (int64_t d = 0; d < D; ++d) {
      const T* row = x + d * M;
      T s = 0;
#pragma omp simd reduction(+ : s)
      for (int64_t m = 0; m < M; ++m) s += nearest[m] == kk ? row[m] : T(0);
      sums[k * D + d] = s;
    }
  }
}

// The first m with sum_{i <= m} w_i >= value (searchsorted's left side over the cumulative
// sums, in double), from the sums before each block of 16 (prefix) and the weights w.
inline int64_t search(const double* prefix, int64_t nblocks, int64_t M, double value,
                      const double* w) {
  int64_t b = 0;
  while (b < nblocks - 1 && prefix[b + 1] < value) ++b;
  double acc = prefix[b];
  const int64_t end = std::min<int64_t>(M, (b + 1) * 16);
  for (int64_t m = b * 16; m < end; ++m) {
    acc += w[m];
    if (acc >= value) return m;
  }
  return M - 1;
}

// One thread's working memory, reused from datapoint to datapoint (resized, never re-zeroed:
// every element is written before it is read).
template <typename T>
struct Buffers {
  std::vector<T> xs, closest, cand, work, centers, point;
  std::vector<double> ref, w, prefix, sums, counts, mean;
  std::vector<int64_t> idx;
  std::vector<int32_t> previous;
};

template <typename T>
void kmeans_one(const T* xin, int64_t D, int64_t M, int64_t K, int64_t first, const T* u,
                int64_t trials, int64_t lloyd, bool stats, int32_t* nearest, int64_t* seeds,
                T* centers_out, T* loc, T* log_scale, T* logit, Buffers<T>& buf) {
  // The points feature-major and about their mean (as kmeans_plus_plus's torch path).
  auto& xs = buf.xs;
  auto& ref = buf.ref;
  xs.resize(D * M);
  ref.resize(D);
  for (int64_t d = 0; d < D; ++d) {
    double s = 0.0;
#pragma omp simd reduction(+ : s)
    for (int64_t m = 0; m < M; ++m) s += xin[m * D + d];
    ref[d] = s / (double)M;
    const T r = (T)ref[d];
    for (int64_t m = 0; m < M; ++m) xs[d * M + m] = xin[m * D + d] - r;
  }
  const T* x = xs.data();
  const int64_t nblocks = (M + 15) / 16;
  auto &closest = buf.closest, &cand = buf.cand, &work = buf.work, &centers = buf.centers;
  auto &point = buf.point;
  auto &w = buf.w, &prefix = buf.prefix;
  auto& idx = buf.idx;
  closest.resize(M), cand.resize(trials * M), work.resize(2 * M), centers.resize(K * D);
  point.resize(D), w.resize(M), prefix.resize(nblocks), idx.resize(trials);
  auto column = [&](int64_t i, T* out) {
    for (int64_t d = 0; d < D; ++d) out[d] = x[d * M + i];
  };
  // Greedy k-means++: the first seed given, each later one the best of `trials` candidates
  // drawn with probability proportional to the squared distance to the nearest seed so far.
  seeds[0] = first;
  column(first, centers.data());
  distances(x, centers.data(), D, M, closest.data());
  for (int64_t k = 1; k < K; ++k) {
    double total = 0.0;
    for (int64_t b = 0; b < nblocks; ++b) {
      const int64_t lo = b * 16, hi = std::min<int64_t>(M, lo + 16);
      double s = 0.0;
#pragma omp simd reduction(+ : s)
      for (int64_t m = lo; m < hi; ++m) {
        w[m] = (double)(T)(closest[m] + (T)1e-12);
        s += w[m];
      }
      prefix[b] = total;
      total += s;
    }
    int64_t best = 0;
    double best_potential = std::numeric_limits<double>::infinity();
    for (int64_t t = 0; t < trials; ++t) {
      const double value = (double)(u[(k - 1) * trials + t] * (T)total);
      idx[t] = search(prefix.data(), nblocks, M, value, w.data());
      column(idx[t], point.data());
      T* row = cand.data() + t * M;
      distances(x, point.data(), D, M, row);
      double potential = 0.0;
#pragma omp simd reduction(+ : potential)
      for (int64_t m = 0; m < M; ++m) {
        row[m] = row[m] < closest[m] ? row[m] : closest[m];
        potential += row[m];
      }
      if (potential < best_potential) { best_potential = potential; best = t; }
    }
    seeds[k] = idx[best];
    column(idx[best], centers.data() + k * D);
    std::copy(cand.begin() + best * M, cand.begin() + (best + 1) * M, closest.begin());
  }
  auto write_centers = [&]() {
    for (int64_t k = 0; k < K; ++k)
      for (int64_t d = 0; d < D; ++d) centers_out[k * D + d] = (T)(centers[k * D + d] + ref[d]);
  };
  if (lloyd < 0) {  // the seeds; with stats, the pooled scales and equal weights beside them
    write_centers();
    if (!stats) return;
    const double denominator = M > 1 ? (double)(M - 1) : 1.0;
    for (int64_t d = 0; d < D; ++d) {
      const T* row = x + d * M;
      T squares = 0;
#pragma omp simd reduction(+ : squares)
      for (int64_t m = 0; m < M; ++m) squares += row[m] * row[m];
      double v = squares / denominator;
      v = v > std::numeric_limits<T>::min() ? v : (double)std::numeric_limits<T>::min();
      for (int64_t k = 0; k < K; ++k) {
        loc[k * D + d] = centers_out[k * D + d];
        log_scale[k * D + d] = (T)(0.5 * std::log(v));
      }
    }
    for (int64_t k = 0; k < K; ++k) logit[k] = 0;
    return;
  }
  // Lloyd's iterations from the seeds, stopping at a fixed point of the assignment.
  auto& previous = buf.previous;
  auto &sums = buf.sums, &counts = buf.counts;
  previous.resize(M), sums.resize(K * D), counts.resize(K);
  for (int64_t step = 0;; ++step) {
    assign(x, centers.data(), K, D, M, work.data(), nearest);
    if (step == lloyd || (step > 0 && std::equal(nearest, nearest + M, previous.begin()))) break;
    std::copy(nearest, nearest + M, previous.begin());
    cluster_sums(x, nearest, K, D, M, counts.data(), sums.data());
    for (int64_t k = 0; k < K; ++k)
      if (counts[k] > 0)
        for (int64_t d = 0; d < D; ++d) centers[k * D + d] = (T)(sums[k * D + d] / counts[k]);
  }
  write_centers();
  if (!stats) return;
  // The final assignment's cluster means, variances and smoothed weights (kmeans_plus_plus's
  // formulas): an empty cluster keeps its center, a cluster of fewer than two points takes
  // the pooled variance, every variance at least 1e-6 of the pooled one.
  cluster_sums(x, nearest, K, D, M, counts.data(), sums.data());
  auto& mean = buf.mean;
  mean.resize(K * D);
  for (int64_t k = 0; k < K; ++k)
    for (int64_t d = 0; d < D; ++d)
      mean[k * D + d] = counts[k] > 0 ? sums[k * D + d] / counts[k] : (double)centers[k * D + d];
  const double denominator = M > 1 ? (double)(M - 1) : 1.0;
  for (int64_t d = 0; d < D; ++d) {
    const T* row = x + d * M;
    T squares = 0;
#pragma omp simd reduction(+ : squares)
    for (int64_t m = 0; m < M; ++m) squares += row[m] * row[m];
    const double pooled = squares / denominator;
    const double floor = 1e-6 * (pooled > 1e-12 ? pooled : 1e-12);
    for (int64_t k = 0; k < K; ++k) {
      const int32_t kk = (int32_t)k;
      const double c = mean[k * D + d];
      const T ct = (T)c;
      T deviations = 0;
#pragma omp simd reduction(+ : deviations)
      for (int64_t m = 0; m < M; ++m) {
        const T e = row[m] - ct;
        deviations += nearest[m] == kk ? e * e : T(0);
      }
      double v = counts[k] > 1 ? deviations / counts[k] : pooled;
      v = v > floor ? v : floor;
      loc[k * D + d] = (T)(c + ref[d]);
      log_scale[k * D + d] = (T)(0.5 * std::log(v));
    }
  }
  for (int64_t k = 0; k < K; ++k) logit[k] = (T)std::log((counts[k] + 1.0) / (double)(M + K));
}

}  // namespace

// x: (B, M, D) points, first: (B,) int64, u: (B, K - 1, T) uniforms, lloyd: Lloyd iterations
// (-1: the seeds only), stats: whether to return the statistics (with lloyd = -1: the seeds
// with the pooled scales and equal weights).
// Returns [seeds (B, K) int64, nearest (B, M) int64, centers (B, K, D), loc, log_scale
// (B, K, D), logit (B, K)]; what was not asked for is empty.
std::vector<torch::Tensor> kmeans(torch::Tensor x, torch::Tensor first, torch::Tensor u,
                                  int64_t K, int64_t lloyd, bool stats) {
  TORCH_CHECK(x.dim() == 3 && x.is_contiguous() && x.device().is_cpu(), "kmeans: x must be a "
              "contiguous (B, M, D) CPU tensor");
  const int64_t B = x.size(0), M = x.size(1), D = x.size(2);
  TORCH_CHECK(D > 0 && M > 0 && K >= 1 && K <= M, "kmeans: needs 1 <= K <= M and D > 0");
  TORCH_CHECK(first.dtype() == torch::kInt64 && first.is_contiguous() && first.numel() == B,
              "kmeans: first must be (B,) int64");
  TORCH_CHECK(u.dim() == 3 && u.size(0) == B && u.size(1) == K - 1 && u.size(2) >= 1
              && u.is_contiguous() && u.dtype() == x.dtype(),
              "kmeans: u must be (B, K - 1, trials) like x");
  const int64_t trials = u.size(2);
  auto opts = x.options();
  auto seeds = torch::empty({B, K}, opts.dtype(torch::kInt64));
  auto nearest = torch::empty({lloyd >= 0 ? B : 0, M}, opts.dtype(torch::kInt32));
  auto centers = torch::empty({B, K, D}, opts);
  auto loc = stats ? torch::empty({B, K, D}, opts) : torch::empty({0}, opts);
  auto log_scale = stats ? torch::empty({B, K, D}, opts) : torch::empty({0}, opts);
  auto logit = stats ? torch::empty({B, K}, opts) : torch::empty({0}, opts);
  const int64_t* fp = first.data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b)
    TORCH_CHECK(fp[b] >= 0 && fp[b] < M, "kmeans: first must index the points");
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "kmeans", [&] {
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const scalar_t* up = u.data_ptr<scalar_t>();
    int64_t* sp = seeds.data_ptr<int64_t>();
    scalar_t* cp = centers.data_ptr<scalar_t>();
    at::parallel_for(0, B, 8, [&](int64_t lo, int64_t hi) {
      std::vector<int32_t> scratch(M);
      Buffers<scalar_t> buf;
      for (int64_t b = lo; b < hi; ++b) {
        int32_t* np = lloyd >= 0 ? nearest.data_ptr<int32_t>() + b * M : scratch.data();
        kmeans_one<scalar_t>(xp + b * M * D, D, M, K, fp[b], up + b * (K - 1) * trials, trials,
                             lloyd, stats, np, sp + b * K, cp + b * K * D,
                             stats ? loc.data_ptr<scalar_t>() + b * K * D : nullptr,
                             stats ? log_scale.data_ptr<scalar_t>() + b * K * D : nullptr,
                             stats ? logit.data_ptr<scalar_t>() + b * K : nullptr, buf);
      }
    });
  });
  return {seeds, nearest, centers, loc, log_scale, logit};
}
"""

EXTENSION = NativeExtension(
    "fused_kmeans", _SOURCE, ["kmeans"], switch="PYRO_SLOTS_FUSED_KMEANS", what="k-means++ kernel"
)


def available() -> bool:
    """Whether the kernel is built (building it at the first call) and not turned off by
    ``PYRO_SLOTS_FUSED_KMEANS=0``."""
    return EXTENSION.available()


def supported(x: torch.Tensor) -> bool:
    """Whether the kernel applies to points ``x`` ``(B, M, D)``: float32 or float64 on the CPU."""
    return x.device.type == "cpu" and x.dtype in (torch.float32, torch.float64) and available()


def kmeans(x, first, uniforms, num_slots: int, lloyd_steps: int | None, statistics: bool):
    """The discrete part of :func:`~pyro_slots.models.gmm._kmeans_chunk` on points ``x``
    ``(B, M, D)`` (made feature-major and centered about their means per datapoint inside),
    with the first seeds ``(B,)`` and the ``K - 1`` uniforms ``(B, trials)``: ``(seeds (B, K),
    nearest (B, M) int32, centers (B, K, D), stats)``, ``nearest`` ``None`` for
    ``lloyd_steps=None`` (the seeds only), ``centers`` those of the last assignment, and
    ``stats`` the slots' ``{"loc", "log_scale", "logit"}`` where ``statistics`` (else ``None``;
    with ``lloyd_steps=None`` the seeds' coordinates, rounded through the datapoint's mean, with
    the pooled scales and equal weights). No graph."""
    x = x.detach().contiguous()
    if uniforms:
        u = torch.stack(uniforms, 1).contiguous()
    else:  # one slot: no draw
        u = x.new_empty(x.shape[0], 0, 1)
    lloyd = -1 if lloyd_steps is None else int(lloyd_steps)
    seeds, nearest, centers, loc, log_scale, logit = EXTENSION.module.kmeans(
        x, first.contiguous(), u, int(num_slots), lloyd, bool(statistics)
    )
    stats = {"loc": loc, "log_scale": log_scale, "logit": logit} if statistics else None
    return seeds, (nearest if lloyd >= 0 else None), centers, stats
