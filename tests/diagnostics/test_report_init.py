import pytest
import torch

import pyro_slots as ps
from pyro_slots.diagnostics import RhatWarning, write_report
from pyro_slots.inner import EM
from pyro_slots.models import GaussianMixture
from tests.conftest import make_point_sets


def test_write_report_uses_the_given_initializer(tmp_path, float64):
    """The report's restarts start from the trained initializer, not from k-means++."""
    x, _ = make_point_sets(3, 30, seed=0)
    gmm = GaussianMixture(3, 2)
    init = ps.GaussianInit(gmm.slot_dim, loc=0.0, scale=1.0).double()
    with pytest.warns(RhatWarning, match="1 draw"):
        write_report(tmp_path, gmm, x, EM(5), num_restarts=2, seed=4, init=init, draws="point")
    expected = ps.refine(gmm, x, EM(5), num_restarts=2, seed=4, init=init)
    kmeans = ps.refine(gmm, x, EM(5), num_restarts=2, seed=4)
    import arviz as az

    idata = az.from_netcdf(tmp_path / "inference_data.nc")
    elbo = torch.as_tensor(idata.sample_stats["elbo"].values).reshape(2, 3)
    assert torch.allclose(elbo, expected.elbo, atol=1e-8)
    assert not torch.allclose(elbo, kmeans.elbo, atol=1e-3)
