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
from collections.abc import Callable
from dataclasses import dataclass

from pyro_slots.init import GaussianInit
from pyro_slots.inner import EM, GradientAscent, SoftKMeans
from pyro_slots.models import GaussianMixture
from pyro_slots.nested import GRADIENT_MODES
from pyro_slots.objectives import NegativeELBO, Reconstruction
from pyro_slots.validation import CapabilityError

from .config import ConfigError, TrainConfig
from .streams import HDF5Stream, ImageStream, PointStream

__all__ = [
    "DATASETS",
    "INIT_KINDS",
    "INNER_RULES",
    "MODELS",
    "OBJECTIVES",
    "Components",
    "build",
    "resolve",
]

INIT_KINDS = ("auto", "model", "learned")


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
    """:ivar data: ``"points"`` or ``"images"``; :ivar objective: default task objective;
    :ivar closed_form: the model has the closed-form M-step EM and soft k-means need."""

    factory: Callable
    data: str
    objective: str
    closed_form: bool
    description: str


def _gmm(config: TrainConfig, stream):
    return GaussianMixture(config.num_slots, stream.dim)


def _slot_autoencoder(config: TrainConfig, stream):
    cls = _import("pyro_slots.models", "SlotAutoencoder", "slot-autoencoder")
    return cls(
        image_size=stream.image_size, num_slots=config.num_slots, feature_dim=config.slot_dim
    )


def _iodine(config: TrainConfig, stream):
    cls = _import("pyro_slots.models", "IODINE", "iodine")
    sizes = {} if config.pixel_scale is None else {"pixel_scale": config.pixel_scale}
    return cls(
        image_size=stream.image_size,
        num_slots=config.num_slots,
        latent_dim=config.slot_dim,
        **sizes,
    )


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
    ),
    "iodine": ModelEntry(
        _iodine, "images", "elbo", False, "IODINE: spatial Gaussian mixture of decoded slots"
    ),
}

#: Default slot sizes of the image models.
SLOT_DIMS = {"slot-autoencoder": 64, "iodine": 16}


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


def _gradient(config, model):
    return GradientAscent(num_steps=config.inner_steps, step_size=config.step_size, adam=True)


def _slot_attention(config, model):
    cls = _import("pyro_slots.inner", "SlotAttention", "slot-attention")
    if config.dataset == "points":
        # Low-dimensional points: a per-point MLP before the attention, and the attention-weighted
        # moments for the readout (see SlotAttention's docstring).
        return cls(
            config.inner_steps,
            slot_dim=model.slot_dim,
            input_dim=model.feature_dim,
            hidden_dim=config.hidden_dim,
            moments=True,
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
    return cls(
        config.inner_steps,
        slot_dim=model.slot_dim,
        hidden_dim=config.hidden_dim,
        preprocessing="log_sign" if config.dataset == "points" else "layernorm",
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
}


#: The rule each model trains with when --inner is not given.
DEFAULT_INNER = {"gmm": "em", "slot-autoencoder": "slot-attention", "iodine": "learned-gradient"}


# ------------------------------------------------------------------------- objectives
def _elbo_objective(config):
    return NegativeELBO()


def _reconstruction_objective(config):
    return Reconstruction()


OBJECTIVES = {"elbo": _elbo_objective, "reconstruction": _reconstruction_objective}


# --------------------------------------------------------------------------- datasets
def _points_stream(config: TrainConfig, name: str):
    return PointStream(
        config.seed, config.batch_size, config.num_points, config.num_components, config.dim
    )


def _image_stream(config: TrainConfig, name: str):
    return ImageStream(name, config.seed, config.batch_size, config.image_size)


def _hdf5_stream(config: TrainConfig, name: str):
    path = name[len("hdf5:") :]
    if not path:
        raise ConfigError("dataset: 'hdf5:' must be followed by the file's path, e.g. hdf5:x.h5")
    try:
        return HDF5Stream(path, config.seed, config.batch_size, config.eval_size)
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
    ):
        value = getattr(config, name)
        if value is not None and value < 1:
            raise ConfigError(f"{name}: expected an integer >= 1, got {value}")
    for name in ("lr", "pixel_scale"):
        value = getattr(config, name)
        if value is not None and not 0 < value < math.inf:
            raise ConfigError(f"{name}: expected a finite number > 0, got {value}")
    if config.eval_every < 0:
        raise ConfigError(f"eval_every: expected an integer >= 0, got {config.eval_every}")
    if config.seed < 0:
        raise ConfigError(f"seed: expected an integer >= 0, got {config.seed}")


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
    if config.init not in INIT_KINDS:
        raise ConfigError(f"init: unknown kind {config.init!r}; valid choices are {INIT_KINDS}")
    dataset = _dataset_entry(config.dataset)
    objective = model.objective if config.objective is None else config.objective
    _choice(OBJECTIVES, objective, "objective")
    _check_positive(config)
    if dataset.data != model.data:
        valid = [n for n, d in DATASETS.items() if d.data == model.data]
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
    if not inner.learned and init == "model" and model.data == "points":
        raise ConfigError(
            f"--model gmm with --inner {config.inner} and --init model has no weights to train "
            "(the fixed rule starts from k-means++); use --init learned or a learned rule "
            "(slot-attention, learned-gradient)"
        )
    num_steps = inner.num_steps if config.inner_steps is None else config.inner_steps
    # (an unknown --gradient is refused by NestedSVI when the run is built)
    if (
        not inner.learned
        and init == "learned"
        and model.data == "points"
        and (config.gradient in GRADIENT_MODES)
    ):
        reaches_init = config.gradient == "unrolled" or (
            config.gradient == "truncated" and config.truncate >= num_steps
        )
        if not reaches_init:
            raise ConfigError(
                f"--gradient {config.gradient} never reaches the learned initialization, the "
                f"only trained weights of gmm with --inner {config.inner}: it is trained "
                "through every inner step; use --gradient unrolled (or a learned rule)"
            )
    if config.dataset == "points" and config.image_size is not None:
        raise ConfigError("image_size: only used by image datasets, not --dataset points")
    if config.dataset == "tetrominoes" and config.image_size not in (None, 35):
        raise ConfigError(f"image_size: tetrominoes are 35x35, got {config.image_size}")
    if config.num_slots is None:
        if model.data == "points":
            num_slots = config.num_components
        elif config.dataset == "tetrominoes":
            num_slots = 4
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
        slot_dim = SLOT_DIMS[config.model]
    if config.pixel_scale is not None and config.model != "iodine":
        raise ConfigError(
            f"pixel_scale: only for --model iodine (its likelihood's sigma_x), not {config.model}"
        )
    if config.tensorboard:
        try:
            import torch.utils.tensorboard  # noqa: F401
        except ImportError:
            raise ConfigError(
                "tensorboard: the tensorboard package is not installed (pip install "
                "tensorboard); run without --tensorboard"
            ) from None
    if config.warmup_steps < 0:
        raise ConfigError(f"warmup_steps: expected an integer >= 0, got {config.warmup_steps}")
    return dataclasses.replace(
        config,
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
    model = MODELS[config.model].factory(config, stream)
    inner = INNER_RULES[config.inner].factory(config, model)
    try:
        inner.check_model(model)
    except CapabilityError as error:
        raise ConfigError(f"--inner {config.inner} with --model {config.model}: {error}") from None
    objective = OBJECTIVES[config.objective](config)
    init = None
    if config.init == "learned":
        init = GaussianInit(model.slot_dim, learnable=True)
    return Components(model, inner, objective, init, stream)
