r"""Set prediction: a task objective that is not the ELBO.

The property-prediction task of Slot Attention (Locatello et al. 2020, §4.2): a small head maps
every final slot to a prediction of one object's attributes; the predictions of a datapoint are
matched one-to-one to its objects by the Hungarian algorithm on the loss matrix, and the matched
losses are minimized over the shared weights. The inner loop still maximizes the ELBO; only the
outer loop sees the attributes.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from torch import nn

from ..metrics import AP_THRESHOLDS, average_precision
from ..validation import check_bool, check_positive_float, check_positive_int, check_slots
from .base import Objective

__all__ = ["SetPrediction"]


class SetPrediction(Objective):
    r"""Hungarian-matched attribute prediction from slots.

    For slot ``k`` with head outputs (presence logit ``o_k``, position ``p̂_k = sigmoid(·)``,
    shape and colour logits, scale ``ŝ_k``) and object ``m`` of the datapoint, the pair loss is

    .. math::

        C_{km} = w_o\,\mathrm{softplus}(-o_k) + \mathrm{CE}(\text{shape}_k, \text{shape}_m)
            + \mathrm{CE}(\text{color}_k, \text{color}_m)
            + w_p \lVert \hat p_k - p_m \rVert^2 + w_s (\hat s_k - s_m)^2,

    and a slot left without an object pays ``A_k = w_o\,\mathrm{softplus}(o_k)`` (it is trained
    towards "absent"). The objects are padded with absent entries to one per slot and matched by
    :func:`scipy.optimize.linear_sum_assignment` on the costs without gradient; the loss of a
    datapoint is the mean over its slots of the matched costs,
    ``(1/K) min_σ Σ_k C_{k σ(k)}`` — minimal over all one-to-one assignments.

    Targets, as passed to ``NestedSVI.step(x, *targets)`` (see :meth:`targets_from_batch`):

    - ``present`` ``(batch, M)`` bool — which of the ``M`` padded entries are objects
      (at most ``num_slots`` per datapoint);
    - ``position`` ``(batch, M, position_dim)`` float in [0, 1];
    - ``shape`` ``(batch, M)`` int64 in ``[0, num_shapes)``;
    - ``color`` ``(batch, M)`` int64 in ``[0, num_colors)``;
    - ``scale`` ``(batch, M)`` float, only when ``predict_scale``.

    :param int slot_dim: dimension of a slot.
    :param int num_shapes: shape classes (4 for shapes, 19 pieces or 7 types for tetrominoes).
    :param int num_colors: colour classes.
    :param int position_dim: dimension of a position.
    :param bool predict_scale: predict a scalar scale (off for tetrominoes).
    :param int hidden: width of the two hidden layers of the head.
    :param float position_weight: ``w_p``.
    :param float scale_weight: ``w_s``.
    :param float presence_weight: ``w_o``.
    :param str shape_key: the batch key :meth:`targets_from_batch` reads the shape class from
        (``"attr_shape"``, or ``"attr_piece"`` for the 19 tetromino orientations).
    :param str presence_key: the batch key :meth:`targets_from_batch` reads ``present`` from:
        ``"visible"`` (default: objects hidden entirely behind others are not targets, since
        nothing in the image shows them) or ``"present"`` (every object drawn).

    Example::

        >>> objective = SetPrediction(slot_dim=32, num_shapes=4, num_colors=8)
        >>> batch = next(iter(DataLoader(ShapesDataset(64), batch_size=16)))
        >>> targets = objective.targets_from_batch(batch)
        >>> loss = objective(model, x, x_enc, slots, *targets)  # (16,)
    """

    def __init__(
        self,
        slot_dim: int,
        num_shapes: int,
        num_colors: int,
        position_dim: int = 2,
        predict_scale: bool = True,
        hidden: int = 64,
        position_weight: float = 1.0,
        scale_weight: float = 1.0,
        presence_weight: float = 1.0,
        shape_key: str = "attr_shape",
        presence_key: str = "visible",
    ):
        super().__init__()
        self.slot_dim = check_positive_int(slot_dim, "slot_dim")
        self.num_shapes = check_positive_int(num_shapes, "num_shapes")
        self.num_colors = check_positive_int(num_colors, "num_colors")
        self.position_dim = check_positive_int(position_dim, "position_dim")
        self.predict_scale = check_bool(predict_scale, "predict_scale")
        hidden = check_positive_int(hidden, "hidden")
        self.position_weight = check_positive_float(position_weight, "position_weight", True)
        self.scale_weight = check_positive_float(scale_weight, "scale_weight", True)
        self.presence_weight = check_positive_float(presence_weight, "presence_weight", True)
        for name, value in (("shape_key", shape_key), ("presence_key", presence_key)):
            if not isinstance(value, str):
                raise TypeError(f"{name}: expected a string, got {value!r}")
        self.shape_key, self.presence_key = shape_key, presence_key
        self._sizes = [1, self.position_dim, self.num_shapes, self.num_colors]
        self._sizes.append(1 if self.predict_scale else 0)
        self.head = nn.Sequential(
            nn.Linear(self.slot_dim, hidden),
            nn.ReLU(),
            nn.Linear(hidden, hidden),
            nn.ReLU(),
            nn.Linear(hidden, sum(self._sizes)),
        )

    # -- head ---------------------------------------------------------------------------------

    def outputs(self, slots: torch.Tensor) -> dict[str, torch.Tensor]:
        """Raw head outputs of every slot.

        :param torch.Tensor slots: ``(batch, num_slots, slot_dim)``.
        :returns: dict with ``presence_logit`` ``(batch, K)``, ``position`` ``(batch, K, D)`` in
            (0, 1), ``shape_logits`` ``(batch, K, num_shapes)``, ``color_logits``
            ``(batch, K, num_colors)`` and, if ``predict_scale``, ``scale`` ``(batch, K)``.
        """
        if not torch.is_tensor(slots):
            raise TypeError(f"slots: expected a torch.Tensor, got {type(slots).__name__}")
        batch = slots.shape[0] if slots.dim() else 0
        check_slots(slots, "slots", batch=batch, slot_dim=self.slot_dim)
        presence, position, shape, color, scale = self.head(slots).split(self._sizes, dim=-1)
        out = {
            "presence_logit": presence.squeeze(-1),
            "position": torch.sigmoid(position),
            "shape_logits": shape,
            "color_logits": color,
        }
        if self.predict_scale:
            out["scale"] = scale.squeeze(-1)
        return out

    def predict(self, slots: torch.Tensor) -> dict[str, torch.Tensor]:
        """Hard predictions for :func:`pyro_slots.metrics.average_precision`.

        :param torch.Tensor slots: ``(batch, num_slots, slot_dim)``.
        :returns: dict with ``confidence`` (presence probability) ``(batch, K)``, ``position``
            ``(batch, K, D)``, ``shape`` and ``color`` (argmax classes) ``(batch, K)`` and, if
            ``predict_scale``, ``scale`` ``(batch, K)``.
        """
        out = self.outputs(slots)
        pred = {
            "confidence": torch.sigmoid(out["presence_logit"]),
            "position": out["position"],
            "shape": out["shape_logits"].argmax(-1),
            "color": out["color_logits"].argmax(-1),
        }
        if self.predict_scale:
            pred["scale"] = out["scale"]
        return pred

    # -- targets ------------------------------------------------------------------------------

    def targets_from_batch(self, batch: dict) -> tuple[torch.Tensor, ...]:
        """Targets ``(present, position, shape, color[, scale])`` from a batch of the generators.

        :param dict batch: a collated batch of :class:`~pyro_slots.data.ShapesDataset` or
            :class:`~pyro_slots.data.TetrominoesDataset` items (keys ``presence_key``,
            ``attr_position``, ``shape_key``, ``attr_color`` and, for ``predict_scale``,
            ``attr_scale``).
        """
        keys = [self.presence_key, "attr_position", self.shape_key, "attr_color"]
        if self.predict_scale:
            keys.append("attr_scale")
        missing = [k for k in keys if k not in batch]
        if missing:
            hint = (
                " (tetrominoes have no scale: use predict_scale=False)"
                if missing == ["attr_scale"]
                else ""
            )
            raise ValueError(f"batch: missing keys {missing}, expected {keys}{hint}")
        return tuple(batch[k] for k in keys)

    def targets_as_dict(self, *targets) -> dict[str, torch.Tensor]:
        """Targets as the dict :func:`pyro_slots.metrics.average_precision` takes."""
        present, position, shape, color, scale = self._check_targets(None, *targets)
        out = {"present": present, "position": position, "shape": shape, "color": color}
        if scale is not None:
            out["scale"] = scale
        return out

    def _check_targets(self, slots, present, position, shape, color, scale=None):
        for name, value in (
            ("present", present),
            ("position", position),
            ("shape", shape),
            ("color", color),
        ):
            if not torch.is_tensor(value):
                raise TypeError(f"{name}: expected a torch.Tensor, got {type(value).__name__}")
        if present.dtype != torch.bool or present.dim() != 2:
            raise ValueError(
                f"present: expected a bool tensor (batch, M), got {present.dtype} "
                f"{tuple(present.shape)}"
            )
        batch, num_objects = present.shape
        if slots is not None:
            if slots.shape[0] != batch:
                raise ValueError(
                    f"present: expected batch size {slots.shape[0]} (as slots), got {batch}"
                )
            most = int(present.sum(1).max()) if batch else 0
            if most > slots.shape[1]:
                raise ValueError(
                    f"present: a datapoint has {most} objects but there are only "
                    f"{slots.shape[1]} slots; use num_slots >= the largest number of objects"
                )
        if tuple(position.shape) != (batch, num_objects, self.position_dim):
            raise ValueError(
                f"position: expected shape ({batch}, {num_objects}, {self.position_dim}), "
                f"got {tuple(position.shape)}"
            )
        for name, value, num in (
            ("shape", shape, self.num_shapes),
            ("color", color, self.num_colors),
        ):
            if value.is_floating_point() or tuple(value.shape) != (batch, num_objects):
                raise ValueError(
                    f"{name}: expected an integer tensor ({batch}, {num_objects}), got "
                    f"{value.dtype} {tuple(value.shape)}"
                )
            live = value[present]
            if live.numel() and (live.min() < 0 or live.max() >= num):
                raise ValueError(
                    f"{name}: expected classes in [0, {num}) for present objects, got "
                    f"[{int(live.min())}, {int(live.max())}]"
                )
        if self.predict_scale:
            if scale is None:
                raise ValueError("scale: required when predict_scale=True, got None")
            if not torch.is_tensor(scale) or tuple(scale.shape) != (batch, num_objects):
                raise ValueError(
                    f"scale: expected a tensor ({batch}, {num_objects}), got "
                    f"{getattr(scale, 'shape', type(scale).__name__)}"
                )
        elif scale is not None:
            raise ValueError("scale: given, but this objective has predict_scale=False")
        # The padding of absent objects never enters the loss, nor its gradient: a class out of
        # range failed in gather, and a NaN made the gradient NaN (through the unused branch).
        shape = shape.long().masked_fill(~present, 0)
        color = color.long().masked_fill(~present, 0)
        position = torch.where(present.unsqueeze(-1), position, torch.zeros_like(position))
        if scale is not None:
            scale = torch.where(present, scale, torch.zeros_like(scale))
        return present, position, shape, color, scale

    # -- matching and loss --------------------------------------------------------------------

    def pair_costs(self, slots, present, position, shape, color, scale=None):
        """Loss of every (slot, object) pair and of every slot left without an object.

        :returns: ``(object_cost, absent_cost)`` of shapes ``(batch, K, M)`` and ``(batch, K)``;
            columns of non-present objects hold finite but meaningless values.
        """
        present, position, shape, color, scale = self._check_targets(
            slots, present, position, shape, color, scale
        )
        out = self.outputs(slots)
        batch, num_slots = slots.shape[:2]
        num_objects = present.shape[1]

        def class_nll(logits, labels):  # (b, k, c), (b, m) -> (b, k, m)
            logp = logits.log_softmax(-1)
            index = labels.clamp(min=0).unsqueeze(1).expand(batch, num_slots, num_objects)
            return -logp.gather(2, index)

        position = position.to(out["position"].dtype)
        cost = self.presence_weight * F.softplus(-out["presence_logit"]).unsqueeze(2)
        cost = cost + class_nll(out["shape_logits"], shape) + class_nll(out["color_logits"], color)
        diff = out["position"].unsqueeze(2) - position.unsqueeze(1)
        cost = cost + self.position_weight * diff.pow(2).sum(-1)
        if self.predict_scale:
            ds = out["scale"].unsqueeze(2) - scale.to(out["scale"].dtype).unsqueeze(1)
            cost = cost + self.scale_weight * ds.pow(2)
        absent = self.presence_weight * F.softplus(out["presence_logit"])
        return cost, absent

    @staticmethod
    def _assign(object_cost, absent_cost, present) -> torch.Tensor:
        """Hungarian assignment ``(batch, K)``: the object index of every slot, or -1."""
        # Matching slot k to object m instead of leaving it absent changes the total by
        # C_km - A_k, so the padded square problem reduces to a rectangular one.
        gain = (object_cost - absent_cost.unsqueeze(2)).detach().cpu().double().numpy()
        mask = present.cpu().numpy()
        assignment = np.full(gain.shape[:2], -1, dtype=np.int64)
        for b in range(gain.shape[0]):
            (objects,) = np.nonzero(mask[b])
            if objects.size == 0:
                continue
            rows, cols = linear_sum_assignment(gain[b][:, objects])
            assignment[b, rows] = objects[cols]
        return torch.from_numpy(assignment).to(object_cost.device)

    def match(self, slots, present, position, shape, color, scale=None) -> torch.Tensor:
        """The optimal matching: for every slot the index of its object in ``[0, M)``, or -1.

        :param torch.Tensor slots: ``(batch, num_slots, slot_dim)``.
        :returns: ``(batch, num_slots)`` int64.
        """
        object_cost, absent_cost = self.pair_costs(slots, present, position, shape, color, scale)
        return self._assign(object_cost, absent_cost, present)

    def forward(self, model, x, x_enc, slots, present, position, shape, color, scale=None):
        """Matched set-prediction loss of every datapoint, ``(batch,)``.

        :param model: the slot model (unused: the head reads the slots only).
        :param x: the raw datapoints (unused).
        :param x_enc: the encoded measurements (unused).
        :param torch.Tensor slots: ``(batch, num_slots, slot_dim)``.
        :param present: see the class docstring for the targets.
        :returns: ``(batch,)`` mean matched cost per slot.
        """
        object_cost, absent_cost = self.pair_costs(slots, present, position, shape, color, scale)
        assignment = self._assign(object_cost, absent_cost, present)
        matched = object_cost.gather(2, assignment.clamp(min=0).unsqueeze(2)).squeeze(2)
        per_slot = torch.where(assignment >= 0, matched, absent_cost)
        return per_slot.mean(1)

    def average_precisions(
        self, slots, *targets, thresholds=AP_THRESHOLDS, position_scale: float = 1.0
    ) -> dict[float, float]:
        """AP of this head's predictions at every distance threshold.

        :param torch.Tensor slots: ``(batch, num_slots, slot_dim)``.
        :param targets: as for :meth:`forward`.
        :param thresholds: distance thresholds (``math.inf`` for ∞).
        :returns: ``{threshold: AP}``.
        """
        with torch.no_grad():
            pred = self.predict(slots)
        truth = self.targets_as_dict(*targets)
        return {
            float(t): average_precision(pred, truth, t, position_scale=position_scale)
            for t in thresholds
        }
