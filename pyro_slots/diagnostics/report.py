"""Everything at once: a folder with a markdown report, PNG plots and the InferenceData."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from ..inner.reinit import masks_of
from ..plots.diagnostics import plot_elbo_trajectories, plot_khat, plot_rhat
from ..plots.slots import plot_slot_masks
from ..refine import initial_slots, make_generator, refine
from ..validation import check_positive_int
from . import _traces
from .amortization import default_refiner, refinement_gap
from .health import inner_loop_health
from .inference_data import check_draws, resolve_draws, to_inference_data
from .psis import psis_diagnostic
from .summary import summary

__all__ = ["write_report"]


def write_report(
    folder,
    model,
    x: torch.Tensor,
    inner,
    *,
    num_slots: int | None = None,
    num_steps: int | None = None,
    num_restarts: int = 4,
    seed: int = 0,
    refiner=None,
    num_psis_samples: int = 1000,
    num_draws: int = 200,
    image_shape: tuple[int, int] | None = None,
    draws: str | None = None,
    log_likelihood: bool = False,
    init=None,
) -> Path:
    """Run the diagnostics on a batch and write them to ``folder``.

    Runs ``refine(model, x, inner, num_restarts=num_restarts)``, then writes

    * ``report.md``: the per-datapoint :func:`summary` table, aggregates and how to read them;
    * ``elbo_trajectories.png``, ``rhat.png`` (with ≥ 2 restarts), ``khat.png`` (when the guide
      samples latents), ``slot_masks.png`` (with ``image_shape``, where the model has
      responsibilities, see :func:`~pyro_slots.diagnostics.model_responsibilities`);
    * ``inference_data.nc``: the :func:`to_inference_data` result (netCDF, ``az.from_netcdf``);
    * ``summary.csv``: the table.

    Posterior draws (``draws=None``) are Laplace draws of λ when the guide samples nothing (the
    ELBO is then deterministic), else guide samples; Laplace draws cost one Hessian-vector
    product per coordinate of a datapoint's slots, so for large slots pass ``draws="point"``
    (R-hat is then not computed) or ``"guide"``. PSIS is run on the best restart when the
    guide samples latents. The amortization gap refines the best restart's slots with
    ``refiner`` (default :func:`~pyro_slots.diagnostics.default_refiner`). The inner-loop health
    includes the Jacobian norm of ``inner``'s update.

    Example (what ``pyro-slots diagnose CHECKPOINT`` does with the checkpoint's model, rule and
    a data batch)::

        write_report("diagnostics/", gmm, x, EM(100), num_restarts=4, seed=0)

    :param folder: output folder (created).
    :param SlotModel model: the model.
    :param torch.Tensor x: a batch of datapoints, as for :func:`~pyro_slots.refine`.
    :param InnerRule inner: the inner rule under test.
    :param int num_slots: K (default ``model.num_slots``).
    :param int num_steps: T (default ``inner.num_steps``).
    :param int num_restarts: independent restarts (chains).
    :param int seed: seed of every random choice.
    :param InnerRule refiner: the fixed rule of the amortization gap.
    :param int num_psis_samples: guide samples per datapoint for PSIS.
    :param int num_draws: posterior draws per restart.
    :param tuple image_shape: ``(H, W)`` of image measurements, for the slot-mask plot.
    :param str draws: ``"point"``, ``"laplace"`` or ``"guide"`` (see
        :func:`~pyro_slots.diagnostics.to_inference_data`); chosen as above when ``None``.
    :param bool log_likelihood: store the per-measurement log-likelihood of every draw in the
        netCDF (``restarts · draws · batch · measurements`` numbers: 80 MB for 64 sets of 200
        points, hence off by default).
    :param init: the slot initializer the model was trained with (e.g. a learned
        :class:`~pyro_slots.GaussianInit`), passed to :func:`~pyro_slots.refine`; default the
        rule's or the model's own.
    :returns: the path of ``report.md``.
    """
    folder = Path(folder)
    num_restarts = check_positive_int(num_restarts, "num_restarts")
    if draws not in (None, "auto", "point"):
        # Before any work: the guide's sites on one datapoint at its initial slots.
        with torch.no_grad():
            probe = model.encode(x[:1])
            start = initial_slots(
                model, probe, num_slots or model.num_slots, inner=inner, init=init,
                generator=make_generator(seed),
            )  # fmt: skip
        check_draws(draws, model, probe, start)
    folder.mkdir(parents=True, exist_ok=True)
    result = refine(
        model,
        x,
        inner,
        num_slots=num_slots,
        num_steps=num_steps,
        num_restarts=num_restarts,
        seed=seed,
        init=init,
    )
    best_result = result.best()
    best = best_result.slots[0]
    x_enc = result.x_enc
    with torch.no_grad():
        guide_sites = _traces.guide_sample_sites(_traces.traces(model, x_enc, best, 1)[1])
    draws = resolve_draws(draws, model, result)
    idata = to_inference_data(
        result,
        model,
        draws=draws,
        num_draws=num_draws,
        seed=seed,
        log_likelihood=log_likelihood,
    )
    psis = None
    if guide_sites:
        psis = psis_diagnostic(model, x, best, num_psis_samples, seed=seed)
    gap = refinement_gap(model, x, best, refiner or default_refiner(model))
    health = inner_loop_health(result, model, inner, seed=seed, masks=masks_of(model))
    table = summary(idata, psis=psis, gap=gap, health=health)

    idata.to_netcdf(str(folder / "inference_data.nc"))
    table.to_csv(folder / "summary.csv")
    figures = {}
    ax = plot_elbo_trajectories(idata)
    figures["elbo_trajectories.png"] = ax.figure
    if num_restarts > 1 and idata.posterior.sizes["draw"] >= 4:
        figures["rhat.png"] = plot_rhat(idata).figure
    if psis is not None:
        figures["khat.png"] = plot_khat(psis).figure
    if image_shape is not None:
        resp = best_result.responsibilities
        if resp is not None:
            resp = resp[0]
            figures["slot_masks.png"] = plot_slot_masks(resp, image_shape)
    for name, fig in figures.items():
        fig.savefig(folder / name, dpi=100, bbox_inches="tight")

    path = folder / "report.md"
    path.write_text(_markdown(model, inner, init, result, table, gap, psis, draws, figures))
    return path


def _fmt(v) -> str:
    if isinstance(v, float | np.floating):
        return "" if math.isnan(v) else f"{v:.4g}"
    return str(v)


def _markdown_table(table: pd.DataFrame) -> str:
    header = [table.index.name or ""] + list(table.columns)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for idx, row in table.iterrows():
        lines.append("| " + " | ".join([str(idx)] + [_fmt(v) for v in row.values]) + " |")
    return "\n".join(lines)


def _markdown(model, inner, init, result, table, gap, psis, draws, figures) -> str:
    flagged = int((table["flags"] != "").sum())
    start = "the rule's or the model's own" if init is None else f"`{init!r}`"
    lines = [
        "# pyro_slots diagnostics",
        "",
        f"- model: `{type(model).__name__}`, inner rule: `{inner!r}`",
        f"- slot initialization: {start}",
        f"- datapoints: {len(table)}, restarts (chains): {result.num_restarts}, "
        f"inner steps: {result.num_steps}, posterior draws: {draws}",
        f"- datapoints with a flag: {flagged} of {len(table)}",
        f"- amortization gap (Cremer et al. 2018): mean {gap.gap.mean().item():.4g}, "
        f"max {gap.gap.max().item():.4g}",
    ]
    if psis is not None:
        k = psis.khat.detach().cpu().numpy()
        lines.append(
            f"- Pareto k̂ (Yao et al. 2018): {int((k > 0.7).sum())} datapoints above 0.7, "
            f"{int(((k > 0.5) & (k <= 0.7)).sum())} in (0.5, 0.7]"
        )
    lines += [
        "",
        "How to read it: k̂ < 0.5 good, 0.5-0.7 usable, > 0.7 the guide is unreliable; R-hat "
        "(aligned restarts) above 1.01 means restarts found different solutions (with Laplace "
        "draws the flag reads rhat_centres, R-hat's limit from the restarts' own slots: "
        "rhat itself carries the Monte Carlo noise of the draws); the unaligned "
        "R-hat shows label switching and is expected to be large; a positive amortization gap "
        "is ELBO the rule leaves to further refinement; a Jacobian norm above 1 warns that "
        "long unrolls and implicit gradients are unstable.",
        "",
        "## Per datapoint",
        "",
        _markdown_table(table),
        "",
        "## Plots",
        "",
    ]
    lines += [f"![{name[:-4]}]({name})" for name in figures]
    lines += ["", "The InferenceData is in `inference_data.nc` (`arviz.from_netcdf`).", ""]
    return "\n".join(lines)
