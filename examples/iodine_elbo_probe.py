"""How high an ELBO does a trained IODINE decoder allow, and does that ELBO reward segmentation?

For each run of ``pyro-slots train --model iodine`` (a run folder or checkpoint, read with
:func:`pyro_slots.cli.runs.load_run`) this refines the slots of its validation scenes twice:
with the run's learned rule (T steps), then from there with
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

    python examples/iodine_elbo_probe.py runs/iodine-a runs/iodine-b --num-iterations 10
"""

from __future__ import annotations

import argparse
import json
import math

import torch

from pyro_slots import PerDatapointELBO, refine
from pyro_slots.cli.runs import load_run
from pyro_slots.inner import GradientAscent
from pyro_slots.metrics import fg_ari, segmentation_errors


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
    parser.add_argument("runs", nargs="+", help="run folders or checkpoints of IODINE runs")
    parser.add_argument("--num-iterations", type=int, default=10, help="steps of the rule")
    parser.add_argument("--ascent-steps", type=int, default=300)
    parser.add_argument("--ascent-lr", type=float, default=0.05)
    parser.add_argument("--particles", type=int, default=8)
    parser.add_argument("--num-scenes", type=int, default=64, help="validation scenes")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--output", default=None)
    args = parser.parse_args(argv)
    for name in ("num_iterations", "ascent_steps", "particles", "num_scenes"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')}: expected an integer >= 1")
    torch.set_num_threads(args.threads)
    results = {}
    for path in args.runs:
        run = load_run(path, {"tensorboard": False})
        if run.config.model != "iodine":
            parser.error(f"runs: {path} is a {run.config.model} run, not iodine")
        model, rule, config = run.components.model, run.components.inner, run.config
        data = run.components.stream.validation(args.num_scenes)
        x, true = data.x, data.truth["mask"]
        for p in [*model.parameters(), *rule.parameters()]:
            p.requires_grad_(False)
        learned = refine(
            model, x, rule, num_slots=config.num_slots, num_steps=args.num_iterations,
            init=run.components.init, seed=config.seed,
        ).slots[0]  # fmt: skip
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
