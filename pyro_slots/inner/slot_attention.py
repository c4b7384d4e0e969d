"""Slot attention as a learned inner rule (Locatello et al. 2020; Eq. 5 of the seed paper)."""

from __future__ import annotations

import math

import torch
from torch import nn

from ..elbo.kernels import stable_softmax
from ..validation import check_bool, check_positive_float, check_positive_int
from . import _fused_attention as _fused
from .base import InnerProblem, InnerRule, InnerState, StepInfo
from .mstep import mean_and_variance

__all__ = ["GaussianFeatures", "SlotAttention"]


#: The attribute of an :class:`~pyro_slots.inner.InnerProblem` under which slot-attention rules
#: keep what they derive from its measurements: ``{(rule, name): _Derived}``.
_DERIVED_ATTR = "_slot_attention_derived"


class _Derived:
    """A tensor derived from a problem's ``x`` and some weights, with what it was computed from.

    It stays valid while it is used with the same ``x`` and weights (the same tensors, not
    modified in place since) in the same grad mode: an optimizer step, a ``load_state_dict`` or
    a ``torch.no_grad`` block in between refreshes it. A tensor made under
    ``torch.inference_mode`` has no version counter: it counts as unmodified (the problem's own
    ``x`` is not changed in place during its inner loop).
    """

    __slots__ = ("grad", "params", "source", "value", "versions")

    def __init__(self, source: torch.Tensor, params: tuple, value: torch.Tensor):
        self.source, self.params, self.value = source, params, value
        self.grad = torch.is_grad_enabled()
        self.versions = _versions(source, params)

    def valid(self, source: torch.Tensor, params: tuple) -> bool:
        return (
            self.grad == torch.is_grad_enabled()
            and source is self.source
            and len(params) == len(self.params)
            and all(a is b for a, b in zip(params, self.params))
            and self.versions == _versions(source, params)
        )


def _versions(source: torch.Tensor, params: tuple) -> tuple:
    return tuple(None if t.is_inference() else t._version for t in (source, *params))


#: Whether this torch's autograd engine tells a backward which pass it is in and which nodes it
#: will run (private API, used the same way by ``torch.utils.checkpoint``); without it the
#: inputs' gradient is not deferred.
_CAN_DEFER = hasattr(torch._C, "_current_graph_task_id") and hasattr(
    torch._C, "_will_engine_execute_node"
)


class _InputsGradient:
    """The gradient of inputs shared by several :class:`_AttendPool` calls, deferred.

    The inner loop attends over the same normalized inputs ``n`` at every step, so autograd
    would write one ``(batch, M, F)`` gradient per step and add them up, each addition another
    pass over memory. Instead every step's backward leaves its two factors here (tagged with
    the backward pass that made them), and :class:`_CollectInputsGradient` accumulates
    ``Σ_t left_t^T right_t`` into one tensor inside the products (``baddbmm``) at the end, or
    earlier once the factors would hold more memory than that tensor (many steps or slots).
    (One product of the stacked factors, ``[left_1; ...]^T [right_1; ...]``, measured slower:
    the BLAS is slow for that inner size.)
    """

    __slots__ = ("factors", "node", "partial", "split")

    def __init__(self, split: bool = False):
        self.factors = []  # (graph task id, left (batch, R, M), right (batch, R, F))
        self.partial = {}  # graph task id: the gradient summed so far
        self.node = None  # the collecting node, once its token is made
        # Whether the collector sums factor pairs itself (the fused LayerNorm's backward): a
        # step then leaves its two pairs as they are, not stacked into one for a single product.
        self.split = split

    def needed(self) -> bool:
        """Whether the running backward pass reaches the inputs (else it wants no factors)."""
        return torch._C._will_engine_execute_node(self.node)

    def add(self, left: torch.Tensor, right: torch.Tensor):
        """Keeps one step's factors for the running backward pass. Once its factors hold more
        rows than the gradient has features, they are summed into it: the memory held stays
        below that of the gradient itself, however many steps share the inputs."""
        task = torch._C._current_graph_task_id()
        self.factors.append((task, left, right))
        mine = [f for f in self.factors if f[0] == task]
        if sum(f[1].shape[1] for f in mine) > right.shape[-1]:
            self.partial[task] = self.take(task)

    def take(self, task: int) -> torch.Tensor | None:
        """This backward pass's gradient summed so far, removed (that of other passes stays)."""
        d_n, factors = self.pop(task)
        for left, right in factors:
            if d_n is None:
                d_n = torch.bmm(left.transpose(1, 2), right)
            else:
                d_n.baddbmm_(left.transpose(1, 2), right)  # accumulated inside the product
        return d_n

    def pop(self, task: int) -> tuple:
        """This backward pass's partial sum (or ``None``) and its factors not yet summed,
        ``[(left, right), ...]``, removed (those of other passes stay)."""
        factors = [(left, right) for t, left, right in self.factors if t == task]
        self.factors = [f for f in self.factors if f[0] != task]
        return self.partial.pop(task, None), factors


class _CollectInputsGradient(torch.autograd.Function):
    """``token = 0``, a scalar made from the shared inputs ``n``: every :class:`_AttendPool`
    over ``n`` takes it as an input, so autograd runs this backward after all of theirs and
    it returns ``n``'s whole gradient from the factors they left in ``sink``."""

    @staticmethod
    def forward(ctx, n, sink):
        ctx.sink = sink
        ctx.set_materialize_grads(False)
        return n.new_zeros(())

    @staticmethod
    def backward(ctx, _):
        return ctx.sink.take(torch._C._current_graph_task_id()), None


class _NormalizeShared(torch.autograd.Function):
    """``n = LayerNorm(h)`` of the shared inputs by the fused kernel
    (:func:`~pyro_slots.inner._fused_attention.normalize`), returned with a token that plays
    :class:`_CollectInputsGradient`'s part for an optional ``sink``, and the kernel's blocked
    copy of ``n`` (not differentiable) made in the same pass over ``h``.

    Without a graph the backward takes the factors that the :class:`_AttendPool` calls left in
    the sink and, per input, sums ``Σ_t left_tᵀ right_t`` and applies the LayerNorm's backward to
    it in registers (:func:`~pyro_slots.inner._fused_attention.normalize_backward`): no
    gradient of ``n`` is written or read. A gradient of ``n`` from elsewhere is added to it. A
    backward that builds a graph differentiates torch's ``layer_norm`` of the saved inputs
    instead (the attention then returns ``n``'s gradient itself), so double backward works.
    """

    @staticmethod
    def forward(ctx, h, weight, bias, eps, sink, blocked):
        n, nb, mean, rstd = _fused.normalize(h, weight, bias, eps, blocked=blocked)
        ctx.save_for_backward(h, weight, bias, mean, rstd)
        ctx.eps, ctx.sink = eps, sink
        ctx.mark_non_differentiable(nb)
        ctx.set_materialize_grads(False)
        return n, n.new_zeros(()), nb

    @staticmethod
    def backward(ctx, d_n, _d_token, _d_nb):
        h, weight, bias, mean, rstd = ctx.saved_tensors
        task = torch._C._current_graph_task_id()
        wanted = ctx.needs_input_grad[:3]
        if torch.is_grad_enabled():  # (the attention deferred nothing: it returned d_n itself)
            deferred = None if ctx.sink is None else ctx.sink.take(task)
            d_n = deferred if d_n is None else d_n if deferred is None else d_n + deferred
            if d_n is None:
                return None, None, None, None, None, None
            with torch.enable_grad():
                n = nn.functional.layer_norm(h, h.shape[-1:], weight, bias, ctx.eps)
            inputs = [t for t, want in zip((h, weight, bias), wanted) if want]
            grads = iter(torch.autograd.grad(n, inputs, d_n, create_graph=True))
            d_h, d_w, d_b = (next(grads) if want else None for want in wanted)
        else:
            partial, factors = (None, []) if ctx.sink is None else ctx.sink.pop(task)
            extra = partial if d_n is None else d_n if partial is None else d_n + partial
            if extra is None and not factors:
                return None, None, None, None, None, None
            d_h, d_w, d_b = _fused.normalize_backward(h, mean, rstd, weight, factors, extra)
        return (
            d_h if wanted[0] else None, d_w if wanted[1] else None, d_b if wanted[2] else None,
            None, None, None,
        )  # fmt: skip


def _attend_pool(q, n, eps):
    """:class:`_AttendPool`'s forward: ``(attn (B, h, K, M), pooled (B, h, K, F), blocked,
    padded)``, the last two the fused kernel's blocked inputs and full attention buffer (where
    the inputs were padded to its tile) for the backward, else ``None``."""
    batch, heads, num_slots, features = q.shape
    rows, num_inputs = heads * num_slots, n.shape[1]
    # Base-2 logits: the log2(e) goes on the (batch, rows, F) queries, and the softmax takes
    # exp2, about twice as fast as exp on the CPU (the same probabilities).
    q2 = q.reshape(batch, rows, features) * math.log2(math.e)
    if _fused.supported(q, n):  # the fused CPU kernel (module docs of _fused_attention)
        blocked, padded = _fused.blocked(n), None
        if features % 2:  # the blocked inputs have a zero feature more (two at a time)
            q2 = nn.functional.pad(q2, (0, 1))
        attn, pooled = _fused.forward(q2, blocked, eps)
        if attn.shape[-1] != num_inputs:  # inputs padded to the tile: the kernel's buffer is
            padded = attn  # kept for the backward, the caller sees its M columns
            attn = attn[..., :num_inputs]
        attn = attn.view(batch, heads, num_slots, num_inputs)
        pooled = pooled[..., :features].view(batch, heads, num_slots, features)
        return attn, pooled, blocked, padded
    attn = q2.new_empty(batch, rows, num_inputs)
    pooled = q2.new_empty(batch, rows, features)
    # A few datapoints at a time (ATTEND_CHUNK_BYTES of inputs): the second product reads each
    # datapoint's inputs while the first one's read still holds them in the cache.
    for lo, hi in _batch_chunks(n):
        logits2 = torch.bmm(q2[lo:hi], n[lo:hi].transpose(1, 2), out=attn[lo:hi])
        p = stable_softmax(
            logits2.view(hi - lo, heads, num_slots, -1), 2, eps, log2=True, overwrite=True
        )
        torch.bmm(p.view(hi - lo, rows, -1), n[lo:hi], out=pooled[lo:hi])
    attn = attn.view(batch, heads, num_slots, num_inputs)
    return attn, pooled.view(batch, heads, num_slots, features), None, None


class _AttendPool(torch.autograd.Function):
    r"""Slot-competitive attention over shared inputs and the attention-weighted sums, fused.

    ``attn = softmax_K(q n^T) + eps`` (:func:`~pyro_slots.elbo.kernels.stable_softmax`, in base
    2) and ``pooled = attn n`` for queries ``q`` ``(batch, heads, K, F)`` and inputs ``n``
    ``(batch, M, F)`` shared by the heads. Autograd would write the inputs' gradient twice per
    call, once transposed (from ``q n^T``), and then add the two ``(batch, M, F)`` tensors with
    strided reads: on the CPU that addition was half of a slot-attention step. Here it is one
    product of the stacked factors, ``dn = [dlogits; attn]^T [q; dpooled]``, written once and
    contiguous; with a ``token`` of :class:`_CollectInputsGradient` the factors are left in its
    ``sink`` instead, for one gradient over all the steps that share ``n``. The backward is made
    of differentiable operations of saved inputs and outputs, so double backward works (a
    backward that builds a graph computes ``dn`` here, not through the sink). On the CPU the
    forward and the graph-free backward run a few datapoints at a time
    (:data:`ATTEND_CHUNK_BYTES`), each reading its inputs twice while they are in the cache.
    """

    @staticmethod
    def forward(ctx, q, n, eps, token=None, sink=None):
        attn, pooled, ctx.blocked, ctx.padded = _attend_pool(q, n, eps)
        # Only inputs and outputs keep their history for a double backward: p comes back from
        # the output, p = attn - eps (off by at most an ulp of eps, below the eps floor itself).
        ctx.save_for_backward(q, n, attn)
        ctx.eps, ctx.sink = eps, sink
        ctx.set_materialize_grads(False)
        return attn, pooled

    @staticmethod
    def run(q, n, eps, token=None, sink=None):
        """:meth:`apply`, or where autograd records nothing the same forward without a graph
        node (a Function's call costs ~60 µs on the CPU, a fifth of the fused kernel's time on
        200 datapoints of 500 inputs)."""
        if torch.is_grad_enabled() and (q.requires_grad or n.requires_grad):
            return _AttendPool.apply(q, n, eps, token, sink)
        return _attend_pool(q, n, eps)[:2]

    @staticmethod
    def backward(ctx, d_attn, d_pooled):
        q, n, attn = ctx.saved_tensors
        batch, heads, num_slots, features = q.shape
        rows = heads * num_slots
        if d_pooled is None:
            d_pooled = q.new_zeros(q.shape)
        d_pooled = d_pooled.reshape(batch, rows, features)
        # A backward that builds a graph computes dn here, differentiably; else the sink does.
        defer = ctx.sink is not None and not torch.is_grad_enabled()
        need_n = ctx.needs_input_grad[1] and (not defer or ctx.sink.needed())
        split = defer and ctx.sink.split
        if not torch.is_grad_enabled() and ctx.blocked is not None:
            d_attn = None if d_attn is None else d_attn.reshape(batch, rows, -1)
            full = attn.view(batch, rows, -1) if ctx.padded is None else ctx.padded
            padded_pooled = nn.functional.pad(d_pooled, (0, 1)) if features % 2 else d_pooled
            d_q, left = _fused.backward(
                padded_pooled, full, d_attn, ctx.blocked, ctx.eps, not split
            )
            d_q = d_q[..., :features].reshape(q.shape)
            left = left[..., : n.shape[1]] if need_n else None
            if split and need_n:  # (d_logits, q) and (attn, d_pooled): nothing stacked
                ctx.sink.add(left, q.reshape(batch, rows, features))
                ctx.sink.add(attn.view(batch, rows, -1), d_pooled)
                return d_q, None, None, q.new_zeros(()), None
        elif not torch.is_grad_enabled():
            d_q, left = _attend_pool_grads(q, n, attn, ctx.eps, d_attn, d_pooled, need_n)
        else:
            p = attn - ctx.eps
            g = torch.bmm(d_pooled, n.transpose(1, 2)).view_as(p)
            if d_attn is not None:
                g = g + d_attn
            pg = p * g  # the softmax's backward, p (g - Σ_K p g)
            d_logits = torch.addcmul(pg, p, pg.sum(2, keepdim=True), value=-1)
            d_logits = d_logits.view(batch, rows, -1)
            d_q = torch.bmm(d_logits, n).view(q.shape) if ctx.needs_input_grad[0] else None
            left = None
            if need_n:
                left = torch.cat([d_logits, attn.view(batch, rows, -1)], dim=1)  # (B, 2 rows, M)
        d_q = d_q if ctx.needs_input_grad[0] else None
        d_n = d_token = None
        if need_n:
            right = torch.cat([q.reshape(batch, rows, features), d_pooled], dim=1)
            if defer:
                ctx.sink.add(left, right)
                d_token = q.new_zeros(())  # schedules the sink's product after this one
            else:
                d_n = torch.bmm(left.transpose(1, 2), right)
        return d_q, d_n, None, d_token, None


#: Bytes of inputs per chunk of :class:`_AttendPool`'s batch: the inputs of a chunk are read
#: twice in a row (the logits, then the weighted sums; in the backward the logits' gradient,
#: then the queries'), the second time from the cache. Forward and backward of three
#: iterations with 2 threads on this project's machine (32 MiB L3): 5 % faster at 64 × 1024
#: inputs, 1.5 % at 32 × 4096 than the whole batch at once; 1 and 2 MiB were slower.
ATTEND_CHUNK_BYTES = 2**22


def _batch_chunks(n):
    """``(lo, hi)`` slices of ``n``'s batch holding about :data:`ATTEND_CHUNK_BYTES` each; one
    slice off the CPU (there every chunk is more kernel launches, not fewer passes over memory)."""
    batch = n.shape[0]
    if n.device.type != "cpu" or batch == 0:
        return [(0, batch)]
    per_datapoint = n[0].numel() * n.element_size()
    size = max(1, min(batch, ATTEND_CHUNK_BYTES // max(1, per_datapoint)))
    return [(lo, min(lo + size, batch)) for lo in range(0, batch, size)]


def _attend_pool_grads(q, n, attn, eps, d_attn, d_pooled, need_n: bool):
    """:class:`_AttendPool`'s backward without a graph, a chunk of the batch at a time:
    ``d_q`` ``(B, heads, K, F)`` and, with ``need_n``, the left factor ``[d_logits; attn]``
    ``(B, 2 rows, M)`` of the inputs' gradient."""
    batch, heads, num_slots, features = q.shape
    rows, num_inputs = heads * num_slots, n.shape[1]
    d_q = q.new_empty(batch, rows, features)
    left = q.new_empty(batch, 2 * rows, num_inputs) if need_n else None
    for lo, hi in _batch_chunks(n):
        a = attn[lo:hi].view(hi - lo, rows, num_inputs)
        g = torch.bmm(d_pooled[lo:hi], n[lo:hi].transpose(1, 2))  # (c, rows, M)
        if d_attn is not None:
            g.add_(d_attn[lo:hi].reshape(hi - lo, rows, num_inputs))
        p = a - eps
        pg = g.mul_(p).view(hi - lo, heads, num_slots, -1)  # the softmax's backward
        d_logits = pg.addcmul_(p.view_as(pg), pg.sum(2, keepdim=True), value=-1)
        d_logits = d_logits.view(hi - lo, rows, -1)
        torch.bmm(d_logits, n[lo:hi], out=d_q[lo:hi])
        if need_n:
            left[lo:hi, :rows] = d_logits
            left[lo:hi, rows:] = a
    return d_q.view(q.shape), left


def _mlp(in_dim: int, hidden_dim: int, out_dim: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.ReLU(), nn.Linear(hidden_dim, out_dim))


class GaussianFeatures(nn.Module):
    r"""Per-measurement sufficient statistics of a diagonal Gaussian, ``(1, z, z²)``.

    ``z = (x - mean_M x) / std_M x`` standardizes every datapoint's measurements feature by
    feature (a per-datapoint affine map, so the measurements' order does not matter), which puts
    the features of every datapoint on the unit scale. As the keys of :class:`SlotAttention`
    (with ``norm_inputs=False``) they make the attention logits quadratic in ``z``,
    ``q_k·(1, z, z²) = c_k + a_k·z + b_k·z²``, the form of an E-step's
    ``log π_k + log N(x | μ_k, σ_k)`` (the standardization only adds a term shared by all slots,
    which the softmax over slots ignores): the rule can express the E-step of a diagonal
    Gaussian mixture exactly, at ``2 dim + 1`` features per measurement instead of a hidden
    layer's worth.

    :param int dim: features per measurement; the output has ``2 dim + 1``.
    :param float eps: added to the standard deviation, > 0.
    """

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.dim = check_positive_int(dim, "dim")
        self.eps = check_positive_float(eps, "eps")
        self.feature_dim = 2 * self.dim + 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.standardize(x)[0]

    def standardize(self, x: torch.Tensor, blocked: bool = False):
        """The features ``(batch, M, 2 dim + 1)`` with the affine map that made ``z``: the mean
        and the scale ``std + eps``, each ``(batch, 1, dim)`` (``x = mean + scale z``).

        :param bool blocked: where no graph is kept and the fused attention kernel is built,
            also write its blocked copy of the features (for :class:`SlotAttention` with one
            head) in the same pass (:func:`~pyro_slots.inner._fused_attention.gaussian_features`).
        """
        if x.dim() != 3 or x.shape[-1] != self.dim:
            raise ValueError(f"x: expected (batch, M, {self.dim}), got {tuple(x.shape)}")
        if not (torch.is_grad_enabled() and x.requires_grad):
            fused = _fused.gaussian_features(x, self.eps, blocked)
            if fused is not None:
                return fused
        mean, var = mean_and_variance(x)
        scale = var.sqrt() + self.eps
        # Stored feature by feature (a (batch, M, F) view of a contiguous (batch, F, M) tensor):
        # slot attention's products with so few features run 2-3x faster along contiguous M.
        if torch.is_grad_enabled() and (x.requires_grad or scale.requires_grad):
            zt = ((x - mean) / scale).transpose(1, 2)  # (batch, dim, M)
            features = torch.cat([torch.ones_like(zt[:, :1]), zt, zt * zt], dim=1)
        else:  # without a graph, written in place: no temporaries, no concatenation
            batch, num_points, dim = x.shape
            features = x.new_empty(batch, 2 * dim + 1, num_points)
            features[:, 0].fill_(1.0)
            zt = features[:, 1 : dim + 1]
            torch.sub(x.transpose(1, 2), mean.transpose(1, 2), out=zt)
            zt.div_(scale.transpose(1, 2))
            torch.mul(zt, zt, out=features[:, dim + 1 :])
        return features.transpose(1, 2), mean, scale


class SlotAttention(InnerRule):
    r"""The slot-attention update as an inner rule ``λ_{t+1} = f_w(λ_t, x̃)``.

    One step, for every datapoint (``s`` are the slots' hidden vectors ``(batch, K, hidden)``,
    ``x̃`` the encoded measurements ``(batch, M, input_dim)``)::

        n = LayerNorm(encoder(x̃))                        # (batch, M, hidden)
        q, k, v = W_q LayerNorm(s), W_k n, W_v n           # per head, head_dim = hidden / heads
        a = softmax_K(q k^T / sqrt(head_dim)) + eps        # (batch, heads, K, M): slots compete
        u = (a / sum_M a) v                                # weighted mean over measurements
        s' = GRUCell(u, s);  s' = s' + MLP(LayerNorm(s'))

    This is Algorithm 1 of Locatello et al. (2020): softmax over the *slots*, attention
    renormalized over the measurements with ``eps = 1e-8``, a GRU and a residual MLP. With
    ``num_heads > 1`` the logits are scaled by ``head_dim ** -0.5`` (Vaswani et al. 2017), not by
    ``hidden_dim ** -0.5`` as in lucidrains' port, and the heads are concatenated and projected
    back to ``hidden_dim``; ``num_heads = 1`` is exactly the paper's single-head update. Without
    the extra ``encoder`` the inputs are layer-normalized raw measurements, as in the paper's
    Algorithm 1; the encoder (on by default) is the paper's per-position MLP applied to the
    measurements before the attention (useful when ``input_dim`` is small, e.g. 2-D points, where
    a LayerNorm over the raw features would discard almost everything).

    **Slots of any model.** When the model's slots are the hidden vectors themselves
    (``slot_dim == hidden_dim`` and ``moments=False``) the rule is the paper's: ``λ = s``. Otherwise
    per-slot MLPs translate between the two (equivariant, shared by all slots):
    ``s_t = h_t + embed(λ_t)`` and ``λ_{t+1} = readout(h_{t+1})``, where the hidden state
    ``h_t`` (zero at ``t = 0``) is carried in ``InnerState.aux``. Feeding ``embed(λ_t)`` into
    every step (rather than only at ``t = 0``) keeps the step a function of ``λ_t``, so
    first-order and implicit gradients reach ``embed`` too; for implicit differentiation ``h`` is
    held fixed at its final value.

    With ``moments=True`` the readout also sees, per slot, the attention-weighted mean and log
    standard deviation of the raw inputs and the log of the slot's share of the attention,
    ``(2 input_dim + 1)`` numbers — the slot's position and scale of Invariant Slot Attention
    (Biza et al. 2023) — through an MLP and a linear skip. For a Gaussian mixture this gives the
    readout a soft M-step on the attention to refine, instead of having to decode coordinates
    from the normalized features. With :class:`GaussianFeatures` as the keys (and
    ``norm_inputs=False``) the attention-weighted features already are these moments in
    standardized coordinates, ``(Σ a, Σ a z, Σ a z²)``: they are mapped back through the
    standardization instead of taking a second weighted sum over the measurements (the same
    numbers up to rounding, with less cancellation for data far from the origin).

    **Cost.** The key and value projections are folded into the queries and into the
    attention-weighted inputs, ``q·(W_k n) = (W_k^T q)·n`` and
    ``Σ_m a_m W_v n_m = W_v Σ_m a_m n_m``: ``O(heads K M F)`` per step instead of
    ``O(M F hidden)``, about ``hidden / (heads K)`` times fewer FLOPs; ``fold_projections=False``
    runs the textbook order (the same result up to rounding).
    The normalized inputs depend on ``x`` and the weights only, so they are computed once per
    :class:`~pyro_slots.inner.InnerProblem` and kept with it (an attribute of the problem, gone
    with it) for its later steps; they are recomputed whenever the weights or ``x`` change in
    place or the grad mode differs. Their gradient is accumulated over the steps that share
    them inside the matrix products, into one tensor, instead of one ``(batch, M, features)``
    tensor per step added up by autograd (a backward that builds a graph, for second
    derivatives, keeps the per-step form). On the CPU, in float32, with one head, at most 16
    slots and an even number of features, the attention, its softmax and the weighted sums
    (and their backward without a graph) run in a fused C++ kernel compiled at first use
    (:mod:`pyro_slots.inner._fused_attention`; about 30 s once, then cached; torch's operations
    where it cannot be built; ``PYRO_SLOTS_FUSED_ATTENTION=0`` turns it off), and so does the
    input LayerNorm where the inputs and the features are multiples of the kernel's tile (8, or
    16 with AVX-512; its forward writes the kernel's layout in the same pass; its backward
    takes the deferred gradient in registers):
    the rule's steps, forward and backward, about 1.6 times faster at 64 × 1024 and 32 × 4096
    inputs than with torch's operations, on an AVX-512 machine.

    The weights do not depend on the number of slots, so ``refine(..., num_slots=K)`` may use
    another ``K`` than training. The rule is equivariant under permutations of the slots and
    vectorized over the batch. It never draws random numbers: λ_0 comes from ``slot_init`` (a
    :class:`~pyro_slots.init.SlotInitializer`, trained with the rule when learnable) or, when it
    is ``None``, from the model's ``init_slots`` (k-means++ for
    :class:`~pyro_slots.models.GaussianMixture`).

    Example::

        gmm = GaussianMixture(num_slots=4, dim=2)
        rule = SlotAttention(num_steps=3, slot_dim=gmm.slot_dim, input_dim=2, moments=True)
        svi = NestedSVI(gmm, rule, NegativeELBO(), pyro.optim.Adam({"lr": 1e-3}))

    :param int num_steps: default number of iterations ``T``.
    :param int slot_dim: size of one slot ``λ^{n,k}`` of the model (``model.slot_dim``).
    :param int input_dim: features per encoded measurement (last dim of ``problem.x``).
    :param int hidden_dim: size of the slots' hidden vectors and of the attention.
    :param int num_heads: attention heads; must divide ``hidden_dim``.
    :param int mlp_hidden_dim: hidden width of the residual MLP (default ``2 hidden_dim``).
    :param encoder: ``True``: a per-measurement MLP ``input_dim -> hidden_dim`` before the
        input LayerNorm; ``False``: none; or any module mapping ``(batch, M, input_dim)`` to
        ``(batch, M, feature_dim)`` (e.g. :class:`GaussianFeatures`).
    :param int feature_dim: output features of an encoder module (only with a module).
    :param bool norm_inputs: layer-normalize the encoded measurements (the paper's
        ``LayerNorm(inputs)``). ``False`` keeps features whose scale carries meaning, such as
        the sufficient statistics of :class:`GaussianFeatures`.
    :param bool moments: give the readout the attention-weighted moments of the raw inputs.
    :param float eps: offset added to the attention before renormalizing over measurements, > 0.
    :param bool fold_projections: fold the key/value projections (see *Cost*).
    :param slot_init: optional :class:`~pyro_slots.init.SlotInitializer` of dimension
        ``slot_dim`` drawing λ_0 (``refine`` and ``NestedSVI`` use it when present).
    """

    def __init__(
        self,
        num_steps: int = 3,
        *,
        slot_dim: int,
        input_dim: int,
        hidden_dim: int = 64,
        num_heads: int = 1,
        mlp_hidden_dim: int | None = None,
        encoder: bool | nn.Module = True,
        feature_dim: int | None = None,
        norm_inputs: bool = True,
        moments: bool = False,
        eps: float = 1e-8,
        fold_projections: bool = True,
        slot_init=None,
    ):
        super().__init__(num_steps)
        self.fold_projections = check_bool(fold_projections, "fold_projections")
        self.slot_dim = check_positive_int(slot_dim, "slot_dim")
        self.input_dim = check_positive_int(input_dim, "input_dim")
        self.hidden_dim = check_positive_int(hidden_dim, "hidden_dim")
        self.num_heads = check_positive_int(num_heads, "num_heads")
        if self.hidden_dim % self.num_heads:
            raise ValueError(
                f"num_heads: must divide hidden_dim={self.hidden_dim}, got {self.num_heads}"
            )
        self.head_dim = self.hidden_dim // self.num_heads
        mlp_hidden_dim = 2 * self.hidden_dim if mlp_hidden_dim is None else mlp_hidden_dim
        mlp_hidden_dim = check_positive_int(mlp_hidden_dim, "mlp_hidden_dim")
        self.eps = check_positive_float(eps, "eps")
        self.moments = check_bool(moments, "moments")
        if slot_init is not None and getattr(slot_init, "dim", self.slot_dim) != self.slot_dim:
            raise ValueError(
                f"slot_init: expected an initializer of dimension slot_dim={self.slot_dim}, "
                f"got dim={slot_init.dim}"
            )
        self.slot_init = slot_init

        d = self.hidden_dim
        if isinstance(encoder, nn.Module):
            if feature_dim is None:
                raise ValueError(
                    "feature_dim: required with an encoder module (its output features)"
                )
            self.encoder = encoder
            feature_dim = check_positive_int(feature_dim, "feature_dim")
        elif isinstance(encoder, bool):
            if feature_dim is not None:
                raise ValueError(
                    f"feature_dim: only for an encoder module, got {feature_dim} with "
                    f"encoder={encoder}"
                )
            self.encoder = _mlp(self.input_dim, d, d) if encoder else None
            feature_dim = d if encoder else self.input_dim
        else:
            raise TypeError(
                f"encoder: expected a bool or a torch.nn.Module, got {type(encoder).__name__}"
            )
        self.feature_dim = feature_dim
        self.norm_inputs = nn.LayerNorm(feature_dim) if norm_inputs else None
        self.norm_slots = nn.LayerNorm(d)
        self.to_q = nn.Linear(d, d, bias=False)
        self.to_k = nn.Linear(feature_dim, d, bias=False)
        self.to_v = nn.Linear(feature_dim, d, bias=False)
        self.to_out = nn.Linear(d, d) if self.num_heads > 1 else None
        self.gru = nn.GRUCell(d, d)
        self.norm_mlp = nn.LayerNorm(d)
        self.mlp = _mlp(d, mlp_hidden_dim, d)

        # λ and the hidden vectors coincide only for the paper's setting.
        self.translate = self.moments or self.slot_dim != d
        if self.translate:
            self.embed = _mlp(self.slot_dim, d, d)
            num_moments = 2 * self.input_dim + 1 if self.moments else 0
            self.readout = _mlp(d + num_moments, d, self.slot_dim)
            self.readout_skip = nn.Linear(num_moments, self.slot_dim) if self.moments else None
        else:
            self.embed = self.readout = self.readout_skip = None

    # ------------------------------------------------------------------ interface
    def check_model(self, model):
        self._require_slot_dim(model, self.slot_dim)

    def init(self, problem: InnerProblem, slots: torch.Tensor) -> InnerState:
        self._check_shapes(problem.x, slots)
        aux = (slots.new_zeros(*slots.shape[:2], self.hidden_dim),) if self.translate else ()
        return InnerState(slots=slots, step=0, aux=aux)

    def step(self, state: InnerState, problem: InnerProblem, create_graph: bool = False):
        slots, x = state.slots, problem.x
        self._check_shapes(x, slots)
        # The ELBO at λ_t is only a diagnostic (the history); no graph is needed for it.
        elbo = problem.history_elbo(slots)
        s = state.aux[0] + self.embed(slots) if self.translate else slots
        attn, updates, pooled = self._attend(s, *self._shared_inputs(problem))
        batch, num_slots, d = s.shape
        h = self.gru(updates.reshape(-1, d), s.reshape(-1, d)).reshape(batch, num_slots, d)
        h = h + self.mlp(self.norm_mlp(h))
        if self.translate:
            new_slots = self._readout(h, attn, pooled, problem)
            aux = (h,)
        else:
            new_slots, aux = h, ()
        resp = attn[:, 0] if self.num_heads == 1 else attn.mean(1)  # no copy for one head
        info = StepInfo(elbo=elbo, responsibilities=resp.detach())
        return InnerState(new_slots, state.step + 1, aux), info

    # ------------------------------------------------------------------ the update
    def normalized_inputs(self, problem: InnerProblem) -> torch.Tensor:
        """``LayerNorm(encoder(x̃))`` of shape ``(batch, M, features)``, once per problem."""
        return self._shared_inputs(problem)[0]

    def _shared_inputs(self, problem: InnerProblem):
        """The normalized inputs, with the token and sink of their deferred gradient
        (:class:`_InputsGradient`) when a backward will need it (else ``None``), once per
        problem (see :class:`_Derived`)."""
        if self._standardized_moments:
            return self._derived(
                problem, "inputs", (), lambda: self._with_sink(self._standardized(problem)[0])
            )
        params = tuple(
            p for m in (self.encoder, self.norm_inputs) if m is not None for p in m.parameters()
        )
        return self._derived(problem, "inputs", params, lambda: self._encode(problem.x))

    def _defers(self, n: torch.Tensor) -> bool:
        """Whether the gradient of inputs ``n`` is collected once over the steps."""
        return _CAN_DEFER and self.fold_projections and torch.is_grad_enabled() and n.requires_grad

    def _with_sink(self, n: torch.Tensor):
        """``(n, (token, sink))`` with a :class:`_CollectInputsGradient` where the gradient is
        deferred, else ``(n, None)``."""
        if not self._defers(n):
            return n, None
        sink = _InputsGradient()
        token = _CollectInputsGradient.apply(n, sink)
        sink.node = token.grad_fn
        return n, (token, sink)

    @property
    def _standardized_moments(self) -> bool:
        """Whether the moments come from the pooled :class:`GaussianFeatures` (class docs)."""
        return (
            self.moments
            and self.fold_projections
            and self.norm_inputs is None
            and isinstance(self.encoder, GaussianFeatures)
        )

    def _standardized(self, problem: InnerProblem):
        """``GaussianFeatures.standardize(x)``: features, mean and scale, once per problem."""
        return self._derived(
            problem,
            "standardized",
            (),
            lambda: self.encoder.standardize(problem.x, blocked=self.num_heads == 1),
        )

    def _encode(self, x: torch.Tensor):
        """:meth:`_with_sink` of ``LayerNorm(encoder(x))``. Where the fused kernel applies
        (:func:`~pyro_slots.inner._fused_attention.normalize_supported`, the folded order) the
        LayerNorm is :class:`_NormalizeShared`: the kernel's blocked copy of the inputs comes
        from the same pass, and the deferred gradient goes through the LayerNorm's backward
        without being written."""
        inputs = x if self.encoder is None else self.encoder(x)
        if inputs.shape[-1] != self.feature_dim:
            raise ValueError(
                f"encoder: expected {self.feature_dim} output features (feature_dim), "
                f"got {tuple(inputs.shape)}"
            )
        norm = self.norm_inputs
        if norm is None:
            return self._with_sink(inputs)
        if not (
            self.fold_projections and _fused.normalize_supported(inputs, norm.weight, norm.bias)
        ):
            return self._with_sink(norm(inputs))
        blocked = self.num_heads == 1  # the attention kernel's layout (one head only)
        graph = (inputs, norm.weight, norm.bias)
        if not (torch.is_grad_enabled() and any(t.requires_grad for t in graph)):
            n, nb, _, _ = _fused.normalize(inputs, norm.weight, norm.bias, norm.eps, blocked)
            shared = None
        else:
            sink = _InputsGradient(split=True) if _CAN_DEFER else None
            n, token, nb = _NormalizeShared.apply(
                inputs, norm.weight, norm.bias, norm.eps, sink, blocked
            )
            shared = None
            if sink is not None:
                sink.node = token.grad_fn
                shared = (token, sink)
        if blocked:
            _fused.remember_blocked(n, nb)
        return n, shared

    def attention_masks(self, problem: InnerProblem, slots: torch.Tensor) -> torch.Tensor:
        """What every slot attends to at ``slots``, ``(batch, K, M)``: the rule's own attention
        (softmax over the slots, averaged over the heads), one projection and one product with
        the encoded inputs (cached per problem). A ``masks`` for
        :class:`~pyro_slots.inner.Reinitialize` that costs no decoding. With ``translate`` the
        slots are read as at the first step (no recurrent state).
        """
        self._check_shapes(problem.x, slots)
        s = self.embed(slots) if self.translate else slots  # the first step's (aux = 0)
        attn = self.attend(s, self.normalized_inputs(problem))[0]
        return attn[:, 0] if self.num_heads == 1 else attn.mean(1)

    def attend(self, s: torch.Tensor, inputs: torch.Tensor):
        """Attention of slots ``s`` ``(batch, K, hidden)`` over normalized inputs ``(batch, M, F)``.

        :returns: ``attn`` ``(batch, heads, K, M)`` (softmax over the slots, plus ``eps``) and
            the updates ``(batch, K, hidden)`` (attention-weighted means of the values).
        """
        return self._attend(s, inputs)[:2]

    def _attend(self, s: torch.Tensor, inputs: torch.Tensor, shared=None):
        """:meth:`attend`, and the attention-weighted sums of the inputs ``(batch, heads, K, F)``
        (``None`` in the textbook order); ``shared``: the token and sink of
        :meth:`_shared_inputs`, to defer the inputs' gradient."""
        batch, num_slots, _ = s.shape
        heads, head_dim, features = self.num_heads, self.head_dim, inputs.shape[-1]
        # Heads as a leading axis and the slot axis off the last dim: the softmax over slots
        # reduces over dim 2 of (batch, heads, K, M).
        q = self.to_q(self.norm_slots(s)).reshape(batch, num_slots, heads, head_dim).transpose(1, 2)
        w_k = self.to_k.weight.reshape(heads, head_dim, features)
        w_v = self.to_v.weight.reshape(heads, head_dim, features)
        if heads == 1:  # 2-D weights: matmul folds the leading dims into one product (no bmm)
            w_k, w_v = w_k[0], w_v[0]
        # The 1/sqrt(head_dim) scale goes on the (b, h, K, ·) query, not on the logits.
        q = q * head_dim**-0.5
        # Weighted means over the measurements normalize the (b, h, K, ·) sums, not the
        # attention itself: (Σ_m a_m n_m) / Σ_m a_m, one pass over (b, h, K, M) fewer.
        if self.fold_projections:
            q_in = torch.matmul(q, w_k)  # (b, h, K, F): the query pulled back to input space
            # Any strides: GaussianFeatures' inputs are feature-major on purpose (bmm reads both).
            attn, pooled = _AttendPool.run(q_in, inputs, self.eps, *(shared or ()))
            # GaussianFeatures' first feature is 1: its weighted sum is the mass, no pass needed.
            mass = pooled[..., :1] if self._standardized_moments else attn.sum(-1, keepdim=True)
            updates = torch.matmul(pooled / mass, w_v.transpose(-1, -2))
        else:
            n = inputs.unsqueeze(1)  # (b, 1, M, F), shared by the heads
            k = torch.matmul(n, w_k.transpose(-1, -2))  # (b, h, M, head_dim)
            attn = torch.softmax(torch.matmul(q, k.transpose(-1, -2)), dim=2) + self.eps
            mass = attn.sum(-1, keepdim=True)
            updates = torch.matmul(attn, torch.matmul(n, w_v.transpose(-1, -2))) / mass
            pooled = None
        updates = updates.transpose(1, 2).reshape(batch, num_slots, heads * head_dim)
        if self.to_out is not None:
            updates = self.to_out(updates)
        return attn, updates, pooled

    def moment_inputs(self, problem: InnerProblem) -> torch.Tensor:
        """``(x, x²)`` of the raw measurements, ``(batch, M, 2 input_dim)``, once per problem."""
        x = problem.x
        return self._derived(problem, "moments", (), lambda: torch.cat([x, x * x], dim=-1))

    def _derived(self, problem: InnerProblem, name: str, params: tuple, compute):
        """``compute()``, kept with ``problem`` for its later steps (see :class:`_Derived`)."""
        per_rule = problem.__dict__.setdefault(_DERIVED_ATTR, {})
        entry = per_rule.get((self, name))
        if entry is None or not entry.valid(problem.x, params):
            entry = per_rule[(self, name)] = _Derived(problem.x, params, compute())
        return entry.value

    def _readout(self, h, attn, pooled, problem: InnerProblem) -> torch.Tensor:
        if not self.moments:
            return self.readout(h)
        if self._standardized_moments:
            # (Σ a, Σ a z, Σ a z²) summed over the heads, mapped back by x = mean + scale z.
            total = pooled[:, 0] if self.num_heads == 1 else pooled.sum(1)  # (batch, K, F)
            mass = total[..., :1] / self.num_heads  # the heads' mean attention's mass
            ez, ez2 = (total[..., 1:] / total[..., :1]).split(self.input_dim, dim=-1)
            _, loc, scale = self._standardized(problem)
            mean = loc + scale * ez
            var = scale * scale * (ez2 - ez * ez)
        else:
            attn = attn[:, 0] if self.num_heads == 1 else attn.mean(1)  # (batch, K, M)
            mass = attn.sum(-1, keepdim=True)  # (batch, K, 1)
            # First and second moments in one pass over the attention, normalized on (b, K, ·).
            raw = torch.matmul(attn, self.moment_inputs(problem)) / mass  # (batch, K, 2F)
            mean, second = raw.split(self.input_dim, dim=-1)
            var = second - mean * mean
        log_std = 0.5 * (var.clamp_min(0) + self.eps).log()
        log_share = (mass / problem.x.shape[1]).log()
        stats = torch.cat([mean, log_std, log_share], dim=-1)
        return self.readout(torch.cat([h, stats], dim=-1)) + self.readout_skip(stats)

    def _check_shapes(self, x: torch.Tensor, slots: torch.Tensor):
        if x.dim() != 3 or x.shape[-1] != self.input_dim:
            raise ValueError(
                f"problem.x: expected encoded measurements (batch, M, {self.input_dim}), "
                f"got {tuple(x.shape)}; build SlotAttention with input_dim={x.shape[-1]}"
            )
        if slots.dim() != 3 or slots.shape[0] != x.shape[0] or slots.shape[-1] != self.slot_dim:
            raise ValueError(
                f"slots: expected shape ({x.shape[0]}, num_slots, {self.slot_dim}), "
                f"got {tuple(slots.shape)}"
            )

    def extra_repr(self):
        return (
            f"num_steps={self.num_steps}, slot_dim={self.slot_dim}, input_dim={self.input_dim}, "
            f"hidden_dim={self.hidden_dim}, num_heads={self.num_heads}, moments={self.moments}"
        )
