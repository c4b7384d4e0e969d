"""Per-sample log densities of a slot model, read off Pyro's TraceEnum traces.

The diagnostics need quantities that the per-datapoint ELBO (:mod:`pyro_slots.elbo`) averages
away: the log importance weight ``log p(x, z) - log q(z)`` of every guide sample (PSIS), and the
log-likelihood of every measurement (``log_likelihood`` group of the InferenceData). Both come
from the same traces as the ELBO: the guide is traced under a vectorized particle plate, the
model is replayed against it with its enumerated sites marginalized by Pyro's tensor
contraction (the first half of ``TraceEnum_ELBO._compute_dice_elbo``), and the packed
log-density terms are summed over every dimension except the ones kept.
"""

from __future__ import annotations

import contextlib

import torch
from pyro.infer import TraceEnum_ELBO
from pyro.ops import packed

from .. import _pyro_compat as compat
from ..elbo import marginal_model_costs
from ..validation import check_seed

PARTICLE_PLATE = "num_particles_vectorized"  # the name TraceEnum_ELBO gives its particle plate


@contextlib.contextmanager
def seeded(seed: int | None):
    """Run the block on a forked global RNG seeded with ``seed`` (no-op for ``None``).

    Pyro draws guide samples from the global torch RNG; forking keeps the caller's stream intact.
    """
    if seed is None:
        yield
        return
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(check_seed(seed))
        yield


def traces(model, x: torch.Tensor, slots: torch.Tensor, num_particles: int):
    """One ``(model_trace, guide_trace)`` pair with ``num_particles`` vectorized guide samples."""
    elbo = TraceEnum_ELBO(
        max_plate_nesting=model.max_plate_nesting,
        num_particles=num_particles,
        vectorize_particles=True,
        strict_enumeration_warning=False,
    )
    ((model_trace, guide_trace),) = list(
        compat.get_traces(elbo, model.model, model.guide, (x, slots), {})
    )
    return model_trace, guide_trace


def guide_sample_sites(guide_trace) -> list[str]:
    return [n for n, s in guide_trace.nodes.items() if s["type"] == "sample"]


def log_density_terms(model_trace, guide_trace, include_guide: bool = True) -> list[torch.Tensor]:
    """Packed terms whose sum is ``log p(x, z) - log q(z)`` with model enumeration summed out."""
    for name, site in guide_trace.nodes.items():
        if site["type"] == "sample" and site["infer"].get("enumerate"):
            raise ValueError(
                f"guide site {name!r} is enumerated; log weights need a guide that samples all "
                "its sites (enumerate discrete latents in the model instead)"
            )
    # Exact marginalization of the enumerated model sites, as in TraceEnum_ELBO.
    costs, _ = marginal_model_costs(model_trace, guide_trace)
    terms = [term for ordinal_terms in costs.values() for term in ordinal_terms]
    if include_guide:
        for site in guide_trace.nodes.values():
            if site["type"] == "sample":
                terms.append(packed.neg(compat.packed_log_prob(site)))
    return terms


def reduce_terms(terms, keep: list[tuple[str | None, int, str]]) -> torch.Tensor:
    """Sum packed terms over every dimension but ``keep``; the result has shape of the kept sizes.

    :param keep: ``(symbol, size, what)`` per kept dimension, in output order; ``symbol`` is the
        packed dimension name (``None`` when the plate does not appear in the trace). A term
        without a kept dimension is broadcast along it only when that dimension is one that
        terms may legitimately be constant along (``what == "particle"``) or has size 1 (packed
        tensors drop size-1 dimensions); otherwise the term cannot be split that way.
    """
    sizes = [size for _, size, _ in keep]
    symbols = [symbol for symbol, _, _ in keep]
    total = None
    for term in terms:
        dims = compat.pyro_dims(term)  # one symbol per axis of a packed tensor
        summed = [i for i, d in enumerate(dims) if d not in symbols]
        out = term.sum(summed) if summed else term
        kept = [d for d in dims if d in symbols]
        view = []
        for symbol, size, what in keep:
            if symbol in kept:
                view.append(size)
            elif size == 1 or what == "particle":
                view.append(1)
            else:
                raise ValueError(
                    f"found a log-density term (dims {dims!r}) outside the {what} plate; "
                    f"it cannot be split per {what}"
                )
        out = out.permute([kept.index(s) for s in symbols if s in kept]) if kept else out
        out = out.reshape(view).expand(sizes)
        total = out if total is None else total + out
    if total is None:
        raise ValueError("the model and guide have no sample sites")
    return total


def log_weights(model, x: torch.Tensor, slots: torch.Tensor, num_samples: int) -> torch.Tensor:
    """``log p(x^n, z_s) - log q(z_s | λ^n)`` for guide samples ``z_s``: ``(num_samples, batch)``.

    Enumerated model sites are summed out exactly, so ``p(x, z)`` is the marginal over them.
    """
    model_trace, guide_trace = traces(model, x, slots, num_samples)
    symbols = compat.plate_symbols(model_trace)
    keep = [
        (symbols.get(PARTICLE_PLATE), num_samples, "particle"),
        (symbols.get(model.batch_plate), x.shape[0], "batch"),
    ]
    return reduce_terms(log_density_terms(model_trace, guide_trace), keep)


def measurement_plate(model_trace, model) -> str | None:
    """The name of the one plate besides the batch (and particle) plate, if there is one."""
    others = [
        name
        for name in compat.plate_symbols(model_trace)
        if name not in (model.batch_plate, PARTICLE_PLATE)
    ]
    return others[0] if len(others) == 1 else None


def pointwise_log_likelihood(model, x: torch.Tensor, slots: torch.Tensor) -> torch.Tensor | None:
    """``log p(x^{n,m} | λ^n)`` per measurement, ``(batch, measurements)``, or ``None``.

    Defined when the guide has no sample sites (every latent is enumerated in the model, so the
    per-datapoint ELBO is the exact log-likelihood) and every log-density term lies inside one
    measurement plate of size ``x.shape[1]``: then the terms split over measurements and sum to
    the ELBO. Otherwise (continuous latents in the guide, terms shared by all measurements) a
    per-measurement split is not defined without further model structure, and ``None`` is
    returned.
    """
    with torch.no_grad():
        model_trace, guide_trace = traces(model, x, slots, 1)
        if guide_sample_sites(guide_trace):
            return None
        name = measurement_plate(model_trace, model)
        if name is None:
            return None
        plate_size = None
        for site in model_trace.nodes.values():
            if site["type"] == "sample":
                for frame in site["cond_indep_stack"]:
                    if frame.name == name:
                        plate_size = frame.size
        if plate_size != x.shape[1]:
            return None
        symbols = compat.plate_symbols(model_trace)
        keep = [
            (symbols.get(model.batch_plate), x.shape[0], "batch"),
            (symbols.get(name), x.shape[1], "measurement"),
        ]
        try:
            return reduce_terms(log_density_terms(model_trace, guide_trace, False), keep)
        except ValueError:
            return None
