"""
Did inference work? Diagnostics with ArviZ
==========================================

Every datapoint has its own inference problem, so every datapoint gets its own diagnosis:

* **R-hat across restarts**: :func:`~pyro_slots.refine` with ``num_restarts=R`` runs ``R``
  independent initializations side by side; :func:`~pyro_slots.diagnostics.to_inference_data`
  makes them ArviZ *chains* (aligned slot by slot, since a mixture is symmetric) so that
  :func:`arviz.rhat` asks whether the restarts agree;
* **inner-loop health**: ELBO decreases, residuals, the update's Jacobian norm, dead and
  duplicate slots (:func:`~pyro_slots.diagnostics.inner_loop_health`);
* **Pareto k̂** of the guide (:func:`~pyro_slots.diagnostics.psis_diagnostic`), for models
  whose guide samples continuous latents;
* :func:`~pyro_slots.diagnostics.summary`: one row per datapoint with the flags raised.
"""

import os
import warnings

import arviz as az
import matplotlib.pyplot as plt
import pandas as pd
import pyro
import pyro.distributions as dist
import torch

import pyro_slots as ps
from pyro_slots import SlotModel, SlotSpec
from pyro_slots.diagnostics import (
    PSISWarning,
    inner_loop_health,
    plot_elbo_trajectories,
    plot_khat,
    plot_rhat,
    psis_diagnostic,
    summary,
    to_inference_data,
)
from pyro_slots.inner import EM, GradientAscent
from pyro_slots.models import GaussianMixture

FAST = os.environ.get("PYRO_SLOTS_DOCS_FAST") == "1"  # the docs' fast build (CI): tiny sizes
pyro.set_rng_seed(0)

###############################################################################
# Restarts as chains
# ------------------
#
# Eight point sets from mixtures of three Gaussians, four EM restarts each from k-means++
# seeds.

x = ps.data.sample_point_sets(8, 100, num_components=3, seed=3).x
gmm = GaussianMixture(num_slots=3, dim=2)
result = ps.refine(gmm, x, EM(num_steps=100), num_restarts=4, seed=0)

###############################################################################
# The default ``draws`` is chosen from the model: this GMM enumerates all its latents (its guide
# samples nothing), so the draws of each chain come from the Laplace approximation of the ELBO
# at the restart's optimum; with a guide that samples, they would be the guide's samples.

idata = to_inference_data(result, gmm, num_draws=100 if FAST else 400, seed=0)
print(idata.posterior.attrs["draws"], dict(idata.posterior.sizes))
rhat = az.rhat(idata.posterior)["loc"].max(["slot", "loc_dim_0"])
print("largest R-hat of the means per datapoint:", rhat.values.round(3))

###############################################################################
# Where the restarts found the same optimum, R-hat is near 1 (its own sampling noise with a few
# hundred draws is about 0.01); where some restart ended in another local optimum, the
# difference of the restarts' ELBOs (``elbo_spread``) is large and so is R-hat.
# ``summary`` gathers these per-datapoint numbers and the flags (``rhat>1.01``,
# ``elbo_decreased``, ``jacobian_norm>1``, ``dead_slots``, ...):

pd.set_option("display.width", 120)
pd.set_option("display.max_columns", None)

health = inner_loop_health(result, gmm, EM(50))
table = summary(idata, health=health)
print(table[["elbo", "elbo_spread", "rhat", "fraction_elbo_decrease", "flags"]].round(3))

###############################################################################
# ELBO trajectories of every restart, and R-hat per datapoint:

fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(10, 3.5))
plot_elbo_trajectories(idata, ax=ax0, max_datapoints=3)
plot_rhat(idata, ax=ax1)
fig.tight_layout()

###############################################################################
# R-hat needs draws
# -----------------
#
# With one draw per chain (``draws="point"``, the slots themselves) R-hat is undefined; the
# library says so instead of handing back NaN silently:

with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    to_inference_data(result, gmm, draws="point")
print(caught[0].category.__name__, ":", caught[0].message)

###############################################################################
# Pareto k̂ of a guide
# -------------------
#
# A small model with one continuous latent per slot and a Gaussian guide: ``z ~ N(0, 1)``,
# ``x | z ~ N(z, 0.7²)``, one measurement per slot. PSIS (Yao et al. 2018) fits a generalized
# Pareto distribution to the largest importance ratios ``p(x, z) / q(z)``: k̂ < 0.5 good,
# 0.7 < k̂ ≤ 1 unreliable, k̂ > 1 unusable.


class Conjugate(SlotModel):
    def __init__(self, dim=2):
        super().__init__(SlotSpec({"loc": (dim,), "log_scale": (dim,)}), dim)
        self.dim = dim
        self.slot_init = ps.GaussianInit(2 * dim, learnable=False)

    def model(self, x, slots):
        with pyro.plate("batch", x.shape[0], dim=-2), pyro.plate("slots", x.shape[1], dim=-1):
            z = pyro.sample("z", dist.Normal(x.new_zeros(self.dim), 1.0).to_event(1))
            pyro.sample("obs", dist.Normal(z, 0.7).to_event(1), obs=x)

    def guide(self, x, slots):
        parts = self.slot_spec.split(slots)
        with pyro.plate("batch", x.shape[0], dim=-2), pyro.plate("slots", x.shape[1], dim=-1):
            pyro.sample("z", dist.Normal(parts["loc"], parts["log_scale"].exp()).to_event(1))


model = Conjugate()
xc = torch.randn(6, 3, 2, generator=torch.Generator().manual_seed(0))
few = ps.refine(model, xc, GradientAscent(num_steps=3), num_slots=3, seed=0)
many = ps.refine(model, xc, GradientAscent(num_steps=300, adam=True), num_slots=3, seed=0)
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always", PSISWarning)
    psis_few = psis_diagnostic(model, xc, few.slots[0], 500, seed=0)
print("after 3 steps:  ", psis_few.reliability)
print(caught[0].message if caught else "no warning")
psis_many = psis_diagnostic(model, xc, many.slots[0], 500, seed=0)
print("after 300 steps:", psis_many.reliability)

fig, axes = plt.subplots(1, 2, figsize=(10, 3), sharey=True)
plot_khat(psis_few, ax=axes[0])
plot_khat(psis_many, ax=axes[1])
axes[0].set_title("3 inner steps")
axes[1].set_title("300 inner steps")
fig.tight_layout()

###############################################################################
# ``to_inference_data`` picks guide draws for this model on its own:

print(to_inference_data(many, model, num_draws=20, seed=0).posterior.attrs["draws"])

###############################################################################
# :func:`~pyro_slots.diagnostics.write_report` runs all of this on a batch and writes a folder
# with a markdown report, the pictures and the InferenceData as netCDF; the command line does
# the same for a checkpoint: ``pyro-slots diagnose CHECKPOINT --out DIR``.
