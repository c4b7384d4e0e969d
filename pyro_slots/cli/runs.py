"""What ``train``, ``evaluate`` and ``diagnose`` share: a run, its folder, its checkpoint, the
outer loop it trains with, and the device and process group it runs on.

A **run folder** (``--out``) holds one run:

==================  ==============================================================================
entry               content
==================  ==============================================================================
``checkpoint.pt``   every state an exact resume needs (:mod:`pyro_slots.checkpoint`), with its
                    SHA-256; written atomically every ``checkpoint_every`` updates and at the end
``metrics.jsonl``   one JSON record per update (``split: train``) and per held-out evaluation
``config.yaml``     the resolved configuration (usable as ``--config``)
``run.lock``        the process id of the run that owns the folder, while it runs
pictures            ``training_curve.png``, ``inner_elbo.png``, ``gmm_fits.png`` / ``slots.png``
==================  ==============================================================================

It is protected by :class:`RunFolder`: one run at a time (the lock), a fresh run starts a fresh
log, and ``--overwrite`` moves the previous run aside (``.overwritten/``) and deletes it only
once the new run has written its first checkpoint; a run that fails before that puts the
previous one back.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import platform
import shutil
import socket
import tempfile
import time
import uuid
from dataclasses import dataclass
from datetime import timedelta

import pyro
import torch
import torch.distributed as dist

from pyro_slots import NestedSVI
from pyro_slots.checkpoint import (
    FORMAT,
    CheckpointError,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from pyro_slots.plots.training import read_metrics
from pyro_slots.validation import check_positive_int

from .config import ConfigError, TrainConfig
from .registry import Components, build, hdf5_held_out, resolve

__all__ = [
    "CHECKPOINT_WEIGHTS",
    "BEST_NAME",
    "CHECKPOINT_NAME",
    "TEST_NAME",
    "TrainingClock",
    "init_from",
    "lr_factor",
    "pixel_scale_at",
    "CONFIG_NAME",
    "LOCK_NAME",
    "METRICS_NAME",
    "RunFolder",
    "TrainRun",
    "TrainingError",
    "checkpoint_path",
    "count_option",
    "distributed_backend",
    "distributed_context",
    "first_line",
    "load_run",
    "make_svi",
    "new_run",
    "resolve_device",
    "save_run",
    "tf32_mode",
    "weights_path",
    "writable_folder",
]

CHECKPOINT_NAME = "checkpoint.pt"
#: The weights of the best validation score (``select_best``), a checkpoint of the same format.
BEST_NAME = "best.pt"
#: The final test's metrics (``test_size``).
TEST_NAME = "test.json"
METRICS_NAME = "metrics.jsonl"
CONFIG_NAME = "config.yaml"
LOCK_NAME = "run.lock"
#: Where ``--overwrite`` keeps the previous run until the new one has a checkpoint.
ASIDE_NAME = ".overwritten"
#: The entries of a run folder that belong to its run (moved aside by ``--overwrite``).
RUN_ENTRIES = (
    CHECKPOINT_NAME,
    BEST_NAME,
    TEST_NAME,
    METRICS_NAME,
    CONFIG_NAME,
    "tensorboard",
    "training_curve.png",
    "inner_elbo.png",
    "gmm_fits.png",
    "slots.png",
    "pictures",
    "diagnostics",
)


class TrainingError(RuntimeError):
    """Training stopped on a non-finite objective, ELBO, slots or gradient."""


def first_line(error: BaseException) -> str:
    """The first line of an error's message (its type's name if it has none)."""
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


class TrainingClock:
    """Seconds of training of a run, summed over the processes that trained it.

    ``before`` is what the checkpoint recorded (0 for a fresh run); :meth:`start` starts this
    process's share. It is the clock of ``max_minutes`` and of the cosine schedule.
    """

    def __init__(self, before: float = 0.0):
        self.before = float(before)
        self.started = None

    def start(self) -> None:
        self.started = time.perf_counter()

    def seconds(self) -> float:
        running = 0.0 if self.started is None else time.perf_counter() - self.started
        return self.before + running


@dataclass
class TrainRun:
    """A built training run: configuration, components, the outer loop, its step count and the
    device its tensors live on."""

    config: TrainConfig
    components: Components
    svi: NestedSVI
    step: int = 0
    device: torch.device = torch.device("cpu")
    #: Seconds of training so far (the clock of ``max_minutes`` and the cosine schedule).
    clock: TrainingClock = dataclasses.field(default_factory=TrainingClock)


def count_option(value: int | None, name: str) -> int | None:
    """``None`` (the option's default), or an integer >= 1; else a :class:`ConfigError` naming
    ``name`` (never a silent fallback to the default)."""
    if value is None:
        return None
    try:
        return check_positive_int(value, name)
    except (TypeError, ValueError) as error:
        raise ConfigError(str(error)) from None


def checkpoint_path(path: str | os.PathLike) -> str:
    """The checkpoint file of ``path``: itself if a file, ``path/checkpoint.pt`` if a folder."""
    path = os.fspath(path)
    return os.path.join(path, CHECKPOINT_NAME) if os.path.isdir(path) else path


#: Which checkpoint of a run folder ``evaluate`` and ``diagnose`` load (``summarize`` chooses
#: between the metrics ``test.json`` records instead, :data:`~pyro_slots.cli.summarize.WEIGHTS`).
CHECKPOINT_WEIGHTS = ("best", "last")


def weights_path(path: str | os.PathLike, weights: str | None = None) -> str:
    """The checkpoint file to evaluate for ``path``: a file is itself; a run folder gives
    ``best.pt`` (``weights="best"``, the weights its final test used with ``select_best``) or
    ``checkpoint.pt`` (``"last"``, the weights training ended with). ``None`` means ``best``
    where the folder has a ``best.pt``, else ``last``.

    :raises ConfigError: for an unknown ``weights``, ``weights`` given with a file, or
        ``"best"`` for a folder without ``best.pt``.
    """
    path = os.fspath(path)
    if weights is not None and weights not in CHECKPOINT_WEIGHTS:
        raise ConfigError(
            f"weights: unknown kind {weights!r}; valid choices are {CHECKPOINT_WEIGHTS}"
        )
    if not os.path.isdir(path):
        if weights is not None:
            raise ConfigError(
                f"weights: chooses among a run folder's checkpoints, got the file {path}; "
                "pass the run folder, or leave weights out"
            )
        return path
    best = os.path.join(path, BEST_NAME)
    if weights == "best" and not os.path.isfile(best):
        raise ConfigError(
            f"weights: best needs {best}, which a run writes with select_best; this folder "
            "has none (use last)"
        )
    if weights == "best" or (weights is None and os.path.isfile(best)):
        return best
    return checkpoint_path(path)


# ------------------------------------------------------------------ device, processes
def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo`` on Linux), else what :mod:`platform` knows."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def machine_record(device: torch.device | None = None) -> dict:
    """What a run's speed depends on besides its configuration, for ``test.json``: the CPU, its
    vector instructions as torch uses them (``AVX2``, ``AVX512``: the same recipe makes
    2-3x more updates per hour on one than on the other), cores, torch threads, torch's version
    and, for a CUDA run, the GPU."""
    record = {
        "cpu": cpu_model(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
    }
    if device is not None and torch.device(device).type == "cuda":
        record["gpu"] = torch.cuda.get_device_name(device)
    return record


def describe_machine(record: dict | None) -> str:
    """``AMD EPYC (AVX2), 1 torch thread`` from :func:`machine_record`'s record."""
    if not record:
        return "unknown machine"
    threads = record.get("torch_threads")
    text = f"{record.get('cpu', '?')} ({record.get('cpu_capability', '?')})"
    if record.get("gpu"):
        text += f", {record['gpu']}"
    if threads is not None:
        text += f", {threads} torch thread{'s' if threads != 1 else ''}"
    return text


@contextlib.contextmanager
def tf32_mode(enabled: bool | None):
    """TensorFloat-32 on NVIDIA GPUs for the matrix products and cuDNN's convolutions:
    ``True`` allows it for both, ``False`` turns it off for both (float32 results as on the CPU
    up to rounding), ``None`` keeps torch's settings (by default convolutions use TF32, matrix
    products do not). The previous settings are restored on exit; no effect on the CPU."""
    if enabled is None:
        yield
        return
    before = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = bool(enabled)
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


def resolve_device(device: str | torch.device | None = "cpu") -> torch.device:
    """The device a run's tensors live on: ``cpu`` (default) or ``cuda`` when asked.

    Under ``torchrun``, ``cuda`` means this rank's GPU, ``cuda:LOCAL_RANK``.

    :raises ConfigError: for an unknown device, or ``cuda`` on a machine without CUDA.
    """
    try:
        device = torch.device("cpu" if device is None else device)
    except (RuntimeError, TypeError, ValueError):
        raise ConfigError(f"device: expected cpu or cuda, got {device!r}") from None
    if device.type not in ("cpu", "cuda"):
        raise ConfigError(f"device: expected cpu or cuda, got {str(device)!r}")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(
                "device: cuda was asked for, but CUDA is not available here "
                "(torch.cuda.is_available() is False); use --device cpu"
            )
        if device.index is None:
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        if device.index >= torch.cuda.device_count():
            raise ConfigError(
                f"device: {device} does not exist; this machine has "
                f"{torch.cuda.device_count()} CUDA device(s)"
            )
    return device


def distributed_backend(device: torch.device) -> str:
    """The ``torch.distributed`` backend for tensors on ``device``: ``nccl`` for CUDA tensors,
    ``gloo`` for CPU ones (whether or not the machine has a GPU)."""
    return "nccl" if torch.device(device).type == "cuda" else "gloo"


def distributed_context(
    timeout: float | None = None, device: torch.device | None = None
) -> tuple[int, int]:
    """``(rank, world_size)``; joins the process group first when launched by ``torchrun``.

    ``torchrun`` sets ``WORLD_SIZE``, ``RANK`` and the rendezvous variables; the group's backend
    follows the device the run uses (:func:`distributed_backend`). Without them: ``(0, 1)``.

    :param float timeout: seconds a collective waits for the other ranks before it raises
        (default: torch's, 30 minutes with ``gloo``). A rank that dies closes its connections
        and the others fail at once; one that stalls (a frozen node, a lost network) is only
        noticed after this time. Used when this call creates the group.
    :param device: the run's device (default: CPU).
    """
    if not dist.is_available():
        return 0, 1
    if not dist.is_initialized() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        device = torch.device("cpu") if device is None else torch.device(device)
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(
            distributed_backend(device),
            timeout=None if timeout is None else timedelta(seconds=timeout),
        )
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


# ------------------------------------------------------------------------ the outer loop
def lr_factor(config: TrainConfig, step: int, clock: TrainingClock | None = None) -> float:
    """The factor of ``lr`` for update ``step`` (0-based), as ``pyro.optim.LambdaLR`` asks.

    A linear warm-up over ``warmup_steps``, times (``lr_schedule: cosine``) the cosine annealing
    ``r + (1 - r)·½(1 + cos πp)`` from 1 to ``r = min_lr_ratio``, where the progress ``p`` is the
    larger of ``step / steps`` and (with ``max_minutes``) the elapsed fraction of the time budget
    on ``clock``: a run bounded by wall time anneals to ``r`` at its end whatever the speed of the
    machine, and is then, in its number of updates, no more reproducible than the clock.
    """
    warmup = 1.0 if config.warmup_steps <= 0 else min(1.0, (step + 1) / config.warmup_steps)
    if config.lr_schedule == "constant":
        return warmup
    progress = step / config.steps
    if config.max_minutes is not None and clock is not None:
        progress = max(progress, clock.seconds() / (60.0 * config.max_minutes))
    progress = min(max(progress, 0.0), 1.0)
    r = config.min_lr_ratio
    return warmup * (r + (1.0 - r) * 0.5 * (1.0 + math.cos(math.pi * progress)))


def pixel_scale_at(config: TrainConfig, step: int, final: float) -> float:
    """σ_x for update ``step`` (0-based): ``pixel_scale_start`` moved linearly to ``final``
    (the model's ``--pixel-scale``) over ``pixel_scale_ramp`` updates, ``final`` from then on
    (and without a ramp)."""
    if config.pixel_scale_start is None or config.pixel_scale_ramp <= 0:
        return final
    progress = min(max(step / config.pixel_scale_ramp, 0.0), 1.0)
    return config.pixel_scale_start + (final - config.pixel_scale_start) * progress


def make_svi(
    config: TrainConfig, components: Components, clock: TrainingClock | None = None
) -> NestedSVI:
    """The outer loop: NestedSVI with Adam on every shared weight and Pyro's ``LambdaLR``
    scheduler for the warm-up and annealing (:func:`lr_factor`; the trainer calls
    ``svi.optim.step()`` once per update). The scheduler's update count is part of
    :meth:`NestedSVI.state_dict`, so a resumed run continues with exactly the rate the
    uninterrupted run would use; with ``max_minutes`` the rate also follows ``clock``, which
    the checkpoint carries on (``train_seconds``)."""

    def factor(step: int) -> float:  # a function, not an object: LambdaLR saves no state of it
        return lr_factor(config, step, clock)

    optim = pyro.optim.LambdaLR(
        {"optimizer": torch.optim.Adam, "optim_args": {"lr": config.lr}, "lr_lambda": factor}
    )
    return NestedSVI(
        components.model,
        components.inner,
        components.objective,
        optim,
        gradient=config.gradient,
        iteration_weights=config.iteration_weights,
        num_slots=config.num_slots,
        num_steps=config.inner_steps,
        truncate=config.truncate,
        init=components.init,
        seed=config.seed,
        clip_norm=config.clip_norm,
        sequence=components.stream.kind == "videos",
        transition=components.transition,
        straight_through=config.straight_through,
        init_regression=config.init_regression,
        slot_sparsity=config.slot_sparsity,
    )


#: Constructor argument names that are another option on the command line.
_OPTION_OF_ARGUMENT = {"num_steps": "inner_steps"}


def _as_config_error(error: Exception) -> ConfigError:
    """A constructor's ``ValueError``/``TypeError`` as a one-line :class:`ConfigError`, its
    argument renamed to the command line's option where they differ."""
    text = first_line(error)
    name, sep, rest = text.partition(":")
    if sep and name in _OPTION_OF_ARGUMENT:
        text = f"{_OPTION_OF_ARGUMENT[name]} ({name}):{rest}"
    return ConfigError(text)


def new_run(
    config: TrainConfig, device: torch.device | None = None, dist_timeout: float | None = None
) -> TrainRun:
    """Build a run from a resolved configuration: data stream, modules on ``device``, outer
    loop. Nothing is written. The constructors check their arguments; their errors become one
    :class:`ConfigError` line."""
    device = torch.device("cpu") if device is None else device
    # Weights are drawn from the global RNG when the modules are built: seed it first (every
    # rank the same; NestedSVI also broadcasts rank 0's weights).
    pyro.clear_param_store()
    pyro.set_rng_seed(config.seed)
    rank, world_size = distributed_context(dist_timeout, device)
    try:
        components = build(config, rank, world_size)
        modules = (components.model, components.inner, components.objective, components.init,
                   components.transition)  # fmt: skip
        for module in modules:
            if isinstance(module, torch.nn.Module):
                module.to(device)
        clock = TrainingClock()
        svi = make_svi(config, components, clock)
    except ConfigError:
        raise
    except (ValueError, TypeError) as error:
        raise _as_config_error(error) from None
    if not svi.parameters():
        raise ConfigError(
            f"--model {config.model} with --inner {config.inner} and --init {config.init} has no "
            "weights to train"
        )
    return TrainRun(config, components, svi, device=device, clock=clock)


# ----------------------------------------------------------------------- checkpoints
def config_from_checkpoint(payload: dict, path: str) -> TrainConfig:
    try:
        return TrainConfig(**payload["config"])
    except TypeError as error:
        raise CheckpointError(
            f"{path}: the saved configuration is not valid here: {error}"
        ) from None


def _check_step(payload: dict, config: TrainConfig, path: str) -> int:
    """The checkpoint's step, refused when it cannot be: not an integer, negative, beyond the
    saved number of steps, or different from the outer loop's count of updates."""
    step = payload["step"]
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise CheckpointError(f"{path}: impossible step {step!r} (expected an integer >= 0)")
    if step > config.steps:
        raise CheckpointError(
            f"{path}: impossible step {step}: beyond the {config.steps} steps of its configuration"
        )
    svi_state = payload.get("svi")
    updates = svi_state.get("num_updates") if isinstance(svi_state, dict) else None
    if updates is not None and updates != step:
        raise CheckpointError(
            f"{path}: impossible step {step}: the outer loop's state counts {updates} updates"
        )
    return step


def _logged_steps(folder: str) -> int | None:
    """The last training step in ``folder/metrics.jsonl``, ``None`` without a log."""
    path = os.path.join(folder, METRICS_NAME)
    if not os.path.exists(path):
        return None
    last = 0
    for record in read_metrics(path):
        if record.get("split") == "train":
            last = max(last, int(record.get("step", 0)))
    return last


def _check_finite_weights(payload: dict, path: str) -> None:
    for part in ("model", "inner", "objective", "init", "transition"):
        state = payload.get(part) or {}
        for name, value in state.items():
            if torch.is_tensor(value) and value.is_floating_point():
                if not torch.isfinite(value).all():
                    raise CheckpointError(
                        f"{path}: the weights {part}.{name} hold NaN or infinite values"
                    )


#: Options of the final test that are also the periodic validation's with
#: ``validate_as_tested``: changing them on resume would change what --select-best compares.
_TESTED_AS = ("eval_inner_steps", "eval_restarts", "restart_criterion", "eval_reinitialize")


def _check_resumed_procedure(saved: TrainConfig, config: TrainConfig) -> None:
    """The resumable options that would change a run's data or its selection all the same:
    an HDF5 run's held-out split (the larger of eval_size and test_size: its last images), with
    ``select_best`` the validation scenes it compares across the resume (``eval_size``), and
    with ``validate_as_tested`` the options of the validation it selects by."""
    if saved.dataset.startswith("hdf5:"):
        before, after = hdf5_held_out(saved), hdf5_held_out(config)
        if after != before:
            raise ConfigError(
                f"eval_size, test_size: the run holds out the last {before} images of its file "
                f"(the larger of the two); resuming with {after} would move images between its "
                "training and held-out splits"
            )
    if saved.select_best and config.select_best and config.eval_size != saved.eval_size:
        raise ConfigError(
            f"eval_size: --select-best compares every validation score with the best so far, "
            f"taken on the first {saved.eval_size} validation scenes; resuming with "
            f"{config.eval_size} would compare scores of other scenes"
        )
    if saved.validate_as_tested:
        changed = [n for n in _TESTED_AS if getattr(config, n) != getattr(saved, n)]
        if changed:
            names = ", ".join("--" + n.replace("_", "-") for n in changed)
            raise ConfigError(
                f"{names}: the run validates as it tests (validate_as_tested), so these define "
                "the validation that --select-best compares across the resume; they cannot change"
            )


def load_run(
    path: str | os.PathLike,
    overrides: dict | None = None,
    device: torch.device | None = None,
    resume: bool = False,
) -> TrainRun:
    """Rebuild a run from a checkpoint, with every state restored. Nothing is written.

    The run's folder (``config.out``) becomes the checkpoint's folder, wherever the run was
    first written.

    :param path: a checkpoint file or a folder holding ``checkpoint.pt``.
    :param dict overrides: configuration fields to change (e.g. ``steps``) before rebuilding;
        ``steps`` may not go below the checkpoint's step.
    :param device: where the run's tensors live (default: CPU).
    :param bool resume: the run is to be continued: its log must reach the checkpoint's step.
    :raises CheckpointError: for an unreadable checkpoint, one whose step is impossible, whose
        weights are not finite or whose states do not fit.
    :raises ConfigError: for overrides that do not fit the run.
    """
    path = checkpoint_path(path)
    payload = load_checkpoint(path)
    config = config_from_checkpoint(payload, path)
    step = _check_step(payload, config, path)
    folder = os.path.dirname(os.path.abspath(path))
    if resume:
        logged = _logged_steps(folder)
        if logged is not None and logged < step:
            raise CheckpointError(
                f"{path}: impossible step {step}: beyond the log, whose last update is {logged}"
            )
    _check_finite_weights(payload, path)
    overrides = {**(overrides or {}), "out": folder}
    if overrides.get("steps") is not None and overrides["steps"] < step:
        raise ConfigError(
            f"steps: the run is at step {step}; --steps is the total number of updates and "
            f"cannot go below it (got {overrides['steps']}); the run was left as it is"
        )
    saved = config
    config = TrainConfig(**{**config.to_dict(), **overrides})
    if resume:
        _check_resumed_procedure(saved, config)
    config = resolve(config)
    run = new_run(config, device)
    c = run.components
    try:
        c.model.load_state_dict(payload["model"])
        c.inner.load_state_dict(payload["inner"])
        c.objective.load_state_dict(payload["objective"])
        if c.init is not None:
            c.init.load_state_dict(payload["init"])
        if c.transition is not None:
            c.transition.load_state_dict(payload["transition"])
        run.svi.load_state_dict(payload["svi"])
        set_rng_state(payload["rng"])
        run.clock.before = float(payload.get("train_seconds", 0.0))
    except (RuntimeError, ValueError, KeyError, TypeError) as error:
        raise CheckpointError(
            f"{path}: the saved states do not fit the model: {first_line(error)}"
        ) from None
    run.step = step
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
        "transition": None if c.transition is None else c.transition.state_dict(),
        "svi": run.svi.state_dict(),
        "rng": rng_state(data_position=run.step),
        "train_seconds": run.clock.seconds(),
    }


def save_run(run: TrainRun, name: str = CHECKPOINT_NAME) -> str:
    """Write the run's checkpoint (atomically, with its SHA-256) as ``name`` in its folder
    (``checkpoint.pt``, or ``best.pt`` for ``select_best``); returns its path."""
    path = os.path.join(run.config.out, name)
    save_checkpoint(path, _payload(run))
    return path


def init_from(run: TrainRun, path: str | os.PathLike) -> int:
    """Load the weights of a finished run (a folder or checkpoint) into ``run``; its optimizer,
    schedule and update count stay fresh. Returns the finished run's number of updates. A run
    with ``--slot-sparsity`` may start from a run without it (its slot selector starts fresh).

    :raises ConfigError: one line naming ``init_from`` when the weights do not fit ``run``'s
        architecture.
    """
    source = checkpoint_path(path)
    try:
        payload = load_checkpoint(source)
    except CheckpointError as error:
        raise ConfigError(f"init_from: {first_line(error)}") from None
    c = run.components
    parts = [("model", c.model), ("inner", c.inner), ("objective", c.objective)]
    if c.init is not None and payload.get("init") is not None:
        parts.append(("init", c.init))
    if c.transition is not None and payload.get("transition") is not None:
        parts.append(("transition", c.transition))
    try:
        for key, module in parts:
            _load_weights(key, module, payload[key])
    except (RuntimeError, KeyError, TypeError, ValueError) as error:
        raise ConfigError(
            f"init_from: {source} does not hold weights of this configuration (--model "
            f"{run.config.model}, --inner {run.config.inner} and the architecture options): "
            f"{first_line(error)}"
        ) from None
    return int(payload.get("step", 0))


def _load_weights(key: str, module, state: dict) -> None:
    """``module.load_state_dict(state)``, except that a model with a slot selector
    (``--slot-sparsity``) takes the weights of a run without one and keeps its fresh selector:
    AdaSlot fine-tunes a fixed-K model."""
    selector = "slot_selector."
    if (
        key != "model"
        or getattr(module, "slot_selector", None) is None
        or any(name.startswith(selector) for name in state)
    ):
        module.load_state_dict(state)
        return
    missing, unexpected = module.load_state_dict(state, strict=False)
    others = [name for name in missing if not name.startswith(selector)]
    if others or unexpected:
        raise RuntimeError(f"missing keys {others}, unexpected keys {list(unexpected)}")


# ------------------------------------------------------------------------ run folders
def writable_folder(path: str | os.PathLike, option: str) -> str:
    """Create ``path`` if needed and check that files can be written into it.

    :param str option: the option naming the folder, for the message (e.g. ``--out``).
    :raises ConfigError: one line, when ``path`` is a file, lies below a file, or is read-only.
    """
    path = os.fspath(path)
    try:
        os.makedirs(path, exist_ok=True)
    except FileExistsError:
        raise ConfigError(f"{option}: {path} is a file, not a folder") from None
    except NotADirectoryError:
        raise ConfigError(f"{option}: {path} lies below a file, not a folder") from None
    except OSError as error:
        raise ConfigError(f"{option}: {path} cannot be created ({error.strerror})") from None
    try:
        fd, probe = tempfile.mkstemp(prefix=".write-test-", dir=path)
    except OSError as error:
        raise ConfigError(f"{option}: {path} cannot be written into ({error.strerror})") from None
    os.close(fd)
    os.unlink(probe)
    return path


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process
    return True


def _link_or_create(source: str, target: str) -> None:
    """``target`` as a hard link of ``source`` (atomic, whole); where the file system has no
    hard links, created exclusively and written (``FileExistsError`` if it exists)."""
    try:
        os.link(source, target)
        return
    except FileExistsError:
        raise
    except OSError:  # no hard links here (e.g. some network or FAT file systems)
        pass
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    with os.fdopen(fd, "w") as f, open(source) as g:
        f.write(g.read())


class RunFolder:
    """Exclusive ownership of a run folder for the lifetime of one run.

    ``acquire()`` writes ``run.lock`` (``PID HOST``) with ``O_EXCL``; a lock left by a process
    that no longer runs on this host is reclaimed, one held by a live process (or by another
    host, which cannot be checked) is refused in one line. ``release()`` removes it.

    For a fresh run, :meth:`prepare` moves a previous run aside (``--overwrite``) or refuses
    (without it); :meth:`committed` deletes the moved run once the new run has written its first
    checkpoint; :meth:`restore` puts it back when the new run fails before that.
    """

    def __init__(self, folder: str | os.PathLike):
        self.folder = os.fspath(folder)
        self.lock = os.path.join(self.folder, LOCK_NAME)
        self.aside = os.path.join(self.folder, ASIDE_NAME)
        self.owned = False
        self.moved = False

    # -------------------------------------------------------------------- the lock
    def acquire(self) -> None:
        """Take the lock (see the class docstring). :raises ConfigError: while it is held."""
        writable_folder(self.folder, "--out")
        # The lock appears whole: written under a name of this process's own, then hard-linked
        # to run.lock, which fails if the lock exists (no other run can read it half-written).
        mine = f"{self.lock}.{os.getpid()}.{uuid.uuid4().hex}"
        try:
            with open(mine, "w") as f:
                f.write(f"{os.getpid()} {socket.gethostname()}\n")
            for _ in range(3):
                try:
                    _link_or_create(mine, self.lock)
                except FileExistsError:
                    self._reclaim_or_refuse()
                    continue
                self.owned = True
                return
        except OSError as error:
            raise ConfigError(f"--out: cannot lock {self.folder}: {error.strerror}") from None
        finally:
            with contextlib.suppress(OSError):
                os.unlink(mine)
        raise ConfigError(f"--out: {self.folder} is being taken by another run; try again")

    def _reclaim_or_refuse(self) -> None:
        try:
            with open(self.lock) as f:
                text = f.read().split()
            pid, host = int(text[0]), text[1]
        except (OSError, ValueError, IndexError):
            pid, host = None, socket.gethostname()  # unreadable or half-written: stale
        if pid is not None and (host != socket.gethostname() or _alive(pid)):
            where = "" if host == socket.gethostname() else f" on {host}"
            raise ConfigError(
                f"--out: {self.folder} is in use by the run of process {pid}{where} "
                f"({self.lock}); wait for it to end or choose another --out (remove the lock "
                "file only if that run is gone)"
            )
        try:
            os.unlink(self.lock)  # stale: its process is gone
        except FileNotFoundError:
            pass

    def release(self) -> None:
        if self.owned:
            self.owned = False
            try:
                os.unlink(self.lock)
            except FileNotFoundError:
                pass

    # ------------------------------------------------------------- a fresh run's folder
    def _entries(self, folder: str) -> list[str]:
        return [n for n in RUN_ENTRIES if os.path.lexists(os.path.join(folder, n))]

    def prepare(self, overwrite: bool) -> None:
        """Make the (locked) folder ready for a fresh run; see the class docstring.

        A previous run moved aside by an ``--overwrite`` that was killed before its first
        checkpoint is put back first, so it is never lost without a new checkpoint.
        """
        if os.path.isdir(self.aside) and not os.path.exists(
            os.path.join(self.folder, CHECKPOINT_NAME)
        ):
            self._move(self.aside, self.folder, replace=True)
            shutil.rmtree(self.aside, ignore_errors=True)
        if os.path.exists(os.path.join(self.folder, CHECKPOINT_NAME)):
            if not overwrite:
                raise ConfigError(
                    f"out: {self.folder} already holds a checkpoint; continue it with --resume "
                    f"{self.folder}, pass --overwrite, or choose another --out"
                )
            shutil.rmtree(self.aside, ignore_errors=True)
            os.makedirs(self.aside)
            self._move(self.folder, self.aside)
            self.moved = True
        else:
            # No checkpoint: whatever log is there belongs to a run that died before its first
            # checkpoint, which cannot be resumed; the new run starts a fresh log.
            for name in (METRICS_NAME, CONFIG_NAME):
                path = os.path.join(self.folder, name)
                if os.path.exists(path):
                    os.unlink(path)

    def _move(self, source: str, target: str, replace: bool = False) -> None:
        for name in self._entries(source):
            destination = os.path.join(target, name)
            if replace and os.path.lexists(destination):
                if os.path.isdir(destination) and not os.path.islink(destination):
                    shutil.rmtree(destination)
                else:
                    os.unlink(destination)
            os.replace(os.path.join(source, name), destination)

    def committed(self) -> None:
        """The new run has a checkpoint: delete the run moved aside."""
        if self.moved:
            shutil.rmtree(self.aside, ignore_errors=True)
            self.moved = False

    def restore(self) -> bool:
        """The new run failed before its first checkpoint: put the previous run back.
        :returns: whether a previous run was restored."""
        if not self.moved:
            return False
        for name in self._entries(self.folder):  # what the failed run wrote
            path = os.path.join(self.folder, name)
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path)
            else:
                os.unlink(path)
        self._move(self.aside, self.folder)
        shutil.rmtree(self.aside, ignore_errors=True)
        self.moved = False
        return True
