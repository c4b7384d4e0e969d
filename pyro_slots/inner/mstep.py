"""The M-step of EM derived from the model's Pyro program, for exponential-family mixtures.

A mixture slot model samples an enumerated assignment ``z`` and, given ``z = k``, observes its
measurements from distributions whose parameters are component ``k``'s. When those
distributions have a closed-form weighted maximum-likelihood estimate, the M-step of EM is that
estimate with the responsibilities as weights -- the model need not write it by hand.

What is derived, and how:

* **Which parameter is which slot part.** The model is traced once (``poutine.trace`` of
  ``poutine.enum`` of ``model.model``) at *probe* slots, drawn uniformly from ``(0.1, 0.9)``
  with a fixed generator (no global random state is used). Every component parameter read off
  ``site["fn"]`` at the enumeration dimension is compared with each slot part (same shape,
  ``(batch, num_slots, *field_shape)``) under the known bijections of :data:`TRANSFORMS`
  (identity, ``exp``, ``sigmoid``, ``softplus``; ``softmax`` over a Categorical's values and,
  for the mixing weights, over the slots). A match on random probe values is not a
  coincidence; the inverse bijection then maps the new parameter back to the slot part.
  A parameter that matches no part and does not change with the slots (a second probe) is
  held fixed; one that changes but matches nothing, or matches several parts, is refused with
  a :class:`~pyro_slots.validation.CapabilityError` naming the site and the parameter.
* **The weighted MLEs** (``r`` the responsibilities, ``N_k = Σ_m r_km``):
  Normal ``loc = Σ r x / N``, ``scale² = Σ r (x - loc)² / N + reg_covar · var(x)`` (centred
  statistics; the floor in units of the datapoint's per-feature variance, as
  :class:`~pyro_slots.models.GaussianMixture`'s; either parameter may be fixed);
  Bernoulli and Poisson the weighted mean; Categorical the weighted value frequencies;
  Gamma by Minka's (2002) generalized Newton iteration on the shape from its closed-form start,
  rate ``= shape / mean``; Beta from the method of moments refined by Newton's method on the
  two digamma equations (both with ``newton_steps`` iterations; no closed form exists); the
  mixing weights ``π_k = N_k / M``.

Slot parts that no parameter reads keep their values. Anything else -- latent sites other
than the assignment, parameters that vary across measurements (IODINE's per-pixel means),
other distribution families -- is refused; :class:`~pyro_slots.inner.GeneralizedEM` handles
every model.
"""

from __future__ import annotations

import math

import pyro
import pyro.distributions as dist
import pyro.util
import torch
from pyro import poutine
from pyro.poutine.util import site_is_subsample

from ..validation import CapabilityError, check_positive_float, check_positive_int

__all__ = ["TRANSFORMS", "DerivedMStep"]


# The inverses take an estimate into the transform's image first: a weighted MLE outside it
# (a negative mean for an exp-parametrized one) maximizes the expected complete log-likelihood
# over the image at its boundary, which a clamp approaches (log of it was NaN).
def _log(t):
    return t.clamp_min(torch.finfo(t.dtype).tiny).log()


def _logit(p):
    eps = torch.finfo(p.dtype).eps
    p = p.clamp(eps, 1 - eps)
    return p.log() - torch.log1p(-p)


def _inv_softplus(y):
    y = y.clamp_min(torch.finfo(y.dtype).tiny)
    return y + torch.log(-torch.expm1(-y))


#: Bijections by which a slot part may become a component parameter: ``name -> (forward,
#: inverse)``. ``softmax`` acts on the last axis (a Categorical's values); the mixing weights
#: use ``softmax`` over the slot axis, handled separately.
TRANSFORMS = {
    "identity": (lambda u: u, lambda t: t),
    "exp": (torch.exp, _log),
    "sigmoid": (torch.sigmoid, _logit),
    "softplus": (torch.nn.functional.softplus, _inv_softplus),
}

# Distribution families with a weighted MLE: the parameters the M-step estimates, and the
# shape each adds after the distribution's batch shape.
_FAMILIES = (
    (dist.Normal, ("loc", "scale")),
    (dist.Bernoulli, ("probs",)),
    (dist.Categorical, ("probs",)),
    (dist.Poisson, ("rate",)),
    (dist.Gamma, ("concentration", "rate")),
    (dist.Beta, ("concentration1", "concentration0")),
)


def _family(fn):
    for cls, params in _FAMILIES:
        if isinstance(fn, cls):
            return cls, params
    return None, ()


def _measurement_weight(node, plates, num_points, resp):
    """The site's ``mask · scale`` per measurement ``(batch, M)``, or ``None`` where both are
    trivial."""
    mask, scale = node["mask"], node["scale"]
    weight = None
    if mask is not None and mask is not True:
        weight = torch.as_tensor(mask, device=resp.device).to(resp.dtype)
    if not (isinstance(scale, (int, float)) and scale == 1.0):
        s = torch.as_tensor(scale, dtype=resp.dtype, device=resp.device)
        weight = s if weight is None else weight * s
    if weight is None:
        return None
    return weight.broadcast_to(plates).reshape(plates[0], num_points)


class DerivedMStep:
    """Closed-form M-step of an exponential-family mixture, derived by tracing the model.

    ``DerivedMStep()(model, x, responsibilities, slots) -> new slots`` is the maximizer of the
    expected complete log-likelihood ``Σ_{m,k} r_km log p(x_m, z_m = k | λ)`` over the slot
    parts the component distributions read (see the module docstring for the families and the
    mapping from distribution parameters back to slot parts). :class:`~pyro_slots.inner.EM`
    uses it for models without a hand-written ``m_step``.

    It is differentiable (no in-place updates), so EM stays unrollable.

    :param float reg_covar: floor added to every Normal variance, in units of the datapoint's
        per-feature variance, >= 0 (as :class:`~pyro_slots.models.GaussianMixture`'s).
    :param int newton_steps: Newton iterations of the Gamma and Beta estimates.
    """

    def __init__(self, reg_covar: float = 1e-6, newton_steps: int = 5):
        self.reg_covar = check_positive_float(reg_covar, "reg_covar", allow_zero=True)
        self.newton_steps = check_positive_int(newton_steps, "newton_steps")

    def __repr__(self):
        return f"DerivedMStep(reg_covar={self.reg_covar}, newton_steps={self.newton_steps})"

    # -------------------------------------------------------------------------- tracing
    def _trace(self, model, x, slots):
        nesting = model.max_plate_nesting
        rng = pyro.util.get_rng_state()
        try:
            enumerated = poutine.enum(model.model, first_available_dim=-nesting - 1)
            trace = poutine.trace(enumerated).get_trace(x, slots)
        finally:
            pyro.util.set_rng_state(rng)
        return trace

    def _probe(self, slots, seed):
        g = torch.Generator(device="cpu").manual_seed(seed)
        u = torch.rand(slots.shape, generator=g, dtype=torch.float64)
        return (0.1 + 0.8 * u).to(dtype=slots.dtype, device=slots.device)

    def plan(self, model, x: torch.Tensor, slots: torch.Tensor) -> dict:
        """Which slot part every component parameter is, found by tracing at probe slots.

        :returns: ``{"sites": [(name, family, value, {param: (part, inverse) | tensor})],
            "weights": (part, None) | None}``; a tensor entry is a parameter that does not
            depend on the slots, ``(batch, K, *shape)``.
        :raises CapabilityError: naming the site and parameter that cannot be mapped.
        """
        name = type(model).__name__
        site_name = getattr(model, "assignment_site", None)
        if site_name is None:
            raise CapabilityError(f"the derived M-step needs an assignment_site; {name} has none")
        nesting = model.max_plate_nesting
        probe = self._probe(slots, 0)
        with torch.no_grad():
            trace = self._trace(model, x, probe)
        parts = model.slot_spec.split(probe)
        num_slots = slots.shape[1]
        sites, other = [], None

        def reduce(param, site, pname, shape):
            """``(K, *plates, *rest)`` -> ``(batch, K, *rest)``, constant over measurements."""
            try:
                full = torch.broadcast_to(param, shape)
            except RuntimeError:
                raise CapabilityError(
                    f"derived M-step: parameter {pname!r} of site {site!r} of {name} does not "
                    f"broadcast to (num_slots, *plates, ...) = {tuple(shape)}; write "
                    f"{name}.m_step or use GeneralizedEM"
                ) from None
            for d in range(2, nesting + 1):
                first = full.narrow(d, 0, 1)
                if full.shape[d] > 1 and not torch.allclose(full, first.expand_as(full)):
                    raise CapabilityError(
                        f"derived M-step: parameter {pname!r} of site {site!r} of {name} varies "
                        "across the measurements (not a mixture of per-slot components); write "
                        f"{name}.m_step or use GeneralizedEM"
                    )
                full = first
            lead = full.reshape(num_slots, full.shape[1], *full.shape[nesting + 1 :])
            return lead.movedim(0, 1)

        def match(value, site, pname, candidates):
            hits = []
            for part_name, part in parts.items():
                if part.shape != value.shape:
                    continue
                for tname, (fwd, inv) in candidates.items():
                    with torch.no_grad():
                        ok = torch.allclose(fwd(part), value, rtol=1e-5, atol=1e-6)
                    if ok:
                        hits.append((part_name, tname, inv))
            if len(hits) > 1:
                raise CapabilityError(
                    f"derived M-step: parameter {pname!r} of site {site!r} of {name} matches "
                    f"several slot parts {[h[:2] for h in hits]}; write {name}.m_step"
                )
            return hits[0] if hits else None

        fixed_checks = []  # (site, param, probe value) to compare at a second probe
        enumerated = 0
        for node in trace.nodes.values():
            if node["type"] != "sample" or site_is_subsample(node):
                continue
            fn = node["fn"]
            if node["name"] == site_name:
                enumerated += 1
                if not isinstance(fn, dist.Categorical):
                    raise CapabilityError(
                        f"derived M-step: assignment site {site_name!r} of {name} is a "
                        f"{type(fn).__name__}, expected a Categorical"
                    )
                plates = _plate_shape(fn.batch_shape, nesting)
                # The mixing weights carry the slot axis last: (*plates, K).
                weights = torch.broadcast_to(fn.probs, (*plates, num_slots))
                for d in range(1, nesting):
                    first = weights.narrow(d, 0, 1)
                    if weights.shape[d] > 1 and not torch.allclose(
                        weights, first.expand_as(weights)
                    ):
                        raise CapabilityError(
                            f"derived M-step: the mixing weights of {site_name!r} of {name} "
                            "vary across the measurements; write an m_step or use GeneralizedEM"
                        )
                    weights = first
                weights = weights.reshape(weights.shape[0], num_slots)
                hit = match(weights, site_name, "probs", {"softmax": (_softmax_slots, torch.log)})
                if hit is None:
                    fixed_checks.append((site_name, "probs", weights))
                other = hit
                continue
            if node["is_observed"]:
                family, pnames = _family(_base(fn)[0])
                base, reinterpreted = _base(fn)
                site_bs = base.batch_shape[: len(base.batch_shape) - reinterpreted]
                if len(site_bs) < nesting + 1 or site_bs[-nesting - 1] != num_slots:
                    if num_slots > 1:
                        fixed_checks.append((node["name"], None, None))
                        continue
                if family is None:
                    raise CapabilityError(
                        f"derived M-step: site {node['name']!r} of {name} is a "
                        f"{type(base).__name__}; closed-form M-steps exist for "
                        f"{[c.__name__ for c, _ in _FAMILIES]}. Write {name}.m_step or use "
                        "GeneralizedEM"
                    )
                rest = tuple(base.batch_shape[len(base.batch_shape) - reinterpreted :])
                event = rest + tuple(base.event_shape)
                value = node["value"]
                plates = tuple(value.shape[: value.dim() - len(event)])
                plates = (1,) * (nesting - len(plates)) + plates
                mapping = {}
                for pname in pnames:
                    param = getattr(base, pname)
                    extra = (param.shape[-1],) if family is dist.Categorical else ()
                    shape = (num_slots, *plates, *rest, *extra)
                    reduced = reduce(param, node["name"], pname, shape)
                    candidates = (
                        {"softmax": (lambda u: torch.softmax(u, -1), torch.log)}
                        if family is dist.Categorical
                        else TRANSFORMS
                    )
                    hit = match(reduced, node["name"], pname, candidates)
                    if hit is None:
                        fixed_checks.append((node["name"], pname, reduced))
                        mapping[pname] = reduced
                    else:
                        mapping[pname] = (hit[0], hit[2])
                sites.append((node["name"], family, plates, rest, mapping))
                continue
            raise CapabilityError(
                f"derived M-step: {name}.model has a latent site {node['name']!r} besides the "
                f"assignment {site_name!r}; the closed-form M-step covers mixtures whose only "
                "latent is the assignment. Use GeneralizedEM"
            )
        if enumerated != 1:
            raise CapabilityError(
                f"derived M-step: {name}.model has no sample site named {site_name!r} "
                "(its assignment_site)"
            )
        if fixed_checks:
            self._check_fixed(model, x, slots, fixed_checks, num_slots, nesting)
        return {"sites": sites, "weights": other}

    def _check_fixed(self, model, x, slots, checks, num_slots, nesting):
        """Parameters that matched no slot part must not depend on the slots."""
        name = type(model).__name__
        with torch.no_grad():
            again = self._trace(model, x, self._probe(slots, 1))
            before = self._trace(model, x, self._probe(slots, 0))
        for site, pname, _ in checks:
            fa, fb = before.nodes[site]["fn"], again.nodes[site]["fn"]
            names = [pname] if pname is not None else list(_base(fa)[0].arg_constraints)
            for p in names:
                va = getattr(_base(fa)[0], p, None)
                vb = getattr(_base(fb)[0], p, None)
                if va is None or vb is None:
                    continue
                if va.shape != vb.shape or not torch.allclose(va, vb):
                    where = (
                        "depends on the slots but not on the assignment"
                        if pname is None
                        else "depends on the slots through no known bijection of one slot part "
                        f"({sorted(TRANSFORMS)})"
                    )
                    raise CapabilityError(
                        f"derived M-step: parameter {p!r} of site {site!r} of {name} {where}; "
                        f"write {name}.m_step or use GeneralizedEM"
                    )

    # ------------------------------------------------------------------------- estimates
    def __call__(self, model, x: torch.Tensor, responsibilities: torch.Tensor, slots):
        """New slots ``(batch, K, slot_dim)`` from responsibilities ``(batch, K, M)``.

        :param SlotModel model: the mixture model.
        :param torch.Tensor x: encoded measurements ``(batch, M, features)``.
        :param torch.Tensor responsibilities: ``(batch, K, M)``, rows summing to one over K.
        :param torch.Tensor slots: current slots; parts no parameter reads are kept.
        """
        plan = self.plan(model, x, slots)
        # The observed values come from a trace at the current slots (they do not depend on
        # them, but the trace keeps x's autograd graph for unrolled training).
        trace = self._trace(model, x, slots)
        resp = responsibilities
        parts = dict(model.slot_spec.split(slots))
        eps = 10 * torch.finfo(resp.dtype).eps
        nk = resp.sum(-1) + eps  # (B, K)
        for site, family, plates, _, mapping in plan["sites"]:
            value = trace.nodes[site]["value"]
            num_points = math.prod(plates[1:])
            if num_points != resp.shape[-1]:
                raise CapabilityError(
                    f"derived M-step: site {site!r} lies in plates of {num_points} elements per "
                    f"datapoint, the assignment in {resp.shape[-1]}; use GeneralizedEM"
                )
            flat = value.reshape(plates[0], num_points, -1)
            if family is dist.Categorical:
                num_values = _base(trace.nodes[site]["fn"])[0].probs.shape[-1]
                flat = torch.nn.functional.one_hot(flat.long(), num_values).to(resp.dtype)
                flat = flat.reshape(flat.shape[0], num_points, -1)
            flat = flat.to(resp.dtype)
            # poutine.mask / scale on the site (missing measurements): its terms weigh in the
            # expected complete log-likelihood by mask · scale, so do they in its estimate.
            weight = _measurement_weight(trace.nodes[site], plates, num_points, resp)
            if weight is None:
                estimates = self._estimate(family, flat, resp, nk, mapping)
            else:
                r_site = resp * weight.unsqueeze(1)
                estimates = self._estimate(family, flat, r_site, r_site.sum(-1) + eps, mapping)
            for pname, estimate in estimates.items():
                entry = mapping[pname]
                if torch.is_tensor(entry):
                    continue
                part, inverse = entry
                shape = parts[part].shape
                parts[part] = inverse(estimate.reshape(shape))
        if plan["weights"] is not None:
            part, _, inverse = plan["weights"]
            parts[part] = inverse(nk / resp.shape[-1])
        return model.slot_spec.pack(parts)

    def _estimate(self, family, v, r, nk, mapping):
        """Weighted MLEs, each ``(batch, K, E)`` over the flattened measurement event ``E``."""

        def mean(values):
            return weighted_sums(r, values) / nk.unsqueeze(-1)

        def flat_fixed(pname):
            t = mapping[pname]
            return t.reshape(*t.shape[:2], -1)

        tiny = torch.finfo(r.dtype).tiny
        eps = torch.finfo(r.dtype).eps
        if family is dist.Normal:
            free_loc = not torch.is_tensor(mapping["loc"])
            if torch.is_tensor(mapping["scale"]):
                return {"loc": mean(v)} if free_loc else {}
            # Centred statistics, as GaussianMixture's (normal_moments): the floor is
            # reg_covar in units of the datapoint's variance.
            fixed = None if free_loc else flat_fixed("loc")
            _, loc, var = normal_moments(r, v, self.reg_covar, loc=fixed)
            out = {"loc": loc} if free_loc else {}
            out["scale"] = var.clamp_min(tiny).sqrt()
            return out
        if family in (dist.Bernoulli, dist.Categorical):
            return {"probs": mean(v).clamp(eps, 1 - eps)}
        if family is dist.Poisson:
            return {"rate": mean(v).clamp_min(tiny)}
        if family is dist.Gamma:
            self._require_free(mapping, ("concentration", "rate"), "Gamma")
            m = mean(v).clamp_min(tiny)
            s = (m.log() - mean(v.clamp_min(tiny).log())).clamp_min(eps)
            a = (3 - s + ((s - 3) ** 2 + 24 * s).sqrt()) / (12 * s)
            for _ in range(self.newton_steps):  # Minka (2002), Eq. 8: Newton on 1/a
                num = -s + a.log() - torch.digamma(a)
                den = a * a * (1 / a - torch.polygamma(1, a))
                a = 1 / (1 / a + num / den)
            return {"concentration": a, "rate": a / m}
        if family is dist.Beta:
            self._require_free(mapping, ("concentration1", "concentration0"), "Beta")
            vv = v.clamp(eps, 1 - eps)
            m = mean(vv)
            var = (mean(vv * vv) - m * m).clamp_min(tiny)
            common = (m * (1 - m) / var - 1).clamp_min(eps)
            a, b = m * common, (1 - m) * common
            la, lb = mean(vv.log()), mean(torch.log1p(-vv))
            for _ in range(self.newton_steps):  # Newton on ψ(a) - ψ(a+b) = E log x, etc.
                tab = torch.polygamma(1, a + b)
                ga = torch.digamma(a) - torch.digamma(a + b) - la
                gb = torch.digamma(b) - torch.digamma(a + b) - lb
                haa, hbb = torch.polygamma(1, a) - tab, torch.polygamma(1, b) - tab
                det = haa * hbb - tab * tab
                da = (hbb * ga + tab * gb) / det
                db = (tab * ga + haa * gb) / det
                a = torch.where(a - da > 0, a - da, a / 2)
                b = torch.where(b - db > 0, b - db, b / 2)
            return {"concentration1": a, "concentration0": b}
        raise CapabilityError(f"derived M-step: no estimate for {family.__name__}")

    @staticmethod
    def _require_free(mapping, names, family):
        fixed = [n for n in names if torch.is_tensor(mapping[n])]
        if fixed:
            raise CapabilityError(
                f"derived M-step: a {family} with fixed {fixed} has no implemented M-step; both "
                f"{list(names)} must be slot parts (or use GeneralizedEM)"
            )


def _softmax_slots(u):
    return torch.softmax(u, dim=1)


def _base(fn):
    """``(base distribution, reinterpreted batch dims)`` of ``Independent`` wrappers."""
    reinterpreted = 0
    while isinstance(fn, torch.distributions.Independent):
        reinterpreted += fn.reinterpreted_batch_ndims
        fn = fn.base_dist
    return fn, reinterpreted


def _plate_shape(batch_shape, nesting):
    shape = tuple(batch_shape)[-nesting:] if nesting else ()
    return (1,) * (nesting - len(shape)) + shape


def mean_and_variance(x):
    """Per-datapoint mean and unbiased variance of the measurements, each ``(batch, 1, dim)``,
    for ``x`` ``(batch, M, dim)``: ``torch.std_mean(x, 1)``'s numbers (up to rounding) from two
    plain passes, a mean and the squared deviations from it (the same stability; the CPU's
    variance kernel over the middle axis of a tensor with few features is ~10× slower)."""
    mean = x.mean(1, keepdim=True)
    dev = x - mean
    var = (dev * dev).sum(1, keepdim=True) / max(x.shape[1] - 1, 1)
    return mean, var


#: Features below which :func:`weighted_sums` hands the batched matrix product its values
#: feature-major: for a few features the CPU's product runs about twice as fast that way (and
#: several times slower for many).
FEATURE_MAJOR_MAX = 8


def weighted_sums(resp, values):
    """``Σ_m r_km v_me`` of shape ``(B, K, E)`` from ``resp`` ``(B, K, M)`` and ``values``
    ``(B, M, E)``: one batched matrix product, differentiable in both."""
    if values.shape[-1] < FEATURE_MAJOR_MAX:
        values = values.transpose(1, 2).contiguous().transpose(1, 2)
    return torch.bmm(resp, values)


def weighted_squared_deviations(x, loc, resp):
    """``Σ_m r_km (x_md - loc_kd)²`` of shape ``(B, K, D)``: the centred second moment.

    One feature at a time over contiguous ``(B, K, M)`` blocks (no ``(B, K, M, D)`` temporary),
    in place in one reused block when no gradient is recorded (a new block per feature is a
    pass over memory the cache no longer holds).
    """
    xt = x.transpose(1, 2).contiguous()  # (B, D, M)
    in_place = not (torch.is_grad_enabled() and (x.requires_grad or loc.requires_grad))
    in_place = in_place and not (torch.is_grad_enabled() and resp.requires_grad)
    out, block = [], None
    for d in range(xt.shape[1]):
        a, b = xt[:, d].unsqueeze(1), loc[:, :, d].unsqueeze(-1)
        if in_place:
            block = a - b if block is None else torch.sub(a, b, out=block)
            sq = block.mul_(block).mul_(resp)  # (B, K, M)
        else:
            dev = a - b
            sq = dev * dev * resp
        out.append(sq.sum(-1))
    return torch.stack(out, -1)


#: Largest relative rounding error a component variance from the raw moments may carry
#: (:func:`normal_moments`); the datapoints where it could be larger are recomputed directly.
MOMENT_RTOL = 1e-3

#: Rounding error of a batched product's sums in units of ``eps`` times the sum of magnitudes
#: (a generous bound for blocked float accumulation over a few thousand terms).
_SUM_ERROR_EPS = 16


def normal_moments(resp, x, reg_covar: float = 0.0, loc=None):
    r"""Weighted Normal statistics of every component: ``(nk, loc, var)``.

    ``nk = Σ_m r_km`` ``(B, K)`` (plus ``10 eps``, so that an empty component divides by it),
    ``loc = Σ_m r_km x_m / nk`` and ``var = Σ_m r_km (x_m - loc_k)² / nk + reg_covar · u``
    ``(B, K, D)``, where ``u`` is the datapoint's per-feature variance of its measurements (1
    where they are all equal: a function of the data, not of λ, so EM stays coordinate ascent).
    With ``loc`` given (``(B, K, D)``, fixed means), the variances are about it and it is
    returned as it is.

    All three come from one batched matrix product of ``resp`` ``(B, K, M)`` with the
    measurements' moments ``[1, x_c, x_c²]`` about the datapoint's mean (``x_c``): one pass
    over the responsibilities, where the direct form reads them, and a ``(B, K, M)`` temporary,
    once per feature. ``var = S₂/nk - loc_c²`` cancels where a component is tight beside its
    distance from the datapoint's mean; its rounding error is bounded by a few ``eps · S₂/nk``,
    and the datapoints where that bound exceeds :data:`MOMENT_RTOL` of a variance are
    recomputed directly (:func:`weighted_squared_deviations`). Differentiable in ``resp``,
    ``x`` and ``loc``.

    :param resp: ``(B, K, M)`` weights (responsibilities); :param x: ``(B, M, D)``.
    """
    batch, num_points, dim = x.shape
    eps = torch.finfo(x.dtype).eps
    ref = x.mean(1, keepdim=True)  # (B, 1, D)
    feature_major = dim < FEATURE_MAJOR_MAX  # the product's fast layout (weighted_sums)
    if not (torch.is_grad_enabled() and x.requires_grad):
        # One tensor, written in place: [1, x_c, x_c²] along the moment axis.
        if feature_major:
            moments = x.new_empty(batch, 1 + 2 * dim, num_points)
            parts = moments[:, :1], moments[:, 1 : 1 + dim], moments[:, 1 + dim :]
            torch.sub(x.transpose(1, 2), ref.transpose(1, 2), out=parts[1])
        else:
            moments = x.new_empty(batch, num_points, 1 + 2 * dim)
            parts = moments[..., :1], moments[..., 1 : 1 + dim], moments[..., 1 + dim :]
            torch.sub(x, ref, out=parts[1])
        parts[0].fill_(1)
        torch.mul(parts[1], parts[1], out=parts[2])
    else:
        xc = x - ref
        moments = torch.cat([torch.ones_like(xc[..., :1]), xc, xc * xc], -1)
        if feature_major:
            moments = moments.transpose(1, 2).contiguous()
    values = moments.transpose(1, 2) if feature_major else moments  # (B, M, 1 + 2D)
    sums = torch.bmm(resp, values)  # (B, K, 1 + 2D)
    nk = sums[..., 0] + 10 * eps
    s1, s2 = sums[..., 1 : 1 + dim] / nk.unsqueeze(-1), sums[..., 1 + dim :] / nk.unsqueeze(-1)
    if loc is None:
        loc_c = s1
        var = s2 - loc_c * loc_c
    else:
        loc_c = loc - ref
        var = s2 - 2 * loc_c * s1 + loc_c * loc_c
    unit = values[..., 1 + dim :].mean(1, keepdim=True)  # (B, 1, D): the data's variance
    unit = torch.where(unit > 0, unit, torch.ones_like(unit))
    floor = reg_covar * unit
    # Rounding error of S₂/nk - loc_c² (and of the sums it comes from) against the variance.
    error = (_SUM_ERROR_EPS * eps) * (s2 + loc_c * loc_c).detach()
    risky = (error > MOMENT_RTOL * (var.detach().clamp_min(0) + floor)).flatten(1).any(1)
    if bool(risky.any()):
        rows = risky.nonzero().flatten()
        direct = weighted_squared_deviations(x[rows] - ref[rows], loc_c[rows], resp[rows])
        var = var.index_copy(0, rows, direct / nk[rows].unsqueeze(-1))
    loc = loc_c + ref if loc is None else loc
    return nk, loc, var + floor
