"""Time per outer step against measurements M, slots K and inner steps T (issue 9, target 4).

One ``NestedSVI.step`` (unrolled gradients, reconstruction objective) of
:class:`~pyro_slots.models.SlotAutoencoder` with the :class:`~pyro_slots.inner.SlotAttention`
rule on random images, varying one of

* M, through the image size (the encoder keeps a quarter of the pixels: M = (H / 2)²);
* K, the number of slots;
* T, the number of inner steps;

around a base configuration, and fitting ``time ∝ size^exponent`` by least squares in log-log
space. Parts of the step do not depend on K (the encoder) or on T (encoder and decoder), so
exponents below one are expected there; above one would be a bug.
"""

from __future__ import annotations

import argparse
import math

import pyro.optim
import torch

import pyro_slots as ps
from benchmarks.common import markdown_table, median_time, report
from pyro_slots.inner import SlotAttention
from pyro_slots.models import SlotAutoencoder
from pyro_slots.objectives import Reconstruction


def step_time(image_size, num_slots, num_steps, batch, repeats) -> float:
    torch.manual_seed(0)
    model = SlotAutoencoder(image_size=image_size, num_slots=num_slots)
    rule = SlotAttention(
        num_steps,
        slot_dim=model.slot_dim,
        input_dim=model.feature_dim,
        hidden_dim=model.slot_dim,
        encoder=False,
    )
    svi = ps.NestedSVI(model, rule, Reconstruction(), pyro.optim.Adam({"lr": 1e-4}), seed=0)
    images = torch.rand(batch, 3, image_size, image_size)
    return median_time(lambda: svi.step(images), repeats=repeats, warmup=1)


def fit_exponent(sizes, times) -> float:
    xs = [math.log(s) for s in sizes]
    ys = [math.log(t) for t in times]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)


def run(args) -> str:
    torch.set_num_threads(args.threads)
    base = {"image_size": args.image_size, "num_slots": args.num_slots, "num_steps": args.steps}
    sweeps = {
        "M": ("image_size", args.image_sizes, lambda h: SlotAutoencoder(h).num_measurements),
        "K": ("num_slots", args.slot_counts, lambda k: k),
        "T": ("num_steps", args.step_counts, lambda t: t),
    }
    rows, summary = [], []
    for name, (key, values, size_of) in sweeps.items():
        sizes, times = [], []
        for v in values:
            t = step_time(**{**base, key: v}, batch=args.batch, repeats=args.repeats)
            sizes.append(size_of(v))
            times.append(t)
            rows.append([name, size_of(v), 1e3 * t, 1e3 * t / size_of(v)])
        exponent = fit_exponent(sizes, times)
        # Parts that do not depend on the varied size flatten the fit at small sizes; the
        # exponent over the largest three sizes shows how the varying part itself grows.
        upper = fit_exponent(sizes[-3:], times[-3:])
        worst = max(exponent, upper)
        summary.append(
            f"- {name}: exponent {exponent:.2f} over {name} = {sizes[0]}..{sizes[-1]}, "
            f"{upper:.2f} over the largest three — target at most linear (above 1.15 would be "
            f"a bug): {'NOT met' if worst > 1.15 else 'met'}"
        )
    table = markdown_table([" varied", "value", "ms / outer step", "ms / unit"], rows)
    return (
        f"SlotAutoencoder (CPU size) + SlotAttention rule, unrolled gradients, batch "
        f"{args.batch}, random images; base: image {args.image_size}×{args.image_size} "
        f"(M = {SlotAutoencoder(args.image_size).num_measurements}), K = {args.num_slots}, "
        f"T = {args.steps}; median of {args.repeats} steps after one warm-up.\n\n"
        f"{table}\n\nFitted log-log exponents (time ∝ size^e):\n\n" + "\n".join(summary)
    )


def main(args):
    return report(args, "scaling", "Time per outer step against M, K and T", run(args))


def parser():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--num-slots", type=int, default=4)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--image-sizes", type=int, nargs="+", default=[16, 24, 32, 48, 64])
    p.add_argument("--slot-counts", type=int, nargs="+", default=[2, 4, 8, 16])
    p.add_argument("--step-counts", type=int, nargs="+", default=[1, 3, 10, 30])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--quick", action="store_true", help="tiny sizes, to check the script runs")
    return p


def parse(argv=None):
    args = parser().parse_args(argv)
    if args.quick:
        args.batch, args.repeats, args.image_size = 2, 1, 16
        args.image_sizes, args.slot_counts, args.step_counts = [8, 16], [2, 4], [1, 2]
    return args


if __name__ == "__main__":
    main(parse())
