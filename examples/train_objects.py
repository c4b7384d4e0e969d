"""Train an object-centric image model (Slot Attention autoencoder or IODINE) with NestedSVI.

The inner rule refines K slots per image on the model's ELBO, the outer loop fits the shared
weights on the task objective J (``--objective``): the model's own J (``own``: reconstruction
for the Slot Attention autoencoder, the negative ELBO for IODINE), the reconstruction MSE or the
negative ELBO by name (``reconstruction``, ``elbo``, as in ``python -m pyro_slots train``),
Hungarian-matched set prediction of the objects' attributes from the final slots
(``SetPrediction``, Locatello et al. 2020, §4.2), or the model's own J and set prediction,
weighted (``both``). J never enters the inner rule. Held-out images are then segmented by the
decoder's masks and scored with FG-ARI, ARI, mean IoU and reconstruction MSE
(``pyro_slots.metrics``) and, with a set-prediction head, with the average precision of its
predictions at the distance thresholds ``AP_THRESHOLDS`` (positions in units of the image
size); everything goes into a JSON file.

Tiny defaults run in seconds::

    python examples/train_objects.py

The headline configuration (see ``examples/results/objects.md``): first-order gradients
through T = 5 slot-attention steps, the learning rate annealed over the hour, the weights of
the best validation FG-ARI kept::

    python examples/train_objects.py --model slot_autoencoder --dataset tetrominoes \\
        --max-minutes 60 --num-steps 100000 --batch-size 32 --lr 4e-4 --warmup-steps 500 \\
        --lr-schedule cosine --gradient first_order --num-iterations 5 --select-best \\
        --num-val 256 --val-every 500 --num-eval 1000 --threads 1 --output /tmp/objects.json

Set prediction and reconstruction together on shapes (up to 5 objects, so 6 slots)::

    python examples/train_objects.py --dataset shapes --num-slots 6 --objective both

``--paper-size`` swaps the CPU-sized networks for the architectures of the papers.
``--init-from RUN.pt`` starts from a finished run's weights (a longer run in stages, or a
second stage with another ``--objective``); pass ``--first-scene`` = its updates × batch size
so the continuation trains on scenes the first stage never saw.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import time

import pyro
import pyro.optim
import torch

from pyro_slots import NestedSVI, refine
from pyro_slots.checkpoint import save_checkpoint
from pyro_slots.data import generate_shapes, generate_tetrominoes, shapes, tetrominoes
from pyro_slots.inner import GradientAscent, LearnedGradient, SlotAttention, SoftKMeans
from pyro_slots.metrics import (
    AP_THRESHOLDS,
    ari,
    fg_ari,
    mean_iou,
    reconstruction_mse,
    segmentation_errors,
)
from pyro_slots.models import IODINE, RefinementInputs, SlotAutoencoder
from pyro_slots.objectives import NegativeELBO, Reconstruction, SetPrediction, WeightedSum

MODELS = ("slot_autoencoder", "iodine")
DATASETS = ("tetrominoes", "shapes")
RULES = ("default", "slot_attention", "soft_kmeans", "learned_gradient", "gradient_ascent")
# "own" is the model's own J; "reconstruction" and "elbo" mean what they mean in the command line
# (``python -m pyro_slots train --objective``); "mse" is the name earlier runs recorded for
# "reconstruction".
OBJECTIVES = ("own", "reconstruction", "mse", "elbo", "elbo+mse", "set-prediction", "both")
CRITERIA = ("elbo", "mse")  # how a restart is chosen at test time (see infer_slots)
# Attribute classes of the generators: (shape classes, colour classes, has a scale).
ATTRIBUTES = {
    "tetrominoes": (len(tetrominoes.TETROMINO_NAMES), len(tetrominoes.COLOR_NAMES), False),
    "shapes": (len(shapes.SHAPE_NAMES), len(shapes.COLOR_NAMES), True),
}
# Held-out images come from a generator seed no training run uses.
TEST_SEED_OFFSET = 1_000_000
# Per-image scores: segmentation, reconstruction, and how a segmentation fails (objects split
# over slots, objects sharing a slot, the share of the background held by one slot).
SCORES = ("fg_ari", "ari", "mean_iou", "mse", "split", "merged", "background_share")


def make_batch(name: str, num_images: int, seed: int, start: int) -> dict:
    """Images ``start .. start + num_images - 1`` of a generated dataset, stacked."""
    if name == "tetrominoes":
        return generate_tetrominoes(num_images, seed=seed, start=start)
    if name == "shapes":
        return generate_shapes(num_images, seed=seed, start=start)
    raise ValueError(f"dataset: expected one of {DATASETS}, got {name!r}")


#: Architecture flags that only one model takes: (that model, why, for the error message).
MODEL_ONLY_SIZES = {
    "encoder_strides": ("slot_autoencoder", "IODINE has none"),
    "latent_dim": ("iodine", "the size of z per slot"),
    "pixel_scale": ("iodine", "its likelihood's sigma_x"),
}


def build_model(args, image_size: int):
    cls = {"slot_autoencoder": SlotAutoencoder, "iodine": IODINE}[args.model]
    sizes = {}
    names = ("decoder_resolution", "decoder_channels", "decoder_upsample", "kernel_size")
    for name in (*names, *MODEL_ONLY_SIZES):
        value = getattr(args, name)
        if value is None:
            continue
        if name in MODEL_ONLY_SIZES and args.model != MODEL_ONLY_SIZES[name][0]:
            only, why = MODEL_ONLY_SIZES[name]
            raise ValueError(f"{name}: only for --model {only} ({why})")
        sizes[name] = value
    if args.paper_size:
        return cls.paper_size(image_size=image_size, num_slots=args.num_slots, **sizes)
    return cls(image_size=image_size, num_slots=args.num_slots, **sizes)


def build_rule(args, model):
    rule = args.rule
    if rule == "default":
        rule = "slot_attention" if args.model == "slot_autoencoder" else "learned_gradient"
    if rule == "slot_attention":
        # The paper's module: inputs are the encoder's measurements, λ = the hidden vectors.
        return SlotAttention(
            args.num_iterations,
            slot_dim=model.slot_dim,
            input_dim=model.feature_dim,
            hidden_dim=model.slot_dim,
            encoder=False,
        )
    if rule == "soft_kmeans":
        return SoftKMeans(args.num_iterations, temperature=model.variance)
    if rule == "learned_gradient":
        extra = {}
        if args.refinement_inputs:  # IODINE's image-sized auxiliary inputs, per slot
            if not isinstance(model, IODINE):
                raise ValueError("refinement_inputs: only for --model iodine")
            features = RefinementInputs(out_dim=32, pooling=args.refinement_pooling)
            extra = {"features": features, "extra_dim": 32}
        return LearnedGradient(
            args.num_iterations,
            slot_dim=model.slot_dim,
            hidden_dim=128,
            preprocessing="layernorm",
            **extra,
        )
    if rule == "gradient_ascent":
        return GradientAscent(args.num_iterations, step_size=0.1, adam=True)
    raise ValueError(f"rule: expected one of {RULES}, got {rule!r}")


def build_objective(args, model):
    """The task objective J and its set-prediction head (``None`` without one).

    ``own`` is the model's own J (MSE for the autoencoder, the negative ELBO for IODINE);
    ``reconstruction`` (or ``mse``) the reconstruction MSE of the decoded slots for either model
    (for IODINE the posterior means: the inner ELBO refines λ, J alone trains the weights);
    ``elbo`` (IODINE) the negative ELBO, as ``pyro_slots train --objective elbo``; ``elbo+mse``
    (IODINE) the negative ELBO plus :func:`mse_weight` times that MSE; ``both`` adds
    ``--set-prediction-weight`` times the set-prediction loss to the model's own J.
    """
    own = Reconstruction() if args.model == "slot_autoencoder" else NegativeELBO()
    if args.objective == "own":
        return own, None
    if args.objective in ("reconstruction", "mse"):  # IODINE: the inner ELBO refines λ
        return Reconstruction(), None
    if args.objective in ("elbo", "elbo+mse") and not isinstance(model, IODINE):
        raise ValueError(f"objective: {args.objective} is only for --model iodine")
    if args.objective == "elbo":
        return NegativeELBO(), None
    if args.objective == "elbo+mse":
        return WeightedSum([NegativeELBO(), Reconstruction()], [1.0, mse_weight(args, model)]), None
    num_shapes, num_colors, has_scale = ATTRIBUTES[args.dataset]
    head = SetPrediction(model.slot_dim, num_shapes, num_colors, predict_scale=has_scale)
    if args.objective == "set-prediction":
        return head, head
    if args.objective == "both":
        return WeightedSum([own, head], weights=[1.0, args.set_prediction_weight]), head
    raise ValueError(f"objective: expected one of {OBJECTIVES}, got {args.objective!r}")


def mse_weight(args, model) -> float:
    """The weight of the MSE in ``--objective elbo+mse``: ``--mse-weight``, by default
    ``C·H·W / (2 σ_x²)``, which makes the term the negative log-likelihood (up to a constant) of
    the image under a Gaussian of IODINE's pixel scale centred on the decoded mean image
    ``Σ_k m_k μ_k`` -- the scale of the ELBO's own likelihood term. The mixture likelihood alone
    is as high when every slot paints one colour over the whole image under soft masks as when
    the masks follow the objects; the mean image is not."""
    if args.mse_weight is not None:
        return args.mse_weight
    return model.in_channels * model.num_measurements / (2.0 * model.pixel_scale**2)


def targets(head, batch: dict) -> tuple:
    """The set-prediction targets of a batch (none without a head)."""
    return () if head is None else head.targets_from_batch(batch)


def checkpoint(model, rule, head) -> dict:
    state = {"model": model.state_dict(), "rule": rule.state_dict()}
    if head is not None:
        state["set_prediction"] = head.state_dict()
    return state


def learning_rate(step: int, warmup: int, half_life: int) -> float:
    """Linear warm-up then exponential decay (Locatello et al. 2020), as a factor of ``--lr``."""
    return min(1.0, (step + 1) / max(warmup, 1)) * 0.5 ** (step / half_life)


def cosine_learning_rate(step: int, progress: float, warmup: int, final: float) -> float:
    """Linear warm-up, then cosine annealing from 1 to ``final`` as ``progress`` goes 0 -> 1."""
    progress = min(max(progress, 0.0), 1.0)
    anneal = final + (1.0 - final) * 0.5 * (1.0 + math.cos(math.pi * progress))
    return min(1.0, (step + 1) / max(warmup, 1)) * anneal


class Schedule:
    """The factor of ``--lr`` for update ``step``, as ``pyro.optim.LambdaLR`` asks for it.

    ``exponential``: :func:`learning_rate` (warm-up, then half-life ``--decay-half-life``).
    ``cosine``: :func:`cosine_learning_rate` over the run's budget, whichever of
    ``--num-steps`` and ``--max-minutes`` runs out first: the progress of update ``step`` is
    ``max(step / num_steps, elapsed / max_seconds)``, the clock started by :meth:`start`. A
    run bounded by wall time thus anneals to ``--final-lr-factor`` at its end whatever the
    speed of the machine (and is, in its number of updates, no more reproducible than the clock).
    """

    def __init__(self, args):
        self.kind = args.lr_schedule
        self.warmup, self.half_life = args.warmup_steps, args.decay_half_life
        self.num_steps, self.final = args.num_steps, args.final_lr_factor
        self.max_seconds = 60.0 * args.max_minutes
        self.started = None

    def start(self) -> None:
        self.started = time.time()

    def progress(self, step: int) -> float:
        elapsed = 0.0 if self.started is None else time.time() - self.started
        return max(step / self.num_steps, elapsed / self.max_seconds)

    def __call__(self, step: int) -> float:
        if self.kind == "exponential":
            return learning_rate(step, self.warmup, self.half_life)
        return cosine_learning_rate(step, self.progress(step), self.warmup, self.final)


@torch.no_grad()
def infer_slots(
    model,
    rule,
    x: torch.Tensor,
    num_slots: int,
    generator: torch.Generator,
    num_steps: int | None = None,
    num_restarts: int = 1,
    criterion: str = "elbo",
) -> torch.Tensor:
    """The refined slots ``(batch, K, slot_dim)`` of images ``x``.

    With ``num_restarts = R > 1`` the inner loop runs from R independent initializations side
    by side and every image keeps one restart: the highest inner ELBO (``criterion="elbo"``) or
    the lowest reconstruction error of the decoded slots (``"mse"``, the task objective J of the
    autoencoder). Both criteria use the image alone, never its true segmentation.
    """
    if criterion not in CRITERIA:
        raise ValueError(f"criterion: expected one of {CRITERIA}, got {criterion!r}")
    result = refine(
        model,
        x,
        rule,
        num_slots=num_slots,
        num_steps=num_steps,
        num_restarts=num_restarts,
        generator=generator,
    )
    if criterion == "elbo":
        return result.best().slots[0]
    restarts, batch = result.slots.shape[:2]
    recon = model.decode(result.slots.flatten(0, 1))[0]  # restart-major, as x.repeat
    mse = reconstruction_mse(x.repeat(restarts, 1, 1, 1), recon)
    return result.select(mse.reshape(restarts, batch).argmin(0)).slots[0]


@torch.no_grad()
def evaluate(
    model,
    rule,
    data: dict,
    batch_size: int,
    num_slots: int,
    seed: int,
    head=None,
    num_steps: int | None = None,
    num_restarts: int = 1,
    criterion: str = "elbo",
) -> dict:
    """Segmentation and reconstruction scores of ``data`` (held-out images), mean and std.

    With a set-prediction ``head``, also ``"ap"``: ``{threshold: AP}`` over all the images at
    once (predictions ranked by confidence across images, as the paper's metric).
    ``num_steps`` (default: the rule's), ``num_restarts`` and ``criterion`` are those of
    :func:`infer_slots`.
    """
    scores = {name: [] for name in SCORES}
    final_slots = []
    generator = torch.Generator().manual_seed(seed)
    images, masks = data["image"], data["mask"]
    for i in range(0, images.shape[0], batch_size):
        x, true = images[i : i + batch_size], masks[i : i + batch_size]
        slots = infer_slots(
            model, rule, x, num_slots, generator, num_steps, num_restarts, criterion
        )
        final_slots.append(slots)
        recon, _, pred = model.decode(slots)
        scores["fg_ari"].append(fg_ari(true, pred))
        scores["ari"].append(ari(true, pred))
        scores["mean_iou"].append(mean_iou(true, pred))
        scores["mse"].append(reconstruction_mse(x, recon).double())
        for name, values in segmentation_errors(true, pred).items():
            scores[name].append(values.double())
    out = {}
    for name, values in scores.items():
        v = torch.cat(values)
        v = v[~torch.isnan(v)]
        out[name] = {"mean": v.mean().item(), "std": v.std().item(), "n": v.numel()}
    if head is not None:
        aps = head.average_precisions(
            torch.cat(final_slots), *targets(head, data), thresholds=AP_THRESHOLDS
        )
        out["ap"] = {("inf" if math.isinf(t) else str(t)): ap for t, ap in aps.items()}
    return out


def format_scores(scores: dict) -> str:
    text = (
        f"FG-ARI {scores['fg_ari']['mean']:.4f} ARI {scores['ari']['mean']:.4f} "
        f"mIoU {scores['mean_iou']['mean']:.4f} MSE {scores['mse']['mean']:.5f}"
    )
    if "ap" in scores:
        text += "  AP " + " ".join(f"{t}: {ap:.3f}" for t, ap in scores["ap"].items())
    return text


def main(args):
    torch.set_num_threads(args.threads)
    pyro.set_rng_seed(args.seed)
    image_size = make_batch(args.dataset, 1, 0, 0)["image"].shape[-1]
    model = build_model(args, image_size)
    rule = build_rule(args, model)
    objective, head = build_objective(args, model)
    schedule = Schedule(args)
    val = make_validation(args)
    if head is not None and args.num_slots < val["present"].shape[1]:
        raise ValueError(
            f"num_slots: set prediction on {args.dataset} needs at least "
            f"{val['present'].shape[1]} slots (one per object), got {args.num_slots}"
        )
    optim = pyro.optim.LambdaLR(
        {
            "optimizer": torch.optim.Adam,
            "optim_args": {"lr": args.lr},
            "lr_lambda": schedule,
        }
    )
    svi = NestedSVI(
        model,
        rule,
        objective,
        optim,
        num_slots=args.num_slots,
        iteration_weights=args.iteration_weights,
        gradient=args.gradient,
        clip_norm=args.clip_norm,
        seed=args.seed,
    )
    num_params = sum(p.numel() for p in svi.parameters())
    print(
        f"model={args.model} rule={type(rule).__name__} objective={args.objective} "
        f"params={num_params}",
        flush=True,
    )
    if args.eval_only:  # the weights of a finished run, evaluated on the test set only
        state = torch.load(args.checkpoint, map_location="cpu", weights_only=True)
        load_weights(model, rule, head, state)
        return test_and_report(args, model, rule, head, {"eval_only": True})
    if args.init_from:  # warm start: a finished run's weights, a fresh optimizer and schedule
        state = torch.load(args.init_from, map_location="cpu", weights_only=True)
        try:
            load_weights(model, rule, head, state)
        except (KeyError, RuntimeError) as error:
            raise ValueError(
                f"init_from: {args.init_from} does not hold weights of this configuration "
                f"(--model {args.model}, architecture flags): {str(error).splitlines()[0]}"
            ) from None
    val_targets = targets(head, val)
    # J on the validation scenes before and after training (slots refined, no update).
    val_j_initial = svi.evaluate_loss(val["image"], *val_targets)
    curve, val_curve = [], []
    best = None  # (validation FG-ARI, update, weights) with --select-best
    start = time.time()
    schedule.start()
    running, running_terms, step, skipped = None, None, 0, []
    while step < args.num_steps and time.time() - start < 60 * args.max_minutes:
        first = args.first_scene + step * args.batch_size
        batch = make_batch(args.dataset, args.batch_size, args.seed, first)
        try:
            loss, _ = svi.step(batch["image"], *targets(head, batch))
        except FloatingPointError as error:
            # NestedSVI refused the update (non-finite J or gradient) and left the weights
            # unchanged: skip this batch, up to --max-skipped times in the whole run.
            skipped.append(step + 1)
            print(f"step {step + 1:6d}  skipped: {error}", flush=True)
            if len(skipped) > args.max_skipped:
                raise
            step += 1
            continue
        optim.step()
        running = loss if running is None else 0.98 * running + 0.02 * loss
        terms = getattr(objective, "last_terms", None)
        if terms is not None:
            running_terms = (
                terms
                if running_terms is None
                else tuple(0.98 * r + 0.02 * t for r, t in zip(running_terms, terms))
            )
        step += 1
        if step % args.log_every == 0 or step == 1:
            elapsed = time.time() - start
            entry = {"step": step, "seconds": round(elapsed, 1), "J": running}
            entry["lr"] = args.lr * schedule(step)
            text = f"step {step:6d}  {elapsed:7.1f}s  J {running:.5f}"
            if running_terms is not None:
                # Unweighted parts of J: the model's own objective, then set prediction or
                # (elbo+mse) the decoded image's MSE.
                second = "mse" if args.objective == "elbo+mse" else "set"
                entry["J_own"], entry[f"J_{second}"] = running_terms
                text += f"  (own {running_terms[0]:.5f}, {second} {running_terms[1]:.4f})"
            curve.append(entry)
            print(text, flush=True)
        if args.val_every and step % args.val_every == 0:
            # Scored as the test scenes will be (--eval-iterations), one restart per scene.
            scores = evaluate(
                model,
                rule,
                val,
                args.batch_size,
                args.num_slots,
                args.seed,
                head=head,
                num_steps=args.eval_iterations,
            )
            val_curve.append({"step": step, "seconds": round(time.time() - start, 1), **scores})
            print(f"  val step {step}: {format_scores(scores)}", flush=True)
            if args.checkpoint:
                save_checkpoint(args.checkpoint, checkpoint(model, rule, head))
            if args.select_best and (best is None or scores["fg_ari"]["mean"] > best[0]):
                state = copy.deepcopy(checkpoint(model, rule, head))
                best = (scores["fg_ari"]["mean"], step, state)
                if args.checkpoint:
                    save_checkpoint(best_path(args.checkpoint), state)
    train_seconds = time.time() - start
    if args.checkpoint:
        save_checkpoint(args.checkpoint, checkpoint(model, rule, head))
    val_j_final = svi.evaluate_loss(val["image"], *val_targets)
    print(f"validation J: {val_j_initial:.5f} before training, {val_j_final:.5f} after")
    results = {
        "num_parameters": num_params,
        "num_updates": step,
        "skipped_updates": skipped,
        "train_seconds": round(train_seconds, 1),
        "validation_J": {"initial": val_j_initial, "final": val_j_final},
        "curve": curve,
        "validation": val_curve,
    }
    test = make_test(args)
    if best is not None:
        # Test the weights of the best validation FG-ARI too (the final ones stay "test").
        final_state = copy.deepcopy(checkpoint(model, rule, head))
        load_weights(model, rule, head, best[2])
        selected = evaluate(model, rule, test, head=head, **test_options(args))
        print(f"test of the best validation weights (update {best[1]}): {format_scores(selected)}")
        results["selected"] = {"step": best[1], "val_fg_ari": best[0], "test": selected}
        load_weights(model, rule, head, final_state)
    return test_and_report(args, model, rule, head, results, test)


def best_path(path: str) -> str:
    """Where ``--select-best`` keeps the best validation weights beside ``--checkpoint``."""
    root, ext = os.path.splitext(path)
    return f"{root}.best{ext or '.pt'}"


def load_weights(model, rule, head, state: dict) -> None:
    model.load_state_dict(state["model"])
    rule.load_state_dict(state["rule"])
    if head is not None:
        head.load_state_dict(state["set_prediction"])


def test_options(args) -> dict:
    """How the test scenes are inferred: the rule's T unless --eval-iterations, restarts."""
    return dict(
        batch_size=args.eval_batch_size,
        num_slots=args.num_slots,
        seed=args.seed,
        num_steps=args.eval_iterations,
        num_restarts=args.eval_restarts,
        criterion=args.restart_criterion,
    )


def make_test(args) -> dict:
    """The held-out test scenes: a generator seed no training batch or validation scene uses.

    With ``--eval-on validation`` the validation scenes instead (``--num-val`` of them), to
    choose test-time settings (``--eval-iterations``, restarts) without looking at the test set.
    """
    if args.eval_on == "validation":
        return make_validation(args)
    return make_batch(args.dataset, args.num_eval, args.seed + TEST_SEED_OFFSET, 0)


def make_validation(args) -> dict:
    return make_batch(args.dataset, args.num_val, args.seed + TEST_SEED_OFFSET + 1, 0)


def test_and_report(args, model, rule, head, results: dict, test: dict | None = None) -> dict:
    """Scores on the held-out test scenes (``make_test(args)`` unless given), printed and
    written to ``--output`` with ``results``."""
    test = make_test(args) if test is None else test
    eval_start = time.time()
    scores = evaluate(model, rule, test, head=head, **test_options(args))
    results = {
        "args": vars(args),
        **results,
        "eval_seconds": round(time.time() - eval_start, 1),
        "eval_on": args.eval_on,
        "test": scores,
    }
    print(
        f"{args.eval_on} ({test['image'].shape[0]} images): "
        + "  ".join(
            f"{k} {v['mean']:.4f} ± {v['std']:.4f}" for k, v in scores.items() if k != "ap"
        ),
        flush=True,
    )
    if "ap" in scores:
        print("test AP: " + "  ".join(f"{t}: {ap:.4f}" for t, ap in scores["ap"].items()))
    if args.output:
        with open(args.output, "w") as f:
            json.dump(results, f, indent=1)
    return results


def _positive_ints(example: str):
    """An argparse type: comma-separated positive integers like ``example``."""

    def parse(text: str) -> tuple[int, ...]:
        try:
            values = tuple(int(v) for v in text.split(","))
        except ValueError:
            values = ()
        if not values or min(values) < 1:
            raise argparse.ArgumentTypeError(
                f"expected positive integers like {example}, got {text!r}"
            )
        return values

    return parse


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="slot_autoencoder", choices=MODELS)
    parser.add_argument("--dataset", default="tetrominoes", choices=DATASETS)
    parser.add_argument("--rule", default="default", choices=RULES)
    parser.add_argument("--paper-size", action="store_true", help="the papers' architectures")
    parser.add_argument(
        "--refinement-inputs",
        action="store_true",
        help="IODINE: feed LearnedGradient the auxiliary inputs of the paper (image, decoded "
        "means and masks, posterior masks, coordinates; models.RefinementInputs)",
    )
    parser.add_argument(
        "--refinement-pooling",
        default="mean",
        choices=RefinementInputs.POOLINGS,
        help="how --refinement-inputs pools each slot's feature map: the mean, or the mean and "
        "the average weighted by the slot's posterior mask",
    )
    parser.add_argument(
        "--objective",
        default="own",
        choices=OBJECTIVES,
        help="J: the model's own (own: the autoencoder's reconstruction MSE, IODINE's negative "
        "ELBO), the MSE of the decoded slots for either model (reconstruction, or its older "
        "name mse), IODINE's negative ELBO (elbo) or the ELBO plus the MSE (elbo+mse), set "
        "prediction from the final slots, or the model's own J plus set prediction (both)",
    )
    parser.add_argument(
        "--set-prediction-weight",
        type=float,
        # At initialization on shapes the set-prediction loss sends ~150x the gradient norm of
        # the MSE into the encoder and the rule; 0.01 keeps reconstruction in the game.
        default=0.01,
        help="weight of the set-prediction loss in J with --objective both",
    )
    parser.add_argument(
        "--mse-weight",
        type=float,
        default=None,
        help="weight of the MSE in J with --objective elbo+mse (default C H W / (2 sigma_x^2))",
    )
    parser.add_argument(
        "--encoder-strides",
        type=_positive_ints("2,1,2,1"),
        default=None,
        help="strides of the encoder's four convolutions, e.g. 2,1,2,1 (default 1,2,1,1)",
    )
    parser.add_argument(
        "--decoder-resolution",
        type=int,
        default=None,
        help="decode at this resolution, then resize bilinearly to the image (default: the "
        "image's)",
    )
    parser.add_argument(
        "--decoder-channels",
        type=_positive_ints("32,32,32"),
        default=None,
        help="channels of the decoder's hidden convolutions, e.g. 32,32,32 (default 32,32,16; "
        "with --paper-size the paper's)",
    )
    parser.add_argument(
        "--decoder-upsample",
        type=int,
        default=None,
        help="how many of the decoder's hidden layers upsample by two (default 2; 0 broadcasts "
        "at the decoding resolution, as the papers' decoders do)",
    )
    parser.add_argument(
        "--kernel-size",
        type=int,
        default=None,
        help="odd kernel size of the hidden convolutions (default 5; the autoencoder's encoder "
        "uses it too)",
    )
    parser.add_argument(
        "--latent-dim",
        type=int,
        default=None,
        help="IODINE: size of each slot's latent z (default 16, with --paper-size 32)",
    )
    parser.add_argument(
        "--pixel-scale",
        type=float,
        default=None,
        help="IODINE: sigma_x of the pixel likelihood, > 0 (default 0.1)",
    )
    parser.add_argument("--num-slots", type=int, default=4)
    parser.add_argument("--num-iterations", type=int, default=3, help="inner steps T")
    parser.add_argument("--gradient", default="unrolled")
    parser.add_argument(
        "--iteration-weights", default="last", choices=("last", "uniform", "linear")
    )
    parser.add_argument("--num-steps", type=int, default=20, help="outer updates (at most)")
    parser.add_argument("--max-minutes", type=float, default=math.inf, help="training wall time")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=4e-4)
    parser.add_argument("--warmup-steps", type=int, default=1000)
    parser.add_argument(
        "--lr-schedule",
        default="exponential",
        choices=("exponential", "cosine"),
        help="after the warm-up: exponential decay (--decay-half-life, the paper's) or cosine "
        "annealing to --final-lr-factor over the run's budget (--num-steps or --max-minutes, "
        "whichever ends first)",
    )
    parser.add_argument("--decay-half-life", type=int, default=100_000)
    parser.add_argument("--final-lr-factor", type=float, default=0.05)
    parser.add_argument(
        "--select-best",
        action="store_true",
        help="keep the weights of the best validation FG-ARI (every --val-every updates) and "
        "score them on the test scenes too (beside the final weights)",
    )
    parser.add_argument(
        "--max-skipped",
        type=int,
        default=10,
        help="updates NestedSVI may refuse as non-finite (batch skipped) before the run stops",
    )
    parser.add_argument("--clip-norm", type=float, default=None)
    parser.add_argument("--num-eval", type=int, default=32, help="held-out test images")
    parser.add_argument("--eval-batch-size", type=int, default=100)
    parser.add_argument(
        "--eval-iterations",
        type=int,
        default=None,
        help="inner steps T on the validation and test scenes (default: --num-iterations); "
        "a rule trained with --gradient first_order may need more steps than it was trained "
        "with to reach its fixed point",
    )
    parser.add_argument(
        "--eval-restarts",
        type=int,
        default=1,
        help="independent slot initializations per test scene; one is kept per scene by "
        "--restart-criterion",
    )
    parser.add_argument(
        "--eval-on",
        default="test",
        choices=("test", "validation"),
        help="score the final weights on the test scenes or on the validation scenes (to "
        "choose test-time settings without the test set)",
    )
    parser.add_argument(
        "--restart-criterion",
        default="elbo",
        choices=CRITERIA,
        help="keep the restart with the highest inner ELBO or the lowest reconstruction MSE",
    )
    parser.add_argument(
        "--num-val", type=int, default=64, help="validation images (J before/after, the curve)"
    )
    parser.add_argument("--val-every", type=int, default=0, help="0: no validation curve")
    parser.add_argument("--log-every", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--checkpoint", default=None, help="where to save the weights")
    parser.add_argument(
        "--eval-only",
        action="store_true",
        help="load --checkpoint (a finished run's weights) and only evaluate on the test set",
    )
    parser.add_argument(
        "--init-from",
        default=None,
        help="start training from the weights of a finished run (its --checkpoint file); the "
        "optimizer state, the learning-rate schedule and the update count start afresh",
    )
    parser.add_argument(
        "--first-scene",
        type=int,
        default=0,
        help="index of the first training scene of the generator's stream; to continue a run "
        "with --init-from on unseen scenes, its updates times its batch size",
    )
    parser.add_argument("--output", default=None, help="JSON file for the results")
    args = parser.parse_args(argv)
    if args.latent_dim is not None and args.latent_dim < 1:
        parser.error(f"--latent-dim: expected an integer >= 1, got {args.latent_dim}")
    if args.decoder_upsample is not None and args.decoder_upsample < 0:
        parser.error(f"--decoder-upsample: expected an integer >= 0, got {args.decoder_upsample}")
    if args.kernel_size is not None and (args.kernel_size < 1 or args.kernel_size % 2 == 0):
        parser.error(f"--kernel-size: expected an odd integer >= 1, got {args.kernel_size}")
    if args.pixel_scale is not None and not args.pixel_scale > 0:
        parser.error(f"--pixel-scale: expected a number > 0, got {args.pixel_scale}")
    if args.first_scene < 0:
        parser.error(f"--first-scene: expected an integer >= 0, got {args.first_scene}")
    if args.init_from and args.eval_only:
        parser.error("--init-from: training only (--eval-only evaluates --checkpoint)")
    if args.init_from and not os.path.isfile(args.init_from):
        parser.error(f"--init-from: no such file {args.init_from!r}")
    if args.max_skipped < 0:
        parser.error("--max-skipped: expected an integer >= 0")
    if not 0.0 <= args.final_lr_factor <= 1.0:
        parser.error(f"--final-lr-factor: expected a number in [0, 1], got {args.final_lr_factor}")
    if args.select_best and not args.val_every:
        parser.error("--select-best: needs a validation curve (--val-every > 0)")
    if args.mse_weight is not None and not args.mse_weight > 0:
        parser.error(f"--mse-weight: expected a number > 0, got {args.mse_weight}")
    if args.mse_weight is not None and args.objective != "elbo+mse":
        parser.error("--mse-weight: only with --objective elbo+mse")
    if args.refinement_pooling != "mean" and not args.refinement_inputs:
        parser.error("--refinement-pooling: only with --refinement-inputs")
    if args.eval_only and not args.checkpoint:
        parser.error("--eval-only: needs --checkpoint, the weights to evaluate")
    if args.eval_iterations is not None and args.eval_iterations < 1:
        parser.error("--eval-iterations: expected an integer >= 1")
    for name in ("num_val", "num_eval", "batch_size", "eval_batch_size", "eval_restarts"):
        if getattr(args, name) < 1:  # J before/after training is measured on the validation set
            parser.error(f"--{name.replace('_', '-')}: expected an integer >= 1")
    return args


if __name__ == "__main__":
    main(parse_args())
