"""Amortized clustering: slot attention learns to fit Gaussian mixtures to point sets.

Every datapoint is a set of 100-500 2-D points from its own mixture of 4 Gaussians; the slots of
:class:`~pyro_slots.models.GaussianMixture` are its components. The rule,
:class:`~pyro_slots.inner.SlotAttention` over the points' features ``(1, z, z²)``, is trained with
``J = -ELBO``, checkpointed by :func:`pyro_slots.checkpoint.save_checkpoint` (run the command
again to resume exactly), then compared with scikit-learn, EM and gradient ascent by
:mod:`pyro_slots.diagnostics.clustering` (log-likelihood per point, time per set)::

    python examples/amortized_clustering.py --num-updates 200 --num-test-sets 50
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import pyro
import torch
from threadpoolctl import threadpool_limits
from tqdm import tqdm

from pyro_slots import NestedSVI, tune_allocator
from pyro_slots.checkpoint import FORMAT, load_checkpoint, rng_state, save_checkpoint
from pyro_slots.data import sample_point_sets
from pyro_slots.diagnostics import clustering
from pyro_slots.inner import GaussianFeatures, SlotAttention
from pyro_slots.models import GaussianMixture
from pyro_slots.models.gmm import INITS
from pyro_slots.objectives import NegativeELBO

K, DIM, TRAIN_SEED, TEST_SEED = 4, 2, 0, 1


def build(args):
    """The model, the learned rule and ``NestedSVI`` (lr decays by ``--lr-decay`` over the run)."""
    torch.manual_seed(args.seed)  # the rule's initial weights: the same command, the same run
    model = GaussianMixture(
        K, DIM, init=args.init, init_lloyd_steps=args.learned_lloyd_steps,
        init_local_trials=args.init_local_trials,
    )  # fmt: skip
    features = {}
    if args.features == "gaussian":  # keys (1, z, z²) of standardized points, no LayerNorm
        features = dict(encoder=GaussianFeatures(DIM), feature_dim=2 * DIM + 1, norm_inputs=False)
    rule = SlotAttention(
        num_steps=args.num_steps, slot_dim=model.slot_dim, input_dim=DIM,
        hidden_dim=args.hidden_dim, num_heads=args.num_heads, moments=args.moments, **features,
    )  # fmt: skip
    lrd = _per_update_decay(args.lr_decay, args.num_updates)
    optim = pyro.optim.ClippedAdam({"lr": args.lr, "lrd": lrd, "clip_norm": 10.0})
    svi = NestedSVI(
        model, rule, NegativeELBO(), optim, gradient=args.gradient, num_steps=args.num_steps,
        iteration_weights=args.iteration_weights, seed=args.seed,
    )  # fmt: skip
    return model, rule, svi


def batch_and_steps(args, update: int) -> tuple[torch.Tensor, int]:
    """Fresh sets of a random size, and T uniform on ``[--num-steps, --max-train-steps]``; both
    drawn from the update's own generators, so a resumed run repeats them."""
    g = torch.Generator().manual_seed(args.seed * 1_000_003 + update)
    n = int(torch.randint(args.min_points, args.max_points + 1, (1,), generator=g))
    g = torch.Generator().manual_seed(args.seed * 1_000_003 + update + 7)
    high = max(args.max_train_steps, args.num_steps)
    t = int(torch.randint(args.num_steps, high + 1, (1,), generator=g))
    return sample_point_sets(args.batch_size, n, K, DIM, TRAIN_SEED, update * args.batch_size).x, t


def save(path, rule, svi, progress, args):
    """The library's checkpoint (atomic, SHA-256); the gmm and J = -ELBO have no weights."""
    step = progress["update"]
    state = dict(inner=rule.state_dict(), svi=svi.state_dict(), model={}, objective={})
    config = {**vars(args), "test_steps": list(args.test_steps)}
    payload = dict(format=FORMAT, step=step, config=config, rng=rng_state(step), **state)
    save_checkpoint(path, {**payload, **progress})


#: The options a resumed run must share with its checkpoint (and the lr decay per update).
TRAINING_OPTIONS = (
    "seed", "lr", "num_steps", "max_train_steps", "hidden_dim", "num_heads", "moments",
    "features", "gradient", "iteration_weights", "init", "learned_lloyd_steps",
    "init_local_trials",
)  # fmt: skip


def _per_update_decay(lr_decay: float, num_updates: int) -> float:
    return lr_decay ** (1.0 / max(num_updates, 1))


def train(args, rule, svi) -> dict:
    """``NestedSVI`` updates up to ``--num-updates``, resuming from ``--checkpoint`` if present.

    :returns: ``{"update", "losses" (J per point of every update), "seconds"}``.
    """
    progress = {"update": 0, "losses": [], "seconds": 0.0}
    source = args.checkpoint if args.checkpoint and os.path.exists(args.checkpoint) else None
    if source or args.init_from:
        payload = load_checkpoint(source or args.init_from)
        rule.load_state_dict(payload["inner"])
        if source:  # --init-from takes the weights only: a fresh optimizer
            # The options that define the training must be the saved ones (a larger
            # --num-updates compounded the lr decay; a new --lr was ignored).
            saved = payload.get("config", {})
            changed = [
                f"--{k.replace('_', '-')} ({saved[k]!r})"
                for k in TRAINING_OPTIONS
                if k in saved and saved[k] != getattr(args, k)
            ]
            if "lr_decay" in saved and not math.isclose(
                _per_update_decay(saved["lr_decay"], saved["num_updates"]),
                _per_update_decay(args.lr_decay, args.num_updates),
                rel_tol=1e-12,
            ):  # more updates may follow, at the saved decay per update
                changed.append(
                    f"--lr-decay over --num-updates ({saved['lr_decay']!r} over "
                    f"{saved['num_updates']!r} updates)"
                )
            if changed:
                raise SystemExit(
                    f"--checkpoint {source}: saved with other {', '.join(changed)}; resume with "
                    "the same options or start a new checkpoint"
                )
            svi.load_state_dict(payload["svi"])
            progress = {k: payload[k] for k in progress}
    bar = tqdm(range(progress["update"], args.num_updates), desc="train", disable=args.quiet)
    for update in bar:
        start = time.perf_counter()
        x, svi.num_steps = batch_and_steps(args, update)
        loss, result = svi.step(x)
        progress["seconds"] += time.perf_counter() - start
        progress["losses"].append(loss / x.shape[1])
        progress["update"] = update + 1
        bar.set_postfix(J=f"{loss / x.shape[1]:.4f}")
        done = progress["update"]
        if args.checkpoint and (done % args.checkpoint_every == 0 or done == args.num_updates):
            save(args.checkpoint, rule, svi, progress, args)
    return progress


def main(args):
    tune_allocator()  # every method is timed with large tensors kept in the heap
    torch.set_num_threads(args.threads)
    threadpool_limits(args.threads)  # numpy's BLAS, used by scikit-learn
    model, rule, svi = build(args)
    progress = train(args, rule, svi)
    rule.eval()
    groups = clustering.point_set_groups(
        args.num_test_sets, args.min_points, args.max_points, args.num_test_groups, K, DIM,
        TEST_SEED,
    )  # fmt: skip
    methods = clustering.baseline_methods(K, DIM, args.seed)
    methods = {k: f for k, f in methods.items() if k == clustering.ORACLE or not args.learned_only}
    methods.update(
        clustering.learned_methods(model, rule, args.test_steps, args.num_steps, args.seed,
                                   args.fast_learned, args.safeguarded)
    )  # fmt: skip
    rows = clustering.compare_methods(methods, groups, repeats=args.timing_repeats)
    table = clustering.comparison_table(rows, f"{args.max_points} pts")
    if not args.quiet:
        print(table)
    if args.results:
        command = " ".join(["python examples/amortized_clustering.py", *sys.argv[1:]])
        with open(args.results, "w") as f:
            f.write(f"# Amortized clustering\n\nReproduce with `{command}`.\n\n{table}\n")
        with open(os.path.splitext(args.results)[0] + ".json", "w") as f:
            json.dump({"args": vars(args), "rows": rows, "train": progress}, f, indent=1)
    return rows, progress


def make_parser():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    options = {
        "num-updates": 100, "batch-size": 32, "min-points": 100, "max-points": 500,
        "num-steps": 3, "max-train-steps": 6, "hidden-dim": 32, "num-heads": 1, "lr": 1e-3,
        "lr-decay": 0.1, "num-test-sets": 50, "num-test-groups": 5, "learned-lloyd-steps": 0,
        "timing-repeats": 1, "checkpoint-every": 100, "threads": 1, "seed": 0,
        "gradient": "unrolled", "iteration-weights": "linear", "checkpoint": None,
        "init-from": None, "results": None,
    }  # fmt: skip
    for name, default in options.items():
        parser.add_argument(f"--{name}", type=type(default) if default is not None else str,
                            default=default)  # fmt: skip
    parser.add_argument("--features", choices=["gaussian", "mlp"], default="gaussian")
    parser.add_argument("--init", choices=INITS, default="kmeans++_seeds")
    parser.add_argument(
        "--init-local-trials", type=int, default=None,
        help="candidates per k-means++ draw (default 2 + ln K, as scikit-learn)",
    )  # fmt: skip
    parser.add_argument("--moments", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--test-steps", type=int, nargs="+", default=[1, 3, 5, 10])
    for flag in ("--fast-learned", "--safeguarded", "--learned-only", "--quiet"):
        parser.add_argument(flag, action="store_true")
    return parser


if __name__ == "__main__":
    main(make_parser().parse_args())
