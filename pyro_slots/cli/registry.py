"""Names the command line accepts, each mapped explicitly to a factory.

Four registries — :data:`MODELS`, :data:`INNER_RULES`, :data:`OBJECTIVES`, :data:`DATASETS` —
map a name to a small entry with its factory and what it requires. :func:`resolve` checks a
:class:`~pyro_slots.cli.config.TrainConfig` against them before anything is trained: unknown names
list the valid ones, incompatible combinations are refused with the reason, and the ``None``
fields get the model's or rule's defaults. :func:`build` then makes the objects.

The core classes are imported with this module; the factories of the optional ones (Slot
Attention, the slot autoencoder, IODINE, the learned gradient rule) import their modules when
called, so a name whose module is not part of this installation fails with a clear message
instead of breaking the whole command line.
"""

from __future__ import annotations

import dataclasses
import importlib
import math
import os
from collections.abc import Callable
from dataclasses import dataclass

import torch

from pyro_slots.data import shapes, tetrominoes
from pyro_slots.init import AmortizedInit, GaussianInit, LearnedQueries, SlotTransition
from pyro_slots.inner import (
    EM,
    GeneralizedEM,
    GradientAscent,
    Reinitialize,
    SoftKMeans,
    decoder_masks,
    masks_of,
    posterior_masks,
)
from pyro_slots.models import GaussianMixture
from pyro_slots.nested import GRADIENT_MODES
from pyro_slots.objectives import NegativeELBO, Reconstruction, SetPrediction, WeightedSum
from pyro_slots.validation import CapabilityError

from .config import ConfigError, TrainConfig
from .streams import HELD_OUT_START, HDF5Stream, ImageStream, PointStream, VideoStream

__all__ = [
    "DATASETS",
    "DETERMINISTIC_INITS",
    "INIT_KINDS",
    "INNER_RULES",
    "MODELS",
    "OBJECTIVES",
    "Components",
    "build",
    "objective_targets",
    "set_prediction_head",
    "reaches_init",
    "resolve",
]

INIT_KINDS = ("auto", "model", "learned", "queries", "amortized", "fixed")
#: The initializers that start every restart of a datapoint at the same slots.
DETERMINISTIC_INITS = ("queries", "amortized")
#: Test-time restart criteria (``restart_criterion``).
RESTART_CRITERIA = ("elbo", "mse")
#: What re-initialization judges dead and duplicate slots by (``reinitialize_masks``).
REINITIALIZE_MASKS = ("decoder", "posterior", "attention")
#: Learning-rate schedules after the warm-up (``lr_schedule``).
LR_SCHEDULES = ("constant", "cosine")
#: The inner mixtures of the slot autoencoder (``mixture``), as ``models.slot_autoencoder``.
MIXTURES = ("isotropic", "diagonal")
#: How the slots of a clip's frame start the next (``transition``).
TRANSITIONS = ("identity", "mlp")


def _import(module: str, name: str, what: str):
    """``module.name``, or a :class:`ConfigError` saying that ``what`` is not installed."""
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as error:
        raise ConfigError(
            f"{what} is not available in this installation ({module}.{name}: {error})"
        ) from None


# ---------------------------------------------------------------------------- models
@dataclass(frozen=True)
class ModelEntry:
    """:ivar data: ``"points"`` or ``"images"`` (image models also take clips, frame by frame);
    :ivar objective: default task objective;
    :ivar closed_form: the model has the closed-form M-step EM and soft k-means need."""

    factory: Callable
    data: str
    objective: str
    closed_form: bool
    description: str
    #: The model's own slot initializer (``slot_init``) has trained weights.
    learned_init: bool = False


def _gmm(config: TrainConfig, stream):
    options = (
        {} if config.init_lloyd_steps is None else {"init_lloyd_steps": config.init_lloyd_steps}
    )
    if config.gmm_init is not None:
        options["init"] = config.gmm_init
    if config.init_local_trials is not None:
        options["init_local_trials"] = config.init_local_trials
    return GaussianMixture(config.num_slots, stream.dim, **options)


def int_list(text: str | None, name: str, example: str = "2,1,2,1") -> tuple[int, ...] | None:
    """``"2,1,2,1"`` as ``(2, 1, 2, 1)`` (``None`` stays ``None``).

    :raises ConfigError: naming ``name`` (and showing ``example``) unless every entry is an
        integer >= 1.
    """
    if text is None:
        return None
    try:
        values = tuple(int(v) for v in str(text).split(","))
    except ValueError:
        values = ()
    if not values or min(values) < 1:
        raise ConfigError(f"{name}: expected positive integers like {example}, got {text!r}")
    return values


def _architecture(config: TrainConfig) -> dict:
    """The architecture options given (``None`` ones left to the model's defaults)."""
    sizes = {
        "decoder_resolution": config.decoder_resolution,
        "decoder_channels": int_list(config.decoder_channels, "decoder_channels"),
        "decoder_upsample": config.decoder_upsample,
        "kernel_size": config.kernel_size,
    }
    if config.model == "slot-autoencoder":
        sizes["encoder_strides"] = int_list(config.encoder_strides, "encoder_strides")
        sizes["mixture"] = None if config.mixture == "isotropic" else config.mixture
        sizes["active_slots"] = True if config.slot_sparsity > 0 else None
    if config.model == "iodine":
        sizes["pixel_scale"] = config.pixel_scale
    return {k: v for k, v in sizes.items() if v is not None}


def _neural_em(config: TrainConfig, stream):
    cls = _import("pyro_slots.models", "NeuralEM", "neural-em")
    sizes = {
        "pixel_scale": config.pixel_scale,
        "decoder_channels": int_list(config.decoder_channels, "decoder_channels"),
        "num_upsample": config.decoder_upsample,
        "kernel_size": config.kernel_size,
    }
    # (the broadcast grid: NeuralEM's default, the smallest that the upsampling takes to the
    # image's size or beyond; floor(size / 2^U) fell short of odd sizes)
    return cls(
        stream.image_size,
        num_slots=config.num_slots,
        slot_dim=config.slot_dim,
        **{k: v for k, v in sizes.items() if v is not None},
    )


def _image_model(cls, config: TrainConfig, stream, **slot_size):
    factory = cls.paper_size if config.paper_size else cls
    return factory(
        image_size=stream.image_size, num_slots=config.num_slots, **slot_size,
        **_architecture(config),
    )  # fmt: skip


def _slot_autoencoder(config: TrainConfig, stream):
    cls = _import("pyro_slots.models", "SlotAutoencoder", "slot-autoencoder")
    return _image_model(cls, config, stream, feature_dim=config.slot_dim)


def _iodine(config: TrainConfig, stream):
    cls = _import("pyro_slots.models", "IODINE", "iodine")
    return _image_model(cls, config, stream, latent_dim=config.slot_dim)


MODELS = {
    "gmm": ModelEntry(
        _gmm, "points", "elbo", True, "Gaussian mixture per point set (slots = its components)"
    ),
    "slot-autoencoder": ModelEntry(
        _slot_autoencoder,
        "images",
        "reconstruction",
        True,
        "Slot Attention autoencoder: CNN encoder, inner mixture, spatial-broadcast decoder",
        learned_init=True,
    ),
    "iodine": ModelEntry(
        _iodine,
        "images",
        "elbo",
        False,
        "IODINE: spatial Gaussian mixture of decoded slots",
        learned_init=True,
    ),
    "neural-em": ModelEntry(
        _neural_em,
        "images",
        "elbo",
        False,
        "Neural EM: every pixel from one of K slots, each decoded to a whole image of means",
        learned_init=True,
    ),
}

#: Default slot sizes of the image models (CPU-sized, ``--paper-size``).
SLOT_DIMS = {"slot-autoencoder": (64, 64), "iodine": (16, 32), "neural-em": (32, 64)}


# ------------------------------------------------------------------------ inner rules
@dataclass(frozen=True)
class InnerEntry:
    """:ivar learned: the rule owns trained weights; :ivar closed_form: it needs the model's
    closed-form M-step."""

    factory: Callable
    learned: bool
    closed_form: bool
    num_steps: int
    description: str


def _em(config, model):
    return EM(num_steps=config.inner_steps)


def _soft_kmeans(config, model):
    # Default: the model's own variance (SlotAutoencoder's σ²), so that the rule is exact EM of
    # the model's inner mixture; 1 for models without one.
    temperature = config.temperature
    if temperature is None:
        temperature = getattr(model, "variance", 1.0)
    return SoftKMeans(num_steps=config.inner_steps, temperature=temperature)


def _generalized_em(config, model):
    # Neural EM's fixed rule: exact E-step, one gradient step on the expected complete
    # log-likelihood as the M-step (Greff et al. 2017), within a trust radius.
    step_size = 1.0 if config.step_size is None else config.step_size
    return GeneralizedEM(
        num_steps=config.inner_steps, ascent_steps=1, step_size=step_size, safeguarded=False
    )


def _rnn_em(config, model):
    cls = _import("pyro_slots.inner", "RNNEM", "rnn-em")
    return cls(
        config.inner_steps,
        slot_dim=model.slot_dim,
        num_measurements=getattr(model, "num_pixels", 1),
        channels=getattr(model, "channels", 1),
        hidden_dim=config.hidden_dim,
    )


def _gradient(config, model):
    return GradientAscent(num_steps=config.inner_steps, step_size=config.step_size, adam=True)


def _slot_attention(config, model):
    cls = _import("pyro_slots.inner", "SlotAttention", "slot-attention")
    if config.dataset == "points":
        # Low-dimensional points: a per-point MLP before the attention (or, features: gaussian,
        # the standardized points' statistics as keys), and the attention-weighted moments for
        # the readout (see SlotAttention's docstring).
        features = {}
        if config.features == "gaussian":
            encoder = _import("pyro_slots.inner", "GaussianFeatures", "features: gaussian")
            dim = model.feature_dim
            features = {"encoder": encoder(dim), "feature_dim": 2 * dim + 1, "norm_inputs": False}
        return cls(
            config.inner_steps,
            slot_dim=model.slot_dim,
            input_dim=model.feature_dim,
            hidden_dim=config.hidden_dim,
            moments=True,
            **features,
        )
    # Images: the paper's module, the slots are the hidden vectors.
    return cls(
        config.inner_steps,
        slot_dim=model.slot_dim,
        input_dim=model.feature_dim,
        hidden_dim=model.slot_dim,
        encoder=False,
    )


def _learned_gradient(config, model):
    cls = _import("pyro_slots.inner", "LearnedGradient", "learned-gradient")
    extra = {}
    if config.refinement_inputs:  # IODINE's image-sized auxiliary inputs, per slot
        inputs = _import("pyro_slots.models", "RefinementInputs", "refinement_inputs")
        features = inputs(out_dim=32, pooling=config.refinement_pooling)
        extra = {"features": features, "extra_dim": 32}
    return cls(
        config.inner_steps,
        slot_dim=model.slot_dim,
        hidden_dim=config.hidden_dim,
        preprocessing="log_sign" if config.dataset == "points" else "layernorm",
        **extra,
    )


INNER_RULES = {
    "em": InnerEntry(_em, False, True, 5, "expectation-maximization (closed form)"),
    "soft-kmeans": InnerEntry(_soft_kmeans, False, True, 5, "soft k-means (closed form)"),
    "gradient": InnerEntry(_gradient, False, False, 20, "per-datapoint Adam ascent on the ELBO"),
    "slot-attention": InnerEntry(
        _slot_attention, True, False, 3, "Slot Attention update (learned)"
    ),
    "learned-gradient": InnerEntry(
        _learned_gradient, True, False, 5, "learned update from the ELBO gradient (IODINE-style)"
    ),
    "generalized-em": InnerEntry(
        _generalized_em,
        False,
        False,
        5,
        "generalized EM: exact E-step, one gradient step as the M-step (Neural EM's fixed rule)",
    ),
    "rnn-em": InnerEntry(
        _rnn_em, True, False, 5, "RNN-EM: a recurrent cell fed the weighted errors (learned)"
    ),
}


#: The rule each model trains with when --inner is not given.
DEFAULT_INNER = {
    "gmm": "em",
    "slot-autoencoder": "slot-attention",
    "iodine": "learned-gradient",
    "neural-em": "generalized-em",
}


# ------------------------------------------------------------------------- objectives
def _elbo_objective(config, model):
    return NegativeELBO()


def _reconstruction_objective(config, model):
    return Reconstruction()


def mse_weight(config: TrainConfig, model) -> float:
    """The weight of the MSE in ``--objective elbo+mse``: ``--mse-weight``, by default
    ``C·H·W / (2 σ_x²)``, which makes the term the negative log-likelihood (up to a constant) of
    the image under a Gaussian of IODINE's pixel scale centred on the decoded mean image -- the
    scale of the ELBO's own likelihood term."""
    if config.mse_weight is not None:
        return config.mse_weight
    return model.in_channels * model.num_measurements / (2.0 * model.pixel_scale**2)


def _elbo_mse_objective(config, model):
    return WeightedSum([NegativeELBO(), Reconstruction()], [1.0, mse_weight(config, model)])


#: Attribute classes of the generators: (shape classes, colour classes, has a scale).
def _attributes(dataset: str) -> tuple[int, int, bool]:
    if dataset == "tetrominoes":
        return len(tetrominoes.TETROMINO_NAMES), len(tetrominoes.COLOR_NAMES), False
    return len(shapes.SHAPE_NAMES), len(shapes.COLOR_NAMES), True


def _set_prediction_head(config, model):
    num_shapes, num_colors, has_scale = _attributes(config.dataset)
    return SetPrediction(model.slot_dim, num_shapes, num_colors, predict_scale=has_scale)


def _reconstruction_set_objective(config, model):
    parts = [Reconstruction(), _set_prediction_head(config, model)]
    return WeightedSum(parts, weights=[1.0, config.set_prediction_weight])


@dataclass(frozen=True)
class ObjectiveEntry:
    """:ivar models: the models it applies to (``None``: every model); :ivar targets: it reads
    the generators' object attributes (set prediction)."""

    factory: Callable
    models: tuple | None
    targets: bool
    description: str


OBJECTIVES = {
    "elbo": ObjectiveEntry(_elbo_objective, None, False, "negative ELBO of the final slots"),
    "reconstruction": ObjectiveEntry(
        _reconstruction_objective, None, False, "MSE of the decoded final slots"
    ),
    "elbo+mse": ObjectiveEntry(
        _elbo_mse_objective,
        ("iodine",),
        False,
        "negative ELBO plus --mse-weight times the MSE of the decoded mean image",
    ),
    "set-prediction": ObjectiveEntry(
        _set_prediction_head,
        ("slot-autoencoder", "iodine"),
        True,
        "Hungarian-matched object attributes predicted from the final slots",
    ),
    "reconstruction+set-prediction": ObjectiveEntry(
        _reconstruction_set_objective,
        ("slot-autoencoder", "iodine"),
        True,
        "reconstruction MSE plus --set-prediction-weight times set prediction",
    ),
}


def set_prediction_head(objective) -> SetPrediction | None:
    """The :class:`~pyro_slots.objectives.SetPrediction` of ``objective`` (itself or a part of
    a :class:`~pyro_slots.objectives.WeightedSum`), ``None`` without one."""
    for part in getattr(objective, "parts", [objective]):
        if isinstance(part, SetPrediction):
            return part
    return None


def objective_targets(objective, truth: dict) -> tuple:
    """The targets ``objective`` takes beside the slots: the set-prediction targets read from a
    batch's ground truth (``truth``, the generator's attribute keys), else none."""
    head = set_prediction_head(objective)
    return () if head is None else head.targets_from_batch(truth)


# --------------------------------------------------------------------------- datasets
def _points_stream(config: TrainConfig, name: str):
    return PointStream(
        config.seed, config.batch_size, config.num_points, config.num_components, config.dim
    )


def _image_stream(config: TrainConfig, name: str):
    return ImageStream(name, config.seed, config.batch_size, config.image_size)


def _video_stream(config: TrainConfig, name: str):
    frames = 8 if config.num_frames is None else config.num_frames
    return VideoStream(config.seed, config.batch_size, frames, config.image_size)


def hdf5_held_out(config: TrainConfig) -> int:
    """Images an HDF5 run holds out at the end of its file, for the validation and the final
    test alike: the larger of ``eval_size`` and ``test_size``."""
    return max(config.eval_size, config.test_size)


def _hdf5_stream(config: TrainConfig, name: str):
    path = name[len("hdf5:") :]
    if not path:
        raise ConfigError("dataset: 'hdf5:' must be followed by the file's path, e.g. hdf5:x.h5")
    try:
        return HDF5Stream(path, config.seed, config.batch_size, hdf5_held_out(config))
    except (OSError, ValueError) as error:
        raise ConfigError(f"dataset {name!r}: {error}") from None


@dataclass(frozen=True)
class DatasetEntry:
    factory: Callable
    data: str
    description: str


DATASETS = {
    "points": DatasetEntry(_points_stream, "points", "point sets from random Gaussian mixtures"),
    "shapes": DatasetEntry(_image_stream, "images", "multi-dSprites-like scenes, 64x64"),
    "tetrominoes": DatasetEntry(_image_stream, "images", "three Tetris pieces, 35x35"),
    "moving-shapes": DatasetEntry(
        _video_stream, "videos", "clips of 2-3 moving, bouncing shapes, 32x32, 8 frames"
    ),
    "hdf5:PATH": DatasetEntry(_hdf5_stream, "images", "a benchmark HDF5 file"),
}


def _dataset_entry(name: str) -> DatasetEntry:
    key = "hdf5:PATH" if name.startswith("hdf5:") else name
    if key not in DATASETS:
        raise ConfigError(f"dataset: unknown name {name!r}; valid choices are {list(DATASETS)}")
    return DATASETS[key]


def _choice(registry: dict, value: str, what: str):
    if value not in registry:
        raise ConfigError(f"{what}: unknown name {value!r}; valid choices are {list(registry)}")
    return registry[value]


# ---------------------------------------------------------------------- resolve, build
def _check_positive(config: TrainConfig) -> None:
    """The options only the command line uses (data streams, schedule, logging). What the
    models, rules and NestedSVI take is checked by their constructors (:func:`build`)."""
    for name in (
        "steps",
        "batch_size",
        "eval_size",
        "checkpoint_every",
        "num_points",
        "num_components",
        "dim",
        "slot_dim",
        "hidden_dim",
        "image_size",
        "num_frames",
    ):
        value = getattr(config, name)
        if value is not None and value < 1:
            raise ConfigError(f"{name}: expected an integer >= 1, got {value}")
    for name in ("lr", "pixel_scale", "pixel_scale_start"):
        value = getattr(config, name)
        if value is not None and not 0 < value < math.inf:
            raise ConfigError(f"{name}: expected a finite number > 0, got {value}")
    if config.eval_every < 0:
        raise ConfigError(f"eval_every: expected an integer >= 0, got {config.eval_every}")
    if config.pixel_scale_ramp < 0:
        raise ConfigError(
            f"pixel_scale_ramp: expected an integer >= 0, got {config.pixel_scale_ramp}"
        )
    if (config.pixel_scale_start is None) != (config.pixel_scale_ramp == 0):
        raise ConfigError(
            "pixel_scale_start, pixel_scale_ramp: give both (sigma_x moves from the start to "
            "--pixel-scale over the ramp's updates) or neither"
        )
    if config.seed < 0:
        raise ConfigError(f"seed: expected an integer >= 0, got {config.seed}")


def reaches_init(config: TrainConfig, num_steps: int) -> bool:
    """Whether J's gradient reaches the slot initializer: through every one of the
    ``num_steps`` inner steps (``unrolled``, or ``truncated`` no shorter than T)."""
    if config.gradient not in GRADIENT_MODES:
        return True  # refused by NestedSVI when the run is built
    return config.gradient == "unrolled" or (
        config.gradient == "truncated" and config.truncate >= num_steps
    )


#: Options only some models take: (those models, what it is).
_MODEL_ONLY = {
    "encoder_strides": (("slot-autoencoder",), "the other models have no encoder"),
    "pixel_scale": (("iodine", "neural-em"), "the pixel likelihood's sigma_x"),
    "pixel_scale_start": (("iodine", "neural-em"), "a ramp of the pixel likelihood's sigma_x"),
    "refinement_inputs": (("iodine",), "IODINE's auxiliary refinement inputs"),
    "mse_weight": (("iodine",), "the weight of --objective elbo+mse"),
    "mixture": (("slot-autoencoder",), "the inner mixture over its encoder's features"),
    "slot_sparsity": (("slot-autoencoder",), "AdaSlot's selection of the slots it decodes"),
}


#: Options read by some inner rules only: (the rules, what the option is).
_INNER_ONLY = {
    "temperature": (("soft-kmeans",), "the variance of soft k-means"),
    "step_size": (("gradient", "generalized-em"), "the step size of the ascent on the ELBO"),
}


def _check_training_options(config: TrainConfig, objective: str) -> None:
    """The schedule, budget, test and architecture options, checked before anything is built."""
    if config.warmup_steps < 0:
        raise ConfigError(f"warmup_steps: expected an integer >= 0, got {config.warmup_steps}")
    if config.lr_schedule not in LR_SCHEDULES:
        raise ConfigError(
            f"lr_schedule: unknown kind {config.lr_schedule!r}; valid choices are {LR_SCHEDULES}"
        )
    if not 0.0 <= config.min_lr_ratio <= 1.0:
        raise ConfigError(f"min_lr_ratio: expected a number in [0, 1], got {config.min_lr_ratio}")
    if config.max_minutes is not None and not 0 < config.max_minutes < math.inf:
        raise ConfigError(f"max_minutes: expected finite minutes > 0, got {config.max_minutes}")
    if config.select_best and not config.eval_every:
        raise ConfigError("select_best: needs the periodic validation (--eval-every > 0)")
    if config.validate_as_tested and not config.eval_every:
        raise ConfigError("validate_as_tested: needs the periodic validation (--eval-every > 0)")
    for name in ("test_size", "first_scene"):
        if getattr(config, name) < 0:
            raise ConfigError(f"{name}: expected an integer >= 0, got {getattr(config, name)}")
    for name in ("eval_inner_steps", "eval_restarts", "decoder_resolution"):
        value = getattr(config, name)
        if value is not None and value < 1:
            raise ConfigError(f"{name}: expected an integer >= 1, got {value}")
    int_list(config.test_sweep, "test_sweep", "1,3,5,10,20")
    if config.test_sweep is not None and not config.test_size:
        raise ConfigError("test_sweep: needs the final test (--test-size N > 0)")
    # The kind itself is checked where the masks are chosen (_masks, when build wraps the rule).
    if config.reinitialize_masks is not None and not (
        config.reinitialize or config.eval_reinitialize
    ):
        raise ConfigError(
            "reinitialize_masks: used only with --reinitialize or --eval-reinitialize"
        )
    if config.restart_criterion not in RESTART_CRITERIA:
        raise ConfigError(
            f"restart_criterion: unknown kind {config.restart_criterion!r}; valid choices are "
            f"{RESTART_CRITERIA}"
        )
    if config.restart_criterion == "mse" and config.model == "gmm":
        raise ConfigError("restart_criterion: mse is for image models; use elbo with gmm")
    if config.decoder_upsample is not None and config.decoder_upsample < 0:
        raise ConfigError(
            f"decoder_upsample: expected an integer >= 0, got {config.decoder_upsample}"
        )
    if config.kernel_size is not None and (config.kernel_size < 1 or config.kernel_size % 2 == 0):
        raise ConfigError(f"kernel_size: expected an odd integer >= 1, got {config.kernel_size}")
    for name in ("mse_weight", "set_prediction_weight"):
        value = getattr(config, name)
        if value is not None and not 0 < value < math.inf:
            raise ConfigError(f"{name}: expected a finite number > 0, got {value}")
    if not 0 <= config.slot_sparsity < math.inf:
        raise ConfigError(
            f"slot_sparsity: expected a finite number >= 0, got {config.slot_sparsity}"
        )
    int_list(config.encoder_strides, "encoder_strides")
    int_list(config.decoder_channels, "decoder_channels")
    given = {
        name: getattr(config, name) not in (None, False)
        for name in (
            "encoder_strides",
            "pixel_scale",
            "pixel_scale_start",
            "refinement_inputs",
            "mse_weight",
        )
    }
    given["mixture"] = config.mixture != "isotropic"
    given["slot_sparsity"] = config.slot_sparsity > 0
    if config.mixture not in MIXTURES:
        raise ConfigError(f"mixture: unknown kind {config.mixture!r}; valid choices are {MIXTURES}")
    for name, is_given in given.items():
        only, what = _MODEL_ONLY[name]
        if is_given and config.model not in only:
            raise ConfigError(
                f"{name}: only for --model {' or '.join(only)} ({what}), not {config.model}"
            )
    if config.model == "neural-em" and config.decoder_resolution is not None:
        raise ConfigError(
            "decoder_resolution: not for --model neural-em (its decoder broadcasts at the image's "
            "resolution, or at it halved per --decoder-upsample)"
        )
    if config.transition not in TRANSITIONS:
        raise ConfigError(
            f"transition: unknown kind {config.transition!r}; valid choices are {TRANSITIONS}"
        )
    video = not config.dataset.startswith("hdf5:") and (
        _dataset_entry(config.dataset).data == "videos"
    )
    if config.transition != "identity" and not video:
        raise ConfigError(
            f"transition: {config.transition} carries slots between frames; only for clips "
            f"(--dataset moving-shapes), not {config.dataset}"
        )
    if config.num_frames is not None and not video:
        raise ConfigError(f"num_frames: only for --dataset moving-shapes, not {config.dataset}")
    if video and config.eval_restarts != 1:
        raise ConfigError(
            f"eval_restarts: clips carry one trajectory of slots, expected 1, got "
            f"{config.eval_restarts}"
        )
    architecture = ("paper_size", "decoder_resolution", "decoder_channels", "decoder_upsample")
    if config.model == "gmm":
        for name in (*architecture, "kernel_size"):
            if getattr(config, name) not in (None, False):
                raise ConfigError(f"{name}: an image model's architecture, not for --model gmm")
    if config.refinement_inputs and config.inner not in (None, "learned-gradient"):
        raise ConfigError("refinement_inputs: only with --inner learned-gradient")
    if config.refinement_pooling not in ("mean", "posterior"):
        raise ConfigError(
            f"refinement_pooling: unknown kind {config.refinement_pooling!r}; valid choices are "
            "('mean', 'posterior')"
        )
    if config.refinement_pooling != "mean" and not config.refinement_inputs:
        raise ConfigError("refinement_pooling: only with --refinement-inputs")
    if config.features not in ("mlp", "gaussian"):
        raise ConfigError(
            f"features: unknown kind {config.features!r}; valid choices are ('mlp', 'gaussian')"
        )
    if config.features != "mlp" and (config.inner != "slot-attention" or config.model != "gmm"):
        raise ConfigError("features: only for --inner slot-attention on --model gmm")
    for name, minimum in (("init_lloyd_steps", 0), ("init_local_trials", 1)):  # gmm's init
        value = getattr(config, name)
        if value is None:
            continue
        if config.model != "gmm":
            raise ConfigError(f"{name}: only for --model gmm, not {config.model}")
        if value < minimum:
            raise ConfigError(f"{name}: expected an integer >= {minimum}, got {value}")
    if config.gmm_init is not None:
        from pyro_slots.models.gmm import INITS

        if config.model != "gmm":
            raise ConfigError(f"gmm_init: only for --model gmm, not {config.model}")
        if config.gmm_init not in INITS:
            raise ConfigError(
                f"gmm_init: unknown kind {config.gmm_init!r}; valid choices are {INITS}"
            )
    if config.mse_weight is not None and objective != "elbo+mse":
        raise ConfigError("mse_weight: only with --objective elbo+mse")
    if config.init_from is not None and not os.path.exists(config.init_from):
        raise ConfigError(f"init_from: no such run folder or checkpoint {config.init_from!r}")


#: The kinds of data a model of each kind takes (image models take clips frame by frame).
_TAKES = {"points": ("points",), "images": ("images", "videos")}


def resolve(config: TrainConfig) -> TrainConfig:
    """Check names and combinations and fill the defaults; nothing is built or trained.

    :raises ConfigError: naming the option, the valid choices or the reason a combination
        cannot work.
    """
    model = _choice(MODELS, config.model, "model")
    if config.inner is None:
        config = dataclasses.replace(config, inner=DEFAULT_INNER[config.model])
    if config.dataset is None:
        config = dataclasses.replace(
            config, dataset="points" if model.data == "points" else "tetrominoes"
        )
    inner = _choice(INNER_RULES, config.inner, "inner")
    for name, (only, what) in _INNER_ONLY.items():
        if getattr(config, name) is not None and config.inner not in only:
            raise ConfigError(
                f"{name}: only for --inner {' or '.join(only)} ({what}), not {config.inner}"
            )
    if config.truncate != 1 and config.gradient != "truncated":
        raise ConfigError(
            f"truncate: the differentiated steps of --gradient truncated, not {config.gradient}"
        )
    if config.init not in INIT_KINDS:
        raise ConfigError(f"init: unknown kind {config.init!r}; valid choices are {INIT_KINDS}")
    dataset = _dataset_entry(config.dataset)
    objective = model.objective if config.objective is None else config.objective
    objective_entry = _choice(OBJECTIVES, objective, "objective")
    if objective_entry.models is not None and config.model not in objective_entry.models:
        raise ConfigError(
            f"objective: {objective} is only for --model {' or '.join(objective_entry.models)}, "
            f"not {config.model}"
        )
    if objective_entry.targets and config.dataset not in ("shapes", "tetrominoes"):
        raise ConfigError(
            f"objective: {objective} reads the object attributes of the generators; use "
            f"--dataset shapes or tetrominoes, not {config.dataset}"
        )
    _check_positive(config)
    _check_training_options(config, objective)
    if dataset.data not in _TAKES[model.data]:
        valid = [n for n, d in DATASETS.items() if d.data in _TAKES[model.data]]
        raise ConfigError(
            f"--model {config.model} works on {model.data}, but --dataset {config.dataset} holds "
            f"{dataset.data}; use --dataset {' or '.join(valid)}"
        )
    if inner.closed_form and not model.closed_form:
        valid = [n for n, e in INNER_RULES.items() if not e.closed_form]
        raise ConfigError(
            f"--inner {config.inner} needs a closed-form M-step, which --model {config.model} "
            f"does not have; use --inner {' or '.join(valid)}"
        )
    init = config.init
    if init == "auto":
        init = "model" if inner.learned or model.data == "images" else "learned"
    num_steps = inner.num_steps if config.inner_steps is None else config.inner_steps
    learnable_init = init == "learned" or (init == "model" and model.learned_init)
    has_other_weights = inner.learned or model.data == "images"
    reached = reaches_init(config, num_steps)
    if config.straight_through and (reached or config.gradient == "implicit"):
        raise ConfigError(
            f"straight_through: only where --gradient detaches the slots before the "
            f"differentiated steps (first_order, truncated shorter than T), not "
            f"--gradient {config.gradient}"
        )
    if config.init_regression < 0:
        raise ConfigError(f"init_regression: expected a number >= 0, got {config.init_regression}")
    trained = reached or config.straight_through or config.init_regression > 0
    if config.transition != "identity" and not (reached or config.straight_through):
        raise ConfigError(
            f"transition: {config.transition} is trained only through every inner step or with "
            f"--straight-through (it makes each frame's starting slots); --gradient "
            f"{config.gradient} alone would leave it where it starts"
        )
    if init in ("queries", "amortized") and not trained:
        raise ConfigError(
            f"init: {init} are trained only through every inner step, with --straight-through "
            f"or with --init-regression; --gradient {config.gradient} alone would leave them "
            "where they start"
        )
    if init in DETERMINISTIC_INITS and config.eval_restarts != 1:
        raise ConfigError(
            f"eval_restarts: --init {init} starts every restart at the same slots, expected 1, "
            f"got {config.eval_restarts}"
        )
    if learnable_init and has_other_weights and config.init == "auto" and not trained:
        # J's gradient would never reach the initializer's weights (NestedSVI's UserWarning):
        # a fixed initializer, said once in the log and saved as init: fixed.
        init = "fixed"
    if not inner.learned and init == "model" and model.data == "points":
        raise ConfigError(
            f"--model gmm with --inner {config.inner} and --init model has no weights to train "
            "(the fixed rule starts from k-means++); use --init learned or a learned rule "
            "(slot-attention, learned-gradient)"
        )
    # (an unknown --gradient is refused by NestedSVI when the run is built)
    if (
        not inner.learned
        and init in ("learned", "queries")
        and model.data == "points"
        and (config.gradient in GRADIENT_MODES)
    ):
        if not trained:
            raise ConfigError(
                f"--gradient {config.gradient} never reaches the learned initialization, the "
                f"only trained weights of gmm with --inner {config.inner}: it is trained "
                "through every inner step; use --gradient unrolled, --straight-through (or a "
                "learned rule)"
            )
    if config.dataset == "points" and config.image_size is not None:
        raise ConfigError("image_size: only used by image datasets, not --dataset points")
    if config.dataset == "tetrominoes" and config.image_size not in (None, 35):
        raise ConfigError(f"image_size: tetrominoes are 35x35, got {config.image_size}")
    if config.dataset.startswith("hdf5:") and config.image_size is not None:
        raise ConfigError(
            f"image_size: an hdf5 run's images have the size of the file's, got {config.image_size}"
        )
    if config.num_slots is None:
        if model.data == "points":
            num_slots = config.num_components
        elif config.dataset == "tetrominoes":
            num_slots = 4
        elif dataset.data == "videos":
            num_slots = VideoStream.MAX_OBJECTS + 1
        else:
            num_slots = 6
    else:
        num_slots = config.num_slots
    if config.lr is not None:
        lr = config.lr
    elif model.data == "images":
        lr = 4e-4
    else:
        lr = 1e-3 if inner.learned else 0.05
    slot_dim = config.slot_dim
    if model.data == "points":
        if slot_dim is not None:
            raise ConfigError("slot_dim: gmm slots are its components' parameters; leave it unset")
    elif slot_dim is None:
        slot_dim = SLOT_DIMS[config.model][config.paper_size]
    if config.tensorboard:
        try:
            import torch.utils.tensorboard  # noqa: F401
        except ImportError:
            raise ConfigError(
                "tensorboard: the tensorboard package is not installed (pip install "
                "tensorboard); run without --tensorboard"
            ) from None
    return dataclasses.replace(
        config,
        # Image models: IODINE's refinement network width (examples/results/objects.md).
        hidden_dim=config.hidden_dim or (64 if model.data == "points" else 128),
        objective=objective,
        init=init,
        lr=lr,
        slot_dim=slot_dim,
        out=config.out or f"runs/{config.model}-{config.inner}",
        num_slots=num_slots,
        inner_steps=num_steps,
        step_size=(0.1 if config.step_size is None else config.step_size)
        if config.inner == "gradient"
        else config.step_size,
    )


@dataclass
class Components:
    """What :func:`build` makes from a resolved configuration."""

    model: object
    inner: object
    objective: object
    init: object | None
    stream: object
    #: The learned transition between the frames of a clip (``transition: mlp``), else ``None``.
    transition: object | None = None


def build(config: TrainConfig, rank: int = 0, world_size: int = 1) -> Components:
    """Make the data stream, model, inner rule, objective and slot initializer.

    :param config: a configuration returned by :func:`resolve`.
    :param int rank: this process's rank among ``world_size`` data-parallel processes; the
        stream draws this rank's share of every global batch.
    :raises ConfigError: when a module is missing or the model rejects the rule.
    """
    dataset = _dataset_entry(config.dataset)
    stream = dataset.factory(config, config.dataset)
    stream.shard(rank, world_size)
    stream.first = config.first_scene
    end = config.first_scene + config.steps * config.batch_size * world_size
    if not hasattr(stream, "held_out_size") and end > HELD_OUT_START:
        # A generator's index: training must stay below the held-out and validation scenes.
        raise ConfigError(
            f"first_scene: training would draw datapoints {config.first_scene} to {end - 1} "
            f"({config.steps} updates of {config.batch_size * world_size}), expected them below "
            f"{HELD_OUT_START}, where the held-out test and validation data begin"
        )
    model = MODELS[config.model].factory(config, stream)
    inner = INNER_RULES[config.inner].factory(config, model)
    try:
        inner.check_model(model)
    except CapabilityError as error:
        raise ConfigError(f"--inner {config.inner} with --model {config.model}: {error}") from None
    objective = OBJECTIVES[config.objective].factory(config, model)
    init = None
    if config.init == "learned":
        init = GaussianInit(model.slot_dim, learnable=True)
    elif config.init == "queries":
        init = LearnedQueries(config.num_slots, model.slot_dim)
    elif config.init == "amortized":
        probe = stream.held_out(1).x
        probe = probe[:, 0] if stream.kind == "videos" else probe
        with torch.no_grad():
            features = model.encode(probe).shape[-1]
        init = AmortizedInit(features, config.num_slots, model.slot_dim)
    elif config.init == "fixed":
        own = getattr(model, "slot_init", None)
        if isinstance(own, GaussianInit):
            # The model's own initializer where it starts, as buffers of the same names (the
            # checkpoints keep their layout).
            fixed = GaussianInit(own.dim, learnable=False)
            with torch.no_grad():
                fixed.loc.copy_(own.loc)
                fixed.log_scale.copy_(own.log_scale)
            model.slot_init = fixed
        else:
            init = GaussianInit(model.slot_dim, learnable=False)
    if OBJECTIVES[config.objective].targets and config.num_slots < stream.num_objects:
        raise ConfigError(
            f"num_slots: --objective {config.objective} on {config.dataset} needs a slot per "
            f"object, at least {stream.num_objects}, got {config.num_slots}"
        )
    if config.reinitialize:
        inner = reinitialized_rule(config, model, inner, init)
    if config.eval_reinitialize and not config.reinitialize:  # the final test's rule, checked early
        reinitialized_rule(config, model, inner, init)
    transition = SlotTransition(model.slot_dim) if config.transition == "mlp" else None
    return Components(model, inner, objective, init, stream, transition)


def reinitialized_rule(config: TrainConfig, model, inner, init, masks: str | None = None):
    """The rule wrapped in :class:`~pyro_slots.inner.Reinitialize`, redrawing from the run's
    slot initializer (``init``, else the rule's or the model's own), seeded with the run's seed:
    ``--reinitialize`` in training, ``pyro-slots evaluate --reinitialize`` at test time.

    Dead and duplicate slots are judged by ``masks`` (default ``config.reinitialize_masks``):
    ``"decoder"`` (:func:`~pyro_slots.inner.decoder_masks`), ``"posterior"``
    (:func:`~pyro_slots.inner.posterior_masks`) or ``"attention"`` (the slot-attention rule's
    :meth:`~pyro_slots.inner.SlotAttention.attention_masks`); ``None``: the decoder's masks
    where the model decodes images, else the posterior (:func:`~pyro_slots.inner.masks_of`)."""
    if isinstance(inner, Reinitialize):
        raise ConfigError(
            "reinitialize: the run's rule re-initializes slots already (trained with "
            "--reinitialize)"
        )
    replacement = init
    for owner in (inner, model):
        if replacement is None:
            replacement = getattr(owner, "slot_init", None)
    if replacement is None:
        raise ConfigError(
            f"reinitialize: --model {config.model} with --inner {config.inner} and --init "
            f"{config.init} has no slot initializer to redraw slots from (k-means++ seeds from "
            "the data); use --init learned or --init fixed"
        )
    try:
        wrapped = Reinitialize(
            inner, init=replacement, seed=config.seed, masks=_masks(config, model, inner, masks)
        )
    except ValueError as error:  # e.g. an initializer that reads the datapoints (amortized)
        raise ConfigError(f"reinitialize: {error}") from None
    try:
        wrapped.check_model(model)
    except CapabilityError as error:
        raise ConfigError(f"reinitialize: {error}") from None
    return wrapped


def _masks(config: TrainConfig, model, inner, kind: str | None):
    kind = config.reinitialize_masks if kind is None else kind
    if kind is None:
        # An image model's segmentation is its decoder's masks; the posterior of its inner
        # mixture over the encoder's features can be far flatter (Reinitialize's docstring).
        return masks_of(model)
    if kind not in REINITIALIZE_MASKS:
        raise ConfigError(
            f"reinitialize_masks: unknown kind {kind!r}; valid choices are {REINITIALIZE_MASKS}"
        )
    if kind == "attention":
        if not hasattr(inner, "attention_masks"):
            raise ConfigError(
                f"reinitialize_masks: attention needs --inner slot-attention (the rule's own "
                f"attention), got --inner {config.inner}"
            )
        return inner.attention_masks
    return decoder_masks if kind == "decoder" else posterior_masks
