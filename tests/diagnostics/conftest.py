"""Shared test models and data of the diagnostics tests."""

import math

import pyro
import pyro.distributions as dist
import pytest
import torch

import pyro_slots as ps
from pyro_slots.init import GaussianInit
from pyro_slots.inner import EM
from pyro_slots.model import SlotModel, SlotSpec
from pyro_slots.models import GaussianMixture


class ConjugateGaussian(SlotModel):
    """``z^{n,k} ~ N(0, I)``, ``x^{n,k} ~ N(z^{n,k}, σ² I)``, guide ``N(loc, exp(log_scale)²)``.

    Measurement ``k`` observes slot ``k`` (``M = K``). The posterior factorizes over slots and
    coordinates, so the mean-field guide family contains it:
    ``z | x ~ N(x / (1 + σ²), σ² / (1 + σ²))`` and ``p(x) = N(x; 0, (1 + σ²) I)``.
    """

    def __init__(self, dim: int = 2, sigma: float = 0.7):
        super().__init__(SlotSpec({"loc": (dim,), "log_scale": (dim,)}), dim)
        self.dim, self.sigma = dim, sigma
        self.slot_init = GaussianInit(2 * dim, learnable=False)

    def _plates(self, x, slots):
        batch, num_slots, _ = slots.shape
        if x.shape[1] != num_slots:
            raise ValueError("ConjugateGaussian needs one measurement per slot")
        return pyro.plate("batch", batch, dim=-2), pyro.plate("slots", num_slots, dim=-1)

    def model(self, x, slots):
        batch_plate, slot_plate = self._plates(x, slots)
        with batch_plate, slot_plate:
            z = pyro.sample("z", dist.Normal(x.new_zeros(self.dim), 1.0).to_event(1))
            pyro.sample("obs", dist.Normal(z, self.sigma).to_event(1), obs=x)

    def guide(self, x, slots):
        parts = self.slot_spec.split(slots)
        batch_plate, slot_plate = self._plates(x, slots)
        with batch_plate, slot_plate:
            pyro.sample("z", dist.Normal(parts["loc"], parts["log_scale"].exp()).to_event(1))

    def exact_slots(self, x, scale_factor: float = 1.0):
        """The exact posterior's λ, with its standard deviation multiplied by ``scale_factor``."""
        s2 = self.sigma**2
        log_scale = 0.5 * math.log(s2 / (1 + s2)) + math.log(scale_factor)
        return self.slot_spec.pack(
            {"loc": x / (1 + s2), "log_scale": torch.full_like(x, log_scale)}
        )

    def log_evidence(self, x):
        """``log p(x^n)``, ``(batch,)``, in closed form."""
        return dist.Normal(0.0, math.sqrt(1 + self.sigma**2)).log_prob(x).sum((-1, -2))


def make_point_sets(
    num_sets, num_points, num_components=3, dim=2, seed=0, spread=8.0, return_labels=False
):
    """Well-separated mixture point sets (cluster sd 0.5, means ~ N(0, spread²))."""
    g = torch.Generator().manual_seed(seed)
    dtype = torch.get_default_dtype()
    means = spread * torch.randn(num_sets, num_components, dim, generator=g, dtype=dtype)
    labels = torch.randint(num_components, (num_sets, num_points), generator=g)
    centers = torch.gather(means, 1, labels.unsqueeze(-1).expand(-1, -1, dim))
    x = centers + 0.5 * torch.randn(num_sets, num_points, dim, generator=g, dtype=dtype)
    return (x, labels) if return_labels else x


def refine_restarts(num_sets, num_points=40, seed=0, num_restarts=4, stuck=()):
    """EM restarts on point sets, from explicit initializations (independent of k-means++).

    Restart ``r`` starts from the statistics of the true clusters with the slots cyclically
    shifted by ``r`` and the locations jittered (sd 1): different initializations and slot
    orders, one optimum. For every ``(restart, datapoint)`` in ``stuck`` slot 1 starts equal to
    slot 0; EM preserves that symmetry, so the restart ends at a fixed point far below the
    optimum (two slots share one cluster, one slot covers two).

    :returns: ``(gmm, x, result)``.
    """
    x, labels = make_point_sets(num_sets, num_points, seed=seed, return_labels=True)
    gmm = GaussianMixture(3, 2)
    truth = gmm.m_step(x, torch.nn.functional.one_hot(labels, 3).transpose(1, 2).to(x.dtype))
    g = torch.Generator().manual_seed(seed)
    inits = []
    for r in range(num_restarts):
        parts = gmm.slot_spec.split(truth.roll(r, dims=1).clone())
        parts["loc"] = parts["loc"] + torch.randn(parts["loc"].shape, generator=g, dtype=x.dtype)
        inits.append(gmm.slot_spec.pack(parts))
    init = torch.stack(inits)
    for r, n in stuck:
        init[r, n, 1] = init[r, n, 0]
    result = ps.refine(gmm, x, EM(100), slots=init, num_restarts=num_restarts, tol=1e-8)
    return gmm, x, result


@pytest.fixture
def conjugate():
    return ConjugateGaussian(dim=2, sigma=0.7)


@pytest.fixture
def point_sets():
    return make_point_sets


@pytest.fixture
def gmm_restarts():
    return refine_restarts
