"""Per-datapoint Gaussian mixture: the parameter-estimation reading of the nested problem.

Each datapoint ``x^n`` is a set of ``M`` measurements (points) drawn from its own mixture of
``K`` diagonal Gaussians; the slots are that datapoint's component parameters
``λ^{n,k} = (loc, log_scale, logit)`` (§3.2 of the seed paper, "meta-learned parameter
estimation"). Assignments are enumerated exactly, so the ELBO equals the log-likelihood.
"""

from __future__ import annotations

import math

import pyro
import pyro.distributions as dist
import torch
from torch import nn

from pyro_slots.init import draw
from pyro_slots.inner.mstep import mean_and_variance, normal_moments
from pyro_slots.model import SlotCategorical, SlotModel, SlotSpec, select_component
from pyro_slots.validation import (
    check_measurements,
    check_positive_float,
    check_positive_int,
    check_slots,
)

from . import _fused_kmeans

__all__ = ["GaussianMixture", "kmeans_plus_plus", "random_from_data"]


class GaussianMixture(SlotModel):
    r"""Mixture of ``num_slots`` diagonal Gaussians per datapoint, assignments enumerated.

    Slot layout: ``loc (dim,)``, ``log_scale (dim,)``, ``logit ()`` — so ``slot_dim = 2 dim + 1``.
    The mixing weights are ``softmax`` of the logits over the slots of a datapoint.

    Model, for every datapoint ``n`` and measurement ``m``::

        z^{n,m} ~ Categorical(softmax(logit^n))          # enumerated
        x^{n,m} ~ Normal(loc^{n,z}, exp(log_scale^{n,z}))

    :param int num_slots: default number of components (``refine`` may use another).
    :param int dim: dimension of a measurement.
    :param torch.nn.Module encoder: optional shared pre-processing ``w_e`` applied to the last
        dimension of ``x`` (e.g. ``nn.Linear(dim_in, dim)``); identity by default.
    :param float reg_covar: variance floor of the M-step, >= 0, relative to the data: the M-step
        adds ``reg_covar`` times the datapoint's per-feature variance of its measurements to
        every component variance (scikit-learn adds ``reg_covar`` itself, which swamps data
        measured in small units and vanishes for large ones; the two agree on data of unit
        variance). The statistics are centred (about a per-datapoint reference point and each
        component's mean), so float32 EM stays exact far from the origin.
    :param int init_lloyd_steps: hard k-means iterations after the k-means++ seeding of
        :meth:`init_slots` (0 keeps the bare seeds: cheaper, e.g. before a learned rule).
    :param str init: how :meth:`init_slots` draws λ_0: ``"kmeans++"`` (greedy k-means++ seeding
        and ``init_lloyd_steps`` Lloyd iterations, as scikit-learn's ``init_params="kmeans"``)
        or ``"random_from_data"`` (``K`` distinct measurements of the datapoint as the means,
        the datapoint's pooled standard deviation as every scale, uniform weights; as
        scikit-learn's option of that name, and the cheapest data-dependent start: one top-k
        over random keys, no distance computations), or ``"kmeans++_seeds"`` (the k-means++
        seeds as the means with ``random_from_data``'s pooled scales and uniform weights: the
        seeds' spread without the pass that assigns every measurement to a seed, for a learned
        rule that refines λ_0 itself; ``init_lloyd_steps`` is not used).
    :param int init_local_trials: candidates per k-means++ draw, of which the one lowering the
        k-means potential most is kept (``None``: ``2 + ln K`` as scikit-learn's greedy
        k-means++; 1: the original k-means++ of Arthur & Vassilvitskii, the cheapest).
    """

    def __init__(
        self,
        num_slots: int,
        dim: int,
        encoder: nn.Module | None = None,
        input_dim: int | None = None,
        reg_covar: float = 1e-6,
        init_lloyd_steps: int = 10,
        init: str = "kmeans++",
        init_local_trials: int | None = None,
    ):
        dim = check_positive_int(dim, "dim")
        super().__init__(SlotSpec({"loc": (dim,), "log_scale": (dim,), "logit": ()}), dim)
        self.assignment_site = "assignment"
        self.num_slots = check_positive_int(num_slots, "num_slots")
        self.dim = dim
        self.encoder = encoder
        self.input_dim = dim if input_dim is None else check_positive_int(input_dim, "input_dim")
        if encoder is None and self.input_dim != dim:
            raise ValueError(f"input_dim: {input_dim} differs from dim {dim} but no encoder given")
        self.reg_covar = check_positive_float(reg_covar, "reg_covar", allow_zero=True)
        self.init_lloyd_steps = check_positive_int(init_lloyd_steps, "init_lloyd_steps", minimum=0)
        if init not in INITS:
            raise ValueError(f"init: expected one of {INITS}, got {init!r}")
        self.init = init
        if init_local_trials is not None:
            init_local_trials = check_positive_int(init_local_trials, "init_local_trials")
        self.init_local_trials = init_local_trials

    # ------------------------------------------------------------------ Pyro program
    def encode(self, x):
        x = check_measurements(x, "x", feature_dim=self.input_dim)
        return x if self.encoder is None else self.encoder(x)

    def component_params(self, slots):
        """``loc, scale (batch, K, dim)`` and ``log_weights (batch, K)`` of the mixture."""
        parts = self.slot_spec.split(slots)
        log_weights = torch.log_softmax(parts["logit"], dim=-1)
        return parts["loc"], parts["log_scale"].exp(), log_weights

    def canonical_slots(self, slots):
        """The mixing logits centred over the slots (their softmax, the weights, ignores a
        common shift); means and scales unchanged."""
        parts = self.slot_spec.split(slots)
        parts["logit"] = parts["logit"] - parts["logit"].mean(-1, keepdim=True)
        return self.slot_spec.pack(parts)

    def model(self, x, slots):
        batch, num_points, _ = x.shape
        # (batch, K, slot_dim): slots of another batch would broadcast over every datapoint.
        check_slots(slots, "slots", batch, self.slot_dim, finite=dist.is_validation_enabled())
        loc, scale, log_weights = self.component_params(slots)
        with pyro.plate(self.batch_plate, batch, dim=-2, device=x.device):
            with pyro.plate("measurements", num_points, dim=-1, device=x.device):
                # (dist.Categorical normalizes its logits with two operations, SlotCategorical
                # with one log_softmax: the same distribution, one operation fewer per step.)
                z = pyro.sample(
                    "assignment",
                    SlotCategorical(log_weights.unsqueeze(-2), dim=-1),
                    infer={"enumerate": "parallel"},
                )
                # The components' parameters (batch, 1, K, dim) line up with the plates; under
                # enumeration the pick is a view with the component axis moved to the
                # enumeration dim, no (batch, M, K, dim) tensor (Vindex for sampled values).
                pyro.sample(
                    "obs",
                    dist.Normal(
                        select_component(loc.unsqueeze(-3), z, dim=-2),
                        select_component(scale.unsqueeze(-3), z, dim=-2),
                    ).to_event(1),
                    obs=x,
                )

    # ---------------------------------------------------------- the documented M-step
    def m_step(self, x, resp, slots=None, fixed_variance: float | None = None, fixed_weights=False):
        """Closed-form maximizer of the expected complete log-likelihood.

        :param x: ``(batch, M, dim)``; :param resp: ``(batch, K, M)``.
        :param fixed_variance: keep every variance at this value (soft k-means).
        :param fixed_weights: keep uniform mixing weights (soft k-means).
        """
        # Centred statistics (about a per-datapoint reference point and, where the raw moments
        # would cancel, each component's own mean), so float32 EM stays exact far from the
        # origin: normal_moments.
        nk, loc, var = normal_moments(resp, x, self.reg_covar)
        if fixed_variance is None:
            log_scale = 0.5 * var.clamp_min(torch.finfo(x.dtype).tiny).log()
        else:
            log_scale = torch.full_like(loc, 0.5 * math.log(fixed_variance))
        if fixed_weights:
            logit = torch.zeros_like(nk)
        else:
            logit = (nk / x.shape[1]).log()
        return self.slot_spec.pack({"loc": loc, "log_scale": log_scale, "logit": logit})

    def isotropic(self, slots, variance: float):
        """Project slots onto the soft k-means family: fixed variance, uniform weights."""
        parts = self.slot_spec.split(slots)
        parts["log_scale"] = torch.full_like(parts["loc"], 0.5 * math.log(variance))
        parts["logit"] = torch.zeros_like(parts["logit"])
        return self.slot_spec.pack(parts)

    def reconstruct(self, x, slots, x_raw=None):
        """Each point replaced by its responsibility-weighted mean, ``(batch, M, dim)``.

        The responsibilities are the posterior of :attr:`assignment_site` under this Pyro
        program (:meth:`pyro_slots.inner.InnerProblem.elbo_and_responsibilities`).
        """
        from pyro_slots.inner.base import InnerProblem

        loc, _, _ = self.component_params(slots)
        resp = InnerProblem(self, x).elbo_and_responsibilities(slots)[1]
        return torch.einsum("bkm,bkd->bmd", resp, loc)

    def init_slots(self, x, num_slots, generator=None, rows=None):
        if self.init == "random_from_data":
            return random_from_data(self, x, num_slots, generator=generator, rows=rows)
        return kmeans_plus_plus(
            self, x, num_slots, generator=generator, lloyd_steps=self.init_lloyd_steps, rows=rows,
            statistics=self.init == "kmeans++", local_trials=self.init_local_trials,
        )  # fmt: skip


#: The values of ``GaussianMixture(init=...)``: how :meth:`GaussianMixture.init_slots` draws λ_0.
INITS = ("kmeans++", "kmeans++_seeds", "random_from_data")


def random_from_data(model: GaussianMixture, x, num_slots: int, generator=None, rows=None):
    """``num_slots`` distinct measurements per datapoint as the means, pooled scales, equal weights.

    The measurements are the ``num_slots`` largest of ``M`` independent uniform keys per
    datapoint, i.e. a uniformly random subset without replacement; distinct indices matter to a
    symmetric rule, which can never separate two identical slots. Every scale is the datapoint's
    pooled per-feature standard deviation and every logit is zero. The means keep their gradient
    with respect to ``x`` (an encoder upstream is trained through them).

    :param rows: only these datapoints' slots (an index tensor), the rows of the whole draw.
    :returns: slots ``(batch, num_slots, 2 dim + 1)`` (``(len(rows), ...)`` with ``rows``).
    """
    num_slots = check_positive_int(num_slots, "num_slots")
    batch, num_points, dim = x.shape
    if num_slots > num_points:
        raise ValueError(
            f"num_slots: random_from_data needs at most M={num_points} slots, got {num_slots}"
        )
    keys = draw(
        torch.rand, (batch, num_points), generator=generator, dtype=x.dtype, device=x.device
    )
    if rows is not None:
        x, keys = x[rows], keys[rows]
        batch = x.shape[0]
    idx = keys.topk(num_slots, dim=1, sorted=False).indices  # (B, K), distinct per row
    loc = torch.gather(x, 1, idx.unsqueeze(-1).expand(-1, -1, dim))
    return model.slot_spec.pack(_pooled_parts(x, loc))


def _pooled_parts(x, loc) -> dict:
    """Slots with means ``loc`` ``(B, K, D)``, the datapoints' pooled per-feature standard
    deviation as every scale and equal weights."""
    batch, num_slots, dim = loc.shape
    pooled = mean_and_variance(x)[1].clamp_min(torch.finfo(x.dtype).tiny)
    return {
        "loc": loc,
        "log_scale": (0.5 * pooled.log()).expand(batch, num_slots, dim),
        "logit": x.new_zeros(batch, num_slots),
    }


def kmeans_plus_plus(
    model: GaussianMixture,
    x,
    num_slots: int,
    generator=None,
    lloyd_steps: int = 10,
    rows=None,
    statistics: bool = True,
    local_trials: int | None = None,
):
    """Batched greedy k-means++ seeding refined by Lloyd iterations.

    Seeds are drawn with probability proportional to the squared distance to the nearest seed
    already chosen (Arthur & Vassilvitskii 2007); like scikit-learn, every draw tries
    ``local_trials`` candidates (default ``2 + ln K``) and keeps the one that lowers the k-means
    potential most (``local_trials=1``: the original algorithm, a third of the distance
    computations at K = 4). The seeds are then moved by ``lloyd_steps`` hard k-means iterations
    (scikit-learn's default ``init_params="kmeans"``). Scales are the per-cluster standard
    deviations of the final hard assignment (the pooled standard deviation for clusters of fewer
    than two points) and the weights the cluster fractions. Vectorized over the batch: no Python
    loop over datapoints.

    Every random number is drawn first, for the whole batch; the datapoints are then processed
    in chunks of about :data:`KMEANS_CHUNK_POINTS` measurements, so the temporaries stay the
    size of a chunk for any batch (10⁵ point sets) and the result does not depend on the
    chunking. With ``rows`` (an index tensor) only those datapoints are seeded, from their own
    random numbers of the whole draw: the rows of the result without ``rows``, at the cost of
    those datapoints alone (a rank of ``refine(distributed=True)`` seeds its shard only).

    With ``statistics=False`` the seeds themselves are the means, with the datapoint's pooled
    scales and equal weights (as :func:`random_from_data`): no Lloyd iteration and no pass that
    assigns the measurements to the seeds, about half the cost of ``lloyd_steps=0``.

    On the CPU in float32 and float64 the seeding, the Lloyd iterations and (when no gradient
    is kept) the statistics run as a C++ kernel, per datapoint with its points in the cache
    (:mod:`pyro_slots.models._fused_kmeans`; ``PYRO_SLOTS_FUSED_KMEANS=0``: torch's operations,
    which make the same choices up to rounding).

    :returns: slots ``(batch, num_slots, 2 dim + 1)`` (``(len(rows), ...)`` with ``rows``).
    """
    num_slots = check_positive_int(num_slots, "num_slots")
    batch, num_points, _ = x.shape
    if num_slots > num_points:
        raise ValueError(
            f"num_slots: k-means++ seeds every slot at a distinct measurement, expected at most "
            f"the {num_points} measurements per datapoint, got {num_slots}"
        )
    if local_trials is None:
        trials = 2 + int(math.log(num_slots))
    else:
        trials = check_positive_int(local_trials, "local_trials")
    first = draw(torch.randint, num_points, (batch,), generator=generator, device=x.device)
    uniforms = [
        draw(torch.rand, (batch, trials), generator=generator, dtype=x.dtype, device=x.device)
        for _ in range(1, num_slots)
    ]
    chunk = max(1, KMEANS_CHUNK_POINTS // num_points)
    parts = []
    for lo in range(0, batch if rows is None else rows.shape[0], chunk):
        index = slice(lo, lo + chunk) if rows is None else rows[lo : lo + chunk]
        parts.append(
            _kmeans_chunk(
                x[index],
                num_slots,
                first[index],
                [u[index] for u in uniforms],
                lloyd_steps if statistics else None,
            )
        )
    parts = {name: torch.cat([p[name] for p in parts]) for name in parts[0]}
    return model.slot_spec.pack(parts)


#: Measurements per chunk of :func:`kmeans_plus_plus` (batch × points), about 2 million.
KMEANS_CHUNK_POINTS = 2**21


def _kmeans_chunk(x, num_slots: int, first, uniforms, lloyd_steps: int | None) -> dict:
    """:func:`kmeans_plus_plus` on the datapoints ``x`` ``(B, M, D)`` with their random
    numbers: the first seed's index ``(B,)`` and one ``(B, trials)`` uniform per later seed;
    ``lloyd_steps=None``: the seeds with pooled statistics."""
    batch, num_points, dim = x.shape
    # Feature-major (B, D, M) throughout: every pass is over contiguous rows of M points (with
    # a few features last, (B, M, D), broadcasts, scatters and matrix products take the CPU's
    # slow paths). The random choices are made without gradients; the resulting cluster
    # statistics keep them, so an unrolled outer gradient sees how the initialization moves
    # with an encoder. Everything is computed about the datapoint's mean: the Lloyd score
    # |c|² - 2 c·x and the cluster sums cancel or round badly in float32 when the data sit far
    # from the origin.
    fused = _fused_kmeans.supported(x)
    if fused:  # the same algorithm in C++ (the module docs of _fused_kmeans)
        # Without a gradient to keep, the kernel returns the statistics too.
        bare = not (torch.is_grad_enabled() and x.requires_grad)
        seeds, nearest, centers, stats = _fused_kmeans.kmeans(
            x, first, uniforms, num_slots, lloyd_steps, bare
        )
        if stats is not None:
            if lloyd_steps is None:  # the seeds exactly as measured, not through the mean
                stats["loc"] = torch.gather(x, 1, seeds.unsqueeze(-1).expand(-1, -1, dim))
            return stats
    xt = x.transpose(1, 2).contiguous()
    ref = xt.mean(2, keepdim=True)  # (B, D, 1)
    xt = xt - ref
    xd = xt.detach()
    if fused:
        centers = centers - ref.detach().transpose(1, 2)  # about the mean, as the points
    else:
        seeds, nearest, centers = _kmeans_discrete(xd, first, uniforms, lloyd_steps)
    if lloyd_steps is None:  # the seeds are measurements, gathered with their gradients
        index = seeds.unsqueeze(-1).expand(-1, -1, dim)
        return _pooled_parts(x, torch.gather(x, 1, index))
    with torch.no_grad():
        members = _one_hot(nearest, num_slots, xd.dtype)
    # The cluster statistics with gradients, as promised above; (B, D, K) like the points.
    nk = members.sum(-1).unsqueeze(1)  # (B, 1, K)
    sums = torch.bmm(xt, members.transpose(1, 2))  # (B, D, K)
    # An empty cluster keeps its seed: its statistics come from the pooled data.
    loc = torch.where(nk > 0, sums / nk.clamp_min(1), centers.transpose(1, 2))
    pooled = (xt * xt).sum(2, keepdim=True) / max(num_points - 1, 1)  # (B, D, 1)
    # Squared deviation of every point from its own cluster's mean: O(B M D), no (B, K, M, D).
    dev = xt - torch.gather(loc, 2, nearest.long().unsqueeze(1).expand(-1, dim, -1))
    var = torch.bmm(dev * dev, members.transpose(1, 2))  # (B, D, K)
    var = torch.where(nk > 1, var / nk.clamp_min(1), pooled)
    var = var.clamp_min(1e-6 * pooled.detach().clamp_min(1e-12))
    return {
        "loc": (loc + ref).transpose(1, 2),
        "log_scale": 0.5 * var.log().transpose(1, 2),
        "logit": ((nk.squeeze(1) + 1.0) / (num_points + num_slots)).log(),
    }


def _kmeans_discrete(xd, first, uniforms, lloyd_steps: int | None):
    """Torch's greedy k-means++ seeding and Lloyd iterations on feature-major points ``xd``
    ``(B, D, M)`` (no graph): ``(seeds (B, K), nearest (B, M), centers (B, K, D))``,
    ``nearest`` ``None`` for ``lloyd_steps=None``."""
    batch, _, num_points = xd.shape
    num_slots = len(uniforms) + 1
    rows = torch.arange(batch, device=xd.device)
    with torch.no_grad():
        centers, seeds = [_columns(xd, first.unsqueeze(1))], [first]
        closest = _squared_distances(xd, centers[0])[0][:, 0]  # (B, M)
        work = (None, None)  # the candidates' (B, T, M) distances and scratch, reused
        for i, u in enumerate(uniforms):
            cdf = (closest + 1e-12).cumsum(-1)
            idx = torch.searchsorted(cdf, u * cdf[:, -1:]).clamp_max(num_points - 1)  # (B, T)
            cand = _columns(xd, idx)  # (B, T, D)
            work = _squared_distances(xd, cand, *work)
            distances = work[0]  # (B, T, M), overwritten below
            new_closest = torch.minimum(closest.unsqueeze(1), distances, out=distances)
            best = new_closest.sum(-1).argmin(1)  # (B,)
            centers.append(cand[rows, best].unsqueeze(1))
            seeds.append(idx[rows, best])
            if i + 1 < len(uniforms):  # the last seed's distances are not needed
                closest = new_closest[rows, best]
        centers = torch.cat(centers, 1)  # (B, K, D)
        seeds = torch.stack(seeds, 1)
        if lloyd_steps is None:
            return seeds, None, centers
        nearest = None
        squares = (xd * xd).sum(1, keepdim=True)  # (B, 1, M)
        for step in range(lloyd_steps + 1):
            # |x - c|² as one batched matrix product, then |c|² and |x|² added in place (a
            # broadcast subtraction of the centers takes the CPU's slow strided path, and
            # baddbmm would first copy the broadcast |c|² into a new (B, K, M) tensor).
            score = torch.bmm(centers, xd).mul_(-2).add_((centers * centers).sum(-1, keepdim=True))
            previous, nearest = nearest, _nearest(score.add_(squares).clamp_min_(0))  # (B, M)
            if step == lloyd_steps or (previous is not None and torch.equal(previous, nearest)):
                break  # the assignment is a fixed point of Lloyd's iteration
            members = _one_hot(nearest, num_slots, xd.dtype)  # (B, K, M)
            counts = members.sum(-1, keepdim=True)  # (B, K, 1)
            sums = torch.bmm(members, xd.transpose(1, 2))  # (B, K, D)
            centers = torch.where(counts > 0, sums / counts.clamp_min(1), centers)
    return seeds, nearest, centers


def _columns(xt, index):
    """Points ``(B, T, D)`` at ``index`` ``(B, T)`` of feature-major ``xt`` ``(B, D, M)``."""
    return torch.gather(xt, 2, index.unsqueeze(1).expand(-1, xt.shape[1], -1)).transpose(1, 2)


def _one_hot(nearest, num_slots: int, dtype):
    """The hard assignment ``(B, M)`` as memberships ``(B, K, M)`` of ``dtype``:
    ``max(0, 1 - |k - nearest|)``, in place on one tensor (a comparison writes booleans, whose
    conversion is a second pass about twice as slow; a scatter is slower still)."""
    k = torch.arange(num_slots, dtype=dtype, device=nearest.device).view(1, -1, 1)
    members = nearest.to(dtype).unsqueeze(1) - k
    return members.abs_().neg_().add_(1).clamp_min_(0)


def _squared_distances(xt, centers, out=None, scratch=None):
    """``|x_m - c_j|²`` of shape ``(B, C, M)`` from feature-major points ``xt`` ``(B, D, M)`` and
    centers ``(B, C, D)``, accumulated one feature at a time: contiguous ``(B, C, M)`` passes
    instead of a ``(B, C, M, D)`` temporary reduced over its short last axis.

    :param out: a ``(B, C, M)`` tensor to write the result into, and ``scratch`` one for the
        differences of the later features (``None``: new ones): a loop that passes back what
        it was given reuses the same memory (a new tensor per call is a pass over memory that
        the cache no longer holds).
    :returns: ``(out, scratch)``; ``scratch`` stays ``None`` for one feature.
    """
    for d in range(xt.shape[1]):
        a, b = xt[:, d].unsqueeze(1), centers[:, :, d].unsqueeze(-1)
        if d == 0:
            out = a - b if out is None else torch.sub(a, b, out=out)
            out.mul_(out)
        else:
            scratch = a - b if scratch is None else torch.sub(a, b, out=scratch)
            out.addcmul_(scratch, scratch)
    return out, scratch


def _nearest(distances):
    """Index ``(B, M)`` of the smallest of ``distances`` ``(B, K, M)`` (≥ 0) along the slot axis;
    ``distances`` is the caller's temporary, overwritten.

    Non-negative floats order as their bit patterns do, so the slot's index goes into the
    lowest ``ceil(log2 K)`` bits and one ``amin`` over the integers returns the distance and its
    index together: on the CPU an index reduction over a short middle axis (``min(1)``,
    ``argmin``) costs 2.5-20 times more. Distances equal up to those low bits (relative
    ``2^-21`` in float32 at K = 4) count as a tie, which goes to the lower index, as exact ties
    do in ``argmin``. Float32 only (``amin`` over int64 is 50 times slower than over int32 on
    the CPU); other dtypes and more than 16 slots: ``min(1)``.
    """
    num_slots = distances.shape[1]
    bits = max(1, (num_slots - 1).bit_length())
    if bits > 4 or distances.dtype != torch.float32:
        return distances.min(1).indices
    packed = distances.view(torch.int32).bitwise_and_(-(1 << bits))
    for k in range(1, num_slots):
        packed[:, k].bitwise_or_(k)
    return packed.amin(1).bitwise_and_((1 << bits) - 1).long()
