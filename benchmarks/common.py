"""Shared helpers of the benchmark scripts: timing, machine description, result files."""

from __future__ import annotations

import datetime
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def median_time(fn, repeats: int = 5, warmup: int = 1) -> float:
    """Median wall time of ``fn()`` in seconds over ``repeats`` runs after ``warmup`` runs."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def machine() -> str:
    import pyro
    import sklearn

    try:
        commit = subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], text=True).strip()
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    return (
        f"{datetime.date.today()} · {platform.processor() or platform.machine()} · "
        f"{os.cpu_count()} cores · torch threads {torch.get_num_threads()} · "
        f"Python {platform.python_version()} · torch {torch.__version__} · pyro {pyro.__version__}"
        f" · scikit-learn {sklearn.__version__} · commit {commit}"
    )


def markdown_table(header: list[str], rows: list[list]) -> str:
    def fmt(v):
        return f"{v:.4g}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def write_result(name: str, title: str, body: str) -> Path:
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{name}.md"
    # The scripts run as modules of the benchmarks package (python -m benchmarks.NAME).
    command = " ".join(["python -m benchmarks." + Path(sys.argv[0]).stem, *sys.argv[1:]])
    path.write_text(f"# {title}\n\n{machine()}\n\nCommand: `{command}`\n\n{body}\n")
    print(f"wrote {path}")
    return path


def report(args, name: str, title: str, body: str) -> str:
    """Print a benchmark's markdown and write it to ``results/NAME.md``, except with
    ``--quick`` (tiny sizes that only check the script runs must not overwrite real numbers)."""
    print(body)
    if not args.quick:
        write_result(name, title, body)
    return body
