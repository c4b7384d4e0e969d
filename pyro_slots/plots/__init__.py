"""Every figure of pyro_slots, drawn with matplotlib's object API on the Agg canvas (no pyplot
global state, safe in scripts, tests and threads), in one palette (:func:`slot_colors`).

* data: :func:`plot_scenes` (images above their ground-truth instance masks);
* slots: :func:`plot_slot_masks` (the slot-mask figure: heat maps, or mask × slot image with
  input and reconstruction columns), :func:`plot_gmm_fits` (point sets and fitted components);
* training: :func:`plot_training_curve` (from ``metrics.jsonl``, :func:`read_metrics`),
  :func:`plot_inner_elbo` (``RefineResult.history``);
* diagnostics: :func:`plot_khat`, :func:`plot_elbo_trajectories`, :func:`plot_rhat` (imported
  on first use: they need ArviZ).
"""

from __future__ import annotations

import importlib

from ._style import UNOWNED_GREY, mask_colors, slot_colors
from .scenes import plot_scenes
from .slots import plot_gmm_fits, plot_slot_masks
from .training import plot_inner_elbo, plot_training_curve, read_metrics

_DIAGNOSTIC = ("plot_elbo_trajectories", "plot_khat", "plot_rhat")

__all__ = [
    "UNOWNED_GREY",
    "mask_colors",
    "plot_elbo_trajectories",
    "plot_gmm_fits",
    "plot_inner_elbo",
    "plot_khat",
    "plot_rhat",
    "plot_scenes",
    "plot_slot_masks",
    "plot_training_curve",
    "read_metrics",
    "slot_colors",
]


def __getattr__(name: str):
    if name in _DIAGNOSTIC:
        return getattr(importlib.import_module(".diagnostics", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(__all__))
