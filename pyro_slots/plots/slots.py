"""What the slots explain: the slot-mask figure of image models, the fitted components of
point-set mixtures."""

from __future__ import annotations

import math

import numpy as np
from matplotlib.figure import Figure
from matplotlib.patches import Ellipse

from ._style import UNOWNED_GREY, save, slot_colors, to_numpy

__all__ = ["plot_gmm_fits", "plot_slot_masks"]


def _masks_array(masks, image_shape) -> np.ndarray:
    """``masks`` as a ``(B, K, H, W)`` array (see :func:`plot_slot_masks`)."""
    if hasattr(masks, "dims"):  # an InferenceData DataArray: chain 0 (the best is not known)
        masks = masks.isel(chain=0, draw=0).transpose("datapoint", "slot", "measurement").values
    masks = to_numpy(masks, dtype=float)
    if masks.ndim == 5:  # (B, K, C, H, W): one mask per slot
        masks = masks[:, :, 0] if masks.shape[2] == 1 else masks.mean(2)
    if masks.ndim == 3:
        if image_shape is None:
            raise ValueError(
                f"image_shape: needed to draw masks of shape (batch, num_slots, H*W) = "
                f"{masks.shape}"
            )
        h, w = (int(s) for s in image_shape)
        if h * w != masks.shape[-1]:
            raise ValueError(
                f"image_shape: {tuple(image_shape)} has {h * w} pixels, but there are "
                f"{masks.shape[-1]} measurements"
            )
        return masks.reshape(*masks.shape[:2], h, w)
    if masks.ndim == 4:
        if image_shape is not None and tuple(int(s) for s in image_shape) != masks.shape[2:]:
            raise ValueError(
                f"image_shape: {tuple(image_shape)} differs from the masks' {masks.shape[2:]}"
            )
        return masks
    raise ValueError(
        "responsibilities: expected (batch, num_slots, H*W), (batch, num_slots, H, W) or "
        f"(batch, num_slots, C, H, W), got {masks.shape}"
    )


def _rgb_image(t) -> np.ndarray:
    """``(3, H, W)`` in [0, 1] as an ``(H, W, 3)`` image."""
    return np.clip(to_numpy(t, dtype=float), 0.0, 1.0).transpose(1, 2, 0)


def plot_slot_masks(
    responsibilities,
    image_shape: tuple[int, int] | None = None,
    datapoints=None,
    max_datapoints: int | None = 4,
    *,
    images=None,
    recon=None,
    rgb=None,
    titles: list[str] | None = None,
    path=None,
) -> Figure:
    """The slot-mask figure of image models: one row per datapoint, one panel per slot.

    Without ``rgb``, slot ``k``'s panel is its mask as a ``[0, 1]`` heat map; with ``rgb`` it is
    ``mask_k · rgb_k + (1 - mask_k) · grey``, what the slot paints where it owns the pixels. A
    panel's title gives the slot's share of the image. ``images`` and ``recon`` add an input and
    a reconstruction column in front.

    :param responsibilities: the masks, ``(B, K, H·W)`` (with ``image_shape``),
        ``(B, K, H, W)`` or ``(B, K, C, H, W)``, array or tensor (one restart), or the
        ``responsibilities`` DataArray of an InferenceData's ``sample_stats`` (the best chain
        of every datapoint is not known there, so chain 0 is shown).
    :param tuple image_shape: ``(H, W)`` with ``H · W`` measurements.
    :param datapoints: indices to show (default: the first ``max_datapoints``; all for
        ``max_datapoints=None``).
    :param images: ``(B, 3, H, W)`` inputs in [0, 1], or ``None``.
    :param recon: ``(B, 3, H, W)`` reconstructions, or ``None``.
    :param rgb: ``(B, K, 3, H, W)`` per-slot images, or ``None``.
    :param list titles: a label per shown datapoint (default ``"datapoint n"``).
    :param path: PNG to write (110 dpi), or ``None``.
    :returns: the figure.
    """
    masks = _masks_array(responsibilities, image_shape)
    batch, num_slots, h, w = masks.shape
    for name, value, shape in (
        ("images", images, (batch, 3, h, w)),
        ("recon", recon, (batch, 3, h, w)),
        ("rgb", rgb, (batch, num_slots, 3, h, w)),
    ):
        if value is not None and tuple(value.shape) != shape:
            raise ValueError(f"{name}: expected shape {shape}, got {tuple(value.shape)}")
    if datapoints is None:
        datapoints = list(range(batch if max_datapoints is None else min(max_datapoints, batch)))
    if titles is not None and len(titles) != len(datapoints):
        raise ValueError(f"titles: expected {len(datapoints)} labels, got {len(titles)}")
    lead = [
        (name, v) for name, v in (("input", images), ("reconstruction", recon)) if v is not None
    ]
    ncols = len(lead) + num_slots
    fig = Figure(figsize=(1.6 * ncols, 1.7 * len(datapoints)), layout="constrained")
    axes = fig.subplots(len(datapoints), ncols, squeeze=False)
    for i, n in enumerate(datapoints):
        panels = [(_rgb_image(v[n]), name, {}) for name, v in lead]
        for k in range(num_slots):
            mask = masks[n, k]
            if rgb is None:
                panel, style = mask, {"vmin": 0, "vmax": 1, "cmap": "viridis"}
            else:
                slot_rgb = to_numpy(rgb[n, k], dtype=float).transpose(1, 2, 0)
                panel = np.clip(
                    mask[..., None] * slot_rgb + (1 - mask[..., None]) * UNOWNED_GREY, 0, 1
                )
                style = {}
            panels.append((panel, f"slot {k} ({100 * mask.mean():.0f}%)", style))
        for j, (panel, label, style) in enumerate(panels):
            ax = axes[i, j]
            ax.imshow(panel, interpolation="nearest", **style)
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0 or j >= len(lead):
                ax.set_title(label, fontsize=8)
        axes[i, 0].set_ylabel(f"datapoint {n}" if titles is None else titles[i], fontsize=8)
    fig.suptitle("slot masks", fontsize=10)
    save(fig, path, dpi=110, bbox_inches="tight")
    return fig


def plot_gmm_fits(
    x,
    responsibilities,
    loc,
    scale,
    weights,
    true_means=None,
    path=None,
    ncols: int = 4,
    titles: list[str] | None = None,
) -> Figure:
    """Point sets coloured by responsibility, with the fitted components as 2σ ellipses.

    A point's colour mixes the slot colours by its responsibilities; each fitted component is
    an ellipse of two standard deviations in its slot colour, line width growing with its
    weight; true means (if given) are black crosses. Only the first two dimensions are drawn.

    :param x: ``(S, N, D)``; :param responsibilities: ``(S, K, N)``;
    :param loc: ``(S, K, D)``; :param scale: ``(S, K, D)`` standard deviations;
    :param weights: ``(S, K)``; :param true_means: ``(S, K', D)`` or ``None``.
    :param path: PNG to write (110 dpi), or ``None``.
    """
    x, resp, loc, scale, weights = (
        to_numpy(t, dtype=float) for t in (x, responsibilities, loc, scale, weights)
    )
    num_sets, num_slots = resp.shape[0], resp.shape[1]
    if x.ndim != 3 or x.shape[-1] < 2 or resp.shape != (num_sets, num_slots, x.shape[1]):
        raise ValueError(
            f"x, responsibilities: expected (S, N, D >= 2) and (S, K, N), got {x.shape} and "
            f"{resp.shape}"
        )
    colors = slot_colors(num_slots)
    ncols = min(ncols, num_sets)
    nrows = math.ceil(num_sets / ncols)
    fig = Figure(figsize=(3.4 * ncols, 3.4 * nrows), layout="constrained")
    axes = np.atleast_1d(fig.subplots(nrows, ncols, squeeze=False)).ravel()
    for s in range(num_sets):
        ax = axes[s]
        point_colors = np.clip(resp[s].T @ colors, 0, 1)
        ax.scatter(x[s, :, 0], x[s, :, 1], c=point_colors, s=9, lw=0)
        for k in range(num_slots):
            ax.add_patch(
                Ellipse(
                    (loc[s, k, 0], loc[s, k, 1]),
                    4 * scale[s, k, 0],
                    4 * scale[s, k, 1],
                    fill=False,
                    color=colors[k],
                    lw=0.8 + 3 * weights[s, k],
                )
            )
            ax.plot(loc[s, k, 0], loc[s, k, 1], "o", color=colors[k], mec="k", ms=6)
        if true_means is not None:
            tm = to_numpy(true_means[s])
            ax.plot(tm[:, 0], tm[:, 1], "x", color="k", ms=8, mew=2)
        if titles is not None:
            ax.set_title(titles[s], fontsize=9)
        ax.set_aspect("equal", adjustable="datalim")
        ax.tick_params(labelsize=7)
    for ax in axes[num_sets:]:
        ax.set_visible(False)
    fig.suptitle(
        "held-out point sets: colour = responsibility, ellipses = fitted components "
        "(2σ), × = true means",
        fontsize=10,
    )
    save(fig, path, dpi=110, bbox_inches="tight")
    return fig
