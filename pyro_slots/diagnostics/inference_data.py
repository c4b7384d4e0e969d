"""Refine results as :class:`arviz.InferenceData`, so that ArviZ's tools work on them.

Independent restarts of the inner loop (``refine(..., num_restarts=R)``) become ArviZ *chains*.
Within a chain, the *draws* are one of

* ``"point"``: λ itself (one draw; R-hat and ESS need at least 4 draws and are ``nan``, which
  :func:`to_inference_data` says in an :class:`RhatWarning`);
* ``"laplace"``: draws of λ from the Laplace approximation ``N(λ*, (-∇²_λ L)^{-1})`` of each
  datapoint's ELBO at the restart's optimum. For a model whose latents are all enumerated the
  ELBO is the exact log-likelihood, so this is the classical large-sample posterior of λ under a
  flat prior (Laplace 1774; MacKay 2003, ch. 27). R-hat across restarts then asks whether the
  restarts disagree by more than the local uncertainty: different local optima, or label
  switching when ``align=False``;
* ``"guide"``: samples of the guide's latent sites ``z ~ q(z | λ)``, for models with continuous
  latents in the guide.

By default (``draws=None`` or ``"auto"``) :func:`to_inference_data` picks ``"guide"`` when the
model's guide has sample sites and ``"laplace"`` otherwise (``"point"`` without a model).
"""

from __future__ import annotations

import datetime
import warnings

import numpy as np
import torch
import xarray as xr

from ..elbo import PerDatapointELBO
from ..init import draw
from ..validation import check_bool, check_positive_int, check_seed
from . import _traces
from ._arviz import az
from .alignment import align_slots, apply_permutation

__all__ = [
    "DRAWS",
    "DrawsError",
    "RhatWarning",
    "check_draws",
    "laplace_draws",
    "pointwise_log_likelihood",
    "resolve_draws",
    "to_inference_data",
]

DRAWS = ("point", "laplace", "guide")

#: Fewest draws per chain for which ArviZ's (split) R-hat and ESS are defined.
MIN_DRAWS_FOR_RHAT = 4


class RhatWarning(UserWarning):
    """R-hat (and ESS) of an InferenceData will be NaN, and why."""


class DrawsError(ValueError):
    """The posterior draws asked for are not ones the model can give (:func:`check_draws`)."""


def resolve_draws(draws, model, result) -> str:
    """``draws`` itself, or for ``None``/``"auto"``: ``"guide"`` when the guide of ``model``
    has sample sites, ``"laplace"`` when it has none, ``"point"`` without a model."""
    if draws not in (None, "auto"):
        return draws
    if model is None:
        return "point"
    res = checked_result(result)
    if res.x_enc is None:
        raise ValueError("result: has no x_enc (encoded measurements); run refine() again")
    with torch.no_grad():
        guide_trace = _traces.traces(model, res.x_enc[:1], res.slots[0, :1], 1)[1]
    return "guide" if _traces.guide_sample_sites(guide_trace) else "laplace"


def check_draws(draws: str, model, x_enc: torch.Tensor, slots: torch.Tensor) -> None:
    """Refuse ``draws`` the model cannot give, from one datapoint's encoded measurements
    ``x_enc`` ``(1+, M, F)`` and slots ``(1+, K, D)`` (any: only the guide's sites matter):
    ``"laplace"`` needs a guide without sample sites (a deterministic ELBO), ``"guide"`` one
    with. :func:`write_report` checks before it refines.

    :raises DrawsError: naming ``draws`` and the kind to use instead.
    """
    if draws not in ("laplace", "guide"):
        return
    with torch.no_grad():
        sampled = _traces.guide_sample_sites(_traces.traces(model, x_enc[:1], slots[:1], 1)[1])
    if draws == "laplace" and sampled:
        raise DrawsError(
            f'draws="laplace" needs a deterministic ELBO, but the guide of '
            f'{type(model).__name__} samples {sampled}; use draws="guide"'
        )
    if draws == "guide" and not sampled:
        raise DrawsError(
            f'draws="guide": the guide of {type(model).__name__} has no sample sites (all '
            'latents are enumerated); use draws="laplace" or draws="point"'
        )


def _warn_undefined_rhat(posterior: dict, num_draws: int, draws: str) -> None:
    """Say, in our words, where ``az.rhat`` of this posterior will be NaN."""
    if num_draws < MIN_DRAWS_FOR_RHAT:
        warnings.warn(
            f'to_inference_data: draws="{draws}" gives {num_draws} draw(s) per chain; R-hat and '
            f'ESS need at least {MIN_DRAWS_FOR_RHAT} and will be NaN. Use draws="laplace" '
            '(enumerated models) or draws="guide" (models whose guide samples), the default.',
            RhatWarning,
            stacklevel=3,
        )
        return
    constant = {}
    for name, (value, _) in posterior.items():
        array = value.detach().cpu().double() if torch.is_tensor(value) else torch.as_tensor(value)
        # (chain, draw, ...): an element that never varies within any chain has no R-hat.
        flat = array.reshape(array.shape[0], array.shape[1], -1)
        frozen = (flat.amax(1) == flat.amin(1)).all(0)
        if frozen.any():
            constant[name] = (int(frozen.sum()), frozen.numel())
    if constant:
        listed = ", ".join(f"{k} ({n} of {t} elements)" for k, (n, t) in constant.items())
        warnings.warn(
            f"to_inference_data: {listed} do not vary across draws (parameters the ELBO does "
            "not identify, e.g. the weight logit of a single slot or a dead slot): their R-hat "
            "is NaN. laplace_unidentified in sample_stats counts them per datapoint.",
            RhatWarning,
            stacklevel=3,
        )


def checked_result(result):
    """``result`` if it is a :class:`~pyro_slots.RefineResult` whose ``x_enc`` fits it."""
    from ..refine import RefineResult

    if not isinstance(result, RefineResult):
        raise TypeError(f"result: expected a RefineResult, got {type(result).__name__}")
    batch = result.elbo.shape[1]
    if result.x_enc is not None and result.x_enc.shape[0] != batch:
        raise ValueError(
            f"result.x_enc: expected {batch} datapoints, got shape {tuple(result.x_enc.shape)}"
        )
    return result


def pointwise_log_likelihood(model, x_enc: torch.Tensor, slots: torch.Tensor):
    """``log p(x^{n,m} | λ^n)`` per measurement, ``(batch, measurements)``, or ``None``.

    The model is traced with Pyro, its enumerated sites summed out; this needs a guide without
    sample sites and every log-density term inside one measurement plate, and gives ``None``
    where that does not hold.

    :param torch.Tensor x_enc: encoded measurements ``(batch, measurements, features)``.
    :param torch.Tensor slots: ``(batch, num_slots, slot_dim)``.
    """
    with torch.no_grad():
        return _traces.pointwise_log_likelihood(model, x_enc, slots)


def laplace_draws(
    model,
    x_enc: torch.Tensor,
    slots: torch.Tensor,
    num_draws: int,
    *,
    generator: torch.Generator | None = None,
    rel_tol: float = 1e-8,
    estimator: PerDatapointELBO | None = None,
):
    """Draws of λ from the Laplace approximation of every datapoint's ELBO at ``slots``.

    The Hessian of the per-datapoint ELBO w.r.t. λ is block diagonal over datapoints, so one
    Hessian-vector product per coordinate of a datapoint's λ (``num_slots · slot_dim`` of them)
    gives all blocks. Directions whose curvature is below ``rel_tol`` times the largest are not
    identified by the ELBO (e.g. a common shift of all mixture logits, which the softmax
    ignores) and get no spread, as with a Moore-Penrose inverse; directions of positive
    curvature (``slots`` is not a maximum there) get no spread either and are counted.

    :param torch.Tensor x_enc: encoded measurements ``(batch, M, features)``.
    :param torch.Tensor slots: ``(batch, num_slots, slot_dim)``, a local maximum of the ELBO.
    :param int num_draws: draws per datapoint.
    :returns: ``(draws, num_unidentified, num_ascent)``: draws ``(num_draws, batch, num_slots,
        slot_dim)``, and per datapoint the number of directions without curvature and the
        number of directions in which the ELBO still increases.
    """
    num_draws = check_positive_int(num_draws, "num_draws")
    estimator = estimator or PerDatapointELBO()
    batch, num_slots, slot_dim = slots.shape
    p = num_slots * slot_dim
    lam = slots.detach().reshape(batch, p).requires_grad_()
    with torch.enable_grad():
        elbo = estimator(model, x_enc.detach(), lam.reshape(batch, num_slots, slot_dim))
        (grad,) = torch.autograd.grad(elbo.sum(), lam, create_graph=True)
        rows = []
        for j in range(p):
            (row,) = torch.autograd.grad(grad[:, j].sum(), lam, retain_graph=j < p - 1)
            rows.append(row)
    hess = torch.stack(rows, 1).detach().double()  # (batch, p, p)
    precision = -0.5 * (hess + hess.transpose(-1, -2))
    evals, evecs = torch.linalg.eigh(precision)
    scale = evals.abs().amax(-1, keepdim=True).clamp_min(torch.finfo(evals.dtype).tiny)
    identified = evals > rel_tol * scale
    ascent = evals < -rel_tol * scale
    inv_sd = torch.where(identified, evals.clamp_min(torch.finfo(evals.dtype).tiny).rsqrt(), 0)
    eps = draw(
        torch.randn,
        (num_draws, batch, p),
        generator=generator,
        dtype=torch.float64,
        device=lam.device,
    )
    delta = torch.einsum("bij,bj,sbj->sbi", evecs, inv_sd, eps)
    draws = lam.detach().double() + delta
    draws = draws.to(slots.dtype).reshape(num_draws, batch, num_slots, slot_dim)
    return draws, (~identified & ~ascent).sum(-1), ascent.sum(-1)


def _guide_draws(model, x_enc, slots, num_draws: int):
    """Samples of every guide site: ``{name: (value (S, batch, ...), dims)}``."""
    with torch.no_grad():
        _, guide_trace = _traces.traces(model, x_enc, slots, num_draws)
    sites = _traces.guide_sample_sites(guide_trace)
    if not sites:
        check_draws("guide", model, x_enc, slots)  # raises: the guide samples nothing
    nesting = model.max_plate_nesting + 1
    out = {}
    for name in sites:
        site = guide_trace.nodes[name]
        value = site["value"].detach()
        event_dim = site["fn"].event_dim
        batch_shape = value.shape[: value.dim() - event_dim]
        value = value.reshape((1,) * (nesting - len(batch_shape)) + tuple(value.shape))
        names = {f.dim: f.name for f in site["cond_indep_stack"]}
        dims = []
        for i in range(-nesting, 0):
            frame = names.get(i)
            if frame == _traces.PARTICLE_PLATE:
                dims.append("draw")
            elif frame == model.batch_plate:
                dims.append("datapoint")
            elif frame is not None and frame == getattr(model, "slot_plate", None):
                dims.append("slot")  # aligned across restarts with the slots themselves
            else:
                dims.append(frame or f"{name}_dim_{i + nesting}")
        dims += [f"{name}_event_{i}" for i in range(event_dim)]
        if dims[:2] != ["draw", "datapoint"]:
            raise ValueError(
                f"guide site {name!r} must lie inside the particle and {model.batch_plate!r} "
                f"plates at dims {-nesting} and {-nesting + 1}; its dims are {dims}"
            )
        shape = (num_draws, x_enc.shape[0], *value.shape[2:])
        out[name] = (value.expand(shape), dims)
    return out


def to_inference_data(
    result,
    model=None,
    *,
    align: bool = True,
    reference: str | int = "best",
    align_on=None,
    draws: str | None = None,
    num_draws: int = 200,
    seed: int | None = None,
    log_likelihood: bool = True,
):
    """An :class:`arviz.InferenceData` of a :func:`~pyro_slots.refine` result.

    Groups (``R`` restarts as chains, ``B`` datapoints, ``K`` slots, ``T`` inner steps):

    * ``posterior``: with ``draws="point"`` or ``"laplace"`` one variable per field of
      ``model.slot_spec`` (``loc``, ``log_scale``, ...; a single ``slots`` variable without a
      model), dims ``(chain, draw, datapoint, slot, <field>_dim_0, ...)``; with
      ``draws="guide"`` one variable per guide site, dims named after its plates;
    * ``sample_stats`` (``draw`` of length 1: all draws of a chain share its inner loop):
      ``elbo (chain, draw, datapoint)``, ``elbo_history (..., datapoint, inner_step)`` with
      ``T + 1`` entries, ``residual`` and ``relative_residual (..., datapoint, inner_update)``
      with ``T``, ``num_steps (chain, draw)``, ``slot_permutation (..., datapoint, slot)`` (the
      alignment, see below), ``responsibilities (..., datapoint, slot, measurement)`` where the
      rule computed them, the λ fields as ``lambda_<field>`` with ``draws="guide"`` and
      ``"laplace"`` (the restarts' final slots, aligned as the posterior), and the Laplace
      counts ``laplace_unidentified``/``laplace_ascent`` with ``draws="laplace"``;
    * ``log_likelihood``: ``x (chain, draw, datapoint, measurement)``, the log-likelihood of
      every measurement at every draw of λ, where the model defines it (see
      :func:`pointwise_log_likelihood`; not with ``draws="guide"``);
    * ``observed_data``: ``x (datapoint, measurement, feature)``, the encoded measurements;
    * ``constant_data``: ``reference_restart (datapoint,)``.

    Alignment: ``slot_permutation[r, 0, n]`` is the Hungarian matching of restart ``r`` to the
    reference restart of datapoint ``n`` (:func:`~pyro_slots.diagnostics.align_slots`); with
    ``align=True`` it has been applied (slot ``j`` of restart ``r`` is its raw slot
    ``slot_permutation[r, 0, n, j]``), with ``align=False`` the slots are raw and the
    permutation is only recorded. ``posterior.attrs["slots_aligned"]`` says which.

    Example::

        result = refine(gmm, x, EM(100), num_restarts=4, seed=0)
        idata = to_inference_data(result, gmm, draws="laplace", seed=0)
        az.rhat(idata)["loc"]  # (datapoint, slot, loc_dim_0)

    :param RefineResult result: from :func:`~pyro_slots.refine`; its restarts are the chains.
    :param SlotModel model: names the fields of λ and defines the log-likelihood; required for
        ``draws="laplace"``/``"guide"``.
    :param bool align: apply the alignment to λ, responsibilities and draws.
    :param reference: ``"best"`` (highest final ELBO per datapoint), ``"first"`` or a restart.
    :param align_on: match on these slot fields only (default: all of λ).
    :param str draws: one of :data:`DRAWS`, or ``None``/``"auto"`` (default): ``"guide"``
        when the guide of ``model`` has sample sites, ``"laplace"`` otherwise, ``"point"``
        without a model (see :func:`resolve_draws`). Where the resulting R-hat is undefined
        (fewer than 4 draws, or elements that never vary) an :class:`RhatWarning` says so.
    :param int num_draws: draws per chain for ``"laplace"`` and ``"guide"``.
    :param int seed: seed of the draws.
    :param bool log_likelihood: compute the ``log_likelihood`` group where possible.
    :returns: :class:`arviz.InferenceData`.
    """
    res = checked_result(result)
    align = check_bool(align, "align")
    if draws not in (*DRAWS, None, "auto"):
        raise ValueError(f"draws: expected one of {DRAWS}, 'auto' or None, got {draws!r}")
    draws = resolve_draws(draws, model, res)
    if draws != "point" and model is None:
        raise ValueError(f'model: required with draws="{draws}"')
    if draws != "point":
        num_draws = check_positive_int(num_draws, "num_draws")
    if (draws != "point" or log_likelihood) and model is not None and res.x_enc is None:
        raise ValueError("result: has no x_enc (encoded measurements); run refine() again")
    spec = None if model is None else model.slot_spec
    if spec is not None and spec.dim != res.slots.shape[-1]:
        raise ValueError(
            f"model: slot_spec {spec} has dim {spec.dim}, but the result's slots have "
            f"shape {tuple(res.slots.shape)}"
        )
    num_restarts, batch, num_slots, _ = res.slots.shape
    _, perm, ref = align_slots(
        res.slots, reference=reference, elbo=res.elbo, fields=align_on, slot_spec=spec
    )
    slots, resp = res.slots, res.responsibilities
    if align:
        slots = apply_permutation(slots, perm, 2)
        if resp is not None:
            resp = apply_permutation(resp, perm, 2)

    # A rank's shard (refine(..., gather=False)) keeps the datapoints' numbers in the batch.
    first = 0 if getattr(res, "datapoints", None) is None else res.datapoints.start
    coords = {
        "chain": np.arange(num_restarts),
        "datapoint": np.arange(first, first + batch),
        "slot": np.arange(num_slots),
    }
    generator = None if seed is None else torch.Generator().manual_seed(check_seed(seed))
    flat = slots.reshape(num_restarts * batch, *slots.shape[2:])
    # λ as the diagnostics compare it: one representative of what the model does not identify
    # (a GMM's logits centred), so that R-hat does not read one mixture as two solutions.
    canonical = getattr(model, "canonical_slots", None) or (lambda s: s)
    centres = canonical(slots).unsqueeze(1)
    x_rep = None if res.x_enc is None else res.x_enc.repeat(num_restarts, 1, 1)
    stats = {}
    lam_draws = None
    if draws == "point":
        lam_draws = centres  # (R, 1, B, K, D)
    elif draws == "laplace":
        check_draws(draws, model, res.x_enc, slots[0])
        d, unidentified, ascent = laplace_draws(model, x_rep, flat, num_draws, generator=generator)
        lam_draws = d.reshape(num_draws, num_restarts, batch, *d.shape[2:]).transpose(0, 1)
        lam_draws = canonical(lam_draws)
        stats["laplace_unidentified"] = (
            unidentified.reshape(num_restarts, 1, batch),
            ["datapoint"],
        )
        stats["laplace_ascent"] = (ascent.reshape(num_restarts, 1, batch), ["datapoint"])
        for name, (value, dims) in _split_fields(centres, spec).items():
            stats[f"lambda_{name}"] = (value, dims)  # the centres of the draws

    posterior = {}
    if lam_draws is not None:
        posterior.update(_split_fields(lam_draws, spec))
        _warn_undefined_rhat(posterior, lam_draws.shape[1], draws)
    else:
        with _traces.seeded(seed):
            sites = _guide_draws(model, x_rep, flat, num_draws)
        for name, (value, dims) in sites.items():
            value = value.reshape(num_draws, num_restarts, batch, *value.shape[2:]).transpose(0, 1)
            posterior[name] = (value, dims[1:])
        _warn_undefined_rhat(posterior, num_draws, draws)
        for name, (value, dims) in _split_fields(centres, spec).items():
            stats[f"lambda_{name}"] = (value, dims)

    stats["elbo"] = (res.elbo.unsqueeze(1), ["datapoint"])
    stats["elbo_history"] = (res.history.permute(1, 2, 0).unsqueeze(1), ["datapoint", "inner_step"])
    stats["residual"] = (res.residuals.permute(1, 2, 0).unsqueeze(1), ["datapoint", "inner_update"])
    stats["relative_residual"] = (
        res.relative_residuals.permute(1, 2, 0).unsqueeze(1),
        ["datapoint", "inner_update"],
    )
    stats["num_steps"] = (torch.full((num_restarts, 1), res.num_steps), [])
    stats["slot_permutation"] = (torch.as_tensor(perm).unsqueeze(1), ["datapoint", "slot"])
    if resp is not None:
        stats["responsibilities"] = (resp.unsqueeze(1), ["datapoint", "slot", "measurement"])

    groups = {
        "posterior": _dataset(posterior, coords, chain_draw=True),
        "sample_stats": _dataset(stats, coords, chain_draw=True),
        "constant_data": _dataset(
            {"reference_restart": (torch.as_tensor(ref), ["datapoint"])}, coords, chain_draw=False
        ),
    }
    if res.x_enc is not None:
        groups["observed_data"] = _dataset(
            {"x": (res.x_enc, ["datapoint", "measurement", "feature"])}, coords, chain_draw=False
        )
    if log_likelihood and model is not None and lam_draws is not None:
        n_draw = lam_draws.shape[1]
        lam = lam_draws.reshape(-1, *lam_draws.shape[3:])
        x_all = res.x_enc.repeat(num_restarts * n_draw, 1, 1)
        ll = pointwise_log_likelihood(model, x_all, lam)
        if ll is not None:
            ll = ll.reshape(num_restarts, n_draw, batch, -1)
            groups["log_likelihood"] = _dataset(
                {"x": (ll, ["datapoint", "measurement"])}, coords, chain_draw=True
            )
    attrs = {
        "slots_aligned": int(bool(align)),
        "alignment_reference": str(reference),
        "draws": draws,
        "num_restarts": num_restarts,
    }
    groups["posterior"].attrs.update(attrs)
    return az.InferenceData(**groups)


def _split_fields(values: torch.Tensor, spec) -> dict:
    """``(R, S, B, K, dim)`` λ draws as ``{field: (value, dims)}`` per slot-spec field."""
    if spec is None:
        return {"slots": (values, ["datapoint", "slot", "slot_dim"])}
    out = {}
    for name, value in spec.split(values).items():
        extra = [f"{name}_dim_{i}" for i in range(len(spec.fields[name]))]
        out[name] = (value, ["datapoint", "slot", *extra])
    return out


def _dataset(variables: dict, coords: dict, chain_draw: bool) -> xr.Dataset:
    data_vars = {}
    for name, (value, dims) in variables.items():
        array = value.detach().cpu().numpy() if torch.is_tensor(value) else np.asarray(value)
        full = (["chain", "draw"] if chain_draw else []) + list(dims)
        if array.ndim != len(full):
            raise ValueError(f"{name}: {array.ndim} axes for dims {full}")
        data_vars[name] = (full, array)
    ds = xr.Dataset(data_vars)
    used = {d: np.arange(n) for d, n in ds.sizes.items()}
    used.update({k: v for k, v in coords.items() if k in ds.sizes and len(v) == ds.sizes[k]})
    ds = ds.assign_coords(used)
    ds.attrs.update(
        {
            "created_at": datetime.datetime.now(datetime.timezone.utc).isoformat(),
            "inference_library": "pyro_slots",
        }
    )
    return ds
