"""Figures, drawn with matplotlib's object API on the Agg canvas (no pyplot global state)."""

from __future__ import annotations

import os

import numpy as np
import torch
from matplotlib.colors import ListedColormap
from matplotlib.figure import Figure

__all__ = ["plot_scenes"]


def _mask_colors(num_ids: int) -> np.ndarray:
    """RGB of mask ids ``0 .. num_ids - 1``: black background, then tab20 cycled."""
    from matplotlib import colormaps

    tab20 = colormaps["tab20"].colors
    colors = [(0.0, 0.0, 0.0)] + [tab20[i % len(tab20)] for i in range(max(num_ids - 1, 0))]
    return np.asarray(colors)


def plot_scenes(images, masks, path=None, ncols: int = 8, title: str | None = None) -> Figure:
    """Draw a grid of images, each above its ground-truth instance mask.

    Mask ids get fixed colours (0 = background in black, then the ``tab20`` colours), so the
    same id has the same colour in every panel.

    :param images: ``(B, 3, H, W)`` RGB in [0, 1] (tensor or array).
    :param masks: ``(B, H, W)`` integer instance ids, 0 = background.
    :param path: if given, the PNG is written there.
    :param int ncols: scenes per row.
    :param str title: optional figure title.
    :returns: the :class:`matplotlib.figure.Figure`.
    """
    images = images.detach().cpu().numpy() if torch.is_tensor(images) else np.asarray(images)
    masks = masks.detach().cpu().numpy() if torch.is_tensor(masks) else np.asarray(masks)
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images: expected shape (B, 3, H, W), got {images.shape}")
    num, _, height, width = images.shape
    if masks.shape != (num, height, width):
        raise ValueError(f"masks: expected shape {(num, height, width)}, got {masks.shape}")
    if not np.issubdtype(masks.dtype, np.integer) or (masks.size and masks.min() < 0):
        raise ValueError("masks: expected non-negative integer instance ids")
    if isinstance(ncols, bool) or not isinstance(ncols, int) or ncols < 1:
        raise ValueError(f"ncols: expected an integer >= 1, got {ncols!r}")
    if num == 0:
        raise ValueError("images: expected at least one scene, got 0")
    ncols = min(ncols, num)
    nrows = -(-num // ncols)
    num_ids = int(masks.max()) + 1
    cmap = ListedColormap(_mask_colors(num_ids))
    fig = Figure(figsize=(1.6 * ncols, 3.2 * nrows))
    axes = fig.subplots(2 * nrows, ncols, squeeze=False)
    for ax in axes.flat:
        ax.set_axis_off()
    for i in range(num):
        row, col = divmod(i, ncols)
        axes[2 * row, col].imshow(np.clip(images[i].transpose(1, 2, 0), 0.0, 1.0))
        axes[2 * row + 1, col].imshow(
            masks[i], cmap=cmap, vmin=-0.5, vmax=num_ids - 0.5, interpolation="nearest"
        )
    if title is not None:
        fig.suptitle(title)
    fig.tight_layout()
    if path is not None:
        fig.savefig(os.fspath(path), format="png", dpi=100)
    return fig
