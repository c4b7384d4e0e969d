"""``pyro-slots diagnose CHECKPOINT``: the posterior diagnostics report of a trained run.

The report is written by :func:`pyro_slots.diagnostics.write_report` when that package is
installed. Without it, a basic report is written instead: the inner loop's ELBO trajectories
and fixed-point residuals on held-out data (``inner_loop.json``, ``inner_elbo.png``,
``residuals.png``), and the command says so.
"""

from __future__ import annotations

import json
import os

import torch

from .train import checkpoint_path, load_run

__all__ = ["diagnose", "write_basic_report"]


def _diagnostics_writer():
    try:
        from pyro_slots.diagnostics import write_report
    except ImportError:
        return None
    return write_report


def write_basic_report(folder: str, run, inner_steps: int | None = None, num: int = 64) -> list:
    """ELBO trajectories and residuals of the inner loop on ``num`` held-out datapoints."""
    from matplotlib.figure import Figure

    from pyro_slots import plotting_training as plots

    from .evaluate import infer

    os.makedirs(folder, exist_ok=True)
    result = infer(run, num, inner_steps).result
    num_measurements = result.x_enc.shape[1]
    history = result.history.double()
    residuals = result.residuals.double()
    summary = {
        "num_datapoints": int(history.shape[1]),
        "inner_steps": int(result.num_steps),
        "elbo_mean": (history.mean(1) / num_measurements).tolist(),
        "elbo_per_datapoint": (history.T / num_measurements).tolist(),
        "residual_mean": residuals.mean(1).tolist(),
        "relative_residual_mean": result.relative_residuals.double().mean(1).tolist(),
        "elbo_decreased_fraction": float((history.diff(dim=0) < -1e-6).any(0).double().mean()),
        "elbo_unit": "per measurement",
    }
    paths = [os.path.join(folder, "inner_loop.json")]
    with open(paths[0], "w") as f:
        json.dump(summary, f, indent=1)
    paths.append(os.path.join(folder, "inner_elbo.png"))
    plots.plot_inner_elbo(history, num_measurements, paths[-1])
    fig = Figure(figsize=(6, 4), layout="constrained")
    ax = fig.subplots()
    steps = torch.arange(1, residuals.shape[0] + 1).numpy()
    for j in range(min(residuals.shape[1], 32)):
        ax.semilogy(steps, residuals[:, j].clamp_min(1e-12).numpy(), color="tab:gray", alpha=0.35)
    ax.semilogy(
        steps, residuals.mean(1).clamp_min(1e-12).numpy(), "o-", color="tab:red", lw=2, label="mean"
    )
    ax.set_xlabel("inner step t")
    ax.set_ylabel("residual ‖λ_t − λ_{t−1}‖")
    ax.set_title("inner loop: fixed-point residuals on held-out data", fontsize=11)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    paths.append(os.path.join(folder, "residuals.png"))
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    fig.savefig(paths[-1], dpi=110, bbox_inches="tight")
    return paths


def diagnose(
    checkpoint, out: str | None = None, num: int = 64, inner_steps: int | None = None, echo=print
) -> str:
    """Write the diagnostics report of ``checkpoint`` into ``out``; returns the folder.

    :param checkpoint: a checkpoint file or a run folder.
    :param str out: the report folder (default: ``diagnostics`` next to the checkpoint).
    :param int num: held-out datapoints.
    :param int inner_steps: inner steps (default: as in training).
    """
    path = checkpoint_path(checkpoint)
    run = load_run(path)
    folder = out or os.path.join(os.path.dirname(os.path.abspath(path)), "diagnostics")
    write_report = _diagnostics_writer()
    if write_report is None:
        echo(
            "pyro_slots.diagnostics is not installed: writing the basic report (ELBO "
            "trajectories and residuals of the inner loop) only"
        )
        write_basic_report(folder, run, inner_steps, num)
        return folder
    x = run.components.stream.held_out(num).x
    write_report(
        folder,
        run.components.model,
        x,
        run.components.inner,
        num_slots=run.config.num_slots,
        num_steps=inner_steps or run.config.inner_steps,
        seed=run.config.seed,
    )
    return folder
