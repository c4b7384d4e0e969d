"""Amortized clustering: slot attention learns to fit Gaussian mixtures to point sets.

Every datapoint is a set of 100-500 2-D points from its own mixture of 4 Gaussians (random means,
weights and scales; :func:`pyro_slots.data.sample_point_sets`). The model is
:class:`~pyro_slots.models.GaussianMixture`; its slots are the component parameters
``(loc, log_scale, logit)``. The inner rule is :class:`~pyro_slots.inner.SlotAttention` over the
points, decoding its hidden slots to component parameters, trained by
:class:`~pyro_slots.NestedSVI` with ``J = -ELBO`` (Eq. 5 of the seed paper: the update rule is
part of the shared weights). Gradients are unrolled through all ``T`` inner steps by default.

Evaluation on held-out sets compares, per point, the log-likelihood under the true parameters
(oracle), scikit-learn's ``GaussianMixture`` (diagonal, ``n_init`` 1 and 5), ``refine`` with EM
and gradient ascent, the learned rule with ``T`` = 1, 3, 5, 10 and the learned rule followed by
EM steps (:class:`~pyro_slots.inner.Hybrid`), with the wall time per set. Everything runs on one
CPU thread so that the batched methods and the scikit-learn loop are timed alike.

Example::

    python examples/amortized_clustering.py --num-updates 200 --num-test-sets 50

Training shows a progress bar with J and the inner ELBO (both per point) and saves a checkpoint
every ``--checkpoint-every`` updates; run the same command again to resume from it.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time

import numpy as np
import pyro
import torch
from pyro_slots.models import GaussianMixture
from tqdm import tqdm

from pyro_slots import NestedSVI, refine
from pyro_slots.data import sample_point_sets, true_log_likelihood
from pyro_slots.inner import EM, GradientAscent, Hybrid, SlotAttention
from pyro_slots.objectives import NegativeELBO

NUM_COMPONENTS = 4
DIM = 2
TRAIN_SEED, TEST_SEED = 0, 1


def build(args):
    model = GaussianMixture(num_slots=NUM_COMPONENTS, dim=DIM)
    rule = SlotAttention(
        num_steps=args.num_steps,
        slot_dim=model.slot_dim,
        input_dim=DIM,
        hidden_dim=args.hidden_dim,
        num_heads=args.num_heads,
        moments=args.moments,
    )
    # lr decays geometrically by --lr-decay over the whole run (ClippedAdam's ``lrd``).
    lrd = args.lr_decay ** (1.0 / max(args.num_updates, 1))
    optim = pyro.optim.ClippedAdam({"lr": args.lr, "lrd": lrd, "clip_norm": 10.0})
    svi = NestedSVI(
        model,
        rule,
        NegativeELBO(),
        optim,
        gradient=args.gradient,
        num_steps=args.num_steps,
        iteration_weights=args.iteration_weights,
        seed=args.seed,
    )
    return model, rule, svi


def train_batch(args, update: int) -> torch.Tensor:
    """Fresh training sets for every update; the set size varies between updates."""
    g = torch.Generator().manual_seed(args.seed * 1_000_003 + update)
    num_points = int(torch.randint(args.min_points, args.max_points + 1, (1,), generator=g))
    start = update * args.batch_size
    return sample_point_sets(args.batch_size, num_points, NUM_COMPONENTS, DIM, TRAIN_SEED, start).x


def save_checkpoint(path: str, rule, svi, update: int, args) -> None:
    state = {"rule": rule.state_dict(), "svi": svi.state_dict(), "update": update}
    state["args"] = {k: v for k, v in vars(args).items() if isinstance(v, int | float | str)}
    tmp = path + ".tmp"
    torch.save(state, tmp)
    os.replace(tmp, path)  # atomic: an interrupted save never corrupts the checkpoint


def load_checkpoint(path: str, rule, svi) -> int:
    state = torch.load(path, weights_only=True)
    rule.load_state_dict(state["rule"])
    svi.load_state_dict(state["svi"])
    return int(state["update"])


def train(args, rule, svi) -> list[float]:
    start = 0
    if args.checkpoint and os.path.exists(args.checkpoint):
        start = load_checkpoint(args.checkpoint, rule, svi)
        print(f"resumed from {args.checkpoint} at update {start}")
    losses = []
    bar = tqdm(range(start, args.num_updates), desc="train", disable=args.quiet)
    for update in bar:
        x = train_batch(args, update)
        loss = svi.step(x) / x.shape[1]
        inner_elbo = svi.last_result.elbo.mean().item() / x.shape[1]
        losses.append(loss)
        bar.set_postfix(J=f"{loss:.4f}", elbo=f"{inner_elbo:.4f}")
        done = update + 1
        if args.checkpoint and (done % args.checkpoint_every == 0 or done == args.num_updates):
            save_checkpoint(args.checkpoint, rule, svi, done, args)
    return losses


# ---------------------------------------------------------------------- evaluation
def test_groups(args):
    """Held-out sets in groups of equal size (``--num-test-sets`` spread over 100..500 points)."""
    sizes = np.linspace(args.min_points, args.max_points, args.num_test_groups).round()
    per_group = math.ceil(args.num_test_sets / len(sizes))
    groups, start = [], 0
    for i, n in enumerate(sizes):
        count = min(per_group, args.num_test_sets - i * per_group)
        if count <= 0:
            break
        groups.append(sample_point_sets(count, int(n), NUM_COMPONENTS, DIM, TEST_SEED, start))
        start += count
    return groups


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def eval_sklearn(sets, n_init: int, seed: int):
    from sklearn.mixture import GaussianMixture as SkGaussianMixture

    scores = []
    for i, points in enumerate(sets.x.double().numpy()):
        gm = SkGaussianMixture(NUM_COMPONENTS, covariance_type="diag", n_init=n_init)
        gm.set_params(random_state=seed + i)
        scores.append(gm.fit(points).score(points))
    return torch.tensor(scores)


def eval_refine(model, sets, rule, num_steps: int, seed: int):
    result = refine(model, sets.x, rule, num_steps=num_steps, seed=seed)
    return result.elbo / sets.x.shape[1]


def evaluate(args, model, rule) -> list[dict]:
    groups = test_groups(args)
    ga = GradientAscent(num_steps=100, step_size=args.ga_step_size, adam=True)
    methods = {
        "oracle (true parameters)": lambda s: true_log_likelihood(
            s.x, s.means, s.scales, s.weights
        ).mean(1),
        "sklearn GaussianMixture (diag, n_init=1)": lambda s: eval_sklearn(s, 1, args.seed),
        "sklearn GaussianMixture (diag, n_init=5)": lambda s: eval_sklearn(s, 5, args.seed),
        "EM, 10 steps": lambda s: eval_refine(model, s, EM(10), 10, args.seed),
        "EM, 100 steps": lambda s: eval_refine(model, s, EM(100), 100, args.seed),
        "GradientAscent (Adam), 100 steps": lambda s: eval_refine(model, s, ga, 100, args.seed),
    }
    for t in (1, 3, 5, 10):
        methods[f"learned, T={t}"] = lambda s, t=t: eval_refine(model, s, rule, t, args.seed)
    for k in (1, 5):
        hybrid = Hybrid(rule, EM(1), num_fixed_steps=k, num_learned_steps=args.num_steps)
        methods[f"learned T={args.num_steps} + {k} EM"] = lambda s, h=hybrid: eval_refine(
            model, s, h, h.num_steps, args.seed
        )
    rows = []
    with torch.no_grad():
        for name, fn in methods.items():
            scores, seconds = [], 0.0
            for sets in groups:
                score, dt = timed(lambda fn=fn, sets=sets: fn(sets))
                scores.append(score.double())
                seconds += dt
            scores = torch.cat(scores)
            rows.append(
                {
                    "method": name,
                    "loglik_per_point": scores.mean().item(),
                    "stderr": (scores.std() / math.sqrt(len(scores))).item(),
                    "ms_per_set": 1e3 * seconds / len(scores),
                }
            )
            if not args.quiet:
                row = rows[-1]
                print(f"{name:45s} {row['loglik_per_point']:.4f}  {row['ms_per_set']:.3f} ms")
    oracle = rows[0]["loglik_per_point"]
    for row in rows:
        row["gap_to_oracle"] = oracle - row["loglik_per_point"]
    return rows


def write_results(path: str, rows: list[dict], args, losses, command: str) -> None:
    lines = [
        "# Amortized clustering: learned slot attention vs. EM, gradient ascent and scikit-learn",
        "",
        f"Reproduce with `{command}` ({args.num_test_sets} held-out sets of "
        f"{args.min_points}-{args.max_points} points, {NUM_COMPONENTS} components, "
        "one CPU thread).",
        "",
        "| method | log-lik / point | ± s.e. | gap to oracle | ms / set |",
        "|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['method']} | {r['loglik_per_point']:.4f} | {r['stderr']:.4f} | "
            f"{r['gap_to_oracle']:+.4f} | {r['ms_per_set']:.3f} |"
        )
    lines.append("")
    with open(path, "w") as f:
        f.write("\n".join(lines))
    with open(os.path.splitext(path)[0] + ".json", "w") as f:
        json.dump({"args": vars(args), "rows": rows, "train_J_per_point": losses}, f, indent=1)


def main(args):
    torch.set_num_threads(args.threads)
    model, rule, svi = build(args)
    losses = train(args, rule, svi)
    rule.eval()
    rows = evaluate(args, model, rule)
    if args.results:
        command = getattr(args, "command", "python examples/amortized_clustering.py")
        write_results(args.results, rows, args, losses, command)
    return rows, losses


def make_parser():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-updates", type=int, default=100, help="outer (NestedSVI) updates")
    parser.add_argument("--batch-size", type=int, default=32, help="point sets per update")
    parser.add_argument("--min-points", type=int, default=100)
    parser.add_argument("--max-points", type=int, default=500)
    parser.add_argument("--num-steps", type=int, default=3, help="inner steps T in training")
    parser.add_argument("--hidden-dim", type=int, default=64)
    parser.add_argument("--num-heads", type=int, default=1)
    parser.add_argument("--moments", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--gradient", default="unrolled", help="NestedSVI gradient mode")
    parser.add_argument("--iteration-weights", default="linear")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--lr-decay", type=float, default=0.1, help="total lr decay factor")
    parser.add_argument("--ga-step-size", type=float, default=0.05)
    parser.add_argument("--num-test-sets", type=int, default=50)
    parser.add_argument("--num-test-groups", type=int, default=5, help="distinct set sizes")
    parser.add_argument("--checkpoint", default=None, help="checkpoint file (resumes if present)")
    parser.add_argument("--checkpoint-every", type=int, default=100)
    parser.add_argument("--results", default=None, help="markdown file for the results table")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quiet", action="store_true")
    return parser


if __name__ == "__main__":
    import sys

    parsed = make_parser().parse_args()
    parsed.command = "python " + " ".join(["examples/amortized_clustering.py", *sys.argv[1:]])
    main(parsed)
