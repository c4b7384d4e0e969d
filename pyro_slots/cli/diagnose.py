"""``pyro-slots diagnose CHECKPOINT``: the posterior diagnostics report of a trained run.

:func:`pyro_slots.diagnostics.write_report` runs on held-out data with the run's model, rule
and slot initialization: ``report.md`` (per-datapoint table: R-hat across restarts, PSIS k̂,
amortization gap, inner-loop health), ``summary.csv``, ``inference_data.nc`` and plots.
"""

from __future__ import annotations

import os

from .config import ConfigError
from .evaluate import final_test_options, held_out_num
from .runs import count_option, load_run, resolve_device, weights_path, writable_folder

__all__ = ["DRAWS", "diagnose"]


#: Laplace draws cost one Hessian-vector product per slot coordinate: above this many
#: coordinates per datapoint, ``draws="auto"`` keeps the point estimates only.
MAX_LAPLACE_COORDINATES = 128
DRAWS = ("auto", "point", "laplace", "guide")
#: Held-out datapoints of a report by default.
DEFAULT_NUM = 64


def diagnose(
    checkpoint,
    out: str | None = None,
    num: int | None = None,
    inner_steps: int | None = None,
    restarts: int = 4,
    draws: str = "auto",
    device: str = "cpu",
    weights: str | None = None,
) -> str:
    """Write the diagnostics report of ``checkpoint`` into ``out``; returns the folder.

    :param checkpoint: a checkpoint file or a run folder.
    :param str out: the report folder (default: ``diagnostics`` next to the checkpoint).
    :param int num: held-out datapoints (default :data:`DEFAULT_NUM`, or every held-out image
        of an HDF5 run that holds out fewer); of a clip run, the clips' first frames.
    :param int inner_steps: inner steps (default: the run's final test's, ``eval_inner_steps``,
        else the training T; :func:`~pyro_slots.cli.evaluate.final_test_options`), so the
        report diagnoses the inference whose scores ``test.json`` holds.
    :param int restarts: independent restarts per datapoint (chains for R-hat).
    :param str draws: posterior draws of the report, one of :data:`DRAWS`; ``"auto"`` lets
        :func:`~pyro_slots.diagnostics.write_report` choose unless the slots have more than
        :data:`MAX_LAPLACE_COORDINATES` coordinates per datapoint (then ``"point"``).
    :param device: ``"cpu"`` (default) or ``"cuda"``.
    :param str weights: a run folder's ``"best"`` or ``"last"`` weights (default: ``best``
        where the folder has a ``best.pt``; :func:`~pyro_slots.cli.runs.weights_path`).
    :raises ConfigError: for ``num``, ``restarts`` or ``inner_steps`` < 1, an unknown
        ``draws`` or ``weights``, or an ``out`` that cannot be written (all checked before any
        work).
    """
    if draws not in DRAWS:
        raise ConfigError(f"draws: unknown kind {draws!r}; valid choices are {list(DRAWS)}")
    num = None if num is None else count_option(num, "num")
    restarts = count_option(restarts, "restarts")
    inner_steps = count_option(inner_steps, "inner_steps")
    # Imported here: arviz and the report's plots add about 2 s to the start of every command.
    from pyro_slots.diagnostics import DrawsError, write_report

    device = resolve_device(device)
    path = weights_path(checkpoint, weights)
    run = load_run(path, {"tensorboard": False}, device)
    folder = out or os.path.join(os.path.dirname(os.path.abspath(path)), "diagnostics")
    writable_folder(folder, "out")
    c = run.components
    x = c.stream.held_out(held_out_num(c.stream, num, DEFAULT_NUM)).x.to(device)
    if c.stream.kind == "videos":
        # A clip's later frames start from the slots the earlier ones carried (refine_video):
        # the report diagnoses the first frame, the inference from the run's initializer.
        x = x[:, 0]
    inner = c.inner
    if draws == "auto":
        large = c.model.slot_dim * run.config.num_slots > MAX_LAPLACE_COORDINATES
        draws = "point" if large else None
    try:  # write_report checks the draws before any work
        write_report(
            folder,
            c.model,
            x,
            inner,
            num_restarts=restarts,
            draws=draws,
            num_slots=run.config.num_slots,
            num_steps=final_test_options(run.config, inner_steps=inner_steps)["inner_steps"]
            or run.config.inner_steps,
            seed=run.config.seed,
            image_shape=_measurement_grid(c.model),
            init=c.init,  # the trained initializer (None: the rule's or the model's own)
        )
    except DrawsError as error:
        raise ConfigError(f"--draws: {error}") from None
    return folder


def _measurement_grid(model) -> tuple[int, int] | None:
    """``(H, W)`` of an image model's measurements (pixels or encoder positions), else None."""
    encoder = getattr(model, "encoder", None)
    grid = getattr(encoder, "output_resolution", None)
    if grid is None and hasattr(model, "image_size"):
        grid = model.image_size
    if grid is None or model.num_measurements != grid[0] * grid[1]:
        return None
    return tuple(grid)
