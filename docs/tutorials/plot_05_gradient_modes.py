"""
Gradient modes and memory
=========================

The outer loop needs ``dJ/dw`` through the inner loop ``λ* = f_w^T(λ_0)``.
:class:`~pyro_slots.NestedSVI` offers four ways (``gradient=``):

* ``"unrolled"``: backpropagate through all ``T`` inner steps -- exact for the finite loop,
  memory growing linearly in ``T``;
* ``"truncated"``: through the last ``truncate`` steps only;
* ``"first_order"``: through the last step only (λ detached before it);
* ``"implicit"``: the implicit function theorem at the fixed point, ``dλ*/dw = (I - ∂f/∂λ)^{-1}
  ∂f/∂w``, solved with vector-Jacobian products of one step -- memory independent of ``T``.

This page measures what each keeps for the backward pass and how close its gradient is to the
unrolled one, on a Gaussian mixture with a trainable linear encoder refined by EM.
"""

import os
import weakref

import matplotlib.pyplot as plt
import pyro
import torch
from torch import nn

import pyro_slots as ps
from pyro_slots.inner import EM
from pyro_slots.models import GaussianMixture
from pyro_slots.objectives import NegativeELBO

FAST = os.environ.get("PYRO_SLOTS_DOCS_FAST") == "1"  # the docs' fast build (CI): tiny sizes
pyro.set_rng_seed(0)
torch.manual_seed(0)

num_sets, num_points = (8, 50) if FAST else (32, 200)
x = ps.data.sample_point_sets(num_sets, num_points, num_components=3, seed=0).x
model = GaussianMixture(num_slots=3, dim=2, encoder=nn.Linear(2, 2))
MODES = ("unrolled", "truncated", "first_order", "implicit")

###############################################################################
# What the backward pass keeps
# ----------------------------
#
# Autograd saves tensors during the forward pass for the backward pass. A
# :func:`torch.autograd.graph.saved_tensors_hooks` pair sees every one of them; those still
# alive when ``J`` has been computed are what the backward pass holds on to (the inner loop's
# own gradient computations free theirs at once).


def saved_bytes(svi, x):
    """Bytes of the distinct storages autograd keeps for J's backward pass, and dJ/dw."""
    saved = []

    def pack(tensor):
        saved.append(weakref.ref(tensor))
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        svi.generator.manual_seed(0)
        loss = svi.loss(x)
    storages = {}
    for ref in saved:
        tensor = ref()
        if tensor is not None:
            storage = tensor.untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()
    grad = torch.autograd.grad(loss, [model.encoder.weight])[0]
    return sum(storages.values()), grad


def make_svi(mode, num_steps):
    return ps.NestedSVI(
        model,
        EM(num_steps),
        NegativeELBO(),
        pyro.optim.Adam({"lr": 1e-3}),
        gradient=mode,
        truncate=2,
        seed=0,
    )


steps = (2, 5, 10) if FAST else (2, 5, 10, 20, 40)
memory = {mode: [] for mode in MODES}
grads = {}
for num_steps in steps:
    for mode in MODES:
        nbytes, grad = saved_bytes(make_svi(mode, num_steps), x)
        memory[mode].append(nbytes / 2**20)
        grads[mode, num_steps] = grad

###############################################################################
# Memory against the number of inner steps: unrolled grows linearly, the others stay flat.

fig, ax0 = plt.subplots(figsize=(5, 3.5))
for mode in MODES:
    ax0.plot(steps, memory[mode], marker="o", label=mode)
ax0.set_xlabel("inner steps T")
ax0.set_ylabel("kept for backward (MiB)")
ax0.legend()
fig.tight_layout()
for mode in MODES:
    print(f"{mode:12s} MiB kept:", [round(m, 3) for m in memory[mode]])

###############################################################################
# ... and the gradients' agreement with the unrolled one (cosine similarity). EM converges in
# a few steps here, so every mode's gradient is close to the unrolled one; the implicit
# gradient is exact at the fixed point, and truncated/first-order gradients drift further from
# it for rules that converge slowly or not at all (learned rules with few steps).

fig, ax1 = plt.subplots(figsize=(5, 3.5))
for mode in MODES[1:]:
    cosines = [
        torch.nn.functional.cosine_similarity(
            grads[mode, t].flatten(), grads["unrolled", t].flatten(), dim=0
        ).item()
        for t in steps
    ]
    ax1.plot(steps, cosines, marker="o", label=mode)
    print(f"{mode:12s} cosine to unrolled:", [round(c, 4) for c in cosines])
ax1.set_xlabel("inner steps T")
ax1.set_ylabel("cos(grad, unrolled grad)")
ax1.legend()
fig.tight_layout()

###############################################################################
# Choosing
# --------
#
# * ``"unrolled"`` when ``T`` is small and the exact gradient of the finite loop matters (with
#   ``"truncated"`` over all ``T`` steps, the modes whose gradient reaches a learned slot
#   initialization through the loop; ``straight_through=True`` passes it on under
#   ``"first_order"`` and shorter truncations);
# * ``"implicit"`` when the rule converges to a fixed point (EM, gradient ascent with a small
#   step): exact at the fixed point, memory of one step. If the adjoint solve fails, that
#   update falls back to the first-order gradient with an
#   :class:`~pyro_slots.ImplicitGradientWarning`;
# * ``"first_order"``/``"truncated"`` for long loops of learned rules, where they train well
#   in practice (see the README's results) at a fraction of the memory.
