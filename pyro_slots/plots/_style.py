"""The one palette and the shared helpers of every figure.

Slot (and component) ``k`` is drawn in ``tab10`` colour ``k`` (cycled) in every figure; in an
instance-mask image, id 0 (the background) is black and id ``i ≥ 1`` takes slot colour ``i - 1``.
"""

from __future__ import annotations

import os

import numpy as np
import torch
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

#: Grey level of the pixels a slot does not own in its panel, so that a slot painting black
#: (the background of Tetrominoes) stays visible.
UNOWNED_GREY = 0.8
#: The colour of mask id 0 (background).
BACKGROUND = (0.0, 0.0, 0.0)


def slot_colors(num: int) -> np.ndarray:
    """RGB of slots ``0 .. num - 1``: the ``tab10`` colours, cycled. ``(num, 3)``."""
    tab10 = colormaps["tab10"].colors
    return np.asarray([tab10[i % len(tab10)] for i in range(num)], dtype=float).reshape(num, 3)


def mask_colors(num_ids: int) -> np.ndarray:
    """RGB of instance-mask ids ``0 .. num_ids - 1``: black, then the slot colours.
    ``(max(num_ids, 1), 3)``."""
    return np.concatenate([np.asarray([BACKGROUND]), slot_colors(max(num_ids - 1, 0))])


def to_numpy(t, dtype=None) -> np.ndarray:
    """A tensor (detached, on the CPU) or array-like as a NumPy array."""
    if torch.is_tensor(t):
        t = t.detach().cpu()
        if t.dtype == torch.bfloat16 or t.dtype == torch.float16:
            t = t.float()
        t = t.numpy()
    return np.asarray(t, dtype=dtype)


def save(fig: Figure, path, **kwargs) -> None:
    """Writes ``fig`` as PNG to ``path`` (nothing for ``None``) on the Agg canvas."""
    if path is not None:
        FigureCanvasAgg(fig)
        fig.savefig(os.fspath(path), format="png", **kwargs)
