"""``pyro-slots train``: one :class:`~pyro_slots.NestedSVI` loop with progress, metrics and
checkpoints that resume bit for bit.

Exact resumption rests on three things: every batch is a function of ``(seed, step)`` alone
(:mod:`pyro_slots.cli.streams`), the checkpoint holds every state that changes while training
(weights, optimizer moments, the slot-initialization generator of NestedSVI, the global RNGs),
and held-out evaluations never touch those states.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass
from datetime import timedelta

import pyro
import torch

from pyro_slots.checkpoint import (
    FORMAT,
    CheckpointError,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)

from .config import ConfigError, TrainConfig, save_config
from .registry import Components, build, resolve

__all__ = [
    "CHECKPOINT_NAME",
    "METRICS_NAME",
    "TrainRun",
    "TrainingError",
    "checkpoint_path",
    "config_from_checkpoint",
    "load_run",
    "make_svi",
    "train",
]

CHECKPOINT_NAME = "checkpoint.pt"
METRICS_NAME = "metrics.jsonl"
CONFIG_NAME = "config.yaml"


class TrainingError(RuntimeError):
    """Training stopped on a non-finite objective, ELBO or gradient."""


@dataclass
class TrainRun:
    """A built training run: configuration, components, the outer loop and its step count."""

    config: TrainConfig
    components: Components
    svi: object
    step: int = 0


def checkpoint_path(path: str | os.PathLike) -> str:
    """The checkpoint file of ``path``: itself if a file, ``path/checkpoint.pt`` if a folder."""
    path = os.fspath(path)
    return os.path.join(path, CHECKPOINT_NAME) if os.path.isdir(path) else path


def learning_rate(config: TrainConfig, step: int) -> float:
    """Learning rate of update ``step`` (0-based): linear warm-up, then constant."""
    if config.warmup_steps <= 0:
        return config.lr
    return config.lr * min(1.0, (step + 1) / config.warmup_steps)


def _set_learning_rate(svi, lr: float) -> None:
    # The rate lives in the optimizers' param_groups, which the checkpoint saves: a resumed run
    # continues with exactly the rate the uninterrupted run would use.
    for optimizer in svi.optim.optim_objs.values():
        for group in optimizer.param_groups:
            group["lr"] = lr


def make_svi(config: TrainConfig, components: Components):
    """The outer loop: NestedSVI with Adam on every shared weight."""
    from pyro_slots import NestedSVI

    return NestedSVI(
        components.model,
        components.inner,
        components.objective,
        pyro.optim.Adam({"lr": learning_rate(config, 0)}),
        gradient=config.gradient,
        iteration_weights=config.iteration_weights,
        num_slots=config.num_slots,
        num_steps=config.inner_steps,
        truncate=config.truncate,
        init=components.init,
        seed=config.seed,
        clip_norm=config.clip_norm,
    )


def distributed_context(timeout: float | None = None) -> tuple[int, int]:
    """``(rank, world_size)``; joins the process group first when launched by ``torchrun``.

    ``torchrun`` sets ``WORLD_SIZE``, ``RANK`` and the rendezvous variables; the group uses
    ``nccl`` when CUDA is available and ``gloo`` otherwise. Without them: ``(0, 1)``.

    :param float timeout: seconds a collective waits for the other ranks before it raises
        (default: torch's, 30 minutes with ``gloo``). A rank that dies closes its connections
        and the others fail at once; one that stalls (a frozen node, a lost network) is only
        noticed after this time. Used when this call creates the group.
    """
    import torch.distributed as dist

    if not dist.is_available():
        return 0, 1
    if not dist.is_initialized() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        dist.init_process_group(
            "nccl" if torch.cuda.is_available() else "gloo",
            timeout=None if timeout is None else timedelta(seconds=timeout),
        )
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _new_run(config: TrainConfig) -> TrainRun:
    # Weights are drawn from the global RNG when the modules are built: seed it first (every
    # rank the same; NestedSVI also broadcasts rank 0's weights).
    pyro.clear_param_store()
    pyro.set_rng_seed(config.seed)
    rank, world_size = distributed_context()
    components = build(config, rank, world_size)
    svi = make_svi(config, components)
    if not svi.parameters():
        raise ConfigError(
            f"--model {config.model} with --inner {config.inner} and --init {config.init} has no "
            "weights to train"
        )
    return TrainRun(config, components, svi)


def config_from_checkpoint(payload: dict, path: str) -> TrainConfig:
    try:
        return TrainConfig(**payload["config"])
    except TypeError as error:
        raise CheckpointError(
            f"{path}: the saved configuration is not valid here: {error}"
        ) from None


def load_run(path: str | os.PathLike, overrides: dict | None = None) -> TrainRun:
    """Rebuild a run from a checkpoint, with every state restored.

    The run's folder (``config.out``) becomes the checkpoint's folder, wherever the run was
    first written.

    :param path: a checkpoint file or a folder holding ``checkpoint.pt``.
    :param dict overrides: configuration fields to change (e.g. ``steps``) before rebuilding.
    :raises CheckpointError: for an unreadable checkpoint or one whose states do not fit.
    """
    path = checkpoint_path(path)
    payload = load_checkpoint(path)
    config = config_from_checkpoint(payload, path)
    overrides = {**(overrides or {}), "out": os.path.dirname(os.path.abspath(path))}
    config = TrainConfig(**{**config.to_dict(), **overrides})
    config = resolve(config)
    run = _new_run(config)
    c = run.components
    try:
        c.model.load_state_dict(payload["model"])
        c.inner.load_state_dict(payload["inner"])
        c.objective.load_state_dict(payload["objective"])
        if c.init is not None:
            c.init.load_state_dict(payload["init"])
        run.svi.load_state_dict(payload["svi"])
        set_rng_state(payload["rng"])
    except (RuntimeError, ValueError, KeyError, TypeError) as error:
        first = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise CheckpointError(f"{path}: the saved states do not fit the model: {first}") from None
    run.step = int(payload["step"])
    return run


def _payload(run: TrainRun) -> dict:
    c = run.components
    return {
        "format": FORMAT,
        "step": run.step,
        "config": run.config.to_dict(),
        "model": c.model.state_dict(),
        "inner": c.inner.state_dict(),
        "objective": c.objective.state_dict(),
        "init": None if c.init is None else c.init.state_dict(),
        "svi": run.svi.state_dict(),
        "rng": rng_state(data_position=run.step),
    }


def save_run(run: TrainRun) -> str:
    path = os.path.join(run.config.out, CHECKPOINT_NAME)
    save_checkpoint(path, _payload(run))
    return path


def _truncate_metrics(path: str, step: int) -> None:
    """Drop the metrics logged after ``step`` (by a run killed after its last checkpoint)."""
    if not os.path.exists(path):
        return
    keep = []
    with open(path) as f:
        for line in f:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut short by the kill
            if record.get("step", 0) <= step:
                keep.append(json.dumps(record))
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write("".join(line + "\n" for line in keep))
    os.replace(tmp, path)


class _Logger:
    """Appends metric records to ``metrics.jsonl`` (flushed per line) and, optionally, to
    TensorBoard."""

    def __init__(self, out: str, tensorboard: bool):
        self.file = open(os.path.join(out, METRICS_NAME), "a")  # noqa: SIM115 - closed in close()
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
    """Mean inner ELBO of a batch's inner result, per datapoint and per measurement."""
    elbo = result.elbo.mean().item()
    return elbo, elbo / result.x_enc.shape[1]


def held_out_record(run: TrainRun, batch) -> dict:
    """Task objective, inner ELBO and segmentation scores on held-out data.

    The slots are refined by :func:`pyro_slots.refine` with a fixed seed rather than by
    ``NestedSVI.evaluate_loss``, so every evaluation starts from the same initialization and
    no state of the run (outer-loop generator, global RNG) changes.
    """
    from .evaluate import infer, metrics_of

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


def prepare_out(config: TrainConfig, resume: bool, overwrite: bool) -> None:
    ckpt = os.path.join(config.out, CHECKPOINT_NAME)
    if not resume and os.path.exists(ckpt):
        if not overwrite:
            raise ConfigError(
                f"out: {config.out} already holds a checkpoint; continue it with --resume "
                f"{config.out}, pass --overwrite, or choose another --out"
            )
        for name in (CHECKPOINT_NAME, METRICS_NAME, CONFIG_NAME):
            path = os.path.join(config.out, name)
            if os.path.exists(path):
                os.unlink(path)
    os.makedirs(config.out, exist_ok=True)


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
    echo=print,
) -> TrainRun:
    """Train (or continue training) and write checkpoint, metrics, config and pictures.

    Under ``torchrun`` every rank trains on its share of each global batch (``batch_size`` is
    per process) and only rank 0 writes files; the logged J is the global mean, the inner ELBO
    rank 0's.

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
        ranks before this rank fails (see :func:`distributed_context`); ignored otherwise.
    :returns: the finished :class:`TrainRun`.
    """
    from tqdm.auto import tqdm

    if dist_timeout is not None and not 0 < dist_timeout < math.inf:
        raise ConfigError(f"dist_timeout: expected finite seconds > 0, got {dist_timeout}")
    rank, world_size = distributed_context(dist_timeout)
    main_rank = rank == 0
    if time_limit is not None and world_size > 1:
        raise ConfigError("time_limit: not supported with several processes (ranks would differ)")
    if resume is not None:
        run = load_run(resume, overrides)
        if main_rank:
            _truncate_metrics(os.path.join(run.config.out, METRICS_NAME), run.step)
            echo(f"resuming {checkpoint_path(resume)} at step {run.step} of {run.config.steps}")
    else:
        config = resolve(config or TrainConfig())
        if main_rank:
            prepare_out(config, resume=False, overwrite=overwrite)
        run = _new_run(config)
    config = run.config
    stream = run.components.stream
    held_out = None
    if main_rank:
        save_config(os.path.join(config.out, CONFIG_NAME), config)
        held_out = stream.held_out(config.eval_size) if config.eval_every else None
        logger = _Logger(config.out, config.tensorboard)
    bar = tqdm(
        total=config.steps,
        initial=run.step,
        desc=f"train {config.model}/{config.inner}",
        unit="step",
        disable=not (progress and main_rank),
        dynamic_ncols=True,
    )
    start_time, start_step = time.perf_counter(), run.step
    try:
        while run.step < config.steps:
            batch = stream.batch(run.step)
            try:
                loss, result = run.svi.step(batch.x)
            except FloatingPointError as error:  # InnerLoopError too: NaN ELBO, J or gradient
                first = (str(error).splitlines() or [type(error).__name__])[0]
                raise TrainingError(
                    f"update {run.step + 1} diverged: {first}; {config.out} keeps the last "
                    "checkpoint, if any (lower --lr or --step-size, or set --clip-norm)"
                ) from None
            run.step += 1
            _set_learning_rate(run.svi, learning_rate(config, run.step))
            elbo, per_measurement = _inner_elbo(result)
            elapsed = time.perf_counter() - start_time
            rate = (run.step - start_step) / elapsed if elapsed > 0 else math.nan
            bar.set_postfix(J=f"{loss:.4g}", elbo=f"{per_measurement:.4g}/m", refresh=False)
            bar.update(1)
            out_of_time = time_limit is not None and elapsed > time_limit
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
                logger.log(held_out_record(run, held_out))
            if run.step % config.checkpoint_every == 0 or run.step == config.steps or out_of_time:
                save_run(run)
            if out_of_time:
                echo(f"time limit of {time_limit:.0f} s reached after {run.step} steps")
                break
    finally:
        bar.close()
        if main_rank:
            logger.close()
    if not main_rank:
        return run
    if run.step == 0 or not os.path.exists(os.path.join(config.out, CHECKPOINT_NAME)):
        save_run(run)
    if pictures:
        from .evaluate import write_pictures

        write_pictures(run, config.out)
    return run
