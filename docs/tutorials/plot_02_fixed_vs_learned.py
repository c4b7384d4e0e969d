"""
Fixed vs learned inference in one argument
==========================================

The inner rule -- how each datapoint's slots are refined -- is one argument of
:func:`~pyro_slots.refine` and of :class:`~pyro_slots.NestedSVI`. Fixed rules
(:class:`~pyro_slots.inner.EM`, :class:`~pyro_slots.inner.GradientAscent`) have no weights;
learned rules (:class:`~pyro_slots.inner.SlotAttention`,
:class:`~pyro_slots.inner.LearnedGradient`) are trained by the outer loop. Every rule climbs
the same per-datapoint ELBO of the same Pyro model, so their results compare directly.
"""

import os

import matplotlib.pyplot as plt
import pyro
import torch

import pyro_slots as ps
from pyro_slots.inner import EM, GradientAscent, Hybrid, Safeguarded, SlotAttention
from pyro_slots.models import GaussianMixture
from pyro_slots.objectives import NegativeELBO

FAST = os.environ.get("PYRO_SLOTS_DOCS_FAST") == "1"  # the docs' fast build (CI): tiny sizes
pyro.set_rng_seed(0)

###############################################################################
# Point sets, each from its own mixture of 3 Gaussians; the model is a per-datapoint GMM.

num_sets, num_points = (16, 100) if FAST else (64, 200)
train = ps.data.sample_point_sets(num_sets, num_points, num_components=3, seed=0).x
test = ps.data.sample_point_sets(num_sets, num_points, num_components=3, seed=1).x
gmm = GaussianMixture(num_slots=3, dim=2, init="random_from_data")

###############################################################################
# Fixed rules
# -----------
#
# EM (closed-form M-step) and gradient ascent (its default step has a trust region, so it does
# not diverge on tight clusters) from the same initial slots:

slots0 = gmm.init_slots(test, 3, generator=torch.Generator().manual_seed(0))
results = {
    "EM": ps.refine(gmm, test, EM(num_steps=20), slots=slots0),
    "GradientAscent": ps.refine(gmm, test, GradientAscent(num_steps=20), slots=slots0),
}

###############################################################################
# A learned rule
# --------------
#
# Slot attention (Locatello et al. 2020) as an inner rule, trained by
# :class:`~pyro_slots.NestedSVI` with the negative ELBO as the task objective. Only the
# argument ``rule`` differs from training anything else.

rule = SlotAttention(num_steps=3, slot_dim=gmm.slot_dim, input_dim=2, hidden_dim=32)
svi = ps.NestedSVI(gmm, rule, NegativeELBO(), pyro.optim.Adam({"lr": 3e-3}), seed=0)
losses = []
for step in range(15 if FAST else 150):
    batch = ps.data.sample_point_sets(16, num_points, num_components=3, seed=100 + step).x
    loss, inner_result = svi.step(batch)  # J before the update, and the batch's inner result
    losses.append(loss)

results["SlotAttention (trained, T=3)"] = ps.refine(gmm, test, rule, slots=slots0)

###############################################################################
# Learned rules can be combined with fixed ones: :class:`~pyro_slots.inner.Hybrid` hands over
# to EM after the learned steps; :class:`~pyro_slots.inner.Safeguarded` keeps a learned step
# only where it does not lower the ELBO, else takes EM's.

results["Hybrid(SlotAttention, EM)"] = ps.refine(
    gmm, test, Hybrid(rule, EM(1), num_fixed_steps=17), slots=slots0
)
results["Safeguarded(SlotAttention, EM)"] = ps.refine(
    gmm, test, Safeguarded(rule, fallback=EM(1)), num_steps=20, slots=slots0
)

###############################################################################
# The mean ELBO per point along the inner steps. The learned rule gets far in 3 steps; the
# fixed rules keep climbing; the combinations keep the learned start and EM's guarantee.

fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(10, 3.5))
ax0.plot(losses)
ax0.set_xlabel("outer update")
ax0.set_ylabel("J = negative ELBO")
ax0.set_title("training SlotAttention")
for name, result in results.items():
    history = result.history.reshape(result.history.shape[0], -1).mean(-1) / num_points
    ax1.plot(history.numpy(), marker=".", label=name)
    print(f"{name:32s} final ELBO / point {result.elbo.mean().item() / num_points:8.4f}")
ax1.set_xlabel("inner step")
ax1.set_ylabel("ELBO / point")
ax1.legend(fontsize=7)
fig.tight_layout()

###############################################################################
# Test-time steps may differ from training steps for every rule (``num_steps=``), and so may
# the number of slots for every rule whose weights do not depend on ``K``.
