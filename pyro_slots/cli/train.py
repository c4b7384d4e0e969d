"""``pyro-slots train``: one :class:`~pyro_slots.NestedSVI` loop with progress, metrics and
checkpoints that resume bit for bit.

Exact resumption rests on three things: every batch is a function of ``(seed, step)`` alone
(:mod:`pyro_slots.cli.streams`), the checkpoint holds every state that changes while training
(weights, optimizer moments, the slot-initialization generator of NestedSVI, the global RNGs),
and held-out evaluations never touch those states.

The recipe options of a run (:class:`~pyro_slots.cli.config.TrainConfig`): the learning-rate
schedule (:func:`~pyro_slots.cli.runs.lr_factor`), the wall-clock budget ``max_minutes`` (its
clock, :class:`~pyro_slots.cli.runs.TrainingClock`, is saved in the checkpoint, so a resumed run
continues the same budget and cosine; a time-bounded run is exact to resume but, in its number of
updates, no more reproducible than the clock), ``select_best`` (``best.pt``), the final test
(:func:`final_test`, ``test.json``), ``init_from`` and ``first_scene``.
"""

from __future__ import annotations

import json
import math
import os
import time

import torch
from tqdm.auto import tqdm

from pyro_slots.checkpoint import write_atomically
from pyro_slots.nested import RankFailedError
from pyro_slots.plots.training import is_validation, read_metrics

from .config import ConfigError, TrainConfig, save_config
from .evaluate import chunked_metrics, final_test_options, validation_record, write_pictures
from .registry import int_list, objective_targets, reaches_init, resolve
from .runs import (
    BEST_NAME,
    CHECKPOINT_NAME,
    CONFIG_NAME,
    METRICS_NAME,
    TEST_NAME,
    RunFolder,
    TrainingError,
    TrainRun,
    checkpoint_path,
    distributed_context,
    first_line,
    init_from,
    load_run,
    machine_record,
    make_svi,
    new_run,
    pixel_scale_at,
    resolve_device,
    save_run,
    tf32_mode,
)

__all__ = [
    "CHECKPOINT_NAME",
    "METRICS_NAME",
    "TrainRun",
    "TrainingError",
    "checkpoint_path",
    "final_test",
    "load_run",
    "make_svi",
    "train",
]


def _truncate_metrics(path: str, step: int) -> None:
    """Drop the metrics logged after ``step`` (by a run killed after its last checkpoint)."""
    if not os.path.exists(path):
        return
    keep = [json.dumps(r) for r in read_metrics(path) if r.get("step", 0) <= step]
    write_atomically(path, "".join(line + "\n" for line in keep))


class _Logger:
    """Appends metric records to ``metrics.jsonl`` (flushed per line) and, optionally, to
    TensorBoard."""

    def __init__(self, out: str, tensorboard: bool, append: bool):
        path = os.path.join(out, METRICS_NAME)
        self.file = open(path, "a" if append else "w")  # noqa: SIM115 - closed in close()
        self.writer = None
        if tensorboard:
            # Checked by resolve(): the package is installed.
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(os.path.join(out, "tensorboard"))

    def log(self, record: dict) -> None:
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.writer is not None:
            prefix = record.get("split", "train")
            for key, value in record.items():
                if key not in ("step", "split", "time") and isinstance(value, int | float):
                    self.writer.add_scalar(f"{prefix}/{key}", value, record["step"])

    def close(self) -> None:
        self.file.close()
        if self.writer is not None:
            self.writer.close()


def _inner_elbo(result) -> tuple[float, float]:
    """Mean inner ELBO of a batch's inner result (a clip's: summed over its frames), per
    datapoint and per measurement."""
    frames = result if isinstance(result, list) else [result]
    elbo = sum(r.elbo.mean().item() for r in frames)
    return elbo, elbo / sum(r.x_enc.shape[1] for r in frames)


def train(
    config: TrainConfig | None = None,
    *,
    resume: str | None = None,
    overrides: dict | None = None,
    overwrite: bool = False,
    progress: bool = True,
    pictures: bool = True,
    time_limit: float | None = None,
    dist_timeout: float | None = None,
    device: str | torch.device = "cpu",
    tf32: bool | None = None,
    echo=print,
) -> TrainRun:
    """Train (or continue training) and write checkpoint, metrics, config and pictures.

    Under ``torchrun`` every rank trains on its share of each global batch (``batch_size`` is
    per process) and only rank 0 writes files; the logged J is the global mean, the inner ELBO
    rank 0's.

    Everything is checked and built before the run folder is touched. The folder is then locked
    for the run (:class:`~pyro_slots.cli.runs.RunFolder`): a second run into it is refused, a
    fresh run starts a fresh ``metrics.jsonl``, and with ``overwrite`` the previous run is moved
    aside and deleted only once this run has written its first checkpoint (put back if this run
    fails before).

    :param TrainConfig config: the configuration (ignored with ``resume``).
    :param str resume: a folder with a checkpoint to continue; its saved configuration is used,
        with ``overrides`` (e.g. a larger ``steps``) applied.
    :param bool overwrite: replace an existing run in ``config.out``.
    :param bool progress: show a tqdm progress bar (on stderr).
    :param bool pictures: draw the pictures at the end.
    :param float time_limit: stop (with a checkpoint) after this many seconds of training even
        if ``config.steps`` is not reached; single-process runs only. The run can be continued
        with ``resume``.
    :param float dist_timeout: under ``torchrun``, seconds a collective waits for the other
        ranks before this rank fails (see :func:`~pyro_slots.cli.runs.distributed_context`);
        ignored otherwise.
    :param device: ``"cpu"`` (default) or ``"cuda"``: where the weights and batches live.
    :param tf32: on a GPU, allow TensorFloat-32 in matrix products and convolutions (``True``),
        forbid it in both (``False``: float32 as on the CPU up to rounding) or keep torch's
        settings (``None``, default: convolutions use it, matrix products do not); restored
        afterwards (:func:`~pyro_slots.cli.runs.tf32_mode`).
    :returns: the finished :class:`TrainRun`.
    """
    if dist_timeout is not None and not 0 < dist_timeout < math.inf:
        raise ConfigError(f"dist_timeout: expected finite seconds > 0, got {dist_timeout}")
    device = resolve_device(device)
    rank, world_size = distributed_context(dist_timeout, device)
    main_rank = rank == 0
    if time_limit is not None and world_size > 1:
        raise ConfigError("time_limit: not supported with several processes (ranks would differ)")
    if resume is not None:
        run = load_run(resume, overrides, device, resume=True)
    else:
        run = new_run(resolve(config or TrainConfig()), device)
        if run.config.init_from is not None:
            updates = init_from(run, run.config.init_from)
            if main_rank:
                echo(
                    f"init_from: the weights of {run.config.init_from} ({updates} updates); a "
                    "fresh optimizer and learning-rate schedule"
                )
    config = run.config
    if config.max_minutes is not None and world_size > 1:
        # Each rank reads its own clock: the ranks would stop, and anneal, differently.
        raise ConfigError("max_minutes: not supported with several processes; use --steps")
    if config.init == "fixed" and main_rank:
        why = "as asked"
        if not reaches_init(config, config.inner_steps):
            why = f"--gradient {config.gradient} does not reach the slot initializer"
        echo(f"init: fixed ({why}; it stays where it starts instead of being trained)")
    folder = RunFolder(config.out)
    if main_rank:
        folder.acquire()
    try:
        with tf32_mode(tf32):
            return _train_in(run, folder, main_rank, resume, overwrite, progress, pictures,
                             time_limit, echo)  # fmt: skip
    finally:
        folder.release()


def _train_in(run, folder, main_rank, resume, overwrite, progress, pictures, time_limit, echo):
    """The training loop of :func:`train`, in a locked run folder."""
    config = run.config
    last_saved = run.step if resume is not None else None
    if main_rank:
        if resume is not None:
            _truncate_metrics(os.path.join(config.out, METRICS_NAME), run.step)
            echo(f"resuming {checkpoint_path(resume)} at step {run.step} of {config.steps}")
        else:
            folder.prepare(overwrite)
    stream = run.components.stream
    held_out = None
    logger = None
    bar = None
    best = _best_so_far(config) if resume is not None else None
    budget = math.inf if config.max_minutes is None else 60.0 * config.max_minutes
    model = run.components.model
    # The model is built with the final sigma_x (a resumed run too); a ramp moves it there,
    # and it is put back when training ends, for the pictures and the final test.
    final_scale = getattr(model, "pixel_scale", None)
    ramp = config.pixel_scale_ramp > 0
    try:
        if main_rank:
            save_config(os.path.join(config.out, CONFIG_NAME), config)
            held_out = stream.validation(config.eval_size) if config.eval_every else None
            logger = _Logger(config.out, config.tensorboard, append=resume is not None)
        bar = tqdm(
            total=config.steps,
            initial=run.step,
            desc=f"train {config.model}/{config.inner}",
            unit="step",
            disable=not (progress and main_rank),
            dynamic_ncols=True,
        )
        start_time, start_step = time.perf_counter(), run.step
        run.clock.start()
        while run.step < config.steps and run.clock.seconds() < budget:
            if ramp:
                model.pixel_scale = pixel_scale_at(config, run.step, final_scale)
            batch = stream.batch(run.step)
            x = batch.x.to(run.device)
            targets = [
                t.to(run.device) for t in objective_targets(run.components.objective, batch.truth)
            ]
            try:
                loss, result = run.svi.step(x, *targets)
            except (FloatingPointError, ValueError, RankFailedError) as error:
                # FloatingPointError: non-finite J, ELBO, gradient or slots (InnerLoopError,
                # NonFiniteError); ValueError: e.g. a distribution refusing the NaN features of
                # a diverged encoder. Either way one line naming the update.
                diverged = isinstance(error, FloatingPointError) or _mentions_nan(error)
                raise TrainingError(
                    f"update {run.step + 1} {'diverged' if diverged else 'failed'}: "
                    f"{first_line(error)}; {_what_is_kept(config.out, last_saved, folder)}"
                    + (" (lower --lr or --step-size, or set --clip-norm)" if diverged else "")
                ) from None
            run.svi.optim.step()  # the learning-rate schedule: one scheduler step per update
            run.step += 1
            elbo, per_measurement = _inner_elbo(result)
            elapsed = time.perf_counter() - start_time
            rate = (run.step - start_step) / elapsed if elapsed > 0 else math.nan
            bar.set_postfix(J=f"{loss:.4g}", elbo=f"{per_measurement:.4g}/m", refresh=False)
            bar.update(1)
            out_of_time = time_limit is not None and elapsed > time_limit
            out_of_budget = run.clock.seconds() >= budget
            if not main_rank:
                continue
            logger.log(
                {
                    "step": run.step,
                    "split": "train",
                    "J": loss,
                    "elbo": elbo,
                    "elbo_per_measurement": per_measurement,
                    "steps_per_s": rate,
                }
            )
            if held_out is not None and run.step % config.eval_every == 0:
                options = final_test_options(config) if config.validate_as_tested else {}
                record = validation_record(run, held_out, **options)
                if ramp:
                    record["pixel_scale"] = model.pixel_scale
                record["train_seconds"] = round(run.clock.seconds(), 1)  # time to a score
                logger.log(record)
                score = record.get(SELECT_BY[run.components.stream.kind], -math.inf)
                if config.select_best and (best is None or score > best[1]):
                    save_run(run, BEST_NAME)
                    best = (run.step, score)
            if (
                run.step % config.checkpoint_every == 0
                or run.step == config.steps
                or out_of_time
                or out_of_budget
            ):
                save_run(run)
                last_saved = run.step
                folder.committed()
            if out_of_budget:
                minutes = config.max_minutes
                echo(f"max_minutes: {minutes:g} minutes of training after {run.step} steps")
                break
            if out_of_time:
                echo(f"time limit of {time_limit:.0f} s reached after {run.step} steps")
                break
        if main_rank and (
            last_saved is None or not os.path.exists(os.path.join(config.out, CHECKPOINT_NAME))
        ):
            save_run(run)
            last_saved = run.step
            folder.committed()
    except BaseException:
        if main_rank and last_saved is None:
            if logger is not None:
                logger.close()
                logger = None
            folder.restore()
        raise
    finally:
        if ramp:
            model.pixel_scale = final_scale
        if bar is not None:
            bar.close()
        if logger is not None:
            logger.close()
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        # The ranks leave training together: a rank that tears its process group down while
        # another is still in its last steps can abort in gloo's teardown.
        torch.distributed.barrier()
    if main_rank and pictures:
        write_pictures(run, config.out)
    if main_rank and config.test_size:
        report = final_test(run)
        echo(f"test ({report['weights']} weights, {config.test_size} held-out): "
             + ", ".join(f"{k} {v:.4f}" for k, v in report["metrics"].items()
                         if k in ("fg_ari", "ari", "mse", "loglik_per_point", "video_fg_ari",
                                  "slot_keeping", "kept_slots")))  # fmt: skip
        for t, metrics in report.get("sweep", {}).items():
            scores = {k: v for k, v in metrics.items() if k in ("fg_ari", "loglik_per_point")}
            echo(f"  at T = {t}: " + ", ".join(f"{k} {v:.4f}" for k, v in scores.items()))
    return run


#: The validation score ``select_best`` maximizes, per kind of data.
SELECT_BY = {"images": "fg_ari", "videos": "video_fg_ari", "points": "loglik_per_point"}


def _best_so_far(config: TrainConfig) -> tuple[int, float] | None:
    """``(step, score)`` of the best validation point logged so far (a resumed run continues to
    select against it); ``None`` without ``select_best`` or a ``best.pt``."""
    if not config.select_best or not os.path.exists(os.path.join(config.out, BEST_NAME)):
        return None
    best = None
    with open(os.path.join(config.out, METRICS_NAME)) as f:
        for line in f:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            for key in SELECT_BY.values():
                if is_validation(record) and key in record:
                    if best is None or record[key] > best[1]:
                        best = (record["step"], record[key])
    return best


def final_test(run: TrainRun) -> dict:
    """Score the run on ``test_size`` held-out test datapoints at the test-time options
    (``eval_inner_steps``, ``eval_restarts``, ``restart_criterion``, ``eval_reinitialize``)
    and write ``test.json``.

    With ``test_sweep`` (``"1,3,5,10,20"``) the tested weights are tested again at each of those
    inner steps T, on the same data from the same initial slots: ``report["sweep"][str(T)]``.

    With ``select_best`` the weights of ``best.pt`` are tested (the final weights' metrics are
    kept beside them as ``final_weights``). :returns: the report written.
    """
    config = run.config
    batch = run.components.stream.held_out(config.test_size)
    options = final_test_options(config)
    cpu_state = torch.get_rng_state()
    try:
        metrics = chunked_metrics(run, batch, **options)
        report = {"weights": "final", "step": run.step, "metrics": metrics}
        tested = run
        best_path = os.path.join(config.out, BEST_NAME)
        if config.select_best and os.path.exists(best_path):
            tested = load_run(best_path, {"tensorboard": False}, run.device)
            report = {
                "weights": "best",
                "step": tested.step,
                "metrics": chunked_metrics(tested, batch, **options),
                "final_weights": {"step": run.step, "metrics": metrics},
            }
        sweep = int_list(config.test_sweep, "test_sweep", "1,3,5,10,20") or ()
        if sweep:
            # The same test data and slot initializations at every T: only T changes.
            options.pop("inner_steps")
            report["sweep"] = {
                str(t): chunked_metrics(tested, batch, inner_steps=t, **options) for t in sweep
            }
    finally:
        torch.set_rng_state(cpu_state)
    report["train_seconds"] = round(run.clock.seconds(), 1)
    report["machine"] = machine_record(run.device)
    report["inner_steps"] = config.eval_inner_steps or config.inner_steps
    report["restarts"], report["restart_criterion"] = config.eval_restarts, config.restart_criterion
    if config.eval_reinitialize or config.reinitialize:
        report["reinitialize"] = True
    path = os.path.join(config.out, TEST_NAME)
    write_atomically(path, json.dumps(report, indent=1))
    return report


def _mentions_nan(error: Exception) -> bool:
    text = str(error).lower()
    return "nan" in text or "invalid values" in text or "inf" in text.split()


def _what_is_kept(out: str, last_saved: int | None, folder: RunFolder) -> str:
    """What the run folder holds after a failure (before the folder is restored)."""
    if last_saved is not None:
        return f"{out} keeps the checkpoint of update {last_saved}"
    if folder.moved:
        return f"{out} keeps the previous run (the --overwrite is undone)"
    return f"no checkpoint was written to {out}"
