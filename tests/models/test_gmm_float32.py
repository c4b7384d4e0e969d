"""Float32 EM stays right far from the origin and at any scale (issue 19, case 1).

The data are the same point sets shifted by 1e3 and 1e5 and rescaled by 1e-6 and 1e6, rounded to
float32. The reference is scikit-learn's float64 EM, from the same initialization, on exactly
those float32 values mapped back to unit scale: the log-likelihood per point of the transformed
data is the reference's minus ``dim * log(scale)``.
"""

import math
import warnings

import pytest
import torch
from sklearn.exceptions import ConvergenceWarning
from sklearn.mixture import GaussianMixture as SkGaussianMixture

import pyro_slots as ps
from pyro_slots.inner import EM
from pyro_slots.models import GaussianMixture
from tests.conftest import make_point_sets

NUM_SETS, NUM_POINTS, K, STEPS = 8, 200, 4, 30


def _sklearn_score(x, loc, scale, logw):
    """Per-point log-likelihood of scikit-learn's float64 EM from the given start."""
    sk = SkGaussianMixture(
        K,
        covariance_type="diag",
        weights_init=logw.exp().numpy(),
        means_init=loc.numpy(),
        precisions_init=(1 / scale**2).numpy(),
        max_iter=STEPS,
        tol=0.0,
        reg_covar=1e-6,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        sk.fit(x.numpy())
    return sk.score(x.numpy())


@pytest.mark.parametrize("shift, scale", [(1e3, 1.0), (1e5, 1.0), (0.0, 1e-6), (0.0, 1e6)], ids=str)
def test_float32_em_matches_float64_reference(shift, scale):
    base, _ = make_point_sets(NUM_SETS, NUM_POINTS, num_components=K, seed=11)
    base = base.double()
    x32 = (base * scale + shift).float()
    # The values the float32 run sees, back at unit scale, in float64.
    back = (x32.double() - shift) / scale
    gmm64 = GaussianMixture(K, 2)
    slots0 = gmm64.init_slots(back, K, torch.Generator().manual_seed(0))
    loc0, scale0, logw0 = gmm64.component_params(slots0)
    parts = gmm64.slot_spec.split(slots0)
    parts["loc"] = parts["loc"] * scale + shift
    parts["log_scale"] = parts["log_scale"] + math.log(scale)
    slots32 = gmm64.slot_spec.pack(parts).float()

    gmm = GaussianMixture(K, 2)
    result = ps.refine(gmm, x32, EM(STEPS), slots=slots32)
    assert result.slots.dtype == torch.float32
    # The ELBO (the exact log-likelihood) never decreases beyond float32 rounding.
    history = result.history.double()
    drops = history.diff(dim=0)
    assert (drops >= -1e-5 * history[:-1].abs()).all(), drops.min()
    ours = result.elbo[0].double() / NUM_POINTS + 2 * math.log(scale)
    for n in range(NUM_SETS):
        expected = _sklearn_score(back[n], loc0[n], scale0[n], logw0[n])
        assert ours[n].item() == pytest.approx(expected, abs=2e-3), n


def test_variance_floor_is_relative_to_the_data():
    """A component holding one point gets variance reg_covar x the set's variance (analytic)."""
    x = torch.tensor([[[0.0], [1.0], [2.0], [3.0]]], dtype=torch.float64) * 1e-6 + 7.0
    gmm = GaussianMixture(2, 1, reg_covar=1e-3)
    resp = torch.tensor([[[1.0, 0.0, 0.0, 0.0], [0.0, 1.0, 1.0, 1.0]]], dtype=torch.float64)
    _, scale, _ = gmm.component_params(gmm.m_step(x, resp))
    data_var = x[0, :, 0].var(unbiased=False).item()  # 1.25e-12
    assert scale[0, 0, 0].item() ** 2 == pytest.approx(1e-3 * data_var, rel=1e-6)
    # The other component: its own variance (2/3 of 1e-12) plus the same floor.
    assert scale[0, 1, 0].item() ** 2 == pytest.approx(2 / 3 * 1e-12 + 1e-3 * data_var, rel=1e-6)
