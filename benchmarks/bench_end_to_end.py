"""Training throughput of the Slot Attention autoencoder (issue 9, target 5; issue 21, item 4).

One outer update (``NestedSVI.step``: encoder, inner steps, decoder, backward, Adam) in
images/s, three cases:

* ``shapes recipe`` — the trainer's own update of the shipped ``shapes-slot-attention`` recipe
  (64×64, K = 6, T = 5, first-order gradients; built by ``pyro-slots train``'s ``build`` and
  ``make_svi``), the update the harder-scenes issue profiles;
* ``shapes 64×64`` and ``tetrominoes 35×35`` — :class:`~pyro_slots.models.SlotAutoencoder`
  (CPU size) with the :class:`~pyro_slots.inner.SlotAttention` rule, T = 3, unrolled gradients,
  reconstruction J, Adam.

Every measurement is a fresh worker process (the scenes are generated before the clock
starts). With ``--baseline REV`` the same workers also run the code of git revision ``REV``
(a temporary ``git worktree``), alternating with this checkout's, so the before/after ratio is
measured side by side in one run::

    python -m benchmarks.bench_end_to_end --baseline 1a3c1fa

The wall time to FG-ARI 0.9 on tetrominoes is read from the headline runs' kept records
(``examples/results/objects/cli/tet-sS/metrics.jsonl``, as ``pyro-slots summarize --reach``),
not retrained here.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from benchmarks.common import (
    CHECKOUT_ENV,
    ROOT,
    baseline_checkout,
    markdown_table,
    remove_checkout,
    report,
)
from pyro_slots.cli import summarize

#: The tetrominoes headline runs' kept records (``pyro-slots train --config
#: tetrominoes-slot-attention --seed S``), read by :func:`wall_time_to_fg_ari`.
HEADLINE = [ROOT / "examples" / "results" / "objects" / "cli" / f"tet-s{s}" for s in range(3)]
CASES = ("shapes recipe", "shapes 64×64", "tetrominoes 35×35")


def _svi(case: str, batch: int, num_iterations: int):
    """``(NestedSVI, batches generator)`` for one case (imports the checkout's pyro_slots)."""
    import pyro.optim

    import pyro_slots as ps
    from pyro_slots.data import generate_shapes, generate_tetrominoes

    if case == "shapes recipe":
        from pyro_slots.cli.config import config_path, load_config_file, merge_config
        from pyro_slots.cli.registry import build, resolve
        from pyro_slots.cli.runs import make_svi

        config = resolve(merge_config(load_config_file(config_path("shapes-slot-attention")), {}))
        return make_svi(config, build(config)), generate_shapes
    from pyro_slots.inner import SlotAttention
    from pyro_slots.models import SlotAutoencoder
    from pyro_slots.objectives import Reconstruction

    generate, num_slots = (
        (generate_shapes, 6) if case.startswith("shapes") else (generate_tetrominoes, 4)
    )
    size = generate(1, seed=0)["image"].shape[-1]
    model = SlotAutoencoder(image_size=size, num_slots=num_slots)
    rule = SlotAttention(
        num_iterations,
        slot_dim=model.slot_dim,
        input_dim=model.feature_dim,
        hidden_dim=model.slot_dim,
        encoder=False,
    )
    optim = pyro.optim.Adam({"lr": 4e-4})
    return ps.NestedSVI(model, rule, Reconstruction(), optim, seed=0), generate


def worker(args) -> dict:
    """Runs in a fresh process: images/s of one case at one thread count."""
    from pyro_slots._allocator import tune_allocator

    tune_allocator()  # as the trainer does
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    svi, generate = _svi(args.case, args.batch, args.num_iterations)
    data = generate(args.batch * (args.steps + args.warmup), seed=0)["image"]
    batches = data.split(args.batch)
    for x in batches[: args.warmup]:
        svi.step(x)
    times = []
    for x in batches[args.warmup :]:
        start = time.perf_counter()
        svi.step(x)
        times.append(time.perf_counter() - start)
    step = statistics.median(times)
    import pyro_slots
    from pyro_slots import models

    return {
        "images_per_s": args.batch / step,
        "ms": 1e3 * step,
        "code": [str(Path(m.__file__).resolve().parents[1]) for m in (pyro_slots, models)],
    }


def _run_worker(case, threads, checkout, args) -> dict:
    cmd = [
        sys.executable, "-m", "benchmarks.bench_end_to_end", "--worker", "--case", case,
        "--threads", str(threads), "--batch", str(args.batch), "--steps", str(args.steps),
        "--warmup", str(args.warmup), "--num-iterations", str(args.num_iterations),
    ]  # fmt: skip
    env = dict(os.environ)
    env.pop(CHECKOUT_ENV, None)
    if checkout is not None:
        env[CHECKOUT_ENV] = str(checkout)
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env)
    if out.returncode:
        raise RuntimeError(f"worker {case!r} ({checkout or 'this checkout'}):\n{out.stderr}")
    result = json.loads(out.stdout.strip().splitlines()[-1])
    expected = str(Path(checkout or ROOT).resolve())
    if result["code"] != [expected, expected]:
        raise RuntimeError(f"worker {case!r} ran the code of {result['code']}, not {expected}")
    return result


def wall_time_to_fg_ari(threshold: float = 0.9) -> str:
    """Time to validation FG-ARI >= ``threshold`` of the headline runs kept in ``HEADLINE``
    (their ``metrics.jsonl``), per seed: the training seconds of the first validation record
    at or above ``threshold`` (``pyro-slots summarize --reach``'s
    :func:`~pyro_slots.cli.summarize.first_reaching`)."""
    parts = []
    for folder in HEADLINE:
        name = folder.name
        if not (folder / "test.json").exists() or not (folder / "metrics.jsonl").exists():
            parts.append(f"{name}: no validation records kept")
            continue
        run = summarize.load_runs([str(folder)])[0]
        hit = summarize.first_reaching(run, threshold)
        if hit is not None and hit.get("train_seconds") is not None:
            parts.append(f"{name}: {hit['train_seconds']:.0f} s (FG-ARI {hit['fg_ari']:.3f})")
        elif hit is not None:  # records from before the trainer kept its clock
            parts.append(f"{name}: update {hit['step']:,} (FG-ARI {hit['fg_ari']:.3f}; no clock)")
        elif run["validation"]:
            last = max(run["validation"], key=lambda r: r["step"])
            parts.append(f"{name}: not reached in {last.get('train_seconds', 0):.0f} s")
        else:
            parts.append(f"{name}: no validation records kept")
    source = HEADLINE[0].parent.relative_to(ROOT)
    return (
        "; ".join(parts) + " of training wall time, the first validation point at or "
        f"above {threshold} in the headline runs' records under `{source}` (read from them, not "
        "retrained here)."
    )


def run(args) -> str:
    checkout = baseline_checkout(args.baseline) if args.baseline else None
    versions = {"this checkout": None}
    if checkout is not None:
        label = subprocess.check_output(
            ["git", "rev-parse", "--short", args.baseline], cwd=ROOT, text=True
        ).strip()
        versions = {f"baseline {label}": checkout, "this checkout": None}
    cases = ("tetrominoes 35×35",) if args.quick else CASES
    rows, ratios = [], []
    try:
        # One thread too: on a shared machine two OpenMP threads wait for each other at every
        # operation whenever another job takes a core, one thread does not.
        for threads in sorted({args.threads, 1}, reverse=True):
            for case in cases:
                runs = {name: [] for name in versions}
                for _ in range(args.repeats):  # alternate the versions, repeat by repeat
                    for name, path in versions.items():
                        runs[name].append(_run_worker(case, threads, path, args))
                speed = {}
                for name, results in runs.items():
                    ips = statistics.median(r["images_per_s"] for r in results)
                    ms = statistics.median(r["ms"] for r in results)
                    speed[name] = ips
                    rows.append([case, name, threads, ms, ips])
                if checkout is not None:
                    before, after = speed.values()
                    ratios.append(f"- {case}, {threads} thread(s): {after / before:.2f}×")
    finally:
        if checkout is not None:
            remove_checkout(checkout)
    table = markdown_table(["case", "code", "torch threads", "ms / outer step", "images / s"], rows)
    text = (
        f"Batch {args.batch}; median over {args.steps} updates after {args.warmup} warm-up "
        f"updates per process, median over {args.repeats} processes per row"
        + (", the two versions alternating" if checkout is not None else "")
        + f".\n\n{table}"
    )
    if ratios:
        text += "\n\nThis checkout's images/s over the baseline's:\n\n" + "\n".join(ratios)
    return text + f"\n\n**Wall time to FG-ARI 0.9 on tetrominoes.** {wall_time_to_fg_ari()}"


def main(args):
    if args.worker:
        print(json.dumps(worker(args)))
        return None
    return report(
        args, "end_to_end", "Training throughput of the Slot Attention autoencoder", run(args)
    )


def parser():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--num-iterations", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3, help="worker processes per row")
    p.add_argument("--baseline", help="git revision to measure side by side (e.g. a commit)")
    p.add_argument("--quick", action="store_true", help="tiny sizes, to check the script runs")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--case", choices=CASES, default=CASES[0], help=argparse.SUPPRESS)
    return p


def parse(argv=None):
    args = parser().parse_args(argv)
    if args.quick:
        args.batch, args.steps, args.warmup, args.repeats = 2, 2, 1, 1
    return args


if __name__ == "__main__":
    main(parse())
