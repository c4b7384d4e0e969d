"""``pyro-slots evaluate RUN``: metrics of a trained run on held-out or any data, and the pictures.

The data are the run's own held-out split (``dataset=None``), another generator of the same kind
(``points``, ``shapes``, ``tetrominoes``) or a benchmark file, ``hdf5:PATH``, in the layout of
:mod:`pyro_slots.data.hdf5` (every image of the file, or its first ``num``). Everything about the
data is checked before any slot is refined (:func:`evaluation_data`).

For ``gmm`` the slots of every point set are refined with the trained rule and initialization,
and the fit is compared with the set's true mixture: log-likelihood per point of the fit and of
the true parameters, ARI of the responsibilities against the true assignments, and a reference
fit (k-means++ then 100 EM steps). For image models: FG-ARI, ARI, mean IoU of the
Hungarian-matched objects, reconstruction MSE, the inner ELBO, the objects split and merged and
the number of true objects (:func:`pyro_slots.metrics.image_scores`); the segmentation is every
pixel's most probable slot under the decoder's masks; a model with a slot selector
(``SlotAutoencoder(active_slots=True)``) also reports ``kept_slots``, the number of slots it
decodes. With ``restarts`` R > 1 each datapoint keeps the restart with the highest inner ELBO
(:meth:`~pyro_slots.RefineResult.best`). The model is evaluated in evaluation mode
(``model.eval()``: a slot selector's deterministic threshold) and put back as it was.

The metrics are computed per datapoint (:func:`per_datapoint`, the rows of ``--per-image``) and
averaged (NaN-aware: FG-ARI is NaN for an image without foreground) into the flat dict that
:func:`evaluate_run` returns.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import io
import math
import os
from collections.abc import Callable
from dataclasses import dataclass

import torch

from pyro_slots import plots, refine, refine_video
from pyro_slots.checkpoint import write_atomically
from pyro_slots.data import true_log_likelihood
from pyro_slots.data.hdf5 import HDF5Dataset, open_hdf5
from pyro_slots.inner import EM
from pyro_slots.metrics import (
    AP_THRESHOLDS,
    ari,
    image_scores,
    reconstruction_mse,
    slot_keeping,
    video_fg_ari,
)
from pyro_slots.refine import best_restart

from .config import ConfigError
from .registry import (
    DATASETS,
    DETERMINISTIC_INITS,
    RESTART_CRITERIA,
    objective_targets,
    reinitialized_rule,
    set_prediction_head,
)
from .runs import (
    METRICS_NAME,
    TrainRun,
    count_option,
    load_run,
    resolve_device,
    weights_path,
    writable_folder,
)
from .streams import Batch

__all__ = [
    "DEFAULT_NUM",
    "VALIDATION",
    "Inference",
    "EvalData",
    "evaluate_run",
    "format_table",
    "chunked_metrics",
    "validation_record",
    "evaluation_mode",
    "infer",
    "kept_slots",
    "metrics_of",
    "per_datapoint",
    "evaluation_data",
    "write_per_image",
    "write_pictures",
]

#: Steps of the reference EM fit that gmm results are compared with.
REFERENCE_EM_STEPS = 100

#: Datapoints drawn from a generator when ``num`` is not given.
DEFAULT_NUM = 128

#: ``dataset`` naming the run's validation scenes (those of its periodic evaluation and
#: ``select_best``), where test-time options can be chosen without looking at the test scenes.
VALIDATION = "validation"

#: Datapoints refined at once by :func:`evaluate_run` and by the final test of training (each
#: chunk's slots are initialized with the run's seed, so the same chunks give the same scores).
CHUNK_SIZE = 100


@dataclass
class Inference:
    """Held-out data and what the trained run infers for them.

    :ivar result: the :class:`~pyro_slots.RefineResult` (one restart, the best of ``restarts``:
        ``result.slots[0]`` are the slots of the datapoints); for clips, the list of every
        frame's (:func:`~pyro_slots.refine_video`).
    """

    batch: Batch
    result: object  # RefineResult, or a list of them (one per frame)

    @property
    def frames(self) -> list:
        """The results of every frame (a single image's result as a list of one)."""
        return self.result if isinstance(self.result, list) else [self.result]

    @property
    def num_steps(self) -> int:
        return max(int(r.num_steps) for r in self.frames)

    @property
    def elbo(self) -> torch.Tensor:
        """Every datapoint's inner ELBO, ``(batch,)``: summed over the frames of a clip."""
        return sum(r.elbo[0] for r in self.frames)

    @property
    def num_measurements(self) -> int:
        """Measurements per datapoint: summed over the frames of a clip."""
        return sum(int(r.x_enc.shape[1]) for r in self.frames)


@dataclass
class EvalData:
    """Data a run is evaluated on, read a slice at a time.

    :ivar str name: ``<dataset>/held-out``, a generator's name or ``hdf5:PATH``.
    :ivar int size: number of datapoints.
    :ivar load: ``load(start, stop)`` returns the :class:`Batch` of datapoints ``start..stop-1``.
    """

    name: str
    size: int
    load: Callable[[int, int], Batch]


def _slice(batch: Batch, start: int, stop: int) -> Batch:
    truth = {k: v[start:stop] if torch.is_tensor(v) else v for k, v in batch.truth.items()}
    return Batch(batch.x[start:stop], truth)


def _generated(stream, num: int, name: str) -> EvalData:
    batch = stream.held_out(num)
    return EvalData(name, num, lambda start, stop: _slice(batch, start, stop))


def held_out_num(
    stream, num: int | None, default: int, every_image: bool = False, hint: str = ""
) -> int:
    """How many of a run's held-out datapoints to use: ``num``, else ``default``. An HDF5 run
    holds out only the last images of its file: there ``num`` may not exceed them, and the
    default is all of them with ``every_image``, else at most them.

    :raises ConfigError: for ``num`` beyond an HDF5 run's held-out images.
    """
    held_out = getattr(stream, "held_out_size", None)  # an HDF5 run: its last images
    if held_out is None:
        return default if num is None else num
    if num is not None and num > held_out:
        raise ConfigError(
            f"--num: {num} images asked for, but the run held out only {held_out} (the larger "
            f"of its --eval-size and --test-size){hint}"
        )
    if num is None:
        return held_out if every_image else min(default, held_out)
    return num


def _hdf5_data(run: TrainRun, name: str, num: int | None) -> EvalData:
    path = name[len("hdf5:") :]
    where = f"--dataset {name}"
    if not path:
        raise ConfigError("--dataset: 'hdf5:' must be followed by the file's path, e.g. hdf5:x.h5")
    kind = run.components.stream.kind
    if kind != "images":
        raise ConfigError(
            f"{where}: --model {run.config.model} was trained on "
            f"{ {'points': 'point sets', 'videos': 'clips'}[kind] }, not images; evaluate it "
            f"on its own data (omit --dataset, or --dataset {run.config.dataset})"
        )
    channels = getattr(run.components.model, "in_channels", 3)
    try:
        with open_hdf5(path) as f:
            image = f.get("image")
            rank = getattr(image, "ndim", None)
            if rank == 4 and image.shape[3] != channels:
                raise ConfigError(
                    f"{where}: images with {image.shape[3]} channels (dataset 'image' of shape "
                    f"{image.shape}), but the run's model takes {channels}-channel images"
                )
        data = HDF5Dataset(path)
    except (OSError, ValueError) as error:
        raise ConfigError(f"{where}: {error}") from None
    size = run.components.stream.image_size
    trained = (size, size) if isinstance(size, int) else tuple(size)
    if tuple(data.image_shape[1:]) != trained:
        raise ConfigError(
            f"{where}: images of {data.image_shape[1]}x{data.image_shape[2]} pixels, but the "
            f"run's model was trained on {trained[0]}x{trained[1]}"
        )
    if len(data) == 0:
        raise ConfigError(f"{where}: the file holds no images")
    if num is not None and num > len(data):
        raise ConfigError(f"--num: {num} images asked for, but {path} holds only {len(data)}")
    count = len(data) if num is None else num

    def load(start: int, stop: int) -> Batch:
        items = [data[i] for i in range(start, stop)]
        x = torch.stack([item["image"] for item in items])
        return Batch(x, {"mask": torch.stack([item["mask"] for item in items])})

    return EvalData(name, count, load)


def evaluation_data(run: TrainRun, dataset: str | None = None, num: int | None = None) -> EvalData:
    """The data to evaluate ``run`` on, checked; nothing is refined.

    :param str dataset: ``None`` (the run's own held-out split), ``"validation"`` (the run's
        validation scenes, apart from training and test), a generator's name of the run's kind
        of data, or ``hdf5:PATH``.
    :param int num: datapoints (default: on the run's own held-out data its ``test_size``, the
        data of ``test.json``, else :data:`DEFAULT_NUM` from a generator; every image of an HDF5
        file or of the run's held-out HDF5 split); >= 1.
    :raises ConfigError: for an unknown name, data of another kind, size or channel count than
        the run's model takes, a missing or misshaped file, or fewer datapoints than ``num``.
    """
    num = count_option(num, "num")
    stream = run.components.stream
    if dataset == VALIDATION:
        if hasattr(stream, "held_out_size"):
            raise ConfigError(
                "--dataset validation: an HDF5 run has no validation split apart from its "
                "held-out images; evaluate it on another file (--dataset hdf5:PATH)"
            )
        batch = stream.validation(DEFAULT_NUM if num is None else num)
        return EvalData(
            f"{run.config.dataset}/validation",
            batch.x.shape[0],
            lambda start, stop: _slice(batch, start, stop),
        )
    own = dataset == run.config.dataset and not dataset.startswith("hdf5:")
    if dataset is None or own:
        name = f"{run.config.dataset}/held-out"
        default = run.config.test_size or DEFAULT_NUM  # the final test's data: test.json again
        return _generated(
            stream,
            held_out_num(stream, num, default, every_image=True, hint="; pass --dataset hdf5:PATH"),
            name,
        )
    if not isinstance(dataset, str):
        raise ConfigError(f"--dataset: expected a name or hdf5:PATH, got {dataset!r}")
    if dataset.startswith("hdf5:"):
        return _hdf5_data(run, dataset, num)
    if dataset not in DATASETS:
        raise ConfigError(
            f"--dataset: unknown name {dataset!r}; valid choices are {list(DATASETS)}"
        )
    if DATASETS[dataset].data != stream.kind:
        raise ConfigError(
            f"--dataset {dataset}: holds {DATASETS[dataset].data}, but --model "
            f"{run.config.model} was trained on {stream.kind}"
        )
    try:
        config = dataclasses.replace(run.config, dataset=dataset)
        other = DATASETS[dataset].factory(config, dataset)
    except ValueError as error:
        raise ConfigError(f"--dataset {dataset}: {error}") from None
    if getattr(other, "image_size", None) != getattr(stream, "image_size", None):
        raise ConfigError(
            f"--dataset {dataset}: images of {other.image_size}x{other.image_size} pixels, but "
            f"the run's model was trained on {stream.image_size}x{stream.image_size}"
        )
    return _generated(other, DEFAULT_NUM if num is None else num, dataset)


@contextlib.contextmanager
def evaluation_mode(module):
    """``module.eval()`` inside the block (e.g. a slot selector's deterministic threshold), its
    former mode restored after; a module that is not an ``nn.Module`` is left alone."""
    if not isinstance(module, torch.nn.Module):
        yield module
        return
    training = module.training
    module.eval()
    try:
        yield module
    finally:
        module.train(training)


def final_test_options(
    config, inner_steps=None, restarts=None, criterion=None, reinitialize=None
) -> dict:
    """How the run's final test refines (``eval_inner_steps``, ``eval_restarts``,
    ``restart_criterion``, ``eval_reinitialize``) as :func:`infer`'s ``inner_steps``,
    ``restarts``, ``criterion`` and ``reinitialize``; an option given (not ``None``) replaces
    the run's.

    The one home of the test's procedure: the final test, the periodic validation with
    ``validate_as_tested``, and ``pyro-slots evaluate`` by default, so that ``evaluate RUN``
    repeats ``test.json``.
    """
    options = dict(
        inner_steps=config.eval_inner_steps,
        restarts=config.eval_restarts,
        criterion=config.restart_criterion,
        # A run trained with --reinitialize re-initializes with its own rule: nothing to add.
        reinitialize=config.eval_reinitialize and not config.reinitialize,
    )
    given = dict(
        inner_steps=inner_steps, restarts=restarts, criterion=criterion, reinitialize=reinitialize
    )
    options.update({k: v for k, v in given.items() if v is not None})
    return options


def infer(
    run: TrainRun,
    batch: Batch | int,
    inner_steps: int | None = None,
    restarts: int = 1,
    criterion: str = "elbo",
    carry: bool = True,
    reinitialize: bool | str = False,
) -> Inference:
    """Refine the slots of held-out datapoints with the trained rule and initialization.

    The slot initialization is seeded with the run's seed, so results are reproducible; no
    state of the run changes.

    :param batch: a :class:`Batch`, or the number of held-out datapoints to draw.
    :param int inner_steps: inner steps T (default: as in training), >= 1.
    :param int restarts: R restarts side by side, >= 1; every datapoint keeps one of them:
    :param str criterion: the highest final inner ELBO (``"elbo"``) or the lowest
        reconstruction MSE of the decoded slots (``"mse"``, image models); both read the data
        only, never the truth.
    :param bool carry: clips only: every frame starts from the slots of the frame before
        (through the run's transition), as in training; ``False`` starts every frame afresh.
    :param reinitialize: refine with the trained rule wrapped in
        :class:`~pyro_slots.inner.Reinitialize` (dead and duplicate slots redrawn from the
        run's slot initializer before every step), a run trained without it: ``True`` judges
        the slots as the run's ``reinitialize_masks`` says, or name the kind (``"decoder"``,
        ``"posterior"``, ``"attention"``; :func:`~pyro_slots.cli.registry.reinitialized_rule`).
    :raises ConfigError: for ``inner_steps`` or ``restarts`` < 1, restarts on clips or from a
        deterministic initializer (learned queries, an amortized guess), or
        ``reinitialize`` where the run has no slot initializer to draw from or already
        re-initializes.
    """
    with evaluation_mode(run.components.model):
        return _infer(run, batch, inner_steps, restarts, criterion, carry, reinitialize)


def _masks_kind(reinitialize: bool | str) -> str | None:
    return reinitialize if isinstance(reinitialize, str) else None


def _infer(run, batch, inner_steps, restarts, criterion, carry, reinitialize) -> Inference:
    config, c = run.config, run.components
    inner = c.inner
    if reinitialize:
        inner = reinitialized_rule(config, c.model, c.inner, c.init, _masks_kind(reinitialize))
    inner_steps = count_option(inner_steps, "inner_steps")
    restarts = count_option(restarts, "restarts")
    if restarts > 1 and config.init in DETERMINISTIC_INITS:
        raise ConfigError(
            f"--restarts: --init {config.init} starts every restart at the same slots, "
            f"expected 1, got {restarts}"
        )
    if isinstance(batch, int):
        batch = c.stream.held_out(batch)
    batch = on_device(batch, run.device)
    options = dict(
        num_slots=config.num_slots,
        num_steps=config.inner_steps if inner_steps is None else inner_steps,
        init=c.init,
        seed=config.seed,
    )
    if c.stream.kind == "videos":
        if restarts != 1:
            raise ConfigError(f"--restarts: clips carry one trajectory of slots, got {restarts}")
        results = refine_video(
            c.model, batch.x, inner, carry=carry, transition=c.transition, **options
        )
        return Inference(batch, results)
    result = refine(c.model, batch.x, inner, num_restarts=restarts, **options)
    if criterion == "elbo" or restarts == 1:
        return Inference(batch, result.best())
    with torch.no_grad():
        x = batch.x.repeat(restarts, *([1] * (batch.x.dim() - 1)))  # restart-major
        recon = c.model.reconstruct(c.model.encode(x), result.slots.flatten(0, 1), x_raw=x)
    size = batch.x.shape[0]
    mse = reconstruction_mse(x, recon).reshape(restarts, size)
    return Inference(batch, result.select(best_restart(-mse)))


def on_device(batch: Batch, device: torch.device) -> Batch:
    """``batch`` with its data and ground truth on ``device``."""
    truth = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.truth.items()}
    return Batch(batch.x.to(device), truth)


def _mean(t: torch.Tensor) -> float:
    return float(torch.nanmean(t.double()).item())


def _gmm_columns(run: TrainRun, inference: Inference, reference: bool = True) -> dict:
    model = run.components.model
    x, truth, result = inference.batch.x, inference.batch.truth, inference.result
    num_points = x.shape[1]
    elbo = result.elbo[0].double()
    # Assignments are enumerated exactly and there is no guide: the ELBO is the log-likelihood.
    loglik = elbo / num_points  # (S,)
    with torch.no_grad():
        true = true_log_likelihood(x, truth["means"], truth["scales"], truth["weights"]).double()
        recon = model.reconstruct(x, result.slots[0])
    columns = {
        "loglik_per_point": loglik,
        "true_loglik_per_point": true.mean(1),
        "gap_to_true_per_point": true.mean(1) - loglik,
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
        columns["reference_em_loglik_per_point"] = fit.elbo[0].double() / num_points
    columns.update(
        {
            "elbo": elbo,
            "elbo_per_point": elbo / num_points,
            "ari": ari(truth["assignments"], result.responsibilities[0]).double(),
            "mse": reconstruction_mse(x, recon).double(),
        }
    )
    return columns


def decode(model, result) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(recon (B, 3, H, W), rgb (B, K, 3, H, W), masks (B, K, H, W))`` of refined slots.

    The masks are the decoder's (``model.decode``), or, for a spatial mixture whose components
    are whole images (:class:`~pyro_slots.models.NeuralEM`), the posterior of every pixel's
    component that the inner loop computed from the Pyro program (``result.responsibilities``),
    with the posterior-weighted image as the reconstruction.
    """
    slots = result.slots[0]
    with torch.no_grad():
        if hasattr(model, "decode"):
            recon, rgb, masks = model.decode(slots)
        else:
            masks = result.responsibilities[0]  # (B, K, M)
            means = model.component_means(slots)  # (B, K, M, C)
            batch, num_slots, _, channels = means.shape
            size = model.resolution
            recon = torch.einsum("bkm,bkmc->bcm", masks, means).reshape(batch, channels, *size)
            rgb = means.transpose(-1, -2).reshape(batch, num_slots, channels, *size)
            masks = masks.reshape(batch, num_slots, *size)
    if masks.dim() == 5:
        masks = masks.squeeze(2)
    return recon, rgb, masks


def _image_columns(
    run: TrainRun, inference: Inference, reference: bool = False, decoded=None
) -> dict:
    """Per-image metrics; ``decoded`` is :func:`decode`'s output when the caller has it."""
    x, truth, result = inference.batch.x, inference.batch.truth, inference.result
    recon, _, masks = decode(run.components.model, result) if decoded is None else decoded
    scores = image_scores(truth["mask"], masks, x, recon)
    elbo = result.elbo[0].double()
    columns = {key: scores[key] for key in ("fg_ari", "ari", "mean_iou", "mse")}
    columns["elbo"] = elbo
    columns["elbo_per_measurement"] = elbo / result.x_enc.shape[1]
    for key in ("objects_split", "objects_merged", "num_objects"):
        columns[key] = scores[key]
    kept = kept_slots(run.components.model, result.slots[0])
    if kept is not None:
        columns["kept_slots"] = kept
    return columns


def kept_slots(model, slots: torch.Tensor) -> torch.Tensor | None:
    """The number of slots ``(batch,)`` (float64) the decoder of ``model`` keeps from ``slots``
    ``(batch, K, D)`` in evaluation mode, or ``None`` for a model without a slot selector
    (``model.slot_selector``, :class:`~pyro_slots.models.SlotSelector`)."""
    selector = getattr(model, "slot_selector", None)
    if selector is None:
        return None
    with torch.no_grad(), evaluation_mode(selector):
        return selector(slots).num_kept.double()


def _video_columns(run: TrainRun, inference: Inference, reference: bool = False) -> dict:
    """The image metrics of every frame averaged over the clip, and the clip's own: FG-ARI
    over all its pixels at once (:func:`~pyro_slots.metrics.video_fg_ari`, a slot must keep its
    object) and the share of objects that keep their slot
    (:func:`~pyro_slots.metrics.slot_keeping`)."""
    x, truth = inference.batch.x, inference.batch.truth
    frames, masks = [], []
    for t, result in enumerate(inference.frames):
        one = Inference(Batch(x[:, t], {"mask": truth["mask"][:, t]}), result)
        decoded = decode(run.components.model, result)
        frames.append(_image_columns(run, one, decoded=decoded))
        masks.append(decoded[2])
    columns = {key: torch.stack([f[key] for f in frames]).double().mean(0) for key in frames[0]}
    columns["elbo"] = inference.elbo.double()
    columns["elbo_per_measurement"] = columns["elbo"] / inference.num_measurements
    masks = torch.stack(masks, 1).cpu()  # (B, T, K, H, W)
    columns["video_fg_ari"] = video_fg_ari(truth["mask"].cpu(), masks)
    columns["slot_keeping"] = slot_keeping(truth["mask"].cpu(), masks)
    return columns


def task_objective(run: TrainRun, inference: Inference) -> torch.Tensor:
    """The task objective J of every held-out datapoint at its refined slots, ``(batch,)``
    (summed over the frames of a clip, as in training)."""
    c = run.components
    x = inference.batch.x
    with torch.no_grad():
        if c.stream.kind == "videos":
            return sum(
                c.objective(c.model, x[:, t], c.model.encode(x[:, t]), result.slots[0])
                for t, result in enumerate(inference.frames)
            )
        x_enc = c.model.encode(x)
        targets = objective_targets(c.objective, inference.batch.truth)  # set prediction
        return c.objective(c.model, x, x_enc, inference.result.slots[0], *targets)


def per_datapoint(run: TrainRun, inference: Inference, reference: bool = True) -> dict:
    """Every metric of every datapoint: ``{name: (batch,) CPU tensor}``, ``J`` first.

    :param bool reference: include the gmm reference fit (100 EM steps).
    """
    kind = {"points": _gmm_columns, "images": _image_columns, "videos": _video_columns}[
        run.components.stream.kind
    ]
    with evaluation_mode(run.components.model):
        columns = {"J": task_objective(run, inference).detach().double()}
        columns.update(kind(run, inference, reference))
    return {k: v.detach().cpu() for k, v in columns.items()}


def _means(columns: dict) -> dict:
    return {key: _mean(value) for key, value in columns.items()}


def metrics_of(run: TrainRun, inference: Inference, reference: bool = True) -> dict:
    """The mean metrics of one :class:`Inference` (see the module docstring).

    :param bool reference: include the gmm reference fit (100 EM steps).
    """
    metrics = {
        "num_datapoints": int(inference.batch.x.shape[0]),
        "inner_steps": inference.num_steps,
    }
    metrics.update(_means(per_datapoint(run, inference, reference)))
    return metrics


def _check_per_image_path(path: str | os.PathLike) -> str:
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise ConfigError(f"--per-image: {path!r} is a folder; expected a .csv file name")
    if not os.path.isdir(folder) or not os.access(folder, os.W_OK):
        raise ConfigError(f"--per-image: cannot write into the folder {folder!r}")
    return path


def write_per_image(path: str | os.PathLike, columns: dict, index=None) -> str:
    """Write one CSV row per datapoint, atomically (a temporary file renamed over ``path``).

    The first column is ``index`` (the datapoint's position in the evaluated data), then one
    column per entry of ``columns``, numbers written exactly (``repr``) so that the column means
    equal the means :func:`evaluate_run` returns.

    :param dict columns: ``{name: (N,) tensor}``.
    :param index: the ``N`` indices (default ``0..N-1``).
    :returns: ``path``.
    """
    path = _check_per_image_path(path)
    size = len(next(iter(columns.values())))
    index = range(size) if index is None else index
    values = [c.tolist() for c in columns.values()]
    text = io.StringIO(newline="")
    writer = csv.writer(text)
    writer.writerow(["index", *columns])
    for row, i in enumerate(index):
        writer.writerow([i, *(repr(v[row]) for v in values)])
    write_atomically(path, text.getvalue())
    return path


def evaluate_run(
    run: TrainRun | str | os.PathLike,
    dataset: str | EvalData | None = None,
    num: int | None = None,
    inner_steps: int | None = None,
    restarts: int | None = None,
    per_image: str | os.PathLike | None = None,
    device: str | torch.device = "cpu",
    chunk_size: int = CHUNK_SIZE,
    criterion: str | None = None,
    carry: bool = True,
    reinitialize: bool | str | None = None,
    weights: str | None = None,
) -> dict:
    """Metrics of a trained run on held-out or any data (a flat dict of numbers), the Python
    form of ``pyro-slots evaluate``.

    Example::

        >>> metrics = evaluate_run("runs/tetrominoes", dataset="hdf5:test.h5", restarts=3)
        >>> metrics["fg_ari"]

    :param run: a :class:`TrainRun`, or a checkpoint file or run folder (loaded on ``device``).
    :param str weights: a run folder's ``"best"`` (``best.pt``, the weights its final test used)
        or ``"last"`` (``checkpoint.pt``) weights; by default ``best`` where the folder has them
        (:func:`~pyro_slots.cli.runs.weights_path`).
    :param dataset: a name, see :func:`evaluation_data` (default: the run's own held-out
        split), or the :class:`EvalData` it returned (``num`` is then ignored).
    :param int num: datapoints (see :func:`evaluation_data`).
    :param int inner_steps: inner steps T. ``inner_steps``, ``restarts``, ``criterion`` and
        ``reinitialize`` default to the run's final test (:func:`final_test_options`: its
        ``eval_inner_steps``, else the training T, ...), so the defaults repeat ``test.json``.
    :param int restarts: restarts per datapoint, one kept by ``criterion``.
    :param str criterion: ``"elbo"`` or ``"mse"``, as :func:`infer`.
    :param per_image: a CSV file to write one row per datapoint into (:func:`write_per_image`).
    :param bool carry: clips: carry the slots from frame to frame (``False``: every frame
        starts afresh, the per-frame baseline of the same weights).
    :param reinitialize: re-initialize dead and duplicate slots at test time: ``True``, or
        the kind of masks that judges them (:func:`infer`); ``False``: not even where the
        run's test does (``eval_reinitialize``).
    :param int chunk_size: datapoints refined at once. The slot initialization of each chunk is
        drawn with the run's seed, so a datapoint's scores depend on its position within its
        chunk (and are reproducible for the same ``num`` and ``chunk_size``).
    :returns: ``step``, ``dataset``, ``num_datapoints``, ``inner_steps``, ``restarts`` and the
        mean of every column of :func:`per_datapoint`.
    :raises ConfigError: for bad options or data (before any slot is refined).
    :raises CheckpointError: for an unreadable checkpoint.
    """
    if not isinstance(run, TrainRun):
        run = load_run(weights_path(run, weights), {"tensorboard": False}, resolve_device(device))
    elif weights is not None:
        raise ConfigError("weights: chooses a run folder's checkpoint; run is already loaded")
    options = final_test_options(
        run.config,
        inner_steps=inner_steps,
        restarts=restarts,
        criterion=criterion,
        reinitialize=reinitialize,
    )
    inner_steps, restarts = options["inner_steps"], options["restarts"]
    criterion, reinitialize = options["criterion"], options["reinitialize"]
    restarts = count_option(restarts, "restarts")
    inner_steps = count_option(inner_steps, "inner_steps")
    chunk_size = count_option(chunk_size, "chunk_size")
    if criterion not in RESTART_CRITERIA:
        raise ConfigError(
            f"criterion: unknown kind {criterion!r}; valid choices are {RESTART_CRITERIA}"
        )
    if reinitialize:  # checked before any work
        c = run.components
        reinitialized_rule(run.config, c.model, c.inner, c.init, _masks_kind(reinitialize))
    data = dataset if isinstance(dataset, EvalData) else evaluation_data(run, dataset, num)
    if per_image is not None:
        _check_per_image_path(per_image)
    parts, steps = [], 0
    for start in range(0, data.size, chunk_size):
        batch = data.load(start, min(start + chunk_size, data.size))
        inference = infer(run, batch, inner_steps, restarts, criterion, carry, reinitialize)
        steps = max(steps, inference.num_steps)
        parts.append(per_datapoint(run, inference))
    columns = {key: torch.cat([p[key] for p in parts]) for key in parts[0]}
    if per_image is not None:
        write_per_image(per_image, columns)
    return {
        "step": run.step,
        "dataset": data.name,
        "num_datapoints": data.size,
        "inner_steps": steps,
        "restarts": restarts,
        **({"restart_criterion": criterion} if restarts > 1 else {}),
        **({"reinitialize": reinitialize} if reinitialize else {}),
        **({"carry": carry} if run.components.stream.kind == "videos" else {}),
        **_means(columns),
    }


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


def write_pictures(
    run: TrainRun,
    folder: str,
    num: int = 4,
    data: EvalData | None = None,
    inner_steps: int | None = None,
    restarts: int = 1,
    reinitialize: bool = False,
) -> list[str]:
    """Write the run's pictures into ``folder``; returns their paths.

    ``training_curve.png`` (when the run's ``metrics.jsonl`` exists), ``inner_elbo.png``, and
    ``gmm_fits.png`` (gmm) or ``slots.png`` (image models) for ``num`` datapoints of ``data``
    (:func:`evaluation_data`; default: the run's held-out split), refined as :func:`infer`
    refines them.

    :raises ConfigError: when ``folder`` cannot be created or written into.
    """
    writable_folder(folder, "pictures")
    with evaluation_mode(run.components.model):
        return _write_pictures(run, folder, num, data, inner_steps, restarts, reinitialize)


def _write_pictures(run, folder, num, data, inner_steps, restarts, reinitialize) -> list[str]:
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
    data = evaluation_data(run) if data is None else data
    batch = data.load(0, min(max(num, 32), data.size))
    inference = infer(run, batch, inner_steps, restarts, reinitialize=reinitialize)
    result = inference.frames[0]
    path = os.path.join(folder, "inner_elbo.png")
    first = " (the first frame of every clip)" if len(inference.frames) > 1 else ""
    plots.plot_inner_elbo(
        result.history[:, 0].cpu(),
        result.x_enc.shape[1],
        path,
        title=f"inner loop ({config.inner}, {result.num_steps} steps) on held-out data{first}, "
        f"after {run.step} updates",
    )
    written.append(path)
    x = inference.batch.x[:num]
    if run.components.stream.kind == "videos":
        # The frames of the first clip, one row each: a slot keeps its colour over time.
        parts = [decode(model, r) for r in inference.frames]
        recon, rgb, masks = (torch.stack([p[i][0] for p in parts]).cpu() for i in range(3))
        path = os.path.join(folder, "slots.png")
        titles = [f"frame {t}" for t in range(masks.shape[0])]
        plots.plot_slot_masks(masks, images=x[0].cpu(), recon=recon, rgb=rgb,
                              max_datapoints=None, titles=titles, path=path)  # fmt: skip
        written.append(path)
        return written
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


def chunked_metrics(
    run: TrainRun,
    batch: Batch,
    inner_steps=None,
    restarts=1,
    criterion="elbo",
    reinitialize=False,
    reference: bool = True,
) -> dict:
    """:func:`metrics_of` of :func:`infer`, over chunks of :data:`CHUNK_SIZE` datapoints (those
    of ``pyro-slots evaluate``, which so repeats the final test and the periodic validation
    exactly): every metric is the mean over all the datapoints' values, those that are NaN
    left out (an image without foreground has no FG-ARI), as :func:`evaluate_run` takes it."""
    num = batch.x.shape[0]
    head = set_prediction_head(run.components.objective)
    columns, count, slots, steps = {}, 0, [], None
    for i in range(0, num, CHUNK_SIZE):
        part = _slice(batch, i, i + CHUNK_SIZE)
        size = part.x.shape[0]
        inference = infer(run, part, inner_steps, restarts, criterion, reinitialize=reinitialize)
        if head is not None:
            slots.append(inference.result.slots[0])
        for key, value in per_datapoint(run, inference, reference).items():
            columns.setdefault(key, []).append(value)
        count += size
        steps = inference.num_steps
    out = {"num_datapoints": count, "inner_steps": int(steps)}
    out.update(_means({key: torch.cat(parts) for key, parts in columns.items()}))
    if head is not None:
        # The average precision of the head's predictions at every distance threshold, over all
        # the test data at once (predictions ranked by confidence across datapoints).
        targets = [t.to(run.device) for t in head.targets_from_batch(batch.truth)]
        aps = head.average_precisions(torch.cat(slots), *targets, thresholds=AP_THRESHOLDS)
        out["ap"] = {("inf" if math.isinf(t) else str(t)): ap for t, ap in aps.items()}
    return out


def validation_record(run: TrainRun, batch: Batch, **options) -> dict:
    """Task objective, inner ELBO and segmentation scores on the validation data.

    The slots are refined by :func:`pyro_slots.refine` with a fixed seed rather than by
    ``NestedSVI.evaluate_loss``, so every evaluation starts from the same initialization and
    no state of the run (outer-loop generator, global RNG) changes.

    :param options: :func:`infer`'s keyword options (``inner_steps``, ``restarts``,
        ``criterion``, ``reinitialize``; default: as in training); given any, the record
        names its T.
    """
    cpu_state = torch.get_rng_state()
    try:
        metrics = chunked_metrics(run, batch, **options, reference=False)
    finally:
        torch.set_rng_state(cpu_state)
    record = {"step": run.step, "split": "validation", "J": metrics.pop("J")}
    if options:
        record["inner_steps"] = metrics["inner_steps"]
    record["elbo"] = metrics["elbo"]
    # a point set's measurements are its points
    record["elbo_per_measurement"] = metrics.get(
        "elbo_per_measurement", metrics.get("elbo_per_point")
    )
    for key in ("fg_ari", "ari", "mse", "loglik_per_point", "true_loglik_per_point",
                "video_fg_ari", "slot_keeping", "kept_slots"):  # fmt: skip
        if key in metrics:
            record[key] = metrics[key]
    return record
