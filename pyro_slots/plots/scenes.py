"""Scenes of an image dataset above their ground-truth instance masks."""

from __future__ import annotations

import numpy as np
from matplotlib.colors import ListedColormap
from matplotlib.figure import Figure

from ._style import mask_colors, save, to_numpy

__all__ = ["plot_scenes"]


def plot_scenes(images, masks, path=None, ncols: int = 8, title: str | None = None) -> Figure:
    """Draw a grid of images, each above its ground-truth instance mask.

    Mask ids get fixed colours (:func:`~pyro_slots.plots.mask_colors`: 0 = background in black,
    then the slot colours), so the same id has the same colour in every panel.

    :param images: ``(B, 3, H, W)`` RGB in [0, 1] (tensor or array).
    :param masks: ``(B, H, W)`` integer instance ids, 0 = background.
    :param path: if given, the PNG is written there (100 dpi).
    :param int ncols: scenes per row.
    :param str title: optional figure title.
    :returns: the :class:`matplotlib.figure.Figure`.
    """
    images, masks = to_numpy(images), to_numpy(masks)
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
    cmap = ListedColormap(mask_colors(num_ids))
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
    save(fig, path, dpi=100)
    return fig
