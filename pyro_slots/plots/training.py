"""Pictures of a training run: the task objective and the inner ELBO.

- :func:`plot_training_curve`: the task objective J and the inner ELBO against the update, from
  ``metrics.jsonl`` (:func:`read_metrics`);
- :func:`plot_inner_elbo`: the ELBO across the inner iterations (``RefineResult.history``).
"""

from __future__ import annotations

import json

import numpy as np
import torch
from matplotlib.figure import Figure

from ._style import save

__all__ = [
    "VALIDATION_SPLITS",
    "is_validation",
    "plot_inner_elbo",
    "plot_training_curve",
    "read_metrics",
]

#: The ``split`` of a periodic validation record in ``metrics.jsonl``: ``"validation"``, or
#: ``"held_out"`` in the logs of runs written before v0.2 (the same validation scenes).
VALIDATION_SPLITS = ("validation", "held_out")


def is_validation(record: dict) -> bool:
    """Whether a ``metrics.jsonl`` record is a periodic validation (any version's label)."""
    return record.get("split") in VALIDATION_SPLITS


def read_metrics(path) -> list[dict]:
    """The records of a ``metrics.jsonl`` file: the dicts of its lines, skipping lines that do
    not parse (e.g. one cut short by a kill)."""
    records = []
    with open(path) as f:
        for line in f:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(record, dict):
                records.append(record)
    return records


def _smooth(values: np.ndarray, window: int) -> np.ndarray:
    if window <= 1 or len(values) < window:
        return values
    kernel = np.ones(window) / window
    head = np.cumsum(values[: window - 1]) / np.arange(1, window)
    return np.concatenate([head, np.convolve(values, kernel, mode="valid")])


def plot_training_curve(records: list[dict], path=None, title: str | None = None) -> Figure:
    """J and the inner ELBO per measurement against the update number.

    Thin lines: every training batch; thick: a moving average; dots: the periodic validations. A
    third panel shows the validation FG-ARI (image models) or log-likelihood per point next to
    that of the true mixtures (gmm) when the records have them.

    :param list records: dicts with ``step``, ``split`` (``"train"`` / ``"validation"``), ``J``
        and ``elbo_per_measurement``, as in ``metrics.jsonl``.
    :param path: PNG to write (110 dpi), or ``None``.
    """
    train = [r for r in records if r.get("split", "train") == "train"]
    held = [r for r in records if is_validation(r)]
    extra = next((k for k in ("fg_ari", "loglik_per_point") if held and k in held[0]), None)
    fig = Figure(figsize=(15 if extra else 10, 3.6), layout="constrained")
    axes = fig.subplots(1, 3 if extra else 2)
    for ax, key, label in (
        (axes[0], "J", "task objective J (lower is better)"),
        (axes[1], "elbo_per_measurement", "inner ELBO per measurement (higher is better)"),
    ):
        if train:
            steps = np.array([r["step"] for r in train])
            values = np.array([r[key] for r in train], dtype=float)
            ax.plot(steps, values, color="tab:blue", alpha=0.3, lw=0.8, label="training batch")
            window = max(1, len(values) // 20)
            ax.plot(
                steps,
                _smooth(values, window),
                color="tab:blue",
                lw=2,
                label=f"moving average ({window})",
            )
        if held:
            ax.plot(
                [r["step"] for r in held],
                [r[key] for r in held],
                "o-",
                color="tab:orange",
                ms=4,
                label="validation",
            )
        ax.set_xlabel("outer update")
        ax.set_title(label, fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    if extra:
        ax = axes[2]
        steps = [r["step"] for r in held]
        ax.plot(steps, [r[extra] for r in held], "o-", color="tab:orange", ms=4, label="validation")
        if extra == "fg_ari":
            ax.set_title("validation FG-ARI (higher is better)", fontsize=10)
            ax.set_ylim(min(0.0, min(r[extra] for r in held)), 1.0)
        else:
            ax.plot(
                steps,
                [r["true_loglik_per_point"] for r in held],
                "--",
                color="k",
                label="true mixtures",
            )
            ax.set_title("validation log-likelihood per point", fontsize=10)
        ax.set_xlabel("outer update")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    if title:
        fig.suptitle(title, fontsize=11)
    save(fig, path, dpi=110, bbox_inches="tight")
    return fig


def plot_inner_elbo(
    history: torch.Tensor,
    num_measurements: int = 1,
    path=None,
    title: str | None = None,
    max_lines: int = 32,
) -> Figure:
    """The ELBO across inner iterations ``t = 0..T`` for several datapoints and their mean.

    :param torch.Tensor history: ``(num_steps + 1, batch)`` or ``(num_steps + 1, restarts,
        batch)`` as ``RefineResult.history`` (every restart of every datapoint is a line).
    :param int num_measurements: divide by it to plot the ELBO per measurement.
    :param path: PNG to write (110 dpi), or ``None``.
    """
    if history.dim() not in (2, 3):
        raise ValueError(
            "history: expected shape (num_steps + 1, batch) or (num_steps + 1, restarts, batch), "
            f"got {tuple(history.shape)}"
        )
    h = history.detach().double().cpu().reshape(history.shape[0], -1).numpy() / num_measurements
    t = np.arange(h.shape[0])
    fig = Figure(figsize=(6, 4), layout="constrained")
    ax = fig.subplots()
    for j in range(min(h.shape[1], max_lines)):
        ax.plot(t, h[:, j], color="tab:gray", alpha=0.35, lw=0.8)
    ax.plot(
        t,
        h.mean(1),
        color="tab:red",
        lw=2.5,
        marker="o",
        ms=4,
        label=f"mean of {h.shape[1]} datapoints"
        if history.dim() == 2
        else f"mean of {h.shape[1]} runs",
    )
    ax.plot([], [], color="tab:gray", alpha=0.5, label="single datapoints")
    ax.set_xlabel("inner iteration t")
    ax.set_ylabel("ELBO per measurement" if num_measurements > 1 else "ELBO")
    ax.set_title(title or "inner loop: ELBO across iterations", fontsize=11)
    if h.shape[0] <= 20:
        ax.set_xticks(t)
    lo, hi = np.percentile(h, 2), np.max(h)
    if np.isfinite(lo) and hi > lo:
        ax.set_ylim(lo - 0.05 * (hi - lo), hi + 0.05 * (hi - lo))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    save(fig, path, dpi=110, bbox_inches="tight")
    return fig
