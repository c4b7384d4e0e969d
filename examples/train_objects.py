"""Train an object-centric image model (Slot Attention autoencoder or IODINE) with NestedSVI.

The inner rule refines K slots per image on the model's ELBO, the outer loop fits the shared
weights on the task objective J (reconstruction for the Slot Attention autoencoder, the negative
ELBO for IODINE). Held-out images are then segmented by the decoder's masks and scored with
FG-ARI, ARI, mean IoU and reconstruction MSE (``pyro_slots.metrics``); everything goes into a
JSON file.

Tiny defaults run in seconds::

    python examples/train_objects.py

The headline configuration (see ``examples/results/objects.md``)::

    python examples/train_objects.py --model slot_autoencoder --dataset tetrominoes \\
        --max-minutes 35 --num-steps 100000 --batch-size 32 --num-eval 1000 \\
        --output /tmp/objects.json

``--paper-size`` swaps the CPU-sized networks for the architectures of the papers.
"""

from __future__ import annotations

import argparse
import json
import math
import time

import pyro
import pyro.optim
import torch
from pyro_slots.models import IODINE, SlotAutoencoder

from pyro_slots import NestedSVI, refine
from pyro_slots.data import generate_shapes, generate_tetrominoes
from pyro_slots.inner import GradientAscent, LearnedGradient, SlotAttention, SoftKMeans
from pyro_slots.metrics import ari, fg_ari, mean_iou, reconstruction_mse
from pyro_slots.objectives import NegativeELBO, Reconstruction

MODELS = ("slot_autoencoder", "iodine")
DATASETS = ("tetrominoes", "shapes")
RULES = ("default", "slot_attention", "soft_kmeans", "learned_gradient", "gradient_ascent")
# Held-out images come from a generator seed no training run uses.
TEST_SEED_OFFSET = 1_000_000


def make_batch(name: str, num_images: int, seed: int, start: int) -> dict:
    """Images ``start .. start + num_images - 1`` of a generated dataset, stacked."""
    if name == "tetrominoes":
        return generate_tetrominoes(num_images, seed=seed, start=start)
    if name == "shapes":
        return generate_shapes(num_images, seed=seed, start=start)
    raise ValueError(f"dataset: expected one of {DATASETS}, got {name!r}")


def build_model(args, image_size: int):
    cls = {"slot_autoencoder": SlotAutoencoder, "iodine": IODINE}[args.model]
    if args.paper_size:
        return cls.paper_size(image_size=image_size, num_slots=args.num_slots)
    return cls(image_size=image_size, num_slots=args.num_slots)


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
        return LearnedGradient(
            args.num_iterations, slot_dim=model.slot_dim, hidden_dim=128, preprocessing="layernorm"
        )
    if rule == "gradient_ascent":
        return GradientAscent(args.num_iterations, step_size=0.1, adam=True)
    raise ValueError(f"rule: expected one of {RULES}, got {rule!r}")


def build_objective(args):
    return Reconstruction() if args.model == "slot_autoencoder" else NegativeELBO()


def learning_rate(step: int, warmup: int, half_life: int) -> float:
    """Linear warm-up then exponential decay (Locatello et al. 2020), as a factor of ``--lr``."""
    return min(1.0, (step + 1) / max(warmup, 1)) * 0.5 ** (step / half_life)


@torch.no_grad()
def evaluate(model, rule, data: dict, batch_size: int, num_slots: int, seed: int) -> dict:
    """Segmentation and reconstruction scores of ``data`` (held-out images), mean and std."""
    scores = {"fg_ari": [], "ari": [], "mean_iou": [], "mse": []}
    generator = torch.Generator().manual_seed(seed)
    images, masks = data["image"], data["mask"]
    for i in range(0, images.shape[0], batch_size):
        x, true = images[i : i + batch_size], masks[i : i + batch_size]
        result = refine(model, x, rule, num_slots=num_slots, generator=generator)
        recon, _, pred = model.decode(result.slots)
        scores["fg_ari"].append(fg_ari(true, pred))
        scores["ari"].append(ari(true, pred))
        scores["mean_iou"].append(mean_iou(true, pred))
        scores["mse"].append(reconstruction_mse(x, recon).double())
    out = {}
    for name, values in scores.items():
        v = torch.cat(values)
        v = v[~torch.isnan(v)]
        out[name] = {"mean": v.mean().item(), "std": v.std().item(), "n": v.numel()}
    return out


def main(args):
    torch.set_num_threads(args.threads)
    pyro.set_rng_seed(args.seed)
    image_size = make_batch(args.dataset, 1, 0, 0)["image"].shape[-1]
    model = build_model(args, image_size)
    rule = build_rule(args, model)
    objective = build_objective(args)
    optim = pyro.optim.LambdaLR(
        {
            "optimizer": torch.optim.Adam,
            "optim_args": {"lr": args.lr},
            "lr_lambda": lambda s: learning_rate(s, args.warmup_steps, args.decay_half_life),
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
    print(f"model={args.model} rule={type(rule).__name__} params={num_params}", flush=True)
    val = make_batch(args.dataset, args.num_val, args.seed + TEST_SEED_OFFSET + 1, 0)
    curve, val_curve = [], []
    start = time.time()
    running, step = None, 0
    while step < args.num_steps and time.time() - start < 60 * args.max_minutes:
        batch = make_batch(args.dataset, args.batch_size, args.seed, step * args.batch_size)
        loss = svi.step(batch["image"])
        optim.step()
        running = loss if running is None else 0.98 * running + 0.02 * loss
        step += 1
        if step % args.log_every == 0 or step == 1:
            elapsed = time.time() - start
            curve.append({"step": step, "seconds": round(elapsed, 1), "J": running})
            print(f"step {step:6d}  {elapsed:7.1f}s  J {running:.5f}", flush=True)
        if args.val_every and step % args.val_every == 0:
            scores = evaluate(model, rule, val, args.batch_size, args.num_slots, args.seed)
            val_curve.append({"step": step, "seconds": round(time.time() - start, 1), **scores})
            print(
                f"  val step {step}: FG-ARI {scores['fg_ari']['mean']:.4f} "
                f"ARI {scores['ari']['mean']:.4f} mIoU {scores['mean_iou']['mean']:.4f} "
                f"MSE {scores['mse']['mean']:.5f}",
                flush=True,
            )
            if args.checkpoint:
                torch.save(
                    {"model": model.state_dict(), "rule": rule.state_dict()}, args.checkpoint
                )
    train_seconds = time.time() - start
    if args.checkpoint:
        torch.save({"model": model.state_dict(), "rule": rule.state_dict()}, args.checkpoint)
    test = make_batch(args.dataset, args.num_eval, args.seed + TEST_SEED_OFFSET, 0)
    eval_start = time.time()
    scores = evaluate(model, rule, test, args.eval_batch_size, args.num_slots, args.seed)
    eval_seconds = time.time() - eval_start
    results = {
        "args": vars(args),
        "num_parameters": num_params,
        "num_updates": step,
        "train_seconds": round(train_seconds, 1),
        "eval_seconds": round(eval_seconds, 1),
        "test": scores,
        "curve": curve,
        "validation": val_curve,
    }
    print(
        f"test ({args.num_eval} images): "
        + "  ".join(f"{k} {v['mean']:.4f} ± {v['std']:.4f}" for k, v in scores.items()),
        flush=True,
    )
    if args.output:
        with open(args.output, "w") as f:
            json.dump(results, f, indent=1)
    return results


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="slot_autoencoder", choices=MODELS)
    parser.add_argument("--dataset", default="tetrominoes", choices=DATASETS)
    parser.add_argument("--rule", default="default", choices=RULES)
    parser.add_argument("--paper-size", action="store_true", help="the papers' architectures")
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
    parser.add_argument("--decay-half-life", type=int, default=100_000)
    parser.add_argument("--clip-norm", type=float, default=None)
    parser.add_argument("--num-eval", type=int, default=32, help="held-out test images")
    parser.add_argument("--eval-batch-size", type=int, default=100)
    parser.add_argument("--num-val", type=int, default=64, help="validation images")
    parser.add_argument("--val-every", type=int, default=0, help="0: no validation curve")
    parser.add_argument("--log-every", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--checkpoint", default=None, help="where to save the weights")
    parser.add_argument("--output", default=None, help="JSON file for the results")
    return parser.parse_args(argv)


if __name__ == "__main__":
    main(parse_args())
