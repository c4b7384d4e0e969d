"""GaussianMixture's initializations: random_from_data, k-means++ (torch's path and the kernel)."""

import numpy as np
import pytest
import torch
from scipy import stats

from pyro_slots.models import GaussianMixture, _fused_kmeans, random_from_data

#: The kernel's own tests; where it cannot be built (no compiler) torch's path runs and is tested
#: by the "torch" parameter of kmeans_path.
needs_kmeans_kernel = pytest.mark.skipif(
    not _fused_kmeans.available(),
    reason=f"the k-means++ kernel was not built: {_fused_kmeans.EXTENSION.error}",
)


@pytest.fixture(params=["torch", "kernel"])
def kmeans_path(request, monkeypatch):
    """k-means++ through torch's operations and through the C++ kernel (models/_fused_kmeans)."""
    if request.param == "kernel" and not _fused_kmeans.available():  # no compiler here
        pytest.skip(f"the k-means++ kernel was not built: {_fused_kmeans.EXTENSION.error}")
    monkeypatch.setenv("PYRO_SLOTS_FUSED_KMEANS", "1" if request.param == "kernel" else "0")
    return request.param


def test_random_from_data_takes_distinct_points_pooled_scales_and_equal_weights():
    x = torch.randn(6, 9, 3, dtype=torch.float64) * torch.tensor([1.0, 2.0, 0.5]) + 4.0
    gmm = GaussianMixture(5, 3, init="random_from_data")
    slots = gmm.init_slots(x, 5, torch.Generator().manual_seed(0))
    parts = gmm.slot_spec.split(slots)
    xn = x.numpy()
    for n in range(6):
        # every mean is one of the datapoint's own points, and no point is used twice
        match = np.all(np.isclose(parts["loc"][n].numpy()[:, None], xn[n][None]), -1)  # (K, M)
        assert (match.sum(1) == 1).all()
        assert len(set(match.argmax(1))) == 5
        pooled_std = xn[n].std(0, ddof=1)  # numpy's unbiased standard deviation per feature
        np.testing.assert_allclose(parts["log_scale"][n].exp().numpy(), np.tile(pooled_std, (5, 1)))
    assert torch.equal(parts["logit"], torch.zeros(6, 5, dtype=torch.float64))


def test_random_from_data_draws_a_uniform_subset():
    """Each of M = 6 points is chosen with probability K / M = 1/2: chi-square over 3,000 sets."""
    x = torch.arange(6.0).reshape(1, 6, 1).expand(3000, 6, 1)
    slots = random_from_data(GaussianMixture(3, 1), x, 3, torch.Generator().manual_seed(1))
    chosen = slots[..., 0].round().long()  # the loc is the point's index
    counts = torch.bincount(chosen.flatten(), minlength=6).numpy()
    assert counts.sum() == 9000
    assert stats.chisquare(counts).pvalue > 1e-3  # expected 1,500 each
    # and the draw is a function of the generator alone
    again = random_from_data(GaussianMixture(3, 1), x, 3, torch.Generator().manual_seed(1))
    assert torch.equal(again, slots)


def test_random_from_data_means_carry_the_gradient_of_x():
    x = torch.randn(2, 7, 2, requires_grad=True)
    slots = random_from_data(GaussianMixture(3, 2), x, 3, torch.Generator().manual_seed(0))
    slots[..., :2].sum().backward()
    # exactly the 3 chosen points of each datapoint get gradient 1 in each feature
    assert torch.equal(x.grad.sum((1, 2)), torch.tensor([6.0, 6.0]))


def test_bad_init_arguments_raise_naming_the_argument():
    with pytest.raises(ValueError, match="init"):
        GaussianMixture(3, 2, init="kmeans")
    with pytest.raises(ValueError, match="num_slots"):
        GaussianMixture(3, 2, init="random_from_data").init_slots(torch.randn(1, 2, 2), 3)


def test_kmeans_plus_plus_in_chunks_equals_the_whole_batch(kmeans_path, monkeypatch, float64):
    """λ_0 of a large batch is computed chunk by chunk from random numbers drawn for the whole
    batch first: the same slots (and gradients w.r.t. x) as one pass over the batch."""
    from pyro_slots.data import sample_point_sets
    from pyro_slots.models import gmm as gmm_module

    x = sample_point_sets(37, 60, 4, 2, seed=5).x.requires_grad_()
    model = GaussianMixture(4, 2)
    whole = gmm_module.kmeans_plus_plus(model, x, 4, torch.Generator().manual_seed(1))
    (g_whole,) = torch.autograd.grad(whole.sin().sum(), x)
    monkeypatch.setattr(gmm_module, "KMEANS_CHUNK_POINTS", 60 * 8)  # 5 chunks, the last of 5
    chunked = gmm_module.kmeans_plus_plus(model, x, 4, torch.Generator().manual_seed(1))
    (g_chunked,) = torch.autograd.grad(chunked.sin().sum(), x)
    assert torch.equal(whole, chunked)
    assert torch.allclose(g_whole, g_chunked, atol=1e-13)
    # The seeds are points of the data: every initial mean is a mean of data points, so it lies
    # in the convex hull's bounding box of its set.
    loc = model.slot_spec.split(chunked)["loc"]
    lo, hi = x.detach().amin(1, keepdim=True), x.detach().amax(1, keepdim=True)
    assert ((loc >= lo - 1e-12) & (loc <= hi + 1e-12)).all()


def _numpy_kmeans_plus_plus_seeds(x, num_slots, generator, trials=None):
    """Greedy k-means++ seeding written per datapoint in numpy, from the same random numbers
    (the first index, then ``trials`` uniforms per later seed, by default ``2 + log K``),
    returning the seeds' indices."""
    batch, num_points, _ = x.shape
    trials = 2 + int(np.log(num_slots)) if trials is None else trials
    first = torch.randint(num_points, (batch,), generator=generator).numpy()
    uniforms = [torch.rand(batch, trials, generator=generator, dtype=torch.float64).numpy()
                for _ in range(1, num_slots)]  # fmt: skip
    seeds = []
    for n in range(batch):
        points, chosen = x[n], [first[n]]
        closest = ((points - points[first[n]]) ** 2).sum(-1)
        for u in uniforms:
            cdf = np.cumsum(closest + 1e-12)
            cand = np.minimum(np.searchsorted(cdf, u[n] * cdf[-1]), num_points - 1)
            potentials = [np.minimum(closest, ((points - points[c]) ** 2).sum(-1)) for c in cand]
            best = int(np.argmin([p.sum() for p in potentials]))
            chosen.append(cand[best])
            closest = potentials[best]
        seeds.append(chosen)
    return np.array(seeds)


@pytest.mark.parametrize("grad", [True, False])
@pytest.mark.parametrize("trials", [None, 1, 3])
def test_kmeans_plus_plus_seeds_are_the_greedy_seeds_with_pooled_statistics(
    kmeans_path, trials, grad
):
    """init="kmeans++_seeds": the means are exactly the seeds of a per-datapoint numpy k-means++
    (same random numbers, ``init_local_trials`` candidates per draw: scikit-learn's 2 + ln K by
    default, 1 the original algorithm), the scales the pooled standard deviations, the weights
    equal, and the means carry x's gradient."""
    x = (torch.randn(5, 40, 2, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
         * torch.tensor([1.0, 3.0]) + 10.0).requires_grad_(grad)  # fmt: skip
    gmm = GaussianMixture(4, 2, init="kmeans++_seeds", init_local_trials=trials)
    slots = gmm.init_slots(x, 4, torch.Generator().manual_seed(3))
    parts = gmm.slot_spec.split(slots)
    xn = x.detach().numpy()
    seeds = _numpy_kmeans_plus_plus_seeds(xn, 4, torch.Generator().manual_seed(3), trials)
    for n in range(5):
        np.testing.assert_array_equal(parts["loc"][n].detach().numpy(), xn[n][seeds[n]])
        assert len(set(seeds[n])) == 4
        pooled_std = xn[n].std(0, ddof=1)
        np.testing.assert_allclose(parts["log_scale"][n].exp().detach().numpy(),
                                   np.tile(pooled_std, (4, 1)))  # fmt: skip
    assert torch.equal(parts["logit"], torch.zeros(5, 4, dtype=torch.float64))
    if grad:
        (d_x,) = torch.autograd.grad(parts["loc"].sum(), x)
        assert torch.equal(d_x.sum((1, 2)), torch.full((5,), 8.0, dtype=torch.float64))
    else:  # the kernel's own pooled scales (kmeans_path "kernel")
        assert not parts["loc"].requires_grad


@pytest.mark.parametrize("init", ["kmeans++", "kmeans++_seeds", "random_from_data"])
def test_init_slots_of_some_rows_are_those_rows_of_the_whole_draw(kmeans_path, init, monkeypatch):
    """GaussianMixture.init_slots(rows=...) equals the whole batch's draw indexed by the rows,
    bit for bit (rows in any order, across k-means++ chunks), and seeds those datapoints only."""
    from pyro_slots.models import gmm as gmm_module

    monkeypatch.setattr(gmm_module, "KMEANS_CHUNK_POINTS", 3 * 30)  # chunks of 3 datapoints
    x = torch.randn(11, 30, 2, generator=torch.Generator().manual_seed(4))
    model = GaussianMixture(4, 2, init=init)
    whole = model.init_slots(x, 4, torch.Generator().manual_seed(7))
    rows = torch.tensor([9, 2, 3, 4, 10])
    seeded, chunk = [], gmm_module._kmeans_chunk
    monkeypatch.setattr(
        gmm_module, "_kmeans_chunk", lambda x, *a: seeded.append(len(x)) or chunk(x, *a)
    )
    part = model.init_slots(x, 4, torch.Generator().manual_seed(7), rows=rows)
    assert torch.equal(part, whole[rows])
    assert seeded == ([] if init == "random_from_data" else [3, 2])


def test_initial_slots_of_some_rows_for_every_kind_of_initializer():
    """refine's initial_slots(rows=...) is the rows of the whole draw for a random initializer,
    a conditional one (which reads only those datapoints; up to rounding) and a model whose
    init_slots takes no rows argument."""
    from pyro_slots import AmortizedInit, GaussianInit
    from pyro_slots.refine import initial_slots

    x = torch.randn(6, 30, 2, generator=torch.Generator().manual_seed(0))
    rows = torch.tensor([4, 1])
    model = GaussianMixture(3, 2)
    torch.manual_seed(0)
    for init in (GaussianInit(5), AmortizedInit(2, 3, 5)):
        whole = initial_slots(model, x, 3, init=init, generator=torch.Generator().manual_seed(1))
        part = initial_slots(
            model, x, 3, init=init, generator=torch.Generator().manual_seed(1), rows=rows
        )
        # a network on fewer rows rounds its products differently: equal to float32 rounding
        torch.testing.assert_close(part, whole[rows], rtol=1e-6, atol=1e-7)

    class OldStyle(GaussianMixture):
        def init_slots(self, x, num_slots, generator=None):  # no rows argument
            return super().init_slots(x, num_slots, generator)

    old = OldStyle(3, 2)
    whole = initial_slots(old, x, 3, generator=torch.Generator().manual_seed(2))
    part = initial_slots(old, x, 3, generator=torch.Generator().manual_seed(2), rows=rows)
    assert torch.equal(part, whole[rows])


def test_mean_and_variance_match_numpy_in_float32_far_from_the_origin():
    """The two-pass per-datapoint moments behind the pooled scales and GaussianFeatures: numpy's
    float64 mean and unbiased variance, to float32 accuracy, for data at 1e4 ± 1."""
    from pyro_slots.inner.mstep import mean_and_variance

    x = 1e4 + torch.randn(3, 200, 2, generator=torch.Generator().manual_seed(0))
    mean, var = mean_and_variance(x)
    xn = x.double().numpy()
    np.testing.assert_allclose(mean.squeeze(1).numpy(), xn.mean(1), rtol=1e-6)
    np.testing.assert_allclose(var.squeeze(1).numpy(), xn.var(1, ddof=1), rtol=1e-3)
    assert mean.shape == var.shape == (3, 1, 2)


def test_original_kmeans_plus_plus_draws_the_second_seed_with_probability_d2(kmeans_path):
    """``init_local_trials=1`` is D² sampling: over many datapoints holding the same five points
    and the same first seed, the second seed's frequencies match d² / Σ d² (analytic)."""
    from pyro_slots.models import gmm as gmm_module

    points = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 2.0], [3.0, 0.0], [1.0, 1.0]])
    batch = 20000
    x = points.expand(batch, -1, -1).double()
    model = GaussianMixture(2, 2, init="kmeans++_seeds", init_local_trials=1)
    generator = torch.Generator().manual_seed(5)
    slots = gmm_module.kmeans_plus_plus(model, x, 2, generator, statistics=False, local_trials=1)
    loc = model.slot_spec.split(slots)["loc"]  # (batch, 2, 2)
    first = (loc[:, :1] == x).all(-1).double().argmax(-1)
    second = (loc[:, 1:] == x).all(-1).double().argmax(-1)
    for i in range(5):
        rows = first == i
        d2 = ((points - points[i]) ** 2).sum(-1).double()
        freq = torch.bincount(second[rows], minlength=5).double() / rows.sum()
        # Binomial standard error at ~4000 draws: < 0.008; 4 of them.
        np.testing.assert_allclose(freq.numpy(), (d2 / d2.sum()).numpy(), atol=0.032)


def test_init_local_trials_must_be_a_positive_int():
    with pytest.raises(ValueError, match="init_local_trials"):
        GaussianMixture(4, 2, init_local_trials=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("num_slots", [2, 3, 4, 7, 16, 20])
def test_nearest_center_is_numpy_argmin_with_ties_to_the_first(dtype, num_slots):
    """k-means++'s assignment (the slot index packed into the distances' low bits, or ``min``
    above 16 slots) against numpy's ``argmin``; exact ties (duplicated centers, zero distances)
    go to the first slot as in ``argmin``."""
    from pyro_slots.models.gmm import _nearest, _one_hot

    g = torch.Generator().manual_seed(num_slots)
    d = torch.rand(5, num_slots, 300, generator=g, dtype=torch.float64).to(dtype)
    d[:, -1] = d[:, 0]  # a duplicated center: every point ties between slots 0 and K - 1
    d[0, :, :10] = 0.0  # points that sit on every center
    got = _nearest(d)
    want = np.argmin(d.numpy(), axis=1)
    np.testing.assert_array_equal(got.numpy(), want)
    members = _one_hot(got, num_slots, dtype)  # the assignment as k-means' memberships
    brute = np.stack([want == k for k in range(num_slots)], 1)
    np.testing.assert_array_equal(members.numpy(), brute.astype(members.numpy().dtype))


def _numpy_lloyd_statistics(points, seeds, lloyd_steps):
    """Lloyd's iterations from the seeds (ties to the first center, an empty cluster keeps its
    center, stopping early at a fixed assignment), then the cluster means, per-feature variances
    (the pooled unbiased variance below two points, floored at 1e-6 of it) and the smoothed
    weights ``(N_k + 1) / (M + K)``, per datapoint in numpy."""
    num_points, num_slots = len(points), len(seeds)
    centers, nearest = points[seeds].copy(), None
    for step in range(lloyd_steps + 1):
        d2 = ((points[:, None, :] - centers[None]) ** 2).sum(-1)
        previous, nearest = nearest, d2.argmin(1)
        if step == lloyd_steps or (previous is not None and (previous == nearest).all()):
            break
        for k in range(num_slots):
            if (nearest == k).any():
                centers[k] = points[nearest == k].mean(0)
    pooled = points.var(0, ddof=1)
    loc, var, count = centers.copy(), np.tile(pooled, (num_slots, 1)), np.zeros(num_slots)
    for k in range(num_slots):
        members = points[nearest == k]
        count[k] = len(members)
        if len(members):
            loc[k] = members.mean(0)
        if len(members) > 1:
            var[k] = ((members - loc[k]) ** 2).mean(0)
    var = np.maximum(var, 1e-6 * pooled)
    return loc, var, np.log((count + 1) / (num_points + num_slots))


@pytest.mark.parametrize("grad", [True, False])
@pytest.mark.parametrize("lloyd_steps", [0, 1, 10])
def test_kmeans_plus_plus_statistics_are_numpy_lloyd_from_the_same_seeds(
    kmeans_path, lloyd_steps, grad
):
    """init="kmeans++": from the greedy seeds, ``init_lloyd_steps`` hard k-means iterations and
    the final assignment's cluster means, variances and smoothed weights, against a numpy Lloyd
    per datapoint (float64, data far from the origin); the means carry x's gradient (the means
    of the assigned points: each point's gradient of Σ loc is 1 / N_k, so a set's total is the
    number of non-empty clusters times the features). Without a gradient to keep (``grad``
    False), the kernel computes the statistics itself."""
    g = torch.Generator().manual_seed(4)
    centers = 6.0 * torch.randn(6, 1, 3, 2, generator=g, dtype=torch.float64)
    pick = torch.randint(3, (6, 50), generator=g)
    x = torch.gather(centers.expand(6, 50, 3, 2), 2, pick[..., None, None].expand(6, 50, 1, 2))
    x = x.squeeze(2) + torch.randn(6, 50, 2, generator=g, dtype=torch.float64) + 100.0
    x.requires_grad_(grad)
    gmm = GaussianMixture(4, 2, init_lloyd_steps=lloyd_steps)
    parts = gmm.slot_spec.split(gmm.init_slots(x, 4, torch.Generator().manual_seed(3)))
    xn = x.detach().numpy()
    seeds = _numpy_kmeans_plus_plus_seeds(xn, 4, torch.Generator().manual_seed(3))
    nonempty = []
    for n in range(6):
        loc, var, logit = _numpy_lloyd_statistics(xn[n], seeds[n], lloyd_steps)
        np.testing.assert_allclose(parts["loc"][n].detach().numpy(), loc, rtol=1e-12)
        np.testing.assert_allclose(parts["log_scale"][n].exp().detach().numpy() ** 2, var,
                                   rtol=1e-9)  # fmt: skip
        np.testing.assert_allclose(parts["logit"][n].detach().numpy(), logit, rtol=1e-12)
        nonempty.append(float((logit > np.log(1 / 54) + 1e-9).sum()))
    if grad:
        (d_x,) = torch.autograd.grad(parts["loc"].sum(), x)
        np.testing.assert_allclose(d_x.sum((1, 2)).numpy(), 2 * np.array(nonempty), rtol=1e-12)
    else:
        assert not parts["loc"].requires_grad


@pytest.mark.parametrize(
    "batch, num_points, dim, num_slots",
    [(7, 37, 1, 3), (5, 53, 5, 4), (4, 6, 2, 6), (3, 20, 2, 1), (6, 129, 3, 7)],
)
@pytest.mark.parametrize("grad", [True, False])
def test_kmeans_plus_plus_on_odd_shapes_is_numpy_lloyd(kmeans_path, batch, num_points, dim,
                                                       num_slots, grad):  # fmt: skip
    """Shapes off the common case against the numpy references: one feature and five, as many
    slots as points (every point a seed), one slot (no draw), points not a multiple of the
    kernel's blocks of 16; three Lloyd steps."""
    x = 3.0 * torch.randn(batch, num_points, dim, generator=torch.Generator().manual_seed(dim),
                          dtype=torch.float64) - 7.0  # fmt: skip
    x.requires_grad_(grad)
    gmm = GaussianMixture(num_slots, dim, init_lloyd_steps=3)
    parts = gmm.slot_spec.split(gmm.init_slots(x, num_slots, torch.Generator().manual_seed(8)))
    xn = x.detach().numpy()
    seeds = _numpy_kmeans_plus_plus_seeds(xn, num_slots, torch.Generator().manual_seed(8))
    for n in range(batch):
        assert len(set(seeds[n])) == num_slots
        loc, var, logit = _numpy_lloyd_statistics(xn[n], seeds[n], 3)
        np.testing.assert_allclose(parts["loc"][n].detach().numpy(), loc, rtol=1e-12, atol=1e-14)
        np.testing.assert_allclose(parts["log_scale"][n].exp().detach().numpy() ** 2, var,
                                   rtol=1e-9)  # fmt: skip
        np.testing.assert_allclose(parts["logit"][n].detach().numpy(), logit, rtol=1e-12)


def test_kmeans_plus_plus_of_identical_points(kmeans_path):
    """Every point the same: every seed that point, zero variances floored at 1e-6 of the
    floored pooled variance (1e-18), the weights from the cluster sizes (all in the first)."""
    x = torch.full((3, 10, 2), 2.5, dtype=torch.float64)
    gmm = GaussianMixture(3, 2, init_lloyd_steps=2)
    parts = gmm.slot_spec.split(gmm.init_slots(x, 3, torch.Generator().manual_seed(0)))
    assert torch.equal(parts["loc"], torch.full((3, 3, 2), 2.5, dtype=torch.float64))
    torch.testing.assert_close(parts["log_scale"], torch.full((3, 3, 2), 0.5 * np.log(1e-18),
                                                              dtype=torch.float64))  # fmt: skip
    want = torch.tensor([11.0, 1.0, 1.0], dtype=torch.float64).div(13).log()
    torch.testing.assert_close(parts["logit"], want.expand(3, 3))


@needs_kmeans_kernel
def test_kmeans_kernel_and_torch_agree_in_float32():
    """The kernel against torch's operations on 512 float32 sets of 500 points (the benchmark's
    shape): the same seeds and assignment, so the same statistics to float32 rounding, on all
    but a few sets (a near-tie in a distance or a potential can go either way: the kernel sums
    differences directly and potentials in double)."""
    from pyro_slots.data import sample_point_sets

    x = sample_point_sets(512, 500, 4, 2, seed=3).x.float()
    gmm = GaussianMixture(4, 2, init_lloyd_steps=2)
    out = {}
    for env in ("0", "1"):
        with pytest.MonkeyPatch.context() as m:
            m.setenv("PYRO_SLOTS_FUSED_KMEANS", env)
            out[env] = gmm.init_slots(x, 4, torch.Generator().manual_seed(2))
    close = torch.isclose(out["0"], out["1"], rtol=1e-4, atol=1e-4).flatten(1).all(1)
    assert close.float().mean() >= 0.99


@needs_kmeans_kernel
def test_kmeans_kernel_refuses_bad_arguments():
    kernel = _fused_kmeans.EXTENSION.module.kmeans
    x, u = torch.randn(2, 5, 2), torch.rand(2, 2, 3)
    with pytest.raises(RuntimeError, match="first must index the points"):
        kernel(x, torch.tensor([0, 5]), u, 3, 0, True)
    with pytest.raises(RuntimeError, match="1 <= K <= M"):
        kernel(x, torch.tensor([0, 1]), torch.rand(2, 5, 3), 6, 0, True)
    with pytest.raises(RuntimeError, match="u must be"):
        kernel(x, torch.tensor([0, 1]), u.double(), 3, 0, True)


def test_native_kernels_are_switched_off_together(monkeypatch):
    monkeypatch.setenv("PYRO_SLOTS_NATIVE", "0")
    assert not _fused_kmeans.supported(torch.randn(2, 5, 2))
    from pyro_slots.inner import _fused_attention

    assert not _fused_attention.available()


def test_more_slots_than_measurements_are_refused_before_seeding(kmeans_path):
    """k-means++ seeds every slot at a distinct measurement: K = 5 slots on 3 points per set
    are refused, naming num_slots, on both paths (torch's used to return collapsed components
    with a positive log-likelihood); K = M still seeds every point once."""
    import pyro_slots as ps
    from pyro_slots.inner import EM

    x = torch.randn(2, 3, 2, generator=torch.Generator().manual_seed(0))
    match = r"num_slots: k-means\+\+ seeds every slot at a distinct measurement, expected at most"
    match += r" the 3 measurements per datapoint, got 5"
    with pytest.raises(ValueError, match=match):
        ps.refine(GaussianMixture(5, 2), x, EM(3), seed=0)
    seeds = GaussianMixture(3, 2, init_lloyd_steps=0).init_slots(
        x, 3, generator=torch.Generator().manual_seed(0)
    )
    # every measurement is a seed (its own cluster's mean), in some order
    assert torch.allclose(torch.cdist(seeds[..., :2], x).min(1).values, torch.zeros(2, 3),
                          atol=1e-6)  # fmt: skip
