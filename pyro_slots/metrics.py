r"""Segmentation and set-prediction metrics, batched in torch.

- :func:`ari` / :func:`fg_ari`: the adjusted Rand index (Hubert & Arabie 1985) of every image's
  predicted segmentation against its ground truth, over all pixels or over foreground pixels
  only (FG-ARI, the metric of IODINE, Greff et al. 2019, and Slot Attention, Locatello et al.
  2020).
- :func:`mean_iou` (one-to-one Hungarian matching) and :func:`segmentation_covering`
  (Arbeláez et al. 2011, as used by GENESIS, Engelcke et al. 2020).
- :func:`reconstruction_mse`.
- :func:`count_objects` and :func:`image_scores`: every per-image score of a segmentation at
  once (what ``pyro-slots evaluate --per-image`` writes).
- :func:`average_precision`: AP of set prediction at a distance threshold, as in the property
  prediction task of Slot Attention.

Labels are integer maps ``(batch, H, W)`` or ``(batch, N)``; predicted segmentations may also be
soft masks ``(batch, K, H, W)`` or ``(batch, K, N)`` (any floating tensor with the slot
dimension at position 1, e.g. the decoder's mixture weights; probabilities over the slots where
:func:`ari`'s ``soft="expected"`` reads them as such).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment

__all__ = [
    "AP_THRESHOLDS",
    "IMAGE_SCORES",
    "ari",
    "average_precision",
    "count_objects",
    "fg_ari",
    "image_scores",
    "mean_iou",
    "reconstruction_mse",
    "segmentation_covering",
    "segmentation_errors",
    "slot_keeping",
    "video_fg_ari",
]

AP_THRESHOLDS = (math.inf, 1.0, 0.5, 0.25, 0.125)
_SOFT_MODES = ("argmax", "expected")


def _flat_labels(true_mask, name: str = "true_mask") -> torch.Tensor:
    if not torch.is_tensor(true_mask):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(true_mask).__name__}")
    if true_mask.is_floating_point() or true_mask.is_complex() or true_mask.dtype == torch.bool:
        raise TypeError(f"{name}: expected an integer label map, got dtype {true_mask.dtype}")
    if true_mask.dim() not in (2, 3) or true_mask.shape[0] < 1:
        raise ValueError(
            f"{name}: expected shape (batch, H, W) or (batch, N) with batch >= 1, got "
            f"{tuple(true_mask.shape)}"
        )
    labels = true_mask.reshape(true_mask.shape[0], -1).long()
    if labels.numel() and labels.min() < 0:
        raise ValueError(f"{name}: expected labels >= 0, got minimum {labels.min().item()}")
    return labels


#: How far from 1 a pixel's soft masks may sum for ``soft="expected"`` (float32 rounding).
_PROBS_TOL = 1e-3


def _pred_onehot(pred, true_shape, soft: str, name: str = "pred") -> torch.Tensor:
    """Predicted assignment ``(batch, N, K)`` float64: one-hot for labels, probabilities if soft."""
    if not torch.is_tensor(pred):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(pred).__name__}")
    if soft not in _SOFT_MODES:
        raise ValueError(f"soft: expected one of {_SOFT_MODES}, got {soft!r}")
    batch = true_shape[0]
    if pred.is_floating_point():
        if tuple(pred.shape[:1]) + tuple(pred.shape[2:]) != tuple(true_shape):
            raise ValueError(
                f"{name}: soft masks must have shape (batch, K, *spatial) with (batch, *spatial) "
                f"= {tuple(true_shape)}, got {tuple(pred.shape)}"
            )
        if batch < 1 or pred.shape[1] < 1:
            raise ValueError(
                f"{name}: expected at least one datapoint and one slot, got {tuple(pred.shape)}"
            )
        probs = pred.reshape(batch, pred.shape[1], -1).transpose(1, 2).double()
        if probs.numel() and not bool(torch.isfinite(probs).all()):  # argmax of NaN picks a slot
            raise ValueError(f"{name}: soft masks must be finite, got NaN or infinite values")
        if soft == "expected":
            # The expected contingency table needs each pixel's probabilities over the slots
            # (scaled masks inflate the ARI, logits make it NaN).
            total = probs.sum(-1)
            if probs.numel() and (probs.min() < 0 or (total - 1).abs().max() > _PROBS_TOL):
                raise ValueError(
                    f"{name}: soft='expected' needs probabilities over the slots (dim 1): "
                    f"non-negative, summing to 1 per pixel within {_PROBS_TOL:g}; got values in "
                    f"[{probs.min().item():.3g}, {probs.max().item():.3g}] with sums in "
                    f"[{total.min().item():.3g}, {total.max().item():.3g}]"
                )
            return probs
        return F.one_hot(probs.argmax(-1), probs.shape[-1]).double()
    labels = _flat_labels(pred, name)
    if tuple(pred.shape) != tuple(true_shape):
        raise ValueError(f"{name}: expected shape {tuple(true_shape)}, got {tuple(pred.shape)}")
    num = int(labels.max()) + 1 if labels.numel() else 1
    return F.one_hot(labels, num).double()


def ari(
    true_mask: torch.Tensor,
    pred: torch.Tensor,
    ignore_background: bool = False,
    soft: str = "argmax",
) -> torch.Tensor:
    r"""Adjusted Rand index of each image, ``(batch,)`` float64.

    Computed from the contingency table ``n_ij`` of true segment ``j`` and predicted segment
    ``i`` by the pair-counting form that :func:`sklearn.metrics.adjusted_rand_score` uses:
    with ``tp = Σ n_ij² - n``, ``fp = Σ_i a_i² - Σ n_ij²``, ``fn = Σ_j b_j² - Σ n_ij²`` and
    ``tn = n² - tp - fp - fn - n``,
    ``ARI = 2 (tp·tn - fn·fp) / ((tp + fn)(fn + tn) + (tp + fp)(fp + tn))``, and ``ARI = 1``
    when ``fp = fn = 0`` (identical partitions, e.g. one segment in both, or a single pixel).
    This equals the classic ``(RI - E[RI]) / (max RI - E[RI])`` wherever that is defined, and
    matches :func:`sklearn.metrics.adjusted_rand_score` on every non-empty input.

    Soft masks: with ``soft="argmax"`` (default) each pixel goes to its most probable slot, the
    hard ARI of the IODINE / Slot Attention evaluation code (``segmentation_metrics.py`` of
    DeepMind's multi_object_datasets, which one-hot encodes the predicted argmax). With
    ``soft="expected"``, ``n_ij`` is the *expected* contingency table ``Σ_n p_n(i) [true_n = j]``
    (a smooth surrogate, not the expectation of the ARI); for one-hot masks both agree.

    :param torch.Tensor true_mask: integer labels ``(batch, H, W)`` or ``(batch, N)``.
    :param torch.Tensor pred: integer labels of the same shape, or soft masks
        ``(batch, K, H, W)`` / ``(batch, K, N)``.
    :param bool ignore_background: score only pixels with ``true_mask != 0`` (FG-ARI). An image
        with no pixel to score (no foreground pixel, for FG-ARI) gets ``NaN``, to be excluded by
        ``nanmean``; scikit-learn returns 1 for empty labelings.
    :param str soft: ``"argmax"`` or ``"expected"``; used for soft masks only.
    :returns: ``(batch,)`` float64.
    """
    labels = _flat_labels(true_mask)
    pred_onehot = _pred_onehot(pred, true_mask.shape, soft)  # (b, n, k)
    true_onehot = F.one_hot(labels, int(labels.max()) + 1 if labels.numel() else 1).double()
    if ignore_background:
        true_onehot = true_onehot * (labels != 0).unsqueeze(-1)
    nij = torch.einsum("bnk,bnj->bkj", pred_onehot, true_onehot)
    n = nij.sum((1, 2))
    sum_nij2 = nij.pow(2).sum((1, 2))
    sum_a2 = nij.sum(2).pow(2).sum(1)
    sum_b2 = nij.sum(1).pow(2).sum(1)
    # Ordered pair counts, as sklearn.metrics.cluster.pair_confusion_matrix.
    tp = sum_nij2 - n
    fp = sum_a2 - sum_nij2
    fn = sum_b2 - sum_nij2
    tn = n * n - tp - fp - fn - n
    denominator = (tp + fn) * (fn + tn) + (tp + fp) * (fp + tn)
    perfect = (fp == 0) & (fn == 0)
    value = 2.0 * (tp * tn - fn * fp) / torch.where(perfect, torch.ones_like(n), denominator)
    value = torch.where(perfect, torch.ones_like(value), value)
    return torch.where(n > 0, value, torch.full_like(value, math.nan))


def fg_ari(true_mask: torch.Tensor, pred: torch.Tensor, soft: str = "argmax") -> torch.Tensor:
    """Foreground ARI: :func:`ari` over the pixels with ``true_mask != 0``, ``(batch,)``.

    Images with no foreground pixel get ``NaN``.
    """
    return ari(true_mask, pred, ignore_background=True, soft=soft)


def _intersections(true_mask, pred_mask):
    """Pixel counts ``n_jk`` of true segment ``j`` in predicted segment ``k``, ``(batch, J, K)``
    float64, and the predicted one-hot masks ``(batch, N, K)`` (soft masks at their argmax)."""
    labels = _flat_labels(true_mask)
    pred_onehot = _pred_onehot(pred_mask, true_mask.shape, "argmax", "pred_mask")
    true_onehot = F.one_hot(labels, int(labels.max()) + 1 if labels.numel() else 1).double()
    return torch.einsum("bnj,bnk->bjk", true_onehot, pred_onehot), pred_onehot


def _overlaps(true_mask, pred_mask, ignore_background):
    """Per image: true segment ids, their sizes, and the IoU matrix (true × predicted)."""
    inter, pred_onehot = _intersections(true_mask, pred_mask)
    true_size = inter.sum(2)
    union = true_size.unsqueeze(2) + pred_onehot.sum(1).unsqueeze(1) - inter
    iou = (inter / union.clamp(min=1)).cpu().numpy()
    true_size = true_size.cpu().numpy()
    first = 1 if ignore_background else 0
    for b in range(inter.shape[0]):
        ids = np.nonzero(true_size[b, first:])[0] + first
        yield ids, true_size[b, ids], iou[b, ids]


def mean_iou(
    true_mask: torch.Tensor, pred_mask: torch.Tensor, ignore_background: bool = True
) -> torch.Tensor:
    """Mean IoU of the true objects under the best one-to-one matching, ``(batch,)`` float64.

    The predicted segments are matched to the true objects present in the image (mask ids with
    at least one pixel; id 0 skipped when ``ignore_background``) by the Hungarian algorithm
    (:func:`scipy.optimize.linear_sum_assignment`) maximizing the total IoU; the score is the
    total matched IoU divided by the number of true objects, so a true object left without a
    predicted segment (more objects than segments) counts as IoU 0. Images without true objects
    get ``NaN``.

    :param torch.Tensor true_mask: integer labels ``(batch, H, W)`` or ``(batch, N)``.
    :param torch.Tensor pred_mask: integer labels of the same shape, or soft masks
        ``(batch, K, ...)`` (each pixel assigned to its argmax slot).
    :param bool ignore_background: leave label 0 of ``true_mask`` out of the objects.
    :returns: ``(batch,)`` float64.
    """
    scores = []
    for ids, _, iou in _overlaps(true_mask, pred_mask, ignore_background):
        if ids.size == 0:
            scores.append(math.nan)
            continue
        rows, cols = linear_sum_assignment(iou, maximize=True)
        scores.append(iou[rows, cols].sum() / ids.size)
    return torch.tensor(scores, dtype=torch.float64)


def segmentation_covering(
    true_mask: torch.Tensor,
    pred_mask: torch.Tensor,
    ignore_background: bool = True,
    weighted: bool = False,
) -> torch.Tensor:
    r"""Segmentation covering of the true objects by the predicted segments, ``(batch,)``.

    Every true object ``R`` takes its best predicted segment, ``max_{R'} IoU(R, R')`` (no
    one-to-one constraint, Arbeláez et al. 2011); the mean over objects is the mean segmentation
    covering (mSC) and the size-weighted mean ``Σ_R |R| max IoU / Σ_R |R|`` the segmentation
    covering (SC) of GENESIS. Images without true objects get ``NaN``.

    :param torch.Tensor true_mask: integer labels ``(batch, H, W)`` or ``(batch, N)``.
    :param torch.Tensor pred_mask: integer labels of the same shape, or soft masks
        ``(batch, K, ...)`` (argmax).
    :param bool ignore_background: leave label 0 of ``true_mask`` out of the objects.
    :param bool weighted: weight objects by their size (SC) instead of uniformly (mSC).
    :returns: ``(batch,)`` float64.
    """
    scores = []
    for ids, sizes, iou in _overlaps(true_mask, pred_mask, ignore_background):
        if ids.size == 0:
            scores.append(math.nan)
            continue
        best = iou.max(axis=1)
        scores.append((best * sizes).sum() / sizes.sum() if weighted else best.mean())
    return torch.tensor(scores, dtype=torch.float64)


def segmentation_errors(
    true_mask: torch.Tensor, pred_mask: torch.Tensor, threshold: float = 0.1
) -> dict[str, torch.Tensor]:
    """How a segmentation fails, per image: split objects, merged objects, a shared background.

    With ``n_jk`` the pixels of true object ``j`` assigned to predicted segment ``k``:

    * ``"split"`` — true objects (labels >= 1) with more than ``threshold`` of their pixels in
      each of two or more segments;
    * ``"merged"`` — true objects whose majority segment is also another object's majority
      segment;
    * ``"background_share"`` — the fraction of the background (label 0) in the one segment that
      holds most of it (1: one slot owns the background; ``NaN`` without background pixels).

    FG-ARI counts split and merged objects alike; these counts tell them apart, and
    ``background_share`` explains an ARI far below the FG-ARI (a background shared by all
    slots). Soft masks ``(batch, K, ...)`` are taken at their argmax.

    :param float threshold: in ``(0, 0.5]``.
    :returns: ``{"split": (batch,) int64, "merged": (batch,) int64, "background_share":
        (batch,) float64}``.
    """
    if isinstance(threshold, bool) or not isinstance(threshold, int | float):
        raise TypeError(f"threshold: expected a number in (0, 0.5], got {threshold!r}")
    if not 0 < threshold <= 0.5:
        raise ValueError(f"threshold: expected a number in (0, 0.5], got {threshold}")
    inter = _intersections(true_mask, pred_mask)[0].cpu().numpy()
    split, merged, share = [], [], []
    for counts in inter:
        size = counts.sum(1)
        background = counts[0] if size[0] > 0 else None
        objects = counts[1:][size[1:] > 0]
        fractions = objects / objects.sum(1, keepdims=True).clip(min=1)
        split.append(int(((fractions > threshold).sum(1) >= 2).sum()))
        majority = objects.argmax(1)
        shared = np.bincount(majority, minlength=counts.shape[1])[majority] >= 2
        merged.append(int(shared.sum()))
        share.append(math.nan if background is None else background.max() / background.sum())
    return {
        "split": torch.tensor(split, dtype=torch.int64),
        "merged": torch.tensor(merged, dtype=torch.int64),
        "background_share": torch.tensor(share, dtype=torch.float64),
    }


def count_objects(true_mask: torch.Tensor) -> torch.Tensor:
    """Number of true objects per image: labels >= 1 with at least one pixel, ``(batch,)`` int64.

    :param torch.Tensor true_mask: integer labels ``(batch, H, W)`` or ``(batch, N)``.
    """
    labels = _flat_labels(true_mask)
    if labels.numel() == 0:
        return torch.zeros(labels.shape[0], dtype=torch.int64)
    present = F.one_hot(labels, int(labels.max()) + 1).sum(1) > 0  # (batch, ids)
    return present[:, 1:].sum(1).to(torch.int64)


#: The columns of :func:`image_scores`, in order.
IMAGE_SCORES = (
    "fg_ari",
    "ari",
    "mean_iou",
    "mse",
    "objects_split",
    "objects_merged",
    "num_objects",
)


def image_scores(
    true_mask: torch.Tensor,
    pred_masks: torch.Tensor,
    x: torch.Tensor | None = None,
    recon: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """Every per-image score of a predicted segmentation, one ``(batch,)`` tensor each.

    The keys are :data:`IMAGE_SCORES`: :func:`fg_ari`, :func:`ari`, :func:`mean_iou`,
    :func:`reconstruction_mse` (only when ``x`` and ``recon`` are given), the split and merged
    objects of :func:`segmentation_errors` and :func:`count_objects`. Soft masks are taken at
    their argmax.

    :param torch.Tensor true_mask: integer labels ``(batch, H, W)``, 0 the background.
    :param torch.Tensor pred_masks: soft masks ``(batch, K, H, W)`` or labels ``(batch, H, W)``.
    :param torch.Tensor x: images ``(batch, C, H, W)`` (optional).
    :param torch.Tensor recon: their reconstructions, the shape of ``x`` (optional).
    :returns: ``{name: (batch,)}``, float64 scores and int64 counts.
    """
    if (x is None) != (recon is None):
        raise ValueError("x, recon: give both (for the reconstruction MSE) or neither")
    errors = segmentation_errors(true_mask, pred_masks)
    scores = {
        "fg_ari": fg_ari(true_mask, pred_masks).double().cpu(),
        "ari": ari(true_mask, pred_masks).double().cpu(),
        "mean_iou": mean_iou(true_mask, pred_masks),
    }
    if x is not None:
        scores["mse"] = reconstruction_mse(x, recon).detach().double().cpu()
    scores["objects_split"] = errors["split"]
    scores["objects_merged"] = errors["merged"]
    scores["num_objects"] = count_objects(true_mask).cpu()
    return scores


def reconstruction_mse(x: torch.Tensor, x_hat: torch.Tensor) -> torch.Tensor:
    """Mean squared error of every datapoint's reconstruction, ``(batch,)``.

    :param torch.Tensor x: data ``(batch, ...)``.
    :param torch.Tensor x_hat: reconstructions of the same shape (no broadcasting).
    :returns: the mean over all non-batch dimensions, ``(batch,)``.
    """
    for name, value in (("x", x), ("x_hat", x_hat)):
        if not torch.is_tensor(value):
            raise TypeError(f"{name}: expected a torch.Tensor, got {type(value).__name__}")
        if not value.is_floating_point():  # uint8 images against [0, 1] reconstructions
            hint = " (images: x.float() / 255)" if value.dtype == torch.uint8 else ""
            raise TypeError(f"{name}: expected a floating-point tensor, got {value.dtype}{hint}")
    if x.shape != x_hat.shape or x.dim() < 1:
        raise ValueError(
            f"x_hat: expected the shape of x, {tuple(x.shape)}, got {tuple(x_hat.shape)}"
        )
    return (x - x_hat).pow(2).reshape(x.shape[0], -1).mean(1)


def average_precision(
    pred: dict[str, torch.Tensor],
    targets: dict[str, torch.Tensor],
    distance_threshold: float,
    discrete_keys: tuple[str, ...] = ("shape", "color"),
    position_scale: float = 1.0,
) -> float:
    r"""Average precision of predicted object sets at a position distance threshold.

    The property-prediction metric of Slot Attention (Locatello et al. 2020, App. of the
    official ``average_precision_clevr``): all predictions of all images are sorted by
    confidence; a prediction is a true positive when, among the present objects of its image
    whose discrete attributes all equal its own, the nearest one is within
    ``distance_threshold`` (Euclidean distance of positions times ``position_scale``) and has
    not been claimed by a more confident prediction; otherwise it is a false positive. AP is
    the area under the interpolated precision-recall curve (precision made monotone from the
    right, summed over the recall steps), with recall relative to all present objects.

    Slot Attention measures CLEVR distances in the original ``[-3, 3]`` scene units, i.e.
    ``position_scale=6`` for positions normalized to ``[0, 1]``; the default compares
    normalized positions directly. Use ``math.inf`` for the threshold ∞ (attributes only);
    :data:`AP_THRESHOLDS` lists the paper's thresholds.

    :param dict pred: ``confidence`` ``(batch, K)``, ``position`` ``(batch, K, D)`` and an
        integer ``(batch, K)`` tensor per key of ``discrete_keys``.
    :param dict targets: ``present`` ``(batch, M)`` bool, ``position`` ``(batch, M, D)`` and an
        integer ``(batch, M)`` tensor per key of ``discrete_keys``.
    :param float distance_threshold: largest accepted distance (> 0, may be ``math.inf``).
    :param tuple discrete_keys: the attributes that must match exactly.
    :param float position_scale: factor applied to position differences.
    :returns: AP in [0, 1]; ``NaN`` when no object is present (recall is undefined).
    """
    threshold = float(distance_threshold)
    if not threshold > 0:
        raise ValueError(f"distance_threshold: expected a number > 0, got {distance_threshold}")
    for where, d, keys in (
        ("pred", pred, ("confidence", "position", *discrete_keys)),
        ("targets", targets, ("present", "position", *discrete_keys)),
    ):
        missing = [k for k in keys if k not in d]
        if missing:
            raise ValueError(f"{where}: missing keys {missing}; expected keys {list(keys)}")
    confidence = pred["confidence"].detach().cpu().double()
    if confidence.dim() != 2:
        raise ValueError(
            f"pred['confidence']: expected shape (batch, K), got {tuple(confidence.shape)}"
        )
    batch, num_pred = confidence.shape
    present = targets["present"].detach().cpu().bool()
    if present.dim() != 2 or present.shape[0] != batch:
        raise ValueError(
            f"targets['present']: expected shape ({batch}, M), got {tuple(present.shape)}"
        )
    num_true = present.shape[1]
    pred_pos = pred["position"].detach().cpu().double()
    true_pos = targets["position"].detach().cpu().double()
    if pred_pos.shape[:2] != (batch, num_pred) or pred_pos.dim() != 3:
        raise ValueError(
            f"pred['position']: expected shape ({batch}, {num_pred}, D), "
            f"got {tuple(pred_pos.shape)}"
        )
    if true_pos.shape != (batch, num_true, pred_pos.shape[2]):
        raise ValueError(
            f"targets['position']: expected shape ({batch}, {num_true}, {pred_pos.shape[2]}), "
            f"got {tuple(true_pos.shape)}"
        )
    # (batch, K, M): prediction k and object m agree on every discrete attribute.
    agree = present.unsqueeze(1).expand(batch, num_pred, num_true).clone()
    for key in discrete_keys:
        p, t = pred[key].detach().cpu(), targets[key].detach().cpu()
        if p.shape != (batch, num_pred) or t.shape != (batch, num_true):
            raise ValueError(
                f"{key}: expected pred shape ({batch}, {num_pred}) and targets shape "
                f"({batch}, {num_true}), got {tuple(p.shape)} and {tuple(t.shape)}"
            )
        agree &= p.unsqueeze(2) == t.unsqueeze(1)
    distance = torch.cdist(pred_pos, true_pos) * float(position_scale)
    distance = torch.where(agree, distance, torch.full_like(distance, math.inf)).numpy()
    total = int(present.sum())
    if total == 0:
        return math.nan

    # Descending confidence; ties keep the (image, slot) order.
    order = np.argsort(-confidence.reshape(-1).numpy(), kind="stable")
    claimed = set()
    hits = np.zeros(order.size)
    for rank, flat in enumerate(order):
        b, k = divmod(int(flat), num_pred)
        m = int(np.argmin(distance[b, k])) if num_true else 0
        matched = num_true > 0 and math.isfinite(distance[b, k, m])
        if matched and distance[b, k, m] <= threshold and (b, m) not in claimed:
            claimed.add((b, m))
            hits[rank] = 1.0
    true_pos_count = np.cumsum(hits)
    recall = true_pos_count / total
    precision = true_pos_count / np.arange(1, order.size + 1)
    # Interpolated AP: precision made non-increasing from the right, summed over recall steps.
    recall = np.concatenate([[0.0], recall, [1.0]])
    precision = np.concatenate([[0.0], precision, [0.0]])
    precision = np.maximum.accumulate(precision[::-1])[::-1]
    steps = np.nonzero(recall[1:] != recall[:-1])[0]
    return float(np.sum((recall[steps + 1] - recall[steps]) * precision[steps + 1]))


# ------------------------------------------------------------------------------ videos
def _video_masks(true_masks, pred_masks, name="pred_masks"):
    """Checks and flattens ``(B, T, H, W)`` labels and ``(B, T, K, H, W)`` soft masks or
    ``(B, T, H, W)`` labels over time: ``(B, T·H·W)`` and ``(B, K, T·H·W)`` / ``(B, T·H·W)``."""
    if not torch.is_tensor(true_masks) or true_masks.dim() != 4:
        raise ValueError(
            "true_masks: expected shape (batch, frames, H, W), got "
            f"{tuple(getattr(true_masks, 'shape', ()))}"
        )
    batch, frames = true_masks.shape[:2]
    if not torch.is_tensor(pred_masks) or tuple(pred_masks.shape[:2]) != (batch, frames):
        raise ValueError(
            f"{name}: expected leading shape ({batch}, {frames}), got "
            f"{tuple(getattr(pred_masks, 'shape', ()))}"
        )
    true_flat = true_masks.reshape(batch, -1)
    if pred_masks.is_floating_point():
        if pred_masks.dim() != 5 or pred_masks.shape[3:] != true_masks.shape[2:]:
            raise ValueError(
                f"{name}: soft masks must have shape (batch, frames, K, H, W) with (H, W) = "
                f"{tuple(true_masks.shape[2:])}, got {tuple(pred_masks.shape)}"
            )
        pred_flat = pred_masks.transpose(1, 2).reshape(batch, pred_masks.shape[2], -1)
    else:
        if pred_masks.shape != true_masks.shape:
            raise ValueError(
                f"{name}: slot labels must have the shape of true_masks "
                f"{tuple(true_masks.shape)}, got {tuple(pred_masks.shape)}"
            )
        pred_flat = pred_masks.reshape(batch, -1)
    return true_flat, pred_flat


def video_fg_ari(true_masks: torch.Tensor, pred_masks: torch.Tensor) -> torch.Tensor:
    """FG-ARI of every clip over all its pixels at once, ``(batch,)`` float64.

    A slot must keep its object across the clip to score 1: a segmentation that is perfect in
    every frame but swaps two slots between frames scores below 1 (the per-frame FG-ARI would
    not see it). Object identity of ``true_masks`` must be consistent over time (as the masks
    of :func:`pyro_slots.data.video.generate_moving_shapes`).

    :param torch.Tensor true_masks: ``(batch, frames, H, W)`` integer ids, 0 the background.
    :param torch.Tensor pred_masks: ``(batch, frames, K, H, W)`` soft masks (slot ``k`` is the
        same slot in every frame) or ``(batch, frames, H, W)`` slot labels.
    """
    return fg_ari(*_video_masks(true_masks, pred_masks))


def slot_keeping(true_masks: torch.Tensor, pred_masks: torch.Tensor) -> torch.Tensor:
    """Share of objects that keep their slot across the clip, ``(batch,)`` float64.

    An object's slot in a frame is the slot that owns most of its pixels there (argmax of the
    soft masks); it is kept when that slot is the same in every frame where the object is
    visible. Clips without a visible object get ``NaN``.

    :param true_masks: ``(batch, frames, H, W)``; :param pred_masks: as :func:`video_fg_ari`.
    """
    _video_masks(true_masks, pred_masks)
    labels = pred_masks.argmax(2) if pred_masks.is_floating_point() else pred_masks
    batch, frames = true_masks.shape[:2]
    out = torch.full((batch,), math.nan, dtype=torch.float64)
    for b in range(batch):
        kept, seen = 0, 0
        for obj in true_masks[b].unique().tolist():
            if obj == 0:
                continue
            owners = set()
            for t in range(frames):
                pixels = labels[b, t][true_masks[b, t] == obj]
                if pixels.numel():
                    owners.add(int(pixels.mode().values))
            seen += 1
            kept += len(owners) == 1
        if seen:
            out[b] = kept / seen
    return out
