"""CPU kernels of the lean estimator: the same numbers as the textbook formulas, fewer passes.

* :func:`stable_logsumexp` — log-sum-exp whose ``exp`` never sees arguments below -80 (float32
  ``exp`` takes a 25-90x slower path on the CPU below about -87); :func:`stable_softmax`, the
  softmax likewise;
* :func:`diag_normal_log_prob` — ``Independent(Normal(loc, scale), 1).log_prob(value)`` for
  mixture means broadcast against points, without the ``(K, ..., M, F)`` temporary;
* :func:`contract_last` — ``(a * b).sum(-1)`` as one einsum;
* :func:`unbroadcast` — a Normal rebuilt on its unbroadcast parameters (plates expand them to
  the full batch shape with stride-0 views, on which elementwise CPU kernels run a scalar loop).
"""

from __future__ import annotations

import math

import pyro.distributions as dist
import torch

from pyro_slots.elbo import _fused_logprob

__all__ = [
    "CANCELLATION_TOL",
    "CONTRACT_MIN_FEATURES",
    "FEWER_PASSES_MIN_ELEMENTS",
    "broadcast_shape",
    "contract_last",
    "diag_normal_log_prob",
    "diag_normal_log_ratio",
    "is_outer",
    "narrow_broadcast",
    "stable_logsumexp",
    "squared_distance",
    "stable_logsumexp_parts",
    "stable_softmax",
    "unbroadcast",
]

_LOG_2PI = math.log(2 * math.pi)
_LOG2_E = 1.0 / math.log(2.0)

#: Features from which the squared distance is expanded into a matrix product.
CONTRACT_MIN_FEATURES = 16
#: Largest rounding error (nats per measurement and component) the expansion may introduce.
CANCELLATION_TOL = 1e-4
#: Elements from which the passes over a mixture's ``(K, ..., M)`` tensor cost more than the
#: operations' dispatch: with a graph, the log-sum-exp is one fused pass and the log-density
#: of few features an ``addcmul`` per feature from there on (below, fewer operations win).
FEWER_PASSES_MIN_ELEMENTS = 1 << 15


def stable_logsumexp(t: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(logsumexp, log_softmax)`` of ``t`` over ``dim``; differences below -80 are clamped
    inside the exponential only (float32 ``exp`` of smaller arguments is many times slower).

    Clamping changes the sum by less than ``K e^-80``; the log-softmax is exact, and the
    log-sum-exp of a column that is ``-inf`` throughout is ``-inf``.

    :param torch.Tensor t: any shape.
    :param int dim: the reduced dimension.
    :returns: the log-sum-exp (``t``'s shape without ``dim``) and the log-softmax (``t``'s shape).
    """
    lse, shifted, log_norm, _, _ = stable_logsumexp_parts(t, dim)
    return lse, shifted - log_norm


def stable_logsumexp_parts(t: torch.Tensor, dim: int, overwrite: bool = False, parts: str = "all"):
    """``(logsumexp, t - max, log Σ exp(t - max), exp(t - max), Σ exp(t - max))`` over
    ``dim``; the log-softmax is the difference of the second and third, the softmax the fourth
    over the fifth (formed only when a posterior is asked for: a division, where the
    exponential of the log-softmax would cost a second pass of ``exp``).

    :param bool overwrite: ``t`` is the caller's temporary: where nothing is recorded for
        autograd, ``t - max`` (or the softmax) is formed in its storage instead of a new tensor.
    :param str parts: what the caller reads. ``"all"``: everything. Where nothing is recorded
        for autograd, ``"probs"``: the softmax itself as the fourth, ``None`` as the second and
        fifth (one tensor of ``t``'s size fewer, which on the CPU is a pass over memory that no
        longer fits the cache), and ``"lse"``: the first and third, the rest ``None``. With a
        graph, everything whatever ``parts``. Float32 over the first dimension on the CPU, these
        two are one pass over ``t`` (:func:`~pyro_slots.elbo._fused_logprob.logsumexp_first`);
        with a graph, ``"lse"`` is that pass too (:class:`_LogSumExpFirst`), the rest ``None``.
    """
    if parts not in ("all", "probs", "lse"):
        raise ValueError(f"parts: expected 'all', 'probs' or 'lse', got {parts!r}")
    no_graph = _no_graph(t)
    if (
        not no_graph
        and dim == 0
        and parts == "lse"
        and t.numel() >= FEWER_PASSES_MIN_ELEMENTS
        and _fused_logprob.logsumexp_first_applies(t)
    ):
        return _LogSumExpFirst.apply(t), None, None, None, None
    if no_graph and dim == 0 and (parts == "lse" or (parts == "probs" and overwrite)):
        fused = _fused_logprob.logsumexp_first(t, probs=parts == "probs")
        if fused is not None:
            shift, total = fused
            log_norm = total.log_()
            probs = t if parts == "probs" else None
            return log_norm + shift, None, log_norm.unsqueeze(0), probs, None
    top = t.amax(dim, keepdim=True).detach()
    m = top.nan_to_num(0.0, 0.0, 0.0)  # all -inf: shift by 0 (the log-sum-exp adds top: -inf)
    # The differences are clamped at -80 inside exp only: d itself is the log-posterior's part.
    if no_graph:
        d = t.sub_(m) if overwrite else t - m
        # exp(d) as exp2(d log2 e): float32 exp2 is about twice as fast as exp on the CPU, which
        # pays for the extra multiplication.
        if parts == "all":
            e = d.clamp_min(-80.0).mul_(_LOG2_E).exp2_()
        else:
            e, d = d.clamp_min_(-80.0).mul_(_LOG2_E).exp2_(), None
    else:
        d = t - m
        e = d.clamp_min(-80.0).exp()
    total = e.sum(dim, keepdim=True)
    log_norm = total.log()
    lse = (log_norm + top).squeeze(dim)
    if no_graph and parts == "probs":
        return lse, None, log_norm, e.div_(total), None
    if no_graph and parts == "lse":
        return lse, None, log_norm, None, None
    return lse, d, log_norm, e, total


class _LogSumExpFirst(torch.autograd.Function):
    """The log-sum-exp over the first axis of float32 ``t`` on the CPU, differentiable twice:
    the forward is :func:`~pyro_slots.elbo._fused_logprob.logsumexp_first` (one pass over ``t``
    and no temporaries of its size, where torch's operations make five passes and four tensors,
    each recorded for autograd), the backward ``g · exp(t - lse)`` (the softmax) written in
    torch's operations, so that its own gradient is autograd's.

    The exponent of the backward is clamped at -80 as the forward's is (float32 ``exp`` of
    smaller arguments takes a slow path on the CPU): a term below ``e^-80`` of the maximum gets
    ``e^-80 g`` (< 2e-35 g) instead of its exact share, as does a column that is ``-inf``
    throughout (``lse = -inf``), where ``t - lse`` would be NaN.
    """

    @staticmethod
    def forward(ctx, t):
        shift, total = _fused_logprob.logsumexp_first(t)
        lse = total.log_().add_(shift)
        ctx.save_for_backward(t, lse)
        return lse

    @staticmethod
    def backward(ctx, grad):
        t, lse = ctx.saved_tensors
        d = t - lse.clamp_min(torch.finfo(t.dtype).min)
        if torch.is_grad_enabled():  # create_graph: every step recorded, nothing in place
            return d.clamp_min(-80.0).exp() * grad
        return d.clamp_min_(-80.0).exp_().mul_(grad)


def stable_softmax(
    t: torch.Tensor, dim: int, eps: float = 0.0, *, log2: bool = False, overwrite: bool = False
) -> torch.Tensor:
    """``softmax(t) + eps`` over ``dim``, with the differences to the maximum clamped at -80
    before ``exp`` (``torch.softmax`` slows down up to twofold on the CPU as the logits spread).

    Every probability is off by less than ``e^-80`` (1.8e-35). Computed in place on one
    temporary, so not differentiable: for the forward of an autograd function or ``no_grad``.

    :param bool log2: ``t`` holds base-2 logits (``softmax(t ln 2)``, differences clamped at
        ``-80 / ln 2``): float32 ``exp2`` is about twice as fast as ``exp`` on the CPU, and a
        caller can often fold the ``log2 e`` into a smaller tensor upstream (the queries of
        slot attention instead of its logits).
    :param bool overwrite: ``t`` is the caller's temporary and becomes the result (no new
        tensor).
    """
    shift = t.amax(dim, keepdim=True)
    e = t.sub_(shift) if overwrite else t - shift
    e = e.clamp_min_(-80.0 * _LOG2_E).exp2_() if log2 else e.clamp_min_(-80.0).exp_()
    e = e.div_(e.sum(dim, keepdim=True))
    return e.add_(eps) if eps else e


def _no_graph(*tensors) -> bool:
    """Whether nothing computed from ``tensors`` is recorded by autograd (no-grad mode, or no
    input requires a gradient): temporaries may then be overwritten in place."""
    return not torch.is_grad_enabled() or not any(t.requires_grad for t in tensors)


def narrow_broadcast(t):
    """``t`` with every broadcast dimension (stride 0, size > 1) narrowed to size one."""
    if not torch.is_tensor(t):
        return t
    strides = t.stride()
    if 0 not in strides:
        return t
    for d, (size, stride) in enumerate(zip(t.shape, strides)):
        if stride == 0 and size > 1:
            t = t.narrow(d, 0, 1)
    return t


def unbroadcast(fn):
    """``fn`` rebuilt on its unbroadcast parameters, or ``fn`` itself.

    ``log`` of an expanded scale is ~40x slower than of a contiguous one on the CPU; a Normal
    rebuilt on the narrowed parameters computes its log-density by broadcasting against the
    value instead, with the same result. Only ``Normal`` and ``Independent(Normal)`` are rebuilt.
    """
    if isinstance(fn, dist.Independent):
        base = unbroadcast(fn.base_dist)
        if base is fn.base_dist:
            return fn
        return dist.Independent(base, fn.reinterpreted_batch_ndims, validate_args=False)
    if type(fn) is dist.Normal:
        loc, scale = narrow_broadcast(fn.loc), narrow_broadcast(fn.scale)
        if loc is not fn.loc or scale is not fn.scale:
            return dist.Normal(loc, scale, validate_args=False)
    return fn


def contract_last(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``(a * b).sum(-1)`` with broadcasting, as one einsum that never forms ``a * b``.

    :returns: the broadcast shape of ``a.shape[:-1]`` and ``b.shape[:-1]``.
    """
    nd = max(a.dim(), b.dim())
    a = a.reshape((1,) * (nd - a.dim()) + a.shape)
    b = b.reshape((1,) * (nd - b.dim()) + b.shape)
    labels_a, labels_b, labels_out, out_shape = "", "", "", []
    for i, (na, nb) in enumerate(zip(a.shape[:-1], b.shape[:-1])):
        out_shape.append(max(na, nb))
        label = chr(ord("a") + i)
        labels_a += label if na > 1 else ""
        labels_b += label if nb > 1 else ""
        labels_out += label if max(na, nb) > 1 else ""
    a = a.reshape([n for n in a.shape[:-1] if n > 1] + [a.shape[-1]])
    b = b.reshape([n for n in b.shape[:-1] if n > 1] + [b.shape[-1]])
    out = torch.einsum(f"{labels_a}z,{labels_b}z->{labels_out}", a, b)
    return out.reshape(out_shape)


def broadcast_shape(a, b) -> tuple:
    """``torch.broadcast_shapes(a, b)`` for two shapes that broadcast (a distribution's
    parameters and its value), in plain Python: torch's version costs ~70 µs per call, a tenth
    of the lean estimator's fixed cost."""
    a, b = tuple(a), tuple(b)
    if len(a) < len(b):
        a, b = b, a
    b = (1,) * (len(a) - len(b)) + b
    out = tuple(m if n == 1 else n for m, n in zip(a, b))
    if any(m != 1 and n != 1 and m != n for m, n in zip(a, b)):
        raise ValueError(f"shapes {a} and {b} do not broadcast")
    return out


def is_outer(loc_shape, value_shape, shape) -> bool:
    """Whether ``loc`` and ``value`` each miss dimensions of the broadcast ``shape``: only then
    does the contraction avoid a tensor larger than its inputs (mixture means against points)."""
    return max(math.prod(loc_shape), math.prod(value_shape)) < math.prod(shape)


def _outer_few_features(xs, mus, log_scale, const, in_place: bool):
    """``-const - ½ Σ_f (x_f - μ_f)² / σ_f²`` from the features ``xs`` and means ``mus`` (each
    unbound along the event): per feature the difference scaled by ``σ_f^-1 / √2`` and one
    ``addcmul`` into the result, about half the passes over the broadcast shape of squaring,
    weighting and adding separately (six for two features where those take nine).

    :param bool in_place: nothing is recorded for autograd: one block of the broadcast shape
        holds the result and a second is reused for the later features. Otherwise (a graph:
        every pass recorded, then run again by the gradient) new tensors, from
        :data:`FEWER_PASSES_MIN_ELEMENTS` elements only (below, the fewer dispatches of the
        plain sum win).
    :returns: ``None`` where the block would not hold the result's shape (a scale or constant
        with more dimensions than the points and means), or, with a graph, is too small.
    """
    block = broadcast_shape(xs[0].shape, mus[0].shape)
    if not in_place and math.prod(block) < FEWER_PASSES_MIN_ELEMENTS:
        return None
    if in_place:
        roots = (-log_scale).exp_().mul_(math.sqrt(0.5)).unbind(-1)
    else:  # exp's backward reads its output: nothing in place
        roots = ((-log_scale).exp() * math.sqrt(0.5)).unbind(-1)
    if broadcast_shape(block, broadcast_shape(roots[0].shape, const.shape)) != block:
        return None
    out = scratch = None
    for f in range(len(xs)):
        mu, root = mus[f if len(mus) > 1 else 0], roots[f if len(roots) > 1 else 0]
        if not in_place:
            z = (xs[f] - mu) * root
            out = torch.addcmul(-const if out is None else out, z, z, value=-1.0)
        elif out is None:
            out = torch.sub(xs[f], mu).mul_(root)
            out = torch.addcmul(-const, out, out, value=-1.0, out=out)
        else:
            scratch = torch.sub(xs[f], mu, out=scratch).mul_(root)
            out.addcmul_(scratch, scratch, value=-1.0)
    return out


def _constant_number(t: torch.Tensor) -> bool:
    """Whether ``t`` is one number on the CPU that no gradient flows to (read with ``float``
    without a device synchronization)."""
    return t.numel() == 1 and t.device.type == "cpu" and not t.requires_grad


def diag_normal_log_prob(loc, scale, value):
    """``Independent(Normal(loc, scale), 1).log_prob(value)``, or ``None`` where the fast form
    would lose float32 digits (the caller then evaluates the distribution directly).

    Means that already have the points' shape (per-pixel means): one pass over ``(x - μ)²``.
    Few features (< :data:`CONTRACT_MIN_FEATURES`): the squared distance is accumulated one
    feature at a time, each pass over a contiguous ``(K, ..., M)`` tensor. Many features:
    ``-½ Σ (x - μ)²/σ² = Σ x μ/σ² - ½ Σ x²/σ² - ½ Σ μ²/σ²``, whose cross term is one batched
    matrix product; expanding the square costs float32 digits when the components are tight
    compared with their distance from the origin, so where its rounding error could exceed
    :data:`CANCELLATION_TOL` nats, ``None`` is returned.

    :param torch.Tensor loc: means ``(..., F)``, broadcastable against ``value``.
    :param torch.Tensor scale: standard deviations ``(..., F)`` or ``(..., 1)``.
    :param torch.Tensor value: points ``(..., F)``.
    :returns: the broadcast batch shape of the three, or ``None``.
    """
    event = value.shape[-1]
    loc, scale = narrow_broadcast(loc), narrow_broadcast(scale)
    outer = is_outer(loc.shape[:-1], value.shape[:-1], broadcast_shape(loc.shape, value.shape)[:-1])
    sigma = float(scale) if not outer and _constant_number(scale) else math.nan
    if 0 < sigma < math.inf:
        # One fixed scale (IODINE's pixels, a standard-normal prior): the factor and the
        # constant are Python numbers, applied in the passes over the data.
        weight = -0.5 / (sigma * sigma)
        shift = -event * (math.log(sigma) + 0.5 * _LOG_2PI)
        if event >= CONTRACT_MIN_FEATURES:
            d = value - loc
            return (d * d).sum(-1).mul(weight).add_(shift)
        return squared_distance(value, loc, weight, shift)
    # One log serves both: σ^-2 = exp(-2 log σ) (cheaper to differentiate twice than pow).
    log_scale = scale.log()
    prec = (-2.0 * log_scale).exp()
    log_det = event * log_scale[..., 0] if scale.shape[-1] == 1 else log_scale.sum(-1)
    const = log_det + 0.5 * event * _LOG_2PI
    if not outer:
        # The means already have the points' shape (IODINE's per-pixel means). Few features:
        # accumulate them one at a time, each a pass over (K, ..., M) (a reduction over a short
        # last axis is several times slower on the CPU); many: one pass and a reduction.
        if event >= CONTRACT_MIN_FEATURES:
            d = value - loc
            if prec.shape[-1] == 1:
                return (d * d).sum(-1) * (-0.5 * prec[..., 0]) - const
            return (d * d * prec).sum(-1) * -0.5 - const
        if prec.shape[-1] == 1:
            return squared_distance(value, loc) * (-0.5 * prec[..., 0]) - const
        square = None
        for f in range(event):
            d = value[..., f] - loc[..., f if loc.shape[-1] > 1 else 0]  # (a mean shared by all)
            term = d * d * prec[..., f]
            square = term if square is None else square + term
        return -0.5 * square - const
    if event < CONTRACT_MIN_FEATURES:
        # unbind: one autograd node per input for all features (selects: one each, whose
        # backward zero-fills the whole input)
        xs, mus, ps = value.unbind(-1), loc.unbind(-1), prec.unbind(-1)
        in_place = _no_graph(value, loc, scale)  # then the temporaries are reused
        if in_place:
            # One pass over the (K, ..., M) result where the kernel applies.
            out = _fused_logprob.outer_diag_normal(value, loc, log_scale, const)
            if out is not None:
                return out
            if value.shape[-1] > 1 and value.stride(-1) == 1:
                # Features interleaved: each made contiguous (one copy of the points, K times
                # smaller than the passes below, which then read them at unit stride).
                xs = value.movedim(-1, 0).contiguous().unbind(0)
        out = _outer_few_features(xs, mus, log_scale, const, in_place)
        if out is not None:
            return out
        square = None
        for f in range(event):
            d = xs[f] - mus[f if len(mus) > 1 else 0]
            p = ps[f if len(ps) > 1 else 0]
            own = in_place and broadcast_shape(d.shape, p.shape) == d.shape
            term = d.mul_(d).mul_(p) if own else d * d * p
            if square is None:
                square = term
            elif in_place and square.shape == term.shape:
                square = square.add_(term)
            else:
                square = square + term
        if in_place and broadcast_shape(square.shape, const.shape) == square.shape:
            return square.mul_(-0.5).sub_(const)
        return -0.5 * square - const
    if prec.shape[-1] == 1:  # one variance for the whole event: Σ x²/σ² = (Σ x²)/σ²
        square = torch.linalg.vector_norm(value, dim=-1).square() * prec[..., 0]
    else:
        square = contract_last(value * value, prec)
    weighted = loc * prec
    weighted = weighted.expand(weighted.shape[:-1] + (event,))
    loc_square = (weighted * loc).sum(-1)
    # Expanding the square cancels terms of size |x|²/σ² and |μ|²/σ² down to (x - μ)²/σ²: its
    # rounding error is about their size times the machine epsilon.
    size = square.detach().amax() + loc_square.detach().amax()
    if float(size) * torch.finfo(value.dtype).eps > CANCELLATION_TOL:
        return None
    cross = contract_last(value, weighted)
    return cross - 0.5 * square - 0.5 * loc_square - const


def _event_log_scale(scale: torch.Tensor, event: int) -> torch.Tensor:
    """``Σ_f log σ_f`` over an event of ``event`` features, ``scale`` ``(..., event)`` or
    ``(..., 1)`` (one scale shared by the event)."""
    log_scale = scale.log()
    return log_scale.sum(-1) if scale.shape[-1] == event else log_scale[..., 0] * event


def diag_normal_log_ratio(value, prior_loc, prior_scale, guide_loc, guide_scale):
    """``log N(value | prior) - log N(value | guide)`` for two diagonal Normals over the last
    axis (``Independent(Normal, 1)``): a latent's prior density in the model less its guide's,
    at the guide's sample.

    ``½ Σ_f [((v - μ_q)/σ_q)² - ((v - μ_p)/σ_p)²] + Σ_f (log σ_q - log σ_p)``: the ``log 2π``
    terms cancel, and the two densities are one short chain of operations (about a third of
    the two evaluated apart, each recorded for autograd, which a step's gradient then runs
    twice over: the backward with ``create_graph`` and the outer loop's through it). A prior
    with one fixed scale (a Python-readable number, the standard Normal's) folds it into the
    passes.

    :param torch.Tensor value: the latent ``(..., F)``.
    :returns: the broadcast batch shape of the five.
    """
    event = value.shape[-1]
    prior_loc, prior_scale = narrow_broadcast(prior_loc), narrow_broadcast(prior_scale)
    guide_loc, guide_scale = narrow_broadcast(guide_loc), narrow_broadcast(guide_scale)
    standardized = (value - guide_loc) / guide_scale
    quad = standardized * standardized
    prior_zero = _constant_number(prior_loc) and float(prior_loc) == 0.0
    diff = value if prior_zero else value - prior_loc
    sigma = float(prior_scale) if _constant_number(prior_scale) else math.nan
    if 0 < sigma < math.inf:
        quad = quad.addcmul(diff, diff, value=-1.0 / (sigma * sigma))
        log_det = _event_log_scale(guide_scale, event)
        if sigma != 1.0:
            log_det = log_det - event * math.log(sigma)
    else:
        prior_std = diff / prior_scale
        quad = quad.addcmul(prior_std, prior_std, value=-1.0)
        log_det = _event_log_scale(guide_scale, event) - _event_log_scale(prior_scale, event)
    return torch.add(log_det, quad.sum(-1), alpha=0.5)


class _SquaredDistance(torch.autograd.Function):
    """``weight · Σ_f (value - loc)² + shift`` over the last axis; see :func:`squared_distance`."""

    @staticmethod
    def forward(ctx, value, loc, weight, shift):
        features = value.shape[-1] if value.shape[-1] > 1 else loc.shape[-1]
        shape = broadcast_shape(value.shape[:-1], loc.shape[:-1])
        # With a gradient to come, the differences are kept, feature-major: the backward is
        # then one pass (a product) instead of recomputing them.
        keep = any(ctx.needs_input_grad[:2])
        diffs = value.new_empty((features, *shape)) if keep else None
        out = None
        for f in range(features):
            a = value[..., f if value.shape[-1] > 1 else 0]
            b = loc[..., f if loc.shape[-1] > 1 else 0]
            d = torch.sub(a, b, out=diffs[f]) if keep else a - b
            if out is None:  # shift + weight d², one pass
                out = torch.addcmul(d.new_tensor(shift), d, d, value=weight)
            else:
                out.addcmul_(d, d, value=weight)
        ctx.save_for_backward(value, loc, diffs)
        ctx.weight = weight
        return out

    @staticmethod
    def backward(ctx, grad):
        value, loc, diffs = ctx.saved_tensors
        # d/dloc = 2 w (loc - value) g = -d/dvalue: one tensor of the broadcast shape, one
        # pass over the kept differences (a Function whose own backward is autograd's, so
        # double backward works).
        d_value = d_loc = None
        if ctx.needs_input_grad[1]:
            full = _DifferenceTimes.apply(diffs, value, loc, grad, -2.0 * ctx.weight)
            d_loc = full.sum_to_size(loc.shape)
            if ctx.needs_input_grad[0]:
                d_value = (-full).sum_to_size(value.shape)
        elif ctx.needs_input_grad[0]:
            full = _DifferenceTimes.apply(diffs, value, loc, grad, 2.0 * ctx.weight)
            d_value = full.sum_to_size(value.shape)
        return d_value, d_loc, None, None


class _DifferenceTimes(torch.autograd.Function):
    """``scale (value - loc) g[..., None]`` from the differences ``diffs`` ``(F, ...)`` that
    :class:`_SquaredDistance` kept (equal to ``value - loc``, without a graph): one pass; its
    backward differentiates the same expression written in torch's operations."""

    @staticmethod
    def forward(ctx, diffs, value, loc, g, scale):
        ctx.save_for_backward(value, loc, g)
        ctx.scale = scale
        zero = diffs.new_zeros(())
        return torch.addcmul(zero, diffs.movedim(0, -1), g.unsqueeze(-1), value=scale)

    @staticmethod
    def backward(ctx, grad):
        value, loc, g = ctx.saved_tensors
        d_value = d_loc = d_g = None
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
            scaled = grad * (ctx.scale * g).unsqueeze(-1)
            if ctx.needs_input_grad[1]:
                d_value = scaled.sum_to_size(value.shape)
            if ctx.needs_input_grad[2]:
                d_loc = (-scaled).sum_to_size(loc.shape)
        if ctx.needs_input_grad[3]:
            d_g = (grad * (value - loc)).sum(-1).mul(ctx.scale).sum_to_size(g.shape)
        return None, d_value, d_loc, d_g, None


def squared_distance(
    value: torch.Tensor, loc: torch.Tensor, weight: float = 1.0, shift: float = 0.0
) -> torch.Tensor:
    """``weight * ((value - loc) ** 2).sum(-1) + shift`` with broadcasting, for a few features.

    Forward: one feature at a time, each a pass over a tensor of the broadcast batch shape (no
    ``(..., F)`` temporary, no reduction over a short last axis), the weight and shift applied
    in the same passes (a Normal's log-density with a fixed scale: no passes of its own).
    Backward: the gradient of ``loc`` is written once, ``2 w (loc - value) g``, from the
    differences the forward kept (one pass); autograd's
    gradient of the per-feature slices zero-filled a full ``(..., F)`` tensor per feature and
    added them up, which on the CPU (fresh pages for every zero-filled tensor under glibc's
    default allocator) was most of the time of IODINE's likelihood.

    :param float weight: a constant factor (a Python number, no gradient).
    :param float shift: a constant added (a Python number, no gradient).
    """
    return _SquaredDistance.apply(value, loc, float(weight), float(shift))
