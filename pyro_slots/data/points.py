r"""Sets of points from random Gaussian mixtures, with their true parameters.

Every set ``s`` draws its own mixture of ``num_components`` diagonal Gaussians in ``dim``
dimensions and then ``num_points`` points from it:

- means ``μ_k ~ U(-mean_range, mean_range)^dim``;
- scales (diagonal standard deviations) ``σ_{k,d} ~ U(scale_range)``;
- weights ``π ~ Dirichlet(concentration · 1)`` (a Dirichlet with integer concentration, drawn as
  normalized sums of ``concentration`` standard exponentials);
- assignments ``z_n ~ Categorical(π)`` and points ``x_n = μ_{z_n} + σ_{z_n} ⊙ ε_n``,
  ``ε_n ~ N(0, I)`` (Box-Muller).

Set ``s`` depends only on ``(seed, s)`` through ``numpy.random.default_rng([seed, s])``, and only
uniform draws are taken from it, so the same seed gives the same sets on every machine.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
import torch
import torch.distributions as dist
from torch.utils.data import Dataset

from ..validation import check_positive_float, check_positive_int
from ._scene import check_index_range, check_seed, dataset_index, scene_rng

__all__ = ["GaussianMixturePoints", "PointSets", "sample_point_sets", "true_log_likelihood"]


class PointSets(NamedTuple):
    """Point sets and the mixtures they were drawn from.

    :ivar torch.Tensor x: points ``(num_sets, num_points, dim)`` float32.
    :ivar torch.Tensor means: ``(num_sets, num_components, dim)`` float32.
    :ivar torch.Tensor scales: diagonal standard deviations ``(num_sets, num_components, dim)``.
    :ivar torch.Tensor weights: mixture weights ``(num_sets, num_components)``, summing to 1.
    :ivar torch.Tensor assignments: true components ``(num_sets, num_points)`` int64.
    """

    x: torch.Tensor
    means: torch.Tensor
    scales: torch.Tensor
    weights: torch.Tensor
    assignments: torch.Tensor


def _check_config(num_points, num_components, dim, mean_range, scale_range, concentration):
    num_points = check_positive_int(num_points, "num_points")
    num_components = check_positive_int(num_components, "num_components")
    dim = check_positive_int(dim, "dim")
    mean_range = check_positive_float(mean_range, "mean_range", allow_zero=True)
    try:
        low, high = (float(v) for v in scale_range)
    except (TypeError, ValueError):
        raise TypeError(
            f"scale_range: expected a pair (low, high) of numbers, got {scale_range!r}"
        ) from None
    if not 0 < low <= high < math.inf:
        raise ValueError(f"scale_range: expected 0 < low <= high < inf, got {scale_range!r}")
    concentration = check_positive_int(concentration, "concentration")
    return num_points, num_components, dim, mean_range, (low, high), concentration


def _sample_set(rng, num_points, num_components, dim, mean_range, scale_range, concentration):
    low, high = scale_range
    means = mean_range * (2.0 * rng.random((num_components, dim)) - 1.0)
    scales = low + (high - low) * rng.random((num_components, dim))
    # Gamma(concentration, 1) as a sum of exponentials; 1 - U lies in (0, 1], so the log is finite.
    gammas = -np.log1p(-rng.random((num_components, concentration))).sum(axis=1)
    weights = gammas / gammas.sum()
    # Inverse-CDF categorical draw; the clip guards the last bin against round-off in cumsum.
    cdf = np.cumsum(weights)
    z = np.minimum(np.searchsorted(cdf, rng.random(num_points), side="right"), num_components - 1)
    # Box-Muller: two uniforms give two independent standard normals.
    u1 = 1.0 - rng.random((num_points, dim))
    u2 = rng.random((num_points, dim))
    eps = np.sqrt(-2.0 * np.log(u1)) * np.cos(2.0 * math.pi * u2)
    x = means[z] + scales[z] * eps
    return x, means, scales, weights, z


def sample_point_sets(
    num_sets: int,
    num_points: int,
    num_components: int = 4,
    dim: int = 2,
    seed: int = 0,
    start: int = 0,
    mean_range: float = 4.0,
    scale_range: tuple[float, float] = (0.3, 1.0),
    concentration: int = 5,
) -> PointSets:
    """Draw ``num_sets`` sets of points, each from its own random Gaussian mixture.

    :param int num_sets: number of sets ``S``.
    :param int num_points: points per set ``N``.
    :param int num_components: mixture components ``K``.
    :param int dim: dimension ``D`` of the points.
    :param int seed: the generator's seed.
    :param int start: index of the first set (set ``s`` depends only on ``(seed, s)``).
    :param float mean_range: means are uniform in ``[-mean_range, mean_range]^D``.
    :param tuple scale_range: standard deviations are uniform in ``[low, high]``.
    :param int concentration: symmetric Dirichlet concentration of the weights (integer >= 1).
    :returns: a :class:`PointSets` with ``x`` of shape ``(S, N, D)``.

    Example::

        >>> sets = sample_point_sets(8, 200, seed=0)
        >>> sets.x.shape, sets.means.shape, sets.weights.shape
        (torch.Size([8, 200, 2]), torch.Size([8, 4, 2]), torch.Size([8, 4]))
    """
    config = _check_config(num_points, num_components, dim, mean_range, scale_range, concentration)
    seed = check_seed(seed)
    num_sets, start = check_index_range(num_sets, start)
    num_points, num_components, dim = config[:3]
    x = np.zeros((num_sets, num_points, dim))
    means = np.zeros((num_sets, num_components, dim))
    scales = np.zeros((num_sets, num_components, dim))
    weights = np.zeros((num_sets, num_components))
    z = np.zeros((num_sets, num_points), dtype=np.int64)
    for s in range(num_sets):
        x[s], means[s], scales[s], weights[s], z[s] = _sample_set(
            scene_rng(seed, start + s), *config
        )
    return PointSets(
        x=torch.from_numpy(x).float(),
        means=torch.from_numpy(means).float(),
        scales=torch.from_numpy(scales).float(),
        weights=torch.from_numpy(weights).float(),
        assignments=torch.from_numpy(z),
    )


def true_log_likelihood(
    x: torch.Tensor, means: torch.Tensor, scales: torch.Tensor, weights: torch.Tensor
) -> torch.Tensor:
    r"""Log-density of every point under its set's true mixture (the "oracle").

    ``log p(x_n) = logsumexp_k [log π_k + Σ_d log N(x_{n,d}; μ_{k,d}, σ_{k,d})]``, computed with
    :class:`torch.distributions.MixtureSameFamily`.

    :param torch.Tensor x: points ``(S, N, D)``.
    :param torch.Tensor means: ``(S, K, D)``.
    :param torch.Tensor scales: diagonal standard deviations ``(S, K, D)``, positive.
    :param torch.Tensor weights: ``(S, K)``, non-negative, summing to 1 per set.
    :returns: ``(S, N)`` log-densities.
    """
    for name, value, rank in (("x", x, 3), ("means", means, 3), ("scales", scales, 3)):
        if not torch.is_tensor(value):
            raise TypeError(f"{name}: expected a torch.Tensor, got {type(value).__name__}")
        if value.dim() != rank:
            raise ValueError(f"{name}: expected a {rank}-d tensor, got shape {tuple(value.shape)}")
    if not torch.is_tensor(weights):
        raise TypeError(f"weights: expected a torch.Tensor, got {type(weights).__name__}")
    num_sets, _, dim = x.shape
    num_components = means.shape[1]
    if tuple(means.shape) != (num_sets, num_components, dim):
        raise ValueError(
            f"means: expected shape ({num_sets}, num_components, {dim}), got {tuple(means.shape)}"
        )
    if scales.shape != means.shape:
        raise ValueError(
            f"scales: expected shape {tuple(means.shape)} (as means), got {tuple(scales.shape)}"
        )
    if tuple(weights.shape) != (num_sets, num_components):
        raise ValueError(
            f"weights: expected shape ({num_sets}, {num_components}), got {tuple(weights.shape)}"
        )
    mixture = dist.MixtureSameFamily(
        dist.Categorical(probs=weights),
        dist.Independent(dist.Normal(means, scales), 1),
    )
    # Points on the left of the batch: (N, S, D) against batch shape (S,).
    return mixture.log_prob(x.transpose(0, 1)).transpose(0, 1)


class GaussianMixturePoints(Dataset):
    """Point sets from random Gaussian mixtures; item ``s`` is set ``s`` of
    :func:`sample_point_sets` with the same arguments.

    Each item is a dict with ``x`` ``(N, D)``, ``means`` ``(K, D)``, ``scales`` ``(K, D)``,
    ``weights`` ``(K,)`` and ``assignments`` ``(N,)``.

    :param int num_sets: number of sets in the dataset.
    :param int num_points: points per set.
    :param int num_components: mixture components.
    :param int dim: dimension of the points.
    :param int seed: the generator's seed.
    :param kwargs: ``mean_range``, ``scale_range``, ``concentration`` of
        :func:`sample_point_sets`.
    """

    def __init__(
        self,
        num_sets: int,
        num_points: int,
        num_components: int = 4,
        dim: int = 2,
        seed: int = 0,
        **kwargs,
    ):
        self.num_sets = check_positive_int(num_sets, "num_sets", minimum=0)
        self.kwargs = dict(num_points=num_points, num_components=num_components, dim=dim, **kwargs)
        self.seed = check_seed(seed)
        sample_point_sets(0, seed=self.seed, **self.kwargs)  # validates the configuration

    def __len__(self) -> int:
        return self.num_sets

    def __getitem__(self, index) -> dict:
        index = dataset_index(index, self.num_sets)
        sets = sample_point_sets(1, seed=self.seed, start=index, **self.kwargs)
        return {key: value[0] for key, value in sets._asdict().items()}
