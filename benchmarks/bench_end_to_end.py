"""Training throughput of the Slot Attention autoencoder (issue 9, target 5).

``NestedSVI.step`` of :class:`~pyro_slots.models.SlotAutoencoder` (CPU-sized networks) with
the :class:`~pyro_slots.inner.SlotAttention` rule (T = 3, unrolled gradients, reconstruction
objective, Adam), as ``examples/train_objects.py`` trains it, on 64×64 ``shapes`` and on 35×35
``tetrominoes``. The scenes are generated before the clock starts; images/s counts outer steps
only. The wall time to FG-ARI 0.9 on tetrominoes is quoted from
``examples/results/objects_history.md`` (the former training example's runs), not retrained here.
"""

from __future__ import annotations

import argparse
import re
import time
from pathlib import Path

import pyro.optim
import torch

import pyro_slots as ps
from benchmarks.common import markdown_table, report
from pyro_slots.data import generate_shapes, generate_tetrominoes
from pyro_slots.inner import SlotAttention
from pyro_slots.models import SlotAutoencoder
from pyro_slots.objectives import Reconstruction

OBJECTS = Path(__file__).resolve().parents[1] / "examples" / "results" / "objects_history.md"
DATASETS = {
    "shapes 64×64": (generate_shapes, 6),  # up to 5 objects + background
    "tetrominoes 35×35": (generate_tetrominoes, 4),  # 3 pieces + background
}


def throughput(generate, num_slots, args) -> tuple[float, float]:
    """``(images/s, ms per step)`` from the median step time."""
    torch.manual_seed(0)
    data = generate(args.batch * (args.steps + args.warmup), seed=0)["image"]
    model = SlotAutoencoder(image_size=data.shape[-1], num_slots=num_slots)
    rule = SlotAttention(
        args.num_iterations,
        slot_dim=model.slot_dim,
        input_dim=model.feature_dim,
        hidden_dim=model.slot_dim,
        encoder=False,
    )
    svi = ps.NestedSVI(model, rule, Reconstruction(), pyro.optim.Adam({"lr": 4e-4}), seed=0)
    batches = data.split(args.batch)
    for x in batches[: args.warmup]:
        svi.step(x)
    times = []
    for x in batches[args.warmup :]:
        start = time.perf_counter()
        svi.step(x)
        times.append(time.perf_counter() - start)
    step = sorted(times)[len(times) // 2]
    return args.batch / step, 1e3 * step


def wall_time_to_fg_ari(threshold: float = 0.9) -> str:
    """Time to validation FG-ARI >= ``threshold`` read from the results file ``OBJECTS``.

    Reads the first markdown table whose header is ``update | seed ...`` with cells
    ``FG-ARI (SECONDS s)`` (the headline runs' validation curves, as
    ``pyro-slots summarize`` prints them) and reports, for every seed, the training
    wall time of the first validation point at or above ``threshold``.
    """
    source = OBJECTS.relative_to(OBJECTS.parents[2])
    if not OBJECTS.exists():
        return f"`{source}` does not exist yet: not reported."
    header, rows = None, []
    for line in OBJECTS.read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if header is None:
            if cells and cells[0] == "update" and any(c.startswith("seed") for c in cells):
                header = cells
        elif line.startswith("|") and not set(line) <= set("|-: "):
            rows.append(cells)
        elif rows:
            break
    if not rows:
        return f"`{source}` has no validation curve per seed: not reported."
    parts = []
    for column, name in enumerate(header[1:], start=1):
        curve = []
        for cells in rows:
            match = (
                re.fullmatch(r"(-?[\d.]+) \((\d+) s\)", cells[column])
                if column < len(cells)
                else None
            )
            if match:
                curve.append((float(match.group(2)), float(match.group(1))))
        hit = next(((t, v) for t, v in curve if v >= threshold), None)
        parts.append(
            f"{name}: {hit[0]:.0f} s (FG-ARI {hit[1]:.3f})"
            if hit
            else f"{name}: not reached in {curve[-1][0]:.0f} s"
            if curve
            else f"{name}: no curve"
        )
    return (
        "; ".join(parts) + " of training wall time, the first validation point at or "
        f"above {threshold} in the headline runs of `{source}` (read from that file, not retrained "
        "here)."
    )


def run(args) -> str:
    rows = []
    # One thread too: on a shared machine two OpenMP threads wait for each other at every
    # operation whenever another job takes a core, one thread does not.
    for threads in sorted({args.threads, 1}, reverse=True):
        torch.set_num_threads(threads)
        for name, (generate, num_slots) in DATASETS.items():
            images_per_s, ms = throughput(generate, num_slots, args)
            rows.append([name, num_slots, args.batch, threads, ms, images_per_s])
    torch.set_num_threads(args.threads)
    table = markdown_table(
        ["dataset", "K", "batch", "torch threads", "ms / outer step", "images / s"], rows
    )
    return (
        f"SlotAutoencoder (CPU size) + SlotAttention rule, T = {args.num_iterations}, unrolled "
        f"gradients, reconstruction J, Adam; median over {args.steps} steps after "
        f"{args.warmup} warm-up steps.\n\n{table}\n\n"
        f"**Wall time to FG-ARI 0.9 on tetrominoes.** {wall_time_to_fg_ari()}"
    )


def main(args):
    return report(
        args, "end_to_end", "Training throughput of the Slot Attention autoencoder", run(args)
    )


def parser():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--num-iterations", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--quick", action="store_true", help="tiny sizes, to check the script runs")
    return p


def parse(argv=None):
    args = parser().parse_args(argv)
    if args.quick:
        args.batch, args.steps, args.warmup = 2, 2, 1
    return args


if __name__ == "__main__":
    main(parse())
