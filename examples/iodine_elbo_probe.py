"""How high an ELBO does a trained IODINE decoder allow, and does that ELBO reward segmentation?

For each checkpoint of ``examples/train_objects.py --model iodine`` this refines the slots of
held-out tetrominoes scenes twice: with the run's learned rule (T steps), then from there with
``--ascent-steps`` steps of per-datapoint Adam on the ELBO (:class:`~pyro_slots.inner.
GradientAscent`, the inner rule swapped with one argument). It prints, per configuration, the
mean over the scenes of

- the per-datapoint ELBO (Pyro's ``TraceEnum_ELBO`` through :class:`~pyro_slots.PerDatapointELBO`,
  ``--particles`` samples of z);
- the KL divergence of the guide from the prior (analytic);
- the log-likelihood at the posterior means under the decoded masks, and under *hard* masks
  (each pixel given to the slot whose colour explains it best): their gap is what the soft
  masks cost;
- FG-ARI, objects split over slots and objects merged (``pyro_slots.metrics``).

If the ELBO after the ascent is higher for weights that segment worse, the objective itself (not
the inference) prefers the worse segmentation for that decoder::

    python examples/iodine_elbo_probe.py RUN_A.pt RUN_B.pt --refinement-inputs \\
        --refinement-pooling posterior --decoder-resolution 18
"""

from __future__ import annotations

import argparse
import json
import math

import torch
import train_objects as to

from pyro_slots import PerDatapointELBO, refine
from pyro_slots.inner import GradientAscent
from pyro_slots.metrics import fg_ari, segmentation_errors
from pyro_slots.models import RefinementInputs


def elbo_parts(model, x: torch.Tensor, slots: torch.Tensor, particles: int) -> dict:
    """Per-image ELBO, KL and log-likelihoods (soft and hard masks) at the posterior means."""
    x_enc = model.encode(x)
    elbo = PerDatapointELBO(num_particles=particles)(model, x_enc, slots)
    parts = model.slot_spec.split(slots)
    loc, log_scale = parts["loc"], parts["log_scale"]
    kl = (0.5 * (loc**2 + (2 * log_scale).exp() - 1) - log_scale).sum((1, 2))
    rgb, logits = model.decode_latents(loc)  # (B, K, C, H, W), (B, K, H, W)
    s = model.pixel_scale
    log_normal = -0.5 * ((x.unsqueeze(1) - rgb) / s) ** 2 - math.log(s * math.sqrt(2 * math.pi))
    log_normal = log_normal.sum(2)  # (B, K, H, W): each slot's likelihood of each pixel
    soft = torch.logsumexp(torch.log_softmax(logits, 1) + log_normal, 1).sum((1, 2))
    hard = log_normal.max(1).values.sum((1, 2))
    return {"elbo": elbo, "kl": kl, "loglik_soft_masks": soft, "loglik_hard_masks": hard}


def scores(model, x, true, slots, particles: int) -> dict:
    with torch.no_grad():
        masks = model.decode(slots)[2]
        out = {k: v.mean().item() for k, v in elbo_parts(model, x, slots, particles).items()}
    out["fg_ari"] = fg_ari(true, masks).mean().item()
    errors = segmentation_errors(true, masks)
    out["split"], out["merged"] = (errors[k].double().mean().item() for k in ("split", "merged"))
    return out


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("checkpoints", nargs="+", help="--checkpoint files of IODINE runs")
    parser.add_argument("--refinement-inputs", action="store_true")
    parser.add_argument("--refinement-pooling", default="mean", choices=RefinementInputs.POOLINGS)
    parser.add_argument("--num-slots", type=int, default=4)
    parser.add_argument("--num-iterations", type=int, default=10, help="steps of the rule")
    parser.add_argument("--ascent-steps", type=int, default=300)
    parser.add_argument("--ascent-lr", type=float, default=0.05)
    parser.add_argument("--particles", type=int, default=8)
    parser.add_argument("--num-scenes", type=int, default=64, help="validation scenes")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--output", default=None)
    # Every other flag describes the architecture, as train_objects.py takes it
    # (--decoder-resolution, --latent-dim, --decoder-channels, --paper-size, ...).
    args, architecture = parser.parse_known_args(argv)
    for name in ("num_slots", "num_iterations", "ascent_steps", "particles", "num_scenes"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')}: expected an integer >= 1")
    torch.set_num_threads(args.threads)
    flags = ["--model", "iodine", "--rule", "learned_gradient"]
    flags += ["--num-iterations", str(args.num_iterations), "--num-val", str(args.num_scenes)]
    flags += ["--num-slots", str(args.num_slots)]
    flags += ["--seed", str(args.seed), "--refinement-pooling", args.refinement_pooling]
    flags += ["--refinement-inputs"] if args.refinement_inputs else []
    run_args = to.parse_args(flags + architecture)
    data = to.make_validation(run_args)
    x, true = data["image"], data["mask"]
    results = {}
    for path in args.checkpoints:
        model = to.build_model(run_args, x.shape[-1])
        rule = to.build_rule(run_args, model)
        to.load_weights(model, rule, None, torch.load(path, weights_only=True))
        for p in [*model.parameters(), *rule.parameters()]:
            p.requires_grad_(False)
        learned = refine(model, x, rule, num_slots=args.num_slots, seed=args.seed).slots[0]
        ascent = GradientAscent(args.ascent_steps, step_size=args.ascent_lr, adam=True)
        climbed = refine(model, x, ascent, slots=learned).slots[0]
        results[path] = {
            f"rule T={args.num_iterations}": scores(model, x, true, learned, args.particles),
            f"+ {args.ascent_steps} Adam steps": scores(model, x, true, climbed, args.particles),
        }
    header = "| weights | slots | ELBO | KL | log-lik, masks | log-lik, hard masks | FG-ARI |"
    lines = [header + " split | merged |", "|---|---|" + "---:|" * 7]
    for path, rows in results.items():
        for how, r in rows.items():
            lines.append(
                f"| {path} | {how} | {r['elbo']:.0f} | {r['kl']:.0f} | "
                f"{r['loglik_soft_masks']:.0f} | {r['loglik_hard_masks']:.0f} | "
                f"{r['fg_ari']:.3f} | {r['split']:.2f} | {r['merged']:.2f} |"
            )
    print("\n".join(lines), flush=True)
    if args.output:
        with open(args.output, "w") as f:
            json.dump(results, f, indent=1)
    return results


if __name__ == "__main__":
    main()
