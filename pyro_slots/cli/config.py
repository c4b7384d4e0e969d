"""The training configuration: one small dataclass, filled from defaults < config file < flags.

Every field of :class:`TrainConfig` is one ``pyro-slots train`` option (``batch_size`` is
``--batch-size``) and one key of a YAML or TOML config file. Fields left at ``None`` mean
"the model's or rule's own default"; :func:`pyro_slots.cli.registry.resolve` fills them in, and
the resolved configuration is saved next to the checkpoint as ``config.yaml``.
"""

from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass, field

import yaml

from pyro_slots.checkpoint import write_atomically

__all__ = [
    "CONFIGS_DIR",
    "ConfigError",
    "TrainConfig",
    "config_path",
    "list_configs",
    "load_config_file",
    "merge_config",
    "save_config",
]

#: The recipes shipped with the package (``pyro-slots train --config NAME``).
CONFIGS_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")


class ConfigError(ValueError):
    """A configuration value, file or combination is invalid; the message says which and why."""


def _opt(default, help: str, **extra):
    return field(default=default, metadata={"help": help, **extra})


@dataclass
class TrainConfig:
    """Everything a training run depends on (the resolved copy is saved with the checkpoint).

    The defaults train the Gaussian-mixture model on generated point sets with EM as the inner
    rule and a learned slot initialization, in about 15 s on one CPU core: the outer loop learns
    where EM should start so that a few EM steps reach a high likelihood.
    """

    model: str = _opt("gmm", "slot model", metavar="NAME")
    inner: str | None = _opt(
        None,
        "inner rule, how the slots of each datapoint are refined (default: em for gmm, "
        "slot-attention for slot-autoencoder, learned-gradient for iodine)",
        metavar="NAME",
    )
    gradient: str = _opt("unrolled", "how dJ/dw flows through the inner loop", metavar="MODE")
    dataset: str | None = _opt(
        None,
        "training data; hdf5:PATH reads a benchmark file (default: points for gmm, "
        "tetrominoes for image models)",
        metavar="NAME",
    )
    objective: str | None = _opt(
        None,
        "task objective J (default: the model's own, elbo for gmm and iodine, reconstruction for "
        "slot-autoencoder)",
        metavar="NAME",
    )
    init: str = _opt(
        "auto",
        "slot initialization: model (the model's own, k-means++ for gmm), learned (a trained "
        "Gaussian), queries (K learned starting slots, BO-QSA), amortized (slots predicted from "
        "the datapoint, pyro_slots.AmortizedInit), fixed (the model's own or a "
        "standard Gaussian, never trained) or auto (the rule's own if it has one, else learned "
        "for gmm; fixed whenever --gradient does not reach the initializer: first_order, "
        "implicit, truncated shorter than T, unless --straight-through or --init-regression)",
        metavar="KIND",
    )
    steps: int = _opt(200, "number of outer updates")
    batch_size: int = _opt(32, "datapoints per update")
    lr: float | None = _opt(
        None,
        "Adam learning rate (default: 0.05 for a learned initialization of gmm, 1e-3 for "
        "learned rules on gmm, 4e-4 for image models)",
    )
    warmup_steps: int = _opt(0, "linear learning-rate warm-up over the first N updates")
    lr_schedule: str = _opt(
        "constant",
        "learning rate after the warm-up: constant, or cosine (annealed to --min-lr-ratio x --lr "
        "over the run's budget: --steps, or --max-minutes when it ends first)",
        metavar="KIND",
    )
    min_lr_ratio: float = _opt(0.05, "final learning rate of --lr-schedule cosine, times --lr")
    max_minutes: float | None = _opt(
        None,
        "stop after this many minutes of training, summed over resumes (a checkpoint is written); "
        "with --lr-schedule cosine also the schedule's clock",
    )
    seed: int = _opt(0, "seed of the data stream, weights and slot initializations")
    out: str | None = _opt(None, "output directory (default: runs/MODEL-INNER)", metavar="DIR")
    num_slots: int | None = _opt(
        None, "slots K (default: --num-components for gmm, objects + 1 for images)"
    )
    inner_steps: int | None = _opt(None, "inner steps T per datapoint (default: the rule's)")
    truncate: int = _opt(1, "steps differentiated with --gradient truncated")
    iteration_weights: str = _opt(
        "last",
        "J at the last inner iterate, or averaged over them: last, uniform, linear",
        metavar="KIND",
    )
    step_size: float | None = _opt(None, "step size of --inner gradient (default 0.1)")
    temperature: float | None = _opt(
        None, "variance of --inner soft-kmeans (default: the model's variance, else 1)"
    )
    clip_norm: float | None = _opt(None, "clip the gradient norm of the shared weights")
    reinitialize: bool = _opt(
        False,
        "redraw dead slots (explaining < 1%% of the measurements) and duplicate ones (masks at "
        "cosine > 0.95 with another slot's: the decoder's masks of image models, else the "
        "responsibilities) before every inner step, from the slot initializer "
        "(pyro_slots.inner.Reinitialize)",
    )
    reinitialize_masks: str | None = _opt(
        None,
        "what --reinitialize and --eval-reinitialize judge dead and duplicate slots by: decoder "
        "(the decoder's masks, one decode per inner step), posterior (the inner mixture's "
        "responsibilities) or attention (slot attention's own attention, no decode); default "
        "decoder for image models, else posterior",
        metavar="KIND",
    )
    init_regression: float = _opt(
        0.0,
        "beta >= 0: J gains beta * mean (lambda_0 - sg(lambda_T))^2, the starting slots "
        "regressed onto the inner loop's solution (trains --init amortized under any gradient)",
    )
    straight_through: bool = _opt(
        False,
        "first_order / truncated: pass J's gradient where differentiation starts on to the slot "
        "initializer (BO-QSA's straight-through), so learned and queries initializers train",
    )
    slot_sparsity: float = _opt(
        0.0,
        "lambda >= 0, slot-autoencoder: > 0 keeps a per-image number of slots (AdaSlot: a learned "
        "keep probability per final slot, a hard Gumbel-softmax mask on the decoder's mixture, "
        "the most probable slot always kept) and J gains lambda * the mean keep probability; "
        "the evaluations report kept_slots, the mean number kept per image",
    )
    eval_every: int = _opt(
        50, "evaluate on the validation data every N updates (0: never); see --select-best"
    )
    eval_size: int = _opt(64, "validation datapoints of the periodic evaluation")
    select_best: bool = _opt(
        False,
        "keep the weights of the best validation score (FG-ARI for images, log-likelihood per "
        "point for gmm) as best.pt, and test those at the end",
    )
    validate_as_tested: bool = _opt(
        False,
        "the periodic validation refines as the final test does (--eval-inner-steps, "
        "--eval-restarts, --restart-criterion, --eval-reinitialize), so --select-best keeps the "
        "weights that the test's own procedure scores best; a validation then costs a test of "
        "--eval-size datapoints",
    )
    test_size: int = _opt(
        0, "held-out test datapoints scored at the end of training into test.json (0: none)"
    )
    eval_inner_steps: int | None = _opt(
        None, "inner steps T of the final test (default: --inner-steps)"
    )
    eval_restarts: int = _opt(1, "slot initializations per test datapoint; one is kept")
    eval_reinitialize: bool = _opt(
        False,
        "test (final test and --test-sweep) with dead and duplicate slots redrawn before every "
        "inner step, as pyro-slots evaluate --reinitialize; training is unchanged (a run trained "
        "with --reinitialize is tested with its own rule, which does this already)",
    )
    test_sweep: str | None = _opt(
        None,
        "also test the tested weights at each of these inner steps T, e.g. 1,3,5,10,20 "
        "(test.json's 'sweep'; pyro-slots summarize prints FG-ARI against T)",
        metavar="T,T,...",
    )
    restart_criterion: str = _opt(
        "elbo",
        "which restart a test datapoint keeps: elbo (the highest inner ELBO) or mse (the lowest "
        "reconstruction error); both read the data only",
        metavar="KIND",
    )
    init_from: str | None = _opt(
        None,
        "start from the weights of a finished run (a run folder or checkpoint) with a fresh "
        "optimizer and schedule",
        metavar="RUN",
    )
    first_scene: int = _opt(
        0,
        "index of the first training datapoint of the generated stream (to continue an "
        "--init-from run on data it never saw: its updates x its batch size)",
    )
    checkpoint_every: int = _opt(50, "write the checkpoint every N updates (and at the end)")
    num_points: int = _opt(200, "points per set (--dataset points)")
    num_components: int = _opt(4, "true mixture components per set (--dataset points)")
    dim: int = _opt(2, "dimension of the points (--dataset points)")
    image_size: int | None = _opt(
        None, "image height and width (--dataset shapes, default 64; moving-shapes, default 32)"
    )
    slot_dim: int | None = _opt(
        None,
        "slot size of the image models: features and slots of slot-autoencoder (default 64), "
        "latents of iodine (default 16, 32 with --paper-size; also --latent-dim)",
    )
    pixel_scale: float | None = _opt(
        None,
        "sigma_x of the pixel likelihood of iodine (default 0.1; see examples/results/objects.md) "
        "and neural-em (default 0.25)",
    )
    pixel_scale_start: float | None = _opt(
        None,
        "sigma_x at the first update, moved linearly to --pixel-scale (the model's default "
        "without it) over --pixel-scale-ramp updates; validation runs at the sigma_x of the update "
        "before it, the final test at the final one",
    )
    pixel_scale_ramp: int = _opt(
        0, "updates over which sigma_x moves from --pixel-scale-start to --pixel-scale"
    )
    mse_weight: float | None = _opt(
        None,
        "weight of the MSE in --objective elbo+mse (default C H W / (2 sigma_x^2), the scale of "
        "the ELBO's likelihood)",
    )
    set_prediction_weight: float = _opt(
        0.01, "weight of the set-prediction loss in --objective reconstruction+set-prediction"
    )
    mixture: str = _opt(
        "isotropic",
        "slot-autoencoder: the inner mixture over the encoder's features, isotropic (fixed "
        "variance, uniform weights: soft k-means) or diagonal (every slot's own variances and "
        "weight; --inner em is then Probabilistic Slot Attention's GMM-EM update)",
        metavar="KIND",
    )
    num_frames: int | None = _opt(None, "frames per clip (--dataset moving-shapes; default 8)")
    transition: str = _opt(
        "identity",
        "clips: how the slots of one frame start the next: identity (carried as they are) or "
        "mlp (a learned residual MLP per slot, pyro_slots.SlotTransition)",
        metavar="KIND",
    )
    paper_size: bool = _opt(False, "the papers' architectures instead of the CPU-sized ones")
    encoder_strides: str | None = _opt(
        None,
        "strides of slot-autoencoder's four encoder convolutions, e.g. 2,1,2,1 (default 1,2,1,1)",
        metavar="S,S,S,S",
    )
    decoder_resolution: int | None = _opt(
        None, "decode at this resolution, then resize bilinearly (default: the image's)"
    )
    decoder_channels: str | None = _opt(
        None, "channels of the decoder's hidden convolutions (default 32,32,16)", metavar="C,C,C"
    )
    decoder_upsample: int | None = _opt(
        None,
        "decoder layers that upsample by two (default 2; 0 broadcasts at the decoding "
        "resolution, as the papers' decoders)",
    )
    kernel_size: int | None = _opt(None, "odd kernel size of the hidden convolutions (default 5)")
    refinement_inputs: bool = _opt(
        False,
        "iodine with learned-gradient: feed the rule IODINE's auxiliary inputs (image, decoded "
        "means and masks, posterior masks, coordinates)",
    )
    refinement_pooling: str = _opt(
        "mean",
        "how --refinement-inputs pools each slot's feature map: mean or posterior",
        metavar="KIND",
    )
    features: str = _opt(
        "mlp",
        "keys of --inner slot-attention on points: mlp (a per-point MLP and LayerNorm, the "
        "paper's) or gaussian (the standardized points' statistics (1, z, z^2), no LayerNorm)",
        metavar="KIND",
    )
    init_lloyd_steps: int | None = _opt(
        None, "gmm: Lloyd iterations after the k-means++ seeding of its slot init (default 10)"
    )
    init_local_trials: int | None = _opt(
        None,
        "gmm: candidates per k-means++ draw of its slot init, the best kept (default 2 + ln K, "
        "as scikit-learn; 1: the original k-means++)",
    )
    gmm_init: str | None = _opt(
        None,
        "gmm: how its slot init draws lambda_0: kmeans++ (default), kmeans++_seeds (the seeds "
        "with pooled scales, no assignment pass) or random_from_data",
        metavar="KIND",
    )
    hidden_dim: int | None = _opt(
        None,
        "width of the learned rules (default: 64 on points, 128 for learned-gradient on images)",
    )
    tensorboard: bool = _opt(False, "also log to TensorBoard (needs the tensorboard package)")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]


def _type_of(f: dataclasses.Field) -> tuple[type, bool]:
    """``(base type, optional)`` of a field from its annotation string."""
    text = str(f.type).replace(" ", "")
    optional = text.endswith("|None")
    base = {"int": int, "float": float, "str": str, "bool": bool}[text.removesuffix("|None")]
    return base, optional


def coerce(name: str, value, where: str):
    """Check ``value`` against the type of field ``name`` (ints are accepted as floats)."""
    fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
    base, optional = _type_of(fields[name])
    if value is None:
        if optional:
            return None
        raise ConfigError(f"{where}: {name} must not be empty")
    if base is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if base is str and "," in fields[name].metadata.get("metavar", ""):
        # A list option (``2,1,2,1``): a YAML list or a single integer reads as its text.
        items = value if isinstance(value, list) else [value]
        if all(isinstance(v, int) and not isinstance(v, bool) for v in items):
            return ",".join(str(v) for v in items)
    if base is bool and isinstance(value, bool):
        return value
    if base in (int, str) and isinstance(value, base) and not isinstance(value, bool):
        return value
    if base is float and isinstance(value, float):
        return value
    raise ConfigError(
        f"{where}: {name} expects {'an optional ' if optional else 'a '}{base.__name__}, "
        f"got {value!r}"
    )


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing a mapping that repeats a key (PyYAML keeps the last)."""

    def construct_mapping(self, node, deep=False):
        seen = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            try:
                duplicate = key in seen
            except TypeError:  # unhashable key: the base class reports it
                break
            if duplicate:
                raise yaml.constructor.ConstructorError(
                    None,
                    None,
                    f"duplicate key {key!r} (lines {seen[key] + 1} and "
                    f"{key_node.start_mark.line + 1})",
                    key_node.start_mark,
                )
            seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep=deep)


_UniqueKeyLoader.add_constructor(
    yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _UniqueKeyLoader.construct_mapping
)
# Numbers as they read: YAML 1.1 makes "1e-3" (no dot) a string, "032" octal 26 and "1:30"
# base-60 90. Floats take any exponent form; integers only plain decimals (the others stay
# text, which an integer option then refuses and a list option keeps as written).
_UniqueKeyLoader.yaml_implicit_resolvers = {
    key: [(tag, regexp) for tag, regexp in resolvers if tag not in (
        "tag:yaml.org,2002:int", "tag:yaml.org,2002:float")]
    for key, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}  # fmt: skip
_UniqueKeyLoader.add_implicit_resolver(
    "tag:yaml.org,2002:int", re.compile(r"^[-+]?(?:0|[1-9][0-9]*)$"), list("-+0123456789")
)
_UniqueKeyLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"^(?:[-+]?(?:[0-9]+\.[0-9]*|\.[0-9]+)(?:[eE][-+]?[0-9]+)?|[-+]?[0-9]+[eE][-+]?[0-9]+"
        r"|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"
    ),
    list("-+0123456789."),
)


def load_config_file(path: str | os.PathLike) -> dict:
    """Read a YAML (``.yaml``/``.yml``) or TOML (``.toml``) file of :class:`TrainConfig` keys.

    Keys may use dashes or underscores (``batch-size`` or ``batch_size``); a ``[train]`` table
    (TOML) or ``train:`` mapping (YAML) may hold them instead of the top level.

    :raises ConfigError: for a missing or unparsable file, a key given twice (also as
        ``batch-size`` and ``batch_size``), an unknown key (the message lists the valid ones) or
        a value of the wrong type.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ConfigError(f"{path}: no such config file")
    ext = os.path.splitext(path)[1].lower()
    try:
        if ext in (".yaml", ".yml"):
            with open(path) as f:
                data = yaml.load(f, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader
        elif ext == ".toml":
            try:
                import tomllib
            except ModuleNotFoundError:  # Python 3.10
                try:
                    import tomli as tomllib
                except ModuleNotFoundError:
                    raise ConfigError(
                        f"{path}: reading TOML needs Python >= 3.11 or the tomli package"
                    ) from None
            with open(path, "rb") as f:
                data = tomllib.load(f)
        else:
            raise ConfigError(f"{path}: unknown config format {ext!r}; use .yaml, .yml or .toml")
    except ConfigError:
        raise
    except Exception as error:  # noqa: BLE001 - parser errors of both libraries
        first = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise ConfigError(f"{path}: cannot parse the config file: {first}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of options, got {type(data).__name__}")
    if set(data) == {"train"} and isinstance(data["train"], dict):
        data = data["train"]
    valid = TrainConfig.field_names()
    out = {}
    for key, value in data.items():
        name = str(key).replace("-", "_")
        if name in out:
            raise ConfigError(f"{path}: option {name!r} is given twice (as {key!r} and before)")
        if name not in valid:
            raise ConfigError(
                f"{path}: unknown option {key!r}; valid options are {', '.join(valid)}"
            )
        out[name] = coerce(name, value, path)
    return out


def list_configs() -> list[tuple[str, str]]:
    """``(name, description)`` of every shipped recipe, by name; the description is the first
    line of the file, a YAML comment."""
    out = []
    for entry in sorted(os.listdir(CONFIGS_DIR)):
        if entry.endswith(".yaml"):
            with open(os.path.join(CONFIGS_DIR, entry)) as f:
                first = f.readline().strip()
            out.append((entry[: -len(".yaml")], first.lstrip("#").strip()))
    return out


def config_path(name_or_path: str | os.PathLike) -> str:
    """The file of ``--config``: a path as given (anything with a folder or an extension), or
    the shipped recipe of that name.

    :raises ConfigError: for a bare name that is neither a file nor a shipped recipe (the
        message lists the recipes).
    """
    text = os.fspath(name_or_path)
    if os.path.isfile(text) or os.sep in text or os.path.splitext(text)[1]:
        return text  # a path (load_config_file says when it does not exist)
    shipped = os.path.join(CONFIGS_DIR, text + ".yaml")
    if os.path.isfile(shipped):
        return shipped
    names = ", ".join(name for name, _ in list_configs())
    raise ConfigError(
        f"config: {text!r} is neither a config file nor a shipped recipe; the recipes are "
        f"{names} (pyro-slots train --list-configs)"
    )


def merge_config(file_values: dict, flag_values: dict) -> TrainConfig:
    """Defaults, overridden by the config file, overridden by the command-line flags."""
    values = {**file_values, **flag_values}
    for name, value in values.items():
        values[name] = coerce(name, value, "command line")
    return TrainConfig(**values)


def save_config(path: str | os.PathLike, config: TrainConfig) -> None:
    """Write ``config`` as YAML (``config.yaml`` next to the checkpoint)."""
    text = "# Resolved pyro-slots train configuration; usable as --config.\n"
    write_atomically(path, text + yaml.safe_dump(config.to_dict(), sort_keys=False))
