"""Scene generation speed (issue 4): 10,000 shapes and 10,000 tetrominoes scenes.

Times :func:`pyro_slots.data.generate_shapes` (64×64, 2-5 objects, plain and coloured
background) and :func:`pyro_slots.data.generate_tetrominoes` (35×35) for ``--num-images``
scenes, the median of ``--repeats`` runs, plus the per-item access of the ``Dataset`` classes.
The acceptance target is 10,000 64×64 shapes scenes in under 30 s on 2 cores.
"""

from __future__ import annotations

import argparse
import os

from benchmarks.common import markdown_table, median_time, write_result
from pyro_slots.data import (
    ShapesDataset,
    TetrominoesDataset,
    generate_shapes,
    generate_tetrominoes,
)


def main(args):
    n = args.num_images
    cases = [
        (
            f"generate_shapes({n}), 64×64, plain",
            lambda: generate_shapes(n, image_size=64, background="plain", seed=0),
            n,
        ),
        (
            f"generate_shapes({n}), 64×64, colored",
            lambda: generate_shapes(n, image_size=64, background="colored", seed=0),
            n,
        ),
        (f"generate_tetrominoes({n}), 35×35", lambda: generate_tetrominoes(n, seed=0), n),
    ]
    shapes, tetrominoes = ShapesDataset(n, seed=0), TetrominoesDataset(n, seed=0)
    m = args.num_items
    cases += [
        (f"ShapesDataset[i], {m} items", lambda: [shapes[i] for i in range(m)], m),
        (f"TetrominoesDataset[i], {m} items", lambda: [tetrominoes[i] for i in range(m)], m),
    ]
    load_before = os.getloadavg()[0]
    rows = []
    for name, fn, count in cases:
        seconds = median_time(fn, repeats=args.repeats, warmup=0)
        rows.append([name, seconds, 1e6 * seconds / count])
        print(f"{name}: {seconds:.3f} s")
    table = markdown_table(["case", "median seconds", "µs per scene"], rows)
    body = (
        f"Median of {args.repeats} runs (numpy, single-threaded; the generators do not use "
        f"torch threads). Load average of the machine (other jobs running): "
        f"{load_before:.1f} before, {os.getloadavg()[0]:.1f} after; timings on an idle machine "
        f"are lower.\n\n{table}\n\nTarget: 10,000 64×64 shapes scenes in under 30 s."
    )
    print(table)
    if not args.no_write:
        write_result("data", "Scene generation speed", body)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-images", type=int, default=10_000)
    parser.add_argument("--num-items", type=int, default=1_000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-write", action="store_true", help="print only")
    main(parser.parse_args())
