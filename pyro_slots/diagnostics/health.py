"""Health of the inner loop, per iteration and per datapoint.

Signs that the inner loop did not do its job, each readable off one refine result:

* **ELBO decreases**: fixed rules (EM, soft k-means, small-step gradient ascent) never lower
  the ELBO (Neal & Hinton 1998); learned rules are not guaranteed not to.
* **Relative fixed-point residual** ``‖λ_{t+1} - λ_t‖ / ‖λ_t‖``: has the loop stopped moving?
* **Jacobian spectral norm** ``‖∂f/∂λ‖₂`` of the update ``λ ↦ f(λ)`` at the final slots, by power
  iteration on ``JᵀJ`` with Jacobian-vector and vector-Jacobian products. Below 1 the update
  is a contraction: perturbations shrink at every step, long unrolls stay bounded and the
  fixed-point (adjoint) iteration of implicit gradients, ``u = g + Jᵀu``, converges (Bai et al.
  2019). Above 1 some perturbation grows in one step, and none of this is guaranteed (the
  spectral radius, which decides the long run, can still be below 1).
* **Assignment entropy** of the responsibilities: how undecided the slots are about the
  measurements.
* **Duplicate slots** (two slots explaining the same measurements) and **dead slots** (slots
  with almost no mass), the failure modes of mixture fitting and slot attention alike.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
import xarray as xr

from ..elbo import PerDatapointELBO
from ..init import draw
from ..inner.base import InnerProblem, InnerRule, InnerState
from ..inner.reinit import duplicate_mask, posterior_masks
from ..refine import best_restart
from ..validation import CapabilityError, check_positive_float, check_positive_int, check_seed
from . import _traces
from .inference_data import checked_result

__all__ = [
    "InnerLoopHealth",
    "assignment_entropy",
    "duplicate_slots",
    "elbo_decreases",
    "inner_loop_health",
    "jacobian_spectral_norm",
    "model_responsibilities",
    "slot_mass",
    "trajectory_dataset",
]


def jacobian_spectral_norm(
    model,
    x_enc: torch.Tensor,
    rule: InnerRule,
    slots: torch.Tensor,
    *,
    aux: tuple = (),
    step: int = 0,
    num_iterations: int = 50,
    rtol: float = 1e-7,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Largest singular value of ``∂ step(λ) / ∂λ`` at ``slots``, per datapoint.

    The update acts on every datapoint separately, so its Jacobian is block diagonal and one
    batched power iteration on ``JᵀJ`` estimates every block's norm. The step is linearized once
    (one differentiable step); each iteration then costs one Jacobian-vector product (the
    double-vjp trick: ``Jv = ∂(Jᵀu · v)/∂u``) and one vector-Jacobian product. The rule's
    auxiliary state (optimizer moments, hidden state) is held fixed.

    :param SlotModel model: the model.
    :param torch.Tensor x_enc: encoded measurements ``(batch, M, features)``.
    :param InnerRule rule: the update.
    :param torch.Tensor slots: ``(batch, num_slots, slot_dim)`` where to linearize.
    :param tuple aux: the rule's auxiliary state at ``slots`` (``rule.init``'s when empty and
        the rule needs one).
    :param int step: the step counter passed to the rule (matters for Adam's bias correction).
    :param int num_iterations: maximum power iterations.
    :param float rtol: stop once no estimate changed by more than ``rtol`` relatively.
    :param torch.Generator generator: draws the starting vectors.
    :returns: ``(batch,)`` spectral norms.
    """
    num_iterations = check_positive_int(num_iterations, "num_iterations")
    rtol = check_positive_float(rtol, "rtol")
    problem = InnerProblem(model, x_enc.detach())
    lam = slots.detach().requires_grad_()
    with torch.enable_grad():
        if not aux:
            aux = tuple(a.detach() for a in rule.init(problem, lam.detach()).aux)
        new_state, _ = rule.step(InnerState(lam, step, aux), problem, create_graph=True)
        out = new_state.slots
        if not out.requires_grad:
            return slots.new_zeros(slots.shape[0])
        u = torch.zeros_like(out, requires_grad=True)
        (vjp_u,) = torch.autograd.grad(out, lam, u, create_graph=True, allow_unused=True)
    if vjp_u is None:
        return slots.new_zeros(slots.shape[0])

    def per_datapoint_norm(t):
        return t.flatten(1).norm(dim=1).reshape(-1, *([1] * (t.dim() - 1)))

    v = draw(torch.randn, slots.shape, generator=generator, dtype=slots.dtype, device=slots.device)
    v = v / per_datapoint_norm(v)
    sigma = None
    for _ in range(num_iterations):
        (jv,) = torch.autograd.grad(vjp_u, u, v, retain_graph=True)  # J v
        (jtjv,) = torch.autograd.grad(out, lam, jv, retain_graph=True)  # Jᵀ J v
        new_sigma = jv.flatten(1).norm(dim=1)
        norm = per_datapoint_norm(jtjv)
        v = torch.where(norm > 0, jtjv / norm.clamp_min(torch.finfo(norm.dtype).tiny), v)
        done = sigma is not None and bool(
            ((new_sigma - sigma).abs() <= rtol * new_sigma.abs().clamp_min(1e-30)).all()
        )
        sigma = new_sigma
        if done:
            break
    # v is now the top right singular vector (to the iteration's accuracy): σ = ‖J v‖.
    (jv,) = torch.autograd.grad(vjp_u, u, v)
    return jv.flatten(1).norm(dim=1).detach()


def slot_mass(responsibilities: torch.Tensor) -> torch.Tensor:
    """Share of the measurements each slot explains, ``(batch, num_slots)``, rows sum to 1.

    :param torch.Tensor responsibilities: ``(batch, num_slots, measurements)``.
    """
    return responsibilities.sum(-1) / responsibilities.shape[-1]


def assignment_entropy(responsibilities: torch.Tensor) -> torch.Tensor:
    """Mean over measurements of ``-Σ_k r_k log r_k`` (nats), ``(batch,)``; ``0`` for hard
    assignments, ``log K`` for uniform ones.

    :param torch.Tensor responsibilities: ``(batch, num_slots, measurements)``.
    """
    r = responsibilities
    plogp = torch.where(r > 0, r * r.clamp_min(torch.finfo(r.dtype).tiny).log(), 0)
    return -plogp.sum(1).mean(-1)


def duplicate_slots(features: torch.Tensor, threshold: float = 0.95) -> torch.Tensor:
    """How many slots duplicate an earlier slot of the same datapoint, ``(batch,)``.

    Slot ``k`` is a duplicate when the cosine similarity of its feature vector with that of a
    slot ``j < k`` exceeds ``threshold``.

    :param torch.Tensor features: ``(batch, num_slots, F)``: masks (responsibilities) or slots.
    """
    return duplicate_mask(features, threshold).sum(-1)


@dataclass
class InnerLoopHealth:
    """What :func:`inner_loop_health` returns (``T`` steps, ``B`` datapoints, ``K`` slots).

    :ivar elbo_decrease: ``(T, B)`` bool, step ``t`` lowered the ELBO by more than the tolerance
        (for a guide that samples, by more than its Monte Carlo noise: see
        :func:`elbo_decreases`).
    :ivar fraction_elbo_decrease: ``(B,)`` share of steps that lowered the ELBO.
    :ivar relative_residuals: ``(T, B)`` ``‖λ_{t+1} - λ_t‖ / ‖λ_t‖``.
    :ivar final_relative_residual: ``(B,)`` the last of them.
    :ivar jacobian_norm: ``(B,)`` spectral norm of the update's Jacobian at the final slots, or
        ``None`` when not computed.
    :ivar assignment_entropy: ``(B,)`` mean entropy of the assignments (nats), or ``None``.
    :ivar slot_mass: ``(B, K)`` share of measurements per slot, or ``None``.
    :ivar num_duplicate_slots: ``(B,)``.
    :ivar num_dead_slots: ``(B,)``, or ``None`` without responsibilities.
    :ivar restart: ``(B,)`` which restart was examined (the best per datapoint).
    :ivar first_datapoint: the number of the first datapoint in its batch (a rank's shard of
        ``refine(..., gather=False)`` starts at ``result.datapoints.start``), the first index
        of :meth:`to_dataframe`.
    """

    elbo_decrease: torch.Tensor
    fraction_elbo_decrease: torch.Tensor
    relative_residuals: torch.Tensor
    final_relative_residual: torch.Tensor
    jacobian_norm: torch.Tensor | None
    assignment_entropy: torch.Tensor | None
    slot_mass: torch.Tensor | None
    num_duplicate_slots: torch.Tensor
    num_dead_slots: torch.Tensor | None
    restart: torch.Tensor
    first_datapoint: int = 0

    def to_dataframe(self) -> pd.DataFrame:
        """One row per datapoint with the per-datapoint fields."""
        columns = {
            "restart": self.restart,
            "fraction_elbo_decrease": self.fraction_elbo_decrease,
            "final_relative_residual": self.final_relative_residual,
            "jacobian_norm": self.jacobian_norm,
            "assignment_entropy": self.assignment_entropy,
            "num_duplicate_slots": self.num_duplicate_slots,
            "num_dead_slots": self.num_dead_slots,
        }
        data = {k: v.detach().cpu().numpy() for k, v in columns.items() if v is not None}
        first = self.first_datapoint
        index = pd.RangeIndex(first, first + len(self.restart), name="datapoint")
        return pd.DataFrame(data, index=index)


def model_responsibilities(model, x_enc: torch.Tensor, slots: torch.Tensor):
    """``p(z^{n,m} = k | x, λ)`` ``(batch, num_slots, measurements)`` from the model, or ``None``.

    The posterior of the model's enumerated ``assignment_site`` from the Pyro program (one guide
    sample where the guide samples latents); ``None`` where the model declares no such site.
    """
    if getattr(model, "assignment_site", None) is None:
        return None
    with torch.no_grad():
        return InnerProblem(model, x_enc).elbo_and_responsibilities(slots)[1]


def elbo_decreases(
    history: torch.Tensor,
    model=None,
    x_enc: torch.Tensor | None = None,
    trajectory=None,
    final_slots: torch.Tensor | None = None,
    *,
    elbo_rtol: float | None = None,
    num_particles: int = 8,
    seed: int = 0,
) -> torch.Tensor:
    """``(T, B)`` bool: which inner steps really lowered the ELBO.

    A deterministic ELBO (every latent enumerated) is compared step to step, allowing rounding
    (``elbo_rtol``). Where the guide samples, the recorded ``history`` is a one-particle Monte
    Carlo estimate and its noise would count as decreases, so:

    * with the ``trajectory`` λ_0..λ_T, the ELBO is re-estimated at every λ_t with
      ``num_particles`` particles and *common random numbers* (the same seed at every step, so
      the reparameterized guide draws the same noise ε at every λ_t): the differences are
      those of a deterministic function of λ;
    * without it, a step counts only when it lowered the recorded ELBO by more than
      ``4 √2 σ`` (four standard deviations of the difference of two independent one-particle
      estimates), with ``σ`` the standard deviation of a one-particle estimate at the final
      slots, from ``8 · num_particles`` draws. Where the guide was much worse earlier in the
      loop, its noise there was larger than at the end: keep the trajectory for an exact
      answer.

    :param torch.Tensor history: ``(T + 1, B)`` recorded ELBO.
    :param SlotModel model: the model (``None``: the history is taken as deterministic).
    :param torch.Tensor x_enc: encoded measurements ``(B, M, F)``.
    :param trajectory: sequence of ``T + 1`` slot tensors ``(B, K, D)`` or ``None``.
    :param torch.Tensor final_slots: ``(B, K, D)`` λ_T, where the noise is measured without a
        trajectory (default: the trajectory's last entry).
    :param float elbo_rtol: rounding tolerance, default ``100 · eps`` of the dtype.
    :param int num_particles: particles of the re-estimates, >= 2.
    :param int seed: seed of the common random numbers.
    """
    if elbo_rtol is None:
        elbo_rtol = 100 * torch.finfo(history.dtype).eps
    elbo_rtol = check_positive_float(elbo_rtol, "elbo_rtol", allow_zero=True)
    num_particles = check_positive_int(num_particles, "num_particles", minimum=2)
    tol = elbo_rtol * (1 + history[:-1].abs())
    if trajectory is not None and len(trajectory) != history.shape[0]:
        raise ValueError(
            f"trajectory: expected {history.shape[0]} slot tensors (one per history entry), "
            f"got {len(trajectory)}"
        )
    if final_slots is None and trajectory is not None:
        final_slots = trajectory[-1]
    if model is None or x_enc is None or final_slots is None or history.shape[0] < 2:
        return (history[1:] - history[:-1]) < -tol
    if not _guide_samples(model, x_enc, final_slots):
        return (history[1:] - history[:-1]) < -tol
    if trajectory is not None:
        estimator = PerDatapointELBO(num_particles)
        values = []
        with torch.no_grad():
            for slots in trajectory:
                with _traces.seeded(seed):
                    values.append(estimator(model, x_enc, slots.detach()))
        history = torch.stack(values).to(history.dtype)
        tol = elbo_rtol * (1 + history[:-1].abs())
    else:
        # One-particle ELBO draws are the log importance ratios, vectorized over particles.
        with torch.no_grad(), _traces.seeded(seed):
            draws = _traces.log_weights(model, x_enc, final_slots.detach(), 8 * num_particles)
        noise = 4 * math.sqrt(2) * draws.std(0).to(history.dtype)
        tol = torch.maximum(tol, noise.expand_as(tol))
    return (history[1:] - history[:-1]) < -tol


def _guide_samples(model, x_enc, slots) -> bool:
    """Whether the guide has sample sites (its ELBO estimate is random)."""
    with torch.no_grad():
        guide_trace = _traces.traces(model, x_enc[:1], slots[:1], 1)[1]
    return bool(_traces.guide_sample_sites(guide_trace))


def inner_loop_health(
    result,
    model=None,
    rule: InnerRule | None = None,
    *,
    jacobian: bool = True,
    num_power_iterations: int = 50,
    duplicate_threshold: float = 0.95,
    dead_threshold: float = 0.01,
    elbo_rtol: float | None = None,
    num_particles: int = 8,
    seed: int | None = 0,
    masks=None,
) -> InnerLoopHealth:
    """Health indicators of a refine result (the best restart of every datapoint).

    Example::

        result = refine(gmm, x, EM(50), num_restarts=4, seed=0)
        health = inner_loop_health(result, gmm, EM(50))
        health.to_dataframe()

    :param RefineResult result: from :func:`~pyro_slots.refine`.
    :param SlotModel model: needed for the Jacobian, and for responsibilities where the result
        has none (see :func:`model_responsibilities`).
    :param InnerRule rule: the update whose Jacobian is measured (at the final slots, with the
        rule's final auxiliary state held fixed); skipped when ``None``.
    :param bool jacobian: compute the Jacobian spectral norm (one differentiable step and
        ``2 · num_power_iterations`` backward passes).
    :param float duplicate_threshold: cosine similarity above which a slot is a duplicate
        (computed on the masks where responsibilities exist, else on λ).
    :param float dead_threshold: a slot explaining less than this share of measurements is dead.
    :param float elbo_rtol: an ELBO change below ``elbo_rtol · (1 + |ELBO|)`` is rounding, not a
        decrease; default ``100 · eps`` of the ELBO's dtype (EM in float32 shows rounding
        "decreases" of a few eps relative).
    :param int num_particles: particles with which a sampled guide's ELBO is re-estimated
        along the trajectory (common random numbers; run refine with
        ``keep_trajectory=True``), or with which its noise is measured (see
        :func:`elbo_decreases`).
    :param int seed: seed of the power iteration's starting vectors and of the common random
        numbers.
    :param masks: what every slot explains, ``masks(problem, slots) -> (B, K, N)``, for the
        entropy, mass, dead and duplicate slots: e.g. :func:`~pyro_slots.inner.decoder_masks`
        for an image model (:func:`~pyro_slots.inner.masks_of`), whose feature mixture's
        posterior can be flat; default (``None`` or :func:`~pyro_slots.inner.posterior_masks`):
        the responsibilities, as above.
    :returns: an :class:`InnerLoopHealth`.
    """
    res = checked_result(result)
    duplicate_threshold = check_positive_float(duplicate_threshold, "duplicate_threshold")
    dead_threshold = check_positive_float(dead_threshold, "dead_threshold", allow_zero=True)
    idx = best_restart(res.elbo)  # the best restart of every datapoint (as best())
    best = res.select(idx)
    history = best.history[:, 0].detach()  # (T + 1, B)
    decrease = elbo_decreases(
        history,
        model,
        res.x_enc,
        [t[0] for t in best.trajectory] or None,
        best.slots[0],
        elbo_rtol=elbo_rtol,
        num_particles=num_particles,
        seed=0 if seed is None else check_seed(seed),
    )
    relres = best.relative_residuals[:, 0]
    num_steps = decrease.shape[0]
    batch = history.shape[1]
    fraction = decrease.double().mean(0) if num_steps else history.new_zeros(batch)
    final_relres = relres[-1] if num_steps else history.new_zeros(batch)
    slots = best.slots[0].detach()
    resp = None if best.responsibilities is None else best.responsibilities[0]
    if masks is not None and masks is not posterior_masks:  # the default: responsibilities
        if model is None or res.x_enc is None:
            raise ValueError("model: required (with result.x_enc) for masks")
        with torch.no_grad():
            resp = masks(InnerProblem(model, res.x_enc), slots)
    elif resp is None and model is not None and res.x_enc is not None:
        resp = model_responsibilities(model, res.x_enc, slots)
    norm = None
    if jacobian and rule is not None:
        if model is None or res.x_enc is None:
            raise ValueError("model: required (with result.x_enc) for the Jacobian spectral norm")
        generator = None if seed is None else torch.Generator().manual_seed(check_seed(seed))
        norm = jacobian_spectral_norm(
            model,
            res.x_enc,
            rule,
            slots,
            aux=tuple(a[0].detach() for a in best.state.aux) if best.state else (),
            step=res.num_steps,
            num_iterations=num_power_iterations,
            generator=generator,
        )
    mass = None if resp is None else slot_mass(resp)
    return InnerLoopHealth(
        elbo_decrease=decrease,
        fraction_elbo_decrease=fraction,
        relative_residuals=relres,
        final_relative_residual=final_relres,
        jacobian_norm=norm,
        assignment_entropy=None if resp is None else assignment_entropy(resp),
        slot_mass=mass,
        num_duplicate_slots=duplicate_slots(slots if resp is None else resp, duplicate_threshold),
        num_dead_slots=None if mass is None else (mass < dead_threshold).sum(-1),
        restart=idx,
        first_datapoint=getattr(getattr(result, "datapoints", None), "start", 0),
    )


def trajectory_dataset(result, model=None, *, masks: bool = True, reconstructions: bool = False):
    """The inner loop's path as an :class:`xarray.Dataset`, for plots or ``.to_netcdf``.

    Needs ``refine(..., keep_trajectory=True)``. Variables (dims ``inner_step`` ``0..T``,
    ``restart``, ``datapoint``, ``slot`` and per-field dims): the λ fields (or ``slots``
    without a model), ``elbo``, and where the model provides them ``masks`` (responsibilities,
    ``(..., slot, measurement)``, see :func:`model_responsibilities`) and ``reconstruction``
    (``(..., reconstruction_dim_0, ...)`` in the layout of ``model.reconstruct``).
    Slots are the raw (unaligned) slots of every restart.

    :param RefineResult result: from ``refine(..., keep_trajectory=True)``.
    :param SlotModel model: names the fields and computes masks and reconstructions.
    :param bool masks: include the responsibilities at every step.
    :param bool reconstructions: include ``model.reconstruct`` at every step.
    """
    res = checked_result(result)
    if not res.trajectory:
        raise ValueError("result: has no trajectory; run refine(..., keep_trajectory=True)")
    traj = torch.stack(res.trajectory)  # (T + 1, R, B, K, D)
    steps, r, b, k, _ = traj.shape
    data = {"elbo": (["inner_step", "restart", "datapoint"], res.history[:steps].cpu().numpy())}
    if model is None:
        data["slots"] = (
            ["inner_step", "restart", "datapoint", "slot", "slot_dim"],
            traj.cpu().numpy(),
        )
    else:
        for name, value in model.slot_spec.split(traj).items():
            extra = [f"{name}_dim_{i}" for i in range(len(model.slot_spec.fields[name]))]
            data[name] = (
                ["inner_step", "restart", "datapoint", "slot", *extra],
                value.cpu().numpy(),
            )
        flat = traj.reshape(steps * r * b, k, -1)
        x = None if res.x_enc is None else res.x_enc.repeat(steps * r, 1, 1)
        m = model_responsibilities(model, x, flat) if masks and x is not None else None
        if m is not None:
            data["masks"] = (
                ["inner_step", "restart", "datapoint", "slot", "measurement"],
                m.reshape(steps, r, b, k, -1).cpu().numpy(),
            )
        if reconstructions and x is not None:
            try:
                with torch.no_grad():
                    rec = model.reconstruct(x, flat)
            except CapabilityError:
                rec = None
            if rec is not None:
                # Reconstructions come in the raw data's layout (points, images, ...).
                extra = [f"reconstruction_dim_{i}" for i in range(rec.dim() - 1)]
                data["reconstruction"] = (
                    ["inner_step", "restart", "datapoint", *extra],
                    rec.reshape(steps, r, b, *rec.shape[1:]).cpu().numpy(),
                )
    ds = xr.Dataset(data)
    coords = {d: np.arange(n) for d, n in ds.sizes.items()}
    # A rank's shard (refine(..., gather=False)) keeps the datapoints' numbers in the batch.
    first = 0 if getattr(res, "datapoints", None) is None else res.datapoints.start
    coords["datapoint"] = np.arange(first, first + b)
    return ds.assign_coords(coords)
