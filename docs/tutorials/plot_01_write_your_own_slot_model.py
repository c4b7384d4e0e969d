"""
Write your own slot model
=========================

A *slot model* is a Pyro program over a batch of datapoints whose per-datapoint parameters
``λ`` (the **slots**) are passed in, never stored. This page writes one from scratch -- a
mixture of Bernoulli vectors, each datapoint a set of binary measurements with its own
prototypes -- and lists what the library checks about it.

The template
------------

.. code-block:: python

    class MyModel(SlotModel):
        def __init__(self, num_slots, dim):
            # 1. the named layout of ONE slot: name -> event shape
            super().__init__(SlotSpec({"logits": (dim,), "weight_logit": ()}), feature_dim=dim)
            # 2. the enumerated sample site of the assignments, if the model has one
            self.assignment_site = "assignment"
            self.num_slots = num_slots              # the default K of refine()

        def model(self, x, slots):                 # x: (batch, M, F), slots: (batch, K, D)
            parts = self.slot_spec.split(slots)    # dict of (batch, K, *field_shape)
            # 3. datapoints in the plate named "batch", at dim -max_plate_nesting (-2)
            with pyro.plate("batch", x.shape[0], dim=-2) as n:
                with pyro.plate("measurements", x.shape[1], dim=-1):
                    z = pyro.sample("assignment", ..., infer={"enumerate": "parallel"})
                    pyro.sample("obs", ..., obs=x)

        def guide(self, x, slots):                 # optional: q(z | λ) for continuous latents
            ...

Checklist -- what the library checks, and where:

* **slot_spec** (:class:`~pyro_slots.SlotSpec`): slots travel as one tensor
  ``(batch, num_slots, slot_spec.dim)``; ``split``/``pack`` convert to and from named parts.
  ``refine`` refuses slots of the wrong shape, naming the expected one.
* **plate layout**: every sample site lies inside the plate named ``"batch"``
  (``SlotModel.batch_plate``) at dimension ``-max_plate_nesting`` (``-2`` by default); the
  per-datapoint ELBO (:class:`~pyro_slots.PerDatapointELBO`) refuses a log-density outside it.
* **assignment_site**: the name of the enumerated site whose posterior are the
  *responsibilities*; needed by :class:`~pyro_slots.inner.EM`,
  :class:`~pyro_slots.inner.GeneralizedEM` and :class:`~pyro_slots.inner.SoftKMeans`
  (refused with a :class:`~pyro_slots.CapabilityError` otherwise).
* **responsibilities** have the layout ``(batch, num_slots, measurements)``: slot axis before
  measurement axis.
* **per-measurement mixing weights** that a decoder emits slot-major, ``(batch, num_slots,
  measurements)`` (IODINE's masks), go into :class:`~pyro_slots.SlotCategorical` with
  ``dim=-2``: it normalizes them along the slot axis where they lie, instead of transposing
  them for ``dist.Categorical``; :func:`~pyro_slots.select_component` picks every
  measurement's component parameters under enumeration as a view, without a gather.
* **m_step(x, responsibilities, slots) -> slots** is *optional*. :class:`~pyro_slots.inner.EM`
  uses it when the model defines it (see :class:`~pyro_slots.models.GaussianMixture`), and
  otherwise derives the M-step from the model's trace
  (:class:`~pyro_slots.inner.DerivedMStep`): closed form when the components are Normal,
  Bernoulli, Categorical, Poisson, Gamma or Beta distributions whose parameters are slot parts
  up to a known bijection (identity, ``exp``, ``sigmoid``, ``softplus``, ``softmax``).
* **init_slots(x, num_slots, generator)** or a ``slot_init`` initializer draws ``λ_0``, or you
  pass ``slots=`` to :func:`~pyro_slots.refine`.
"""

import os

import matplotlib.pyplot as plt
import pyro
import pyro.distributions as dist
import torch
from pyro.ops.indexing import Vindex

import pyro_slots as ps
from pyro_slots import SlotModel, SlotSpec
from pyro_slots.inner import EM, GeneralizedEM

FAST = os.environ.get("PYRO_SLOTS_DOCS_FAST") == "1"  # the docs' fast build (CI): tiny sizes

###############################################################################
# The model
# ---------
#
# Each datapoint is a set of ``M`` binary vectors of ``dim = 16`` pixels (4 x 4 patterns),
# drawn from ``K`` prototypes of its own. One slot is a prototype's logits and its mixing
# weight's logit.


class BernoulliMixture(SlotModel):
    """``z ~ Categorical(softmax(weight_logit))``, ``x | z ~ Bernoulli(sigmoid(logits_z))``."""

    def __init__(self, num_slots: int, dim: int):
        super().__init__(SlotSpec({"logits": (dim,), "weight_logit": ()}), feature_dim=dim)
        self.assignment_site = "assignment"
        self.num_slots = num_slots

    def model(self, x, slots):
        parts = self.slot_spec.split(slots)
        batch, num_points, _ = x.shape
        with pyro.plate(self.batch_plate, batch, dim=-2) as n:
            with pyro.plate("measurements", num_points, dim=-1):
                z = pyro.sample(
                    "assignment",
                    dist.Categorical(logits=parts["weight_logit"].unsqueeze(-2)),
                    infer={"enumerate": "parallel"},
                )
                logits = Vindex(parts["logits"])[n.unsqueeze(-1), z]  # (K, batch, 1, dim)
                pyro.sample("obs", dist.Bernoulli(logits=logits).to_event(1), obs=x)

    def init_slots(self, x, num_slots, generator=None):
        # K distinct measurements of the datapoint, smoothed, as the prototypes.
        idx = torch.rand(x.shape[:2], generator=generator).argsort(1)[:, :num_slots]
        picked = torch.gather(x, 1, idx[..., None].expand(-1, -1, x.shape[-1]))
        probs = 0.25 + 0.5 * picked
        return self.slot_spec.pack(
            {"logits": probs.logit(), "weight_logit": x.new_zeros(x.shape[0], num_slots)}
        )


###############################################################################
# Data: prototypes are random 4 x 4 patterns, every pixel flipped with probability 0.1.

g = torch.Generator().manual_seed(0)
batch, num_points, k, dim = (4, 60, 3, 16) if FAST else (16, 200, 3, 16)
prototypes = (torch.rand(batch, k, dim, generator=g) < 0.5).float()
labels = torch.randint(k, (batch, num_points), generator=g)
clean = torch.gather(prototypes, 1, labels[..., None].expand(-1, -1, dim))
flip = torch.rand(clean.shape, generator=g) < 0.1
x = torch.where(flip, 1 - clean, clean)

model = BernoulliMixture(num_slots=k, dim=dim)

###############################################################################
# EM without writing an M-step
# ----------------------------
#
# ``BernoulliMixture`` has no ``m_step``: :class:`~pyro_slots.inner.EM` traces the model,
# finds that the Bernoulli's ``probs`` is ``sigmoid`` of the slot part ``logits`` and that the
# mixing weights are ``softmax`` over the slots of ``weight_logit``, and inverts both after the
# weighted maximum-likelihood estimates. :class:`~pyro_slots.inner.GeneralizedEM` needs not even
# that: a few gradient steps on the expected complete log-likelihood per M-step, kept only where
# the ELBO does not drop.

em = ps.refine(model, x, EM(num_steps=30), num_restarts=4, seed=0).best()
gem = ps.refine(model, x, GeneralizedEM(num_steps=30), num_restarts=4, seed=0).best()
print("ELBO per measurement, EM:            ", (em.elbo / num_points).mean().item())
print("ELBO per measurement, generalized EM:", (gem.elbo / num_points).mean().item())

###############################################################################
# The fitted prototypes of the first datapoint, next to the true ones (the slots come in any
# order: a mixture is symmetric in its components).

fitted = torch.sigmoid(model.slot_spec.split(em.slots)["logits"]).reshape(-1, k, 4, 4)[0]
fig, axes = plt.subplots(2, k, figsize=(1.6 * k, 3.4))
for j in range(k):
    axes[0, j].imshow(prototypes[0, j].reshape(4, 4), cmap="gray_r", vmin=0, vmax=1)
    axes[1, j].imshow(fitted[j].detach(), cmap="gray_r", vmin=0, vmax=1)
    axes[0, j].set_title(f"true {j}")
    axes[1, j].set_title(f"slot {j}")
for ax in axes.flat:
    ax.set_xticks([])
    ax.set_yticks([])
fig.tight_layout()

###############################################################################
# The ELBO never decreases under either rule (``history`` has the ELBO at every step):

plt.figure(figsize=(5, 3))
plt.plot(em.history.squeeze(1)[:, 0] / num_points, label="EM (derived M-step)")
plt.plot(gem.history.squeeze(1)[:, 0] / num_points, label="generalized EM")
plt.xlabel("inner step")
plt.ylabel("ELBO / measurement")
plt.legend()
plt.tight_layout()

###############################################################################
# What the checks say
# -------------------
#
# A component parameter that is no known function of one slot part (here ``2 * logits``) is
# refused with the site and the parameter named -- and the way out:


class ScaledLogits(BernoulliMixture):
    def model(self, x, slots):
        parts = self.slot_spec.split(slots)
        parts["logits"] = 2 * parts["logits"]
        super().model(x, self.slot_spec.pack(parts))


try:
    ps.refine(ScaledLogits(k, dim), x, EM(num_steps=5), seed=0)
except ps.CapabilityError as error:
    print(error)

###############################################################################
# A sample site outside the ``"batch"`` plate is not a per-datapoint model:


class SharedSite(BernoulliMixture):
    def model(self, x, slots):
        pyro.sample("shared", dist.Normal(0.0, 1.0), obs=torch.tensor(0.0))
        super().model(x, slots)


try:
    ps.refine(SharedSite(k, dim), x, GeneralizedEM(num_steps=1), seed=0)
except ValueError as error:
    print(error)
