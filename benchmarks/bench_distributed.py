"""Throughput of ``pyro-slots train`` on 1 and 2 processes at a fixed global batch (issue 8).

Each case is a real ``pyro-slots train`` run, as a user launches it: one process
(``python -m pyro_slots train --threads T``) or two under ``torchrun`` (``gloo`` on loopback,
one thread each, ``--batch-size`` halved so the global batch stays the same). Steps/s come from
rank 0's ``metrics.jsonl`` (the cumulative ``steps_per_s`` it logs after every update, which
the per-step ``all_reduce`` keeps in step with the other rank), over the updates after the
warm-up ones: process start, imports, the rendezvous and the final checkpoint are not counted;
generating each rank's data shard, the inner loop, the all_reduce and the metrics line are.
Samples/s = steps/s × global batch. The median over the repeats is reported.

    python -m benchmarks.bench_distributed            # both configs, 5 repeats (~5 min)
    python -m benchmarks.bench_distributed --quick    # tiny sizes: checks that the script runs
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from benchmarks.common import markdown_table, report

#: ``(name, pyro-slots train options without --batch-size and --steps)``
CONFIGS = {
    "gmm": (
        "gmm / em, learned init, 200 points × 2-d, K = 4, T = 10",
        ["--model", "gmm", "--inner", "em"],
    ),
    "slot-autoencoder": (
        "slot-autoencoder / slot-attention, tetrominoes 35×35, K = 4, T = 3, slot dim 64",
        [
            "--model", "slot-autoencoder", "--inner", "slot-attention",
            "--dataset", "tetrominoes", "--num-slots", "4", "--inner-steps", "3",
            "--slot-dim", "64",
        ],
    ),
}  # fmt: skip

#: ``(processes, torch threads per process)``: one process on one core, one process on both
#: cores, two processes on one core each.
LAYOUTS = [(1, 1), (1, 2), (2, 1)]

COMMON = ["--eval-every", "0", "--no-progress", "--no-pictures"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _command(processes: int, threads: int, options: list[str]) -> list[str]:
    train = ["-m", "pyro_slots", "train", "--threads", str(threads), *options]
    if processes == 1:
        return [sys.executable, *train]
    return [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(processes),
        "--master-addr", "127.0.0.1", "--master-port", str(_free_port()), *train,
    ]  # fmt: skip


def steps_per_second(metrics: Path, warmup: int) -> float:
    """Steps/s over the updates after ``warmup``, from the cumulative rates in ``metrics``.

    Update ``s`` is logged with ``steps_per_s = s / elapsed(s)``, so
    ``(N - w) / (elapsed(N) - elapsed(w))`` is the rate of updates ``w + 1 .. N``.
    """
    with open(metrics) as f:
        rate = {r["step"]: r["steps_per_s"] for r in map(json.loads, f) if r["split"] == "train"}
    last = max(rate)
    if not 0 < warmup < last:
        raise ValueError(f"warmup: expected 0 < warmup < {last}, got {warmup}")
    return (last - warmup) / (last / rate[last] - warmup / rate[warmup])


def measure(processes, threads, options, global_batch, steps, warmup) -> float:
    """Steps/s of one ``pyro-slots train`` run."""
    if global_batch % processes:
        raise ValueError(f"global batch {global_batch} does not split over {processes} processes")
    out = Path(tempfile.mkdtemp(prefix="bench_distributed-"))
    try:
        args = [*options, *COMMON, "--batch-size", str(global_batch // processes), "--steps",
                str(steps), "--checkpoint-every", str(steps), "--out", str(out)]  # fmt: skip
        env = dict(os.environ, OMP_NUM_THREADS=str(threads), GLOO_SOCKET_IFNAME="lo")
        proc = subprocess.run(
            _command(processes, threads, args), env=env, capture_output=True, text=True
        )
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(proc.args)} failed:\n{proc.stderr[-3000:]}")
        return steps_per_second(out / "metrics.jsonl", warmup)
    finally:
        shutil.rmtree(out, ignore_errors=True)


def run(args) -> str:
    sizes = {
        "gmm": (args.gmm_batch, args.gmm_steps),
        "slot-autoencoder": (args.image_batch, args.image_steps),
    }
    rows = []
    load_before = os.getloadavg()
    for name in args.configs:
        _, options = CONFIGS[name]
        global_batch, steps = sizes[name]
        rates = {layout: [] for layout in LAYOUTS}
        for _ in range(args.repeats):  # layouts interleaved: a change of load hits all of them
            for processes, threads in LAYOUTS:
                rates[processes, threads].append(
                    measure(processes, threads, options, global_batch, steps, args.warmup)
                )
        baseline = statistics.median(rates[LAYOUTS[0]])
        for (processes, threads), runs in rates.items():
            print(f"{name}: {processes} process(es) × {threads} thread(s): {runs}", flush=True)
            rate = statistics.median(runs)
            speedup = f"{rate / baseline:.2f}×"
            spread = f"{min(runs):.3g}–{max(runs):.3g}"
            rows.append(
                [name, processes, threads, global_batch, rate, spread, rate * global_batch, speedup]
            )
    load_after = os.getloadavg()
    table = markdown_table(
        ["config", "processes", "threads / process", "global batch", "steps / s",
         "min–max steps / s", "samples / s", "vs 1 × 1"],
        rows,
    )  # fmt: skip
    configs = "\n".join(f"* `{name}`: {CONFIGS[name][0]}" for name in args.configs)
    return (
        f"Median over {args.repeats} runs of `pyro-slots train`; steps/s over the updates after "
        f"the first {args.warmup} (process start, rendezvous and final checkpoint excluded; "
        "data generation, inner loop, all_reduce and logging included). Two processes run under "
        "`torchrun --nproc-per-node 2` with `gloo` on loopback, each with half of the global "
        f"batch.\n\n{configs}\n\n{table}\n\n"
        f"Load average (1, 5, 15 min) before: {', '.join(f'{v:.2f}' for v in load_before)}; "
        f"after: {', '.join(f'{v:.2f}' for v in load_after)}. The machine is shared: other "
        "jobs take cores from these runs, and the load after counts this benchmark's own "
        "processes (up to 2 running at a time).\n"
    )


def main(args):
    return report(
        args, "distributed", "Throughput on 1 and 2 processes (torch.distributed)", run(args)
    )


def parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--configs", nargs="+", choices=list(CONFIGS), default=list(CONFIGS))
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=3, help="updates not timed")
    p.add_argument("--gmm-batch", type=int, default=64, help="global batch of gmm")
    p.add_argument("--gmm-steps", type=int, default=80)
    p.add_argument("--image-batch", type=int, default=16, help="global batch of the image model")
    p.add_argument("--image-steps", type=int, default=25)
    p.add_argument("--quick", action="store_true", help="tiny sizes, to check the script runs")
    return p


def parse(argv=None):
    args = parser().parse_args(argv)
    if args.quick:
        args.repeats, args.warmup = 1, 1
        args.gmm_batch, args.gmm_steps, args.image_batch, args.image_steps = 4, 3, 2, 3
    return args


if __name__ == "__main__":
    main(parse())
