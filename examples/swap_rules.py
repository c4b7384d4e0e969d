"""Fixed vs. learned inference is one argument: ``inner=EM(...)`` or ``inner=SlotAttention(...)``.

The same :class:`~pyro_slots.models.GaussianMixture`, the same :class:`~pyro_slots.NestedSVI`, the
same objective ``J = -ELBO`` and the same learnable slot initialization
(:class:`~pyro_slots.init.GaussianInit`) are trained with either inner rule. With EM the shared
weights are the initialization's mean and scale (the gradient flows through the unrolled EM
steps); with slot attention they are the initialization and the update rule itself (Eq. 4 vs.
Eq. 5 of the seed paper).

Example::

    python examples/swap_rules.py --num-updates 50
"""

from __future__ import annotations

import argparse

import pyro
import torch

from pyro_slots import GaussianInit, NestedSVI, refine
from pyro_slots.data import sample_point_sets
from pyro_slots.inner import EM, SlotAttention
from pyro_slots.models import GaussianMixture
from pyro_slots.objectives import NegativeELBO


def make_rule(name: str, model, args):
    if name == "em":
        return EM(num_steps=args.num_steps)
    return SlotAttention(
        num_steps=args.num_steps,
        slot_dim=model.slot_dim,
        input_dim=model.dim,
        hidden_dim=args.hidden_dim,
        moments=True,
    )


def main(args):
    torch.manual_seed(args.seed)
    model = GaussianMixture(num_slots=args.num_components, dim=2)
    test = sample_point_sets(args.batch_size, args.num_points, args.num_components, seed=1).x
    results = {}
    for name in args.rules:
        inner = make_rule(name, model, args)
        init = GaussianInit(model.slot_dim)
        # The only line that differs between the runs is ``inner``.
        svi = NestedSVI(
            model,
            inner,
            NegativeELBO(),
            pyro.optim.Adam({"lr": args.lr}),
            init=init,
            gradient=args.gradient,
            seed=args.seed,
        )
        before = refine(model, test, inner, init=init, seed=args.seed).elbo.mean().item()
        losses = []
        for update in range(args.num_updates):
            x = sample_point_sets(
                args.batch_size, args.num_points, args.num_components, seed=0, start=update
            ).x
            losses.append(svi.step(x).loss / args.num_points)
        held_out = refine(model, test, inner, init=init, seed=args.seed)
        results[name] = {
            "num_weights": sum(p.numel() for p in svi.parameters()),
            "first_J": losses[0],
            "last_J": losses[-1],
            "held_out_elbo_before": before / args.num_points,
            "held_out_elbo": held_out.elbo.mean().item() / args.num_points,
        }
        r = results[name]
        print(
            f"{name:15s} weights={r['num_weights']:6d}  J: {losses[0]:.3f} -> {losses[-1]:.3f}; "
            f"held-out ELBO {r['held_out_elbo_before']:.3f} -> {r['held_out_elbo']:.3f} "
            "(nats/point)"
        )
    return results


def make_parser():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rules", nargs="+", default=["em", "slot_attention"])
    parser.add_argument("--num-updates", type=int, default=30)
    parser.add_argument("--num-steps", type=int, default=3, help="inner steps T")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--num-points", type=int, default=100)
    parser.add_argument("--num-components", type=int, default=4)
    parser.add_argument("--hidden-dim", type=int, default=32)
    parser.add_argument("--gradient", default="unrolled")
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--seed", type=int, default=0)
    return parser


if __name__ == "__main__":
    main(make_parser().parse_args())
