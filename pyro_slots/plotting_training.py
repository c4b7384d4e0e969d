"""Pictures of a training run, drawn with matplotlib's object API on the Agg canvas.

- :func:`plot_training_curve`: the task objective J and the inner ELBO against the update, from
  ``metrics.jsonl``;
- :func:`plot_inner_elbo`: the ELBO across the inner iterations (``RefineResult.history``);
- :func:`plot_gmm_fits`: point sets coloured by responsibility, with the fitted components;
- :func:`plot_slot_decomposition`: input | reconstruction | one panel per slot (mask × slot image).

No pyplot global state is used, so the functions are safe in scripts, tests and threads.
"""

from __future__ import annotations

import json
import math
import os

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Ellipse

__all__ = [
    "plot_gmm_fits",
    "plot_inner_elbo",
    "plot_slot_decomposition",
    "plot_training_curve",
    "read_metrics",
]


def _save(fig: Figure, path) -> None:
    if path is not None:
        FigureCanvasAgg(fig)
        fig.savefig(os.fspath(path), dpi=110, bbox_inches="tight")


def _slot_colors(num: int) -> np.ndarray:
    from matplotlib import colormaps

    tab10 = colormaps["tab10"].colors
    return np.asarray([tab10[i % len(tab10)] for i in range(num)])


def read_metrics(path) -> list[dict]:
    """The records of a ``metrics.jsonl`` file (lines that do not parse are skipped)."""
    records = []
    with open(path) as f:
        for line in f:
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return records


def _smooth(values: np.ndarray, window: int) -> np.ndarray:
    if window <= 1 or len(values) < window:
        return values
    kernel = np.ones(window) / window
    head = np.cumsum(values[: window - 1]) / np.arange(1, window)
    return np.concatenate([head, np.convolve(values, kernel, mode="valid")])


def plot_training_curve(records: list[dict], path=None, title: str | None = None) -> Figure:
    """J and the inner ELBO per measurement against the update number.

    Thin lines: every training batch; thick: a moving average; dots: held-out evaluations. A
    third panel shows the held-out FG-ARI (image models) or log-likelihood per point next to
    that of the true mixtures (gmm) when the records have them.

    :param list records: dicts with ``step``, ``split`` (``"train"`` / ``"held_out"``), ``J``
        and ``elbo_per_measurement``, as in ``metrics.jsonl``.
    :param path: PNG to write, or ``None``.
    """
    train = [r for r in records if r.get("split", "train") == "train"]
    held = [r for r in records if r.get("split") == "held_out"]
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
                label="held-out",
            )
        ax.set_xlabel("outer update")
        ax.set_title(label, fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    if extra:
        ax = axes[2]
        steps = [r["step"] for r in held]
        ax.plot(steps, [r[extra] for r in held], "o-", color="tab:orange", ms=4, label="held-out")
        if extra == "fg_ari":
            ax.set_title("held-out FG-ARI (higher is better)", fontsize=10)
            ax.set_ylim(min(0.0, min(r[extra] for r in held)), 1.0)
        else:
            ax.plot(
                steps,
                [r["true_loglik_per_point"] for r in held],
                "--",
                color="k",
                label="true mixtures",
            )
            ax.set_title("held-out log-likelihood per point", fontsize=10)
        ax.set_xlabel("outer update")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    if title:
        fig.suptitle(title, fontsize=11)
    _save(fig, path)
    return fig


def plot_inner_elbo(
    history: torch.Tensor,
    num_measurements: int = 1,
    path=None,
    title: str | None = None,
    max_lines: int = 32,
) -> Figure:
    """The ELBO across inner iterations ``t = 0..T`` for several datapoints and their mean.

    :param torch.Tensor history: ``(num_steps + 1, batch)`` as ``RefineResult.history``.
    :param int num_measurements: divide by it to plot the ELBO per measurement.
    :param path: PNG to write, or ``None``.
    """
    if history.dim() != 2:
        raise ValueError(
            f"history: expected shape (num_steps + 1, batch), got {tuple(history.shape)}"
        )
    h = history.detach().double().cpu().numpy() / num_measurements
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
        label=f"mean of {h.shape[1]} datapoints",
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
    _save(fig, path)
    return fig


def plot_gmm_fits(
    x: torch.Tensor,
    responsibilities: torch.Tensor,
    loc: torch.Tensor,
    scale: torch.Tensor,
    weights: torch.Tensor,
    true_means: torch.Tensor | None = None,
    path=None,
    ncols: int = 4,
    titles: list[str] | None = None,
) -> Figure:
    """Point sets coloured by responsibility, with the fitted components as 2σ ellipses.

    A point's colour mixes the component colours by its responsibilities; each fitted
    component is an ellipse of two standard deviations in its colour, line width growing with
    its weight; true means (if given) are black crosses. Only the first two dimensions are
    drawn.

    :param x: ``(S, N, D)``; :param responsibilities: ``(S, K, N)``;
    :param loc: ``(S, K, D)``; :param scale: ``(S, K, D)`` standard deviations;
    :param weights: ``(S, K)``; :param true_means: ``(S, K', D)`` or ``None``.
    """
    x, resp, loc, scale, weights = (
        t.detach().double().cpu().numpy() for t in (x, responsibilities, loc, scale, weights)
    )
    num_sets, num_slots = resp.shape[0], resp.shape[1]
    colors = _slot_colors(num_slots)
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
            tm = true_means[s].detach().cpu().numpy()
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
    _save(fig, path)
    return fig


#: Grey level of the pixels a slot does not own in its panel, so that a slot painting black
#: (the background of Tetrominoes) stays visible.
_UNOWNED = 0.8


def _image(t: torch.Tensor) -> np.ndarray:
    return t.detach().float().clamp(0, 1).permute(1, 2, 0).cpu().numpy()


def plot_slot_decomposition(
    images: torch.Tensor,
    recon: torch.Tensor,
    rgb: torch.Tensor,
    masks: torch.Tensor,
    path=None,
    titles: list[str] | None = None,
) -> Figure:
    """One row per image: input | reconstruction | one panel per slot (mask × slot image).

    A slot's panel is ``mask_k · rgb_k + (1 - mask_k) · grey``: what the slot paints where it
    owns the pixels, light grey elsewhere; its title gives its share of the image.

    :param images: ``(B, 3, H, W)`` in [0, 1]; :param recon: ``(B, 3, H, W)``;
    :param rgb: per-slot images ``(B, K, 3, H, W)``; :param masks: ``(B, K, H, W)`` or
        ``(B, K, 1, H, W)``, summing to 1 over the slots.
    """
    if masks.dim() == 5:
        masks = masks.squeeze(2) if masks.shape[2] == 1 else masks.mean(2)
    batch, num_slots = masks.shape[:2]
    fig = Figure(figsize=(1.6 * (num_slots + 2), 1.7 * batch), layout="constrained")
    axes = fig.subplots(batch, num_slots + 2, squeeze=False)
    for b in range(batch):
        panels = [(_image(images[b]), "input"), (_image(recon[b]), "reconstruction")]
        for k in range(num_slots):
            mask = masks[b, k].unsqueeze(0)
            panel = _image(rgb[b, k] * mask + (1 - mask) * _UNOWNED)
            share = masks[b, k].mean().item()
            panels.append((panel, f"slot {k + 1} ({100 * share:.0f}%)"))
        for j, (panel, label) in enumerate(panels):
            ax = axes[b, j]
            ax.imshow(panel, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if b == 0 or j >= 2:
                ax.set_title(label, fontsize=8)
        if titles is not None:
            axes[b, 0].set_ylabel(titles[b], fontsize=8)
    _save(fig, path)
    return fig
