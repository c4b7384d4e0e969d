"""Test setup in Pyro's style: fresh param store, validation on, a fixed seed per test."""

import contextlib
from datetime import timedelta

import pyro
import pytest
import torch


@pytest.fixture(autouse=True)
def _pyro_state():
    pyro.clear_param_store()
    pyro.enable_validation(True)
    pyro.set_rng_seed(0)
    torch.set_num_threads(1)
    yield
    pyro.clear_param_store()


@pytest.fixture
def float64():
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


@pytest.fixture(params=["torch", "kernel"])
def logprob_path(request, monkeypatch):
    """The lean estimator's mixture passes through torch's operations and through the fused C++
    kernels (pyro_slots/elbo/_fused_logprob.py); skipped for "kernel" where none was built."""
    from pyro_slots.elbo import _fused_logprob

    if request.param == "kernel" and not _fused_logprob.available():  # no compiler here
        pytest.skip(f"the log-density kernels were not built: {_fused_logprob.EXTENSION.error}")
    monkeypatch.setenv("PYRO_SLOTS_FUSED_LOGPROB", "1" if request.param == "kernel" else "0")
    return request.param


def make_point_sets(num_sets, num_points, num_components=3, dim=2, seed=0, spread=4.0):
    """Well-separated mixture point sets and their true component labels (test helper)."""
    g = torch.Generator().manual_seed(seed)
    means = spread * torch.randn(num_sets, num_components, dim, generator=g)
    labels = torch.randint(num_components, (num_sets, num_points), generator=g)
    centers = torch.gather(means, 1, labels.unsqueeze(-1).expand(-1, -1, dim))
    x = centers + 0.5 * torch.randn(num_sets, num_points, dim, generator=g)
    return x.to(torch.get_default_dtype()), labels


def tiny_autoencoder(image_size=12, **kwargs):
    """A SlotAutoencoder small enough for unit tests (3 slots, two 3x3 layers each way)."""
    from pyro_slots.models import SlotAutoencoder

    config = dict(
        image_size=image_size,
        num_slots=3,
        feature_dim=16,
        encoder_channels=(8, 8),
        encoder_strides=(1, 2),
        decoder_channels=(8, 8),
        decoder_upsample=1,
        kernel_size=3,
    )
    config.update(kwargs)
    return SlotAutoencoder(**config)


def gmm_log_joint(gmm, x, slots):
    """``log π_k + log N(x_m | loc_k, scale_k)`` ``(batch, K, M)`` of a GaussianMixture, in
    closed form: the independent answer the Pyro program's posterior and ELBO are checked
    against (test helper)."""
    loc, scale, log_weights = gmm.component_params(slots)
    comp = torch.distributions.Normal(loc.unsqueeze(-2), scale.unsqueeze(-2))
    return comp.log_prob(x.unsqueeze(1)).sum(-1) + log_weights.unsqueeze(-1)


def gmm_responsibilities(gmm, x, slots):
    """Closed-form posterior ``p(z^{n,m} = k | x, λ)`` ``(batch, K, M)`` (test helper)."""
    return torch.softmax(gmm_log_joint(gmm, x, slots), dim=1)


@contextlib.contextmanager
def gloo_group(rank: int, world_size: int, init_file: str):
    """A gloo process group of a spawned test worker (one thread), destroyed on exit."""
    import torch.distributed as dist

    dist.init_process_group(
        "gloo",
        init_method=f"file://{init_file}",
        rank=rank,
        world_size=world_size,
        timeout=timedelta(seconds=60),
    )
    try:
        torch.set_num_threads(1)
        yield
        # Meet before tearing the group down: a rank destroying it while the other still
        # finishes its last collective aborts now and then (SIGABRT), as the trainer's ranks
        # did before their barrier.
        dist.barrier()
    finally:
        dist.destroy_process_group()
