"""``pyro-slots evaluate CHECKPOINT``: metrics on held-out generated data, and the pictures.

For ``gmm`` the slots of every held-out point set are refined with the trained rule and
initialization, and the fit is compared with the set's true mixture: log-likelihood per point
of the fit and of the true parameters, ARI of the responsibilities against the true
assignments, and a reference fit (k-means++ then 100 EM steps). For image models: FG-ARI,
ARI, mean IoU of the Hungarian-matched objects, reconstruction MSE and the inner ELBO; the
segmentation is every pixel's most probable slot under the decoder's masks.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch

from pyro_slots import plots, refine
from pyro_slots.data import true_log_likelihood
from pyro_slots.inner import EM
from pyro_slots.metrics import ari, fg_ari, mean_iou, reconstruction_mse

from .registry import objective_targets
from .runs import METRICS_NAME, TrainRun, count_option, writable_folder
from .streams import Batch

__all__ = [
    "Inference",
    "evaluate_run",
    "format_table",
    "held_out_record",
    "infer",
    "write_pictures",
]

#: Steps of the reference EM fit that gmm results are compared with.
REFERENCE_EM_STEPS = 100


@dataclass
class Inference:
    """Held-out data and what the trained run infers for them.

    :ivar result: the :class:`~pyro_slots.RefineResult` (one restart: ``result.slots[0]`` are
        the slots of the held-out datapoints).
    """

    batch: Batch
    result: object  # RefineResult


def infer(run: TrainRun, batch: Batch | int, inner_steps: int | None = None) -> Inference:
    """Refine the slots of held-out datapoints with the trained rule and initialization.

    The slot initialization is seeded with the run's seed, so results are reproducible; no
    state of the run changes.

    :param batch: a :class:`Batch`, or the number of held-out datapoints to draw.
    :param int inner_steps: inner steps T (default: as in training), >= 1.
    :raises ConfigError: for ``inner_steps`` < 1.
    """
    config, c = run.config, run.components
    inner_steps = count_option(inner_steps, "inner_steps")
    if isinstance(batch, int):
        batch = c.stream.held_out(batch)
    batch = on_device(batch, run.device)
    result = refine(
        c.model,
        batch.x,
        c.inner,
        num_slots=config.num_slots,
        num_steps=config.inner_steps if inner_steps is None else inner_steps,
        init=c.init,
        seed=config.seed,
    )
    return Inference(batch, result)


def on_device(batch: Batch, device: torch.device) -> Batch:
    """``batch`` with its data and ground truth on ``device``."""
    truth = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.truth.items()}
    return Batch(batch.x.to(device), truth)


def _mean(t: torch.Tensor) -> float:
    return float(torch.nanmean(t.double()).item())


def _gmm_metrics(run: TrainRun, inference: Inference, reference: bool = True) -> dict:
    model = run.components.model
    x, truth, result = inference.batch.x, inference.batch.truth, inference.result
    num_points = x.shape[1]
    # Assignments are enumerated exactly and there is no guide: the ELBO is the log-likelihood.
    loglik = result.elbo[0] / num_points  # (S,)
    with torch.no_grad():
        true = true_log_likelihood(x, truth["means"], truth["scales"], truth["weights"])
        recon = model.reconstruct(x, result.slots[0])
    metrics = {
        "loglik_per_point": _mean(loglik),
        "true_loglik_per_point": _mean(true),
        "gap_to_true_per_point": _mean(true.mean(1) - loglik),
    }
    if reference:
        with torch.no_grad():
            fit = refine(
                model,
                x,
                EM(num_steps=REFERENCE_EM_STEPS),
                num_slots=run.config.num_slots,
                seed=run.config.seed,
            )
            metrics["reference_em_loglik_per_point"] = _mean(fit.elbo[0]) / num_points
    metrics.update(
        {
            "elbo": _mean(result.elbo[0]),
            "elbo_per_point": _mean(result.elbo[0]) / num_points,
            "ari": _mean(ari(truth["assignments"], result.responsibilities[0])),
            "mse": _mean(reconstruction_mse(x, recon)),
        }
    )
    return metrics


def decode(model, result) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(recon (B, 3, H, W), rgb (B, K, 3, H, W), masks (B, K, H, W))`` of refined slots."""
    with torch.no_grad():
        recon, rgb, masks = model.decode(result.slots[0])
    if masks.dim() == 5:
        masks = masks.squeeze(2)
    return recon, rgb, masks


def _image_metrics(run: TrainRun, inference: Inference, reference: bool = False) -> dict:
    x, truth, result = inference.batch.x, inference.batch.truth, inference.result
    recon, _, masks = decode(run.components.model, result)
    return {
        "fg_ari": _mean(fg_ari(truth["mask"], masks)),
        "ari": _mean(ari(truth["mask"], masks)),
        "mean_iou": _mean(mean_iou(truth["mask"], masks)),
        "mse": _mean(reconstruction_mse(x, recon)),
        "elbo": _mean(result.elbo[0]),
        "elbo_per_measurement": _mean(result.elbo[0]) / result.x_enc.shape[1],
    }


def task_objective(run: TrainRun, inference: Inference) -> torch.Tensor:
    """The task objective J of every held-out datapoint at its refined slots, ``(batch,)``."""
    c = run.components
    x = inference.batch.x
    with torch.no_grad():
        x_enc = c.model.encode(x)
        targets = objective_targets(c.objective, inference.batch.truth)  # set prediction
        return c.objective(c.model, x, x_enc, inference.result.slots[0], *targets)


def metrics_of(run: TrainRun, inference: Inference, reference: bool = True) -> dict:
    """The metrics of one :class:`Inference` (see the module docstring).

    :param bool reference: include the gmm reference fit (100 EM steps).
    """
    metrics = {
        "num_datapoints": int(inference.batch.x.shape[0]),
        "inner_steps": int(inference.result.num_steps),
        "J": _mean(task_objective(run, inference)),
    }
    kind = _gmm_metrics if run.components.stream.kind == "points" else _image_metrics
    metrics.update(kind(run, inference, reference))
    return metrics


def evaluate_run(run: TrainRun, num: int = 128, inner_steps: int | None = None) -> dict:
    """Metrics of a trained run on ``num`` held-out datapoints (a flat dict of numbers).

    :raises ConfigError: for ``num`` or ``inner_steps`` < 1.
    """
    num = count_option(num, "num")
    return {"step": run.step, **metrics_of(run, infer(run, num, inner_steps))}


def format_table(metrics: dict) -> str:
    """Two aligned columns, metric and value."""
    width = max(len(k) for k in metrics)
    lines = []
    for key, value in metrics.items():
        if isinstance(value, float):
            text = "nan" if math.isnan(value) else f"{value:.4f}"
        else:
            text = str(value)
        lines.append(f"{key:<{width}}  {text:>12}")
    return "\n".join(lines)


def write_pictures(run: TrainRun, folder: str, num: int = 4) -> list[str]:
    """Write the run's pictures into ``folder``; returns their paths.

    ``training_curve.png`` (when the run's ``metrics.jsonl`` exists), ``inner_elbo.png``, and
    ``gmm_fits.png`` (gmm) or ``slots.png`` (image models) for ``num`` held-out datapoints.

    :raises ConfigError: when ``folder`` cannot be created or written into.
    """
    writable_folder(folder, "pictures")
    config, model = run.config, run.components.model
    written = []
    metrics_path = os.path.join(config.out, METRICS_NAME)
    if os.path.exists(metrics_path):
        path = os.path.join(folder, "training_curve.png")
        plots.plot_training_curve(
            plots.read_metrics(metrics_path),
            path,
            title=f"{config.model} / {config.inner} / {config.gradient} on {config.dataset}",
        )
        written.append(path)
    inference = infer(run, max(num, 32))
    result = inference.result
    path = os.path.join(folder, "inner_elbo.png")
    plots.plot_inner_elbo(
        result.history[:, 0].cpu(),
        result.x_enc.shape[1],
        path,
        title=f"inner loop ({config.inner}, {result.num_steps} steps) on held-out data, "
        f"after {run.step} updates",
    )
    written.append(path)
    x = inference.batch.x[:num]
    if run.components.stream.kind == "points":
        with torch.no_grad():
            slots = result.slots[0, :num]
            loc, scale, log_weights = model.component_params(slots)
            resp = result.responsibilities[0, :num]
            loglik = result.elbo[0, :num] / x.shape[1]
        t = inference.batch.truth
        true = true_log_likelihood(x, t["means"][:num], t["scales"][:num], t["weights"][:num])
        titles = [
            f"log-lik/point: fit {a:.2f}, true {b:.2f}"
            for a, b in zip(loglik.tolist(), true.mean(1).tolist())
        ]
        path = os.path.join(folder, "gmm_fits.png")
        drawn = (x, resp, loc, scale, log_weights.exp(), t["means"][:num])
        plots.plot_gmm_fits(*(v.cpu() for v in drawn), path, titles=titles)
    else:
        recon, rgb, masks = decode(model, result)
        path = os.path.join(folder, "slots.png")
        masks, x, recon, rgb = (v.cpu() for v in (masks[:num], x, recon[:num], rgb[:num]))
        plots.plot_slot_masks(masks, images=x, recon=recon, rgb=rgb, max_datapoints=None, path=path)
    written.append(path)
    return written


def held_out_record(run: TrainRun, batch: Batch) -> dict:
    """Task objective, inner ELBO and segmentation scores on held-out data.

    The slots are refined by :func:`pyro_slots.refine` with a fixed seed rather than by
    ``NestedSVI.evaluate_loss``, so every evaluation starts from the same initialization and
    no state of the run (outer-loop generator, global RNG) changes.
    """
    cpu_state = torch.get_rng_state()
    try:
        inference = infer(run, batch)
        metrics = metrics_of(run, inference, reference=False)
    finally:
        torch.set_rng_state(cpu_state)
    elbo = inference.result.elbo.mean().item()
    record = {"step": run.step, "split": "held_out", "J": metrics.pop("J"), "elbo": elbo}
    record["elbo_per_measurement"] = elbo / inference.result.x_enc.shape[1]
    for key in ("fg_ari", "ari", "mse", "loglik_per_point", "true_loglik_per_point"):
        if key in metrics:
            record[key] = metrics[key]
    return record
