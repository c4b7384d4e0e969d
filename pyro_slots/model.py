"""The protocol every slot model follows: a factorized symmetric mixture as a Pyro program.

A slot model is a :class:`~pyro.nn.PyroModule` whose shared weights ``w`` are module parameters,
and whose per-datapoint parameters ``λ`` (the *slots*) are passed in, never stored. ``model`` and
``guide`` are ordinary Pyro programs over a batch of datapoints; the library computes one ELBO per
datapoint from their traces (:mod:`pyro_slots.elbo`).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping

import pyro.distributions as dist
import torch
from pyro.nn import PyroModule
from pyro.ops.indexing import Vindex

from .validation import CapabilityError, check_measurements

__all__ = ["SlotCategorical", "SlotModel", "SlotSpec", "select_component"]


class SlotSpec:
    """Named layout of one slot's parameter vector ``λ^{n,k}``.

    Slots travel through the library as one tensor of shape ``(batch, num_slots, dim)`` so that
    every inner rule, restart and alignment works on a plain tensor; a :class:`SlotSpec` splits that
    tensor into named views (``loc``, ``log_scale``, ...) and packs named parts back.

    :param dict fields: ordered mapping ``name -> event shape`` of each part of one slot.
    """

    def __init__(self, fields: Mapping[str, tuple[int, ...]]):
        if not fields:
            raise ValueError("SlotSpec needs at least one field, got none")
        self.fields = OrderedDict((k, tuple(int(s) for s in v)) for k, v in fields.items())
        self.sizes = OrderedDict()
        for name, shape in self.fields.items():
            if any(s < 1 for s in shape):
                raise ValueError(f"SlotSpec field {name!r} has a non-positive size: {shape}")
            self.sizes[name] = int(torch.Size(shape).numel())
        self.dim = sum(self.sizes.values())

    def __repr__(self):
        return f"SlotSpec({dict(self.fields)})"

    def split(self, slots: torch.Tensor) -> dict[str, torch.Tensor]:
        """Views of ``slots`` (``(..., dim)``) as a dict of ``(..., *field_shape)`` tensors."""
        if slots.shape[-1] != self.dim:
            raise ValueError(
                f"slots: expected last dimension {self.dim} for {self}, "
                f"got shape {tuple(slots.shape)}"
            )
        parts = torch.split(slots, list(self.sizes.values()), dim=-1)
        # A one-axis field is its part as split (no reshape: one autograd node fewer per field,
        # which every step's gradient walks, twice with create_graph).
        return {
            name: part if len(shape) == 1 else part.reshape(*slots.shape[:-1], *shape)
            for (name, shape), part in zip(self.fields.items(), parts)
        }

    def pack(self, parts: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Inverse of :meth:`split`: a dict of named parts to one ``(..., dim)`` tensor."""
        missing = set(self.fields) - set(parts)
        extra = set(parts) - set(self.fields)
        if missing or extra:
            raise ValueError(
                f"slots: expected fields {list(self.fields)}, missing {sorted(missing)}, "
                f"unexpected {sorted(extra)}"
            )
        flat = []
        batch_shape = None
        for name, shape in self.fields.items():
            part = parts[name]
            n = len(shape)
            if tuple(part.shape[part.dim() - n :]) != shape:
                raise ValueError(
                    f"slots[{name!r}]: expected trailing shape {shape}, got {tuple(part.shape)}"
                )
            lead = tuple(part.shape[: part.dim() - n])
            if batch_shape is None:
                batch_shape = lead
            elif lead != batch_shape:
                raise ValueError(
                    f"slots[{name!r}]: leading shape {lead} differs from {batch_shape} of the "
                    "other fields"
                )
            flat.append(part.reshape(*lead, -1))
        return torch.cat(flat, dim=-1)


class SlotModel(PyroModule):
    """Base class for factorized symmetric mixture models with per-datapoint slots.

    Subclasses implement :meth:`model` (and optionally :meth:`guide`) with ordinary Pyro
    primitives. Conventions, checked by :func:`pyro_slots.per_datapoint_elbo`:

    * the datapoints are indexed by a plate named :attr:`batch_plate` (``"batch"``) at
      dimension ``-max_plate_nesting``; every sample site lies inside it;
    * ``slots`` has shape ``(batch, num_slots, slot_spec.dim)`` and is treated symmetrically;
    * ``x`` is whatever :meth:`encode` returns, ``(batch, measurements, features)``.

    The ELBO of datapoint ``n`` is ``E_q[log p(x^n, z^n | λ^n, w) - log q(z^n | λ^n)]``
    (Eq. 1 of the seed paper) with discrete assignments enumerated exactly where the model marks
    them ``infer={"enumerate": "parallel"}``.

    :param SlotSpec slot_spec: layout of one slot.
    :param int feature_dim: number of features per measurement that :meth:`model` expects.
    """

    batch_plate = "batch"
    #: The plate over the slots where the model or guide has per-slot sites (IODINE's latents):
    #: diagnostics name that dimension ``slot``, so that restarts are aligned by it.
    slot_plate = "slots"
    #: Largest number of nested plates in model and guide (batch + measurements by default).
    max_plate_nesting = 2

    def __init__(self, slot_spec: SlotSpec, feature_dim: int):
        super().__init__()
        if not isinstance(slot_spec, SlotSpec):
            raise TypeError(f"slot_spec: expected a SlotSpec, got {type(slot_spec).__name__}")
        if int(feature_dim) < 1:
            raise ValueError(f"feature_dim: expected a positive integer, got {feature_dim}")
        self.slot_spec = slot_spec
        self.feature_dim = int(feature_dim)

    @property
    def slot_dim(self) -> int:
        return self.slot_spec.dim

    # ----------------------------------------------------------------- the Pyro programs
    def model(self, x: torch.Tensor, slots: torch.Tensor):
        raise CapabilityError(f"{type(self).__name__} must define model(x, slots)")

    def guide(self, x: torch.Tensor, slots: torch.Tensor):
        """Variational family ``q(z | λ)``; empty by default (all latents enumerated)."""

    # ------------------------------------------------------------------- optional hooks
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """The pre-processing ``w_e``: datapoints to measurements ``(batch, M, features)``.

        The default is the identity and validates ``x``. The inner ELBO is defined on the
        encoded measurements (Eq. 4 of the seed paper: ``L(x̃^n, λ^n)``).
        """
        return check_measurements(x, "x", feature_dim=self.feature_dim)

    def init_slots(
        self,
        x: torch.Tensor,
        num_slots: int,
        generator: torch.Generator | None = None,
        rows: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Initial slots ``(batch, num_slots, slot_dim)`` for encoded measurements ``x``.

        The default draws every slot independently from :attr:`slot_init` (a
        :class:`~pyro_slots.init.SlotInitializer` submodule).

        :param rows: only these datapoints' slots, ``(len(rows), num_slots, slot_dim)``: the
            rows of the draw for the whole of ``x`` from the same generator (a rank of
            ``refine(distributed=True)`` computes its own shard only). An override that does
            not take ``rows`` still works: the whole draw is made and indexed.
        """
        init = getattr(self, "slot_init", None)
        if init is None:
            raise CapabilityError(
                f"{type(self).__name__} has no slot_init; pass initial slots or an init module"
            )
        slots = init(x.shape[0], num_slots, generator=generator, dtype=x.dtype, device=x.device)
        return slots if rows is None else slots[rows]

    def canonical_slots(self, slots: torch.Tensor) -> torch.Tensor:
        """``slots`` ``(..., K, slot_dim)`` with the directions the model does not identify
        fixed (the same model, one representative): diagnostics compare restarts in this form,
        so that R-hat does not read two parametrizations of one mixture as two solutions.
        Unchanged by default; :class:`~pyro_slots.models.GaussianMixture` centres its mixing
        logits over the slots (a softmax ignores a common shift)."""
        return slots

    def reconstruct(self, x: torch.Tensor, slots: torch.Tensor, x_raw=None) -> torch.Tensor:
        """Reconstruction of the raw datapoints from the slots (for the Reconstruction task)."""
        raise CapabilityError(f"{type(self).__name__} does not define reconstruct()")


def select_component(values: torch.Tensor, index: torch.Tensor, dim: int, event_dim: int = 1):
    """Every measurement's component of ``values``: ``values`` indexed by ``index`` along its
    component axis ``dim``, the other non-event dims broadcast against ``index`` as
    :class:`~pyro.ops.indexing.Vindex` does.

    ``values`` has shape ``(*batch_left, K, *batch_right, *event)`` (the component axis at
    ``dim``); the result is ``Vindex(v)[..., index, :]`` of ``v = values.movedim(dim, -event_dim
    - 1)``, shape ``broadcast(index.shape, batch) + event``. Under parallel enumeration the
    index is the support ``arange(K)`` reshaped to ``(K, 1, ..., 1)`` (Pyro marks it), and the
    result is a view, ``values`` with its component axis moved to the enumeration dim: no gather
    of a ``(K, *batch, *event)`` tensor in the forward pass and no scatter in the backward
    (per-pixel means of IODINE and Neural EM: half a millisecond per step and 32 images).

    :param torch.Tensor values: component parameters per measurement.
    :param torch.Tensor index: the mixture assignment of a ``pyro.sample`` site.
    :param int dim: the component axis of ``values`` (left of the event dims).
    :param int event_dim: trailing event dims of ``values``, kept whole.
    """
    ndim = values.dim()
    if not -ndim <= dim < ndim or (dim % ndim) >= ndim - event_dim:
        raise ValueError(
            f"dim: expected a component axis left of the {event_dim} event dim(s) of values "
            f"with shape {tuple(values.shape)}, got {dim}"
        )
    moved = values.movedim(dim, -event_dim - 1)
    batch_rank = moved.dim() - event_dim - 1
    extra = index.dim() - 1 - batch_rank
    if (
        getattr(index, "_pyro_categorical_support", None) is not None
        and extra >= 0
        and index.shape[0] == moved.shape[batch_rank]
    ):
        out = moved.movedim(batch_rank, 0)  # (K, *batch, *event), a view
        return out[(slice(None),) + (None,) * extra] if extra else out
    return Vindex(moved)[(Ellipsis, index) + (slice(None),) * event_dim]


class SlotCategorical(dist.Categorical):
    """``dist.Categorical(logits=logits.movedim(dim, -1))``, normalized along ``dim``, where the
    logits lie in memory.

    A decoder emits the per-measurement mixing logits of a slot model slot-major, ``(..., K,
    M)``; torch's ``Categorical`` normalizes over its last axis, which is then a strided axis of
    length K, and a log-sum-exp and its gradient over a short strided axis take the CPU's slow
    path (0.60 ms against 0.15 ms for one ``log_softmax`` over ``(32, 4, 1024)`` with its
    gradient). The same distribution with the same log-densities: :attr:`logits` are the
    normalized values with the category axis last (a view of the ``log_softmax``), its batch
    shape ``logits.shape`` without ``dim``.

    :param torch.Tensor logits: unnormalized log-probabilities, categories along ``dim``.
    :param int dim: the category (slot) axis of ``logits``.
    """

    def __init__(self, logits: torch.Tensor, dim: int = -1, validate_args=None):
        if not torch.is_tensor(logits) or logits.dim() < 1:
            raise ValueError(f"logits: expected a tensor with a category axis, got {logits!r}")
        if not -logits.dim() <= dim < logits.dim():
            raise ValueError(
                f"dim: expected an axis of logits with shape {tuple(logits.shape)}, got {dim}"
            )
        self.logits = torch.log_softmax(logits, dim).movedim(dim, -1)
        self._param = self.logits
        self._num_events = self.logits.shape[-1]
        batch_shape = self.logits.shape[:-1]
        # torch's Categorical.__init__ would normalize the logits again, over the strided axis.
        torch.distributions.Distribution.__init__(self, batch_shape, validate_args=validate_args)

    def expand(self, batch_shape, _instance=None):
        new = self._get_checked_instance(SlotCategorical, _instance)
        return super().expand(batch_shape, _instance=new)
