"""Shared helpers of the benchmark scripts: timing, machine description, result files."""

from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"
ROOT = Path(__file__).resolve().parents[1]

#: Environment variable naming another checkout of the repository whose ``pyro_slots`` a
#: benchmark worker process imports instead of this one (:func:`baseline_checkout`).
CHECKOUT_ENV = "PYRO_SLOTS_BENCH_CHECKOUT"


def baseline_checkout(rev: str) -> Path:
    """A detached ``git worktree`` of ``rev`` in a temporary folder (remove it with
    :func:`remove_checkout`): the code a benchmark compares against, side by side in one run."""
    commit = subprocess.check_output(
        ["git", "rev-parse", "--short", rev], cwd=ROOT, text=True
    ).strip()
    path = Path(tempfile.mkdtemp(prefix=f"pyro_slots-{commit}-"))
    subprocess.run(
        ["git", "worktree", "add", "--detach", "--force", str(path), commit],
        cwd=ROOT, check=True, capture_output=True,
    )  # fmt: skip
    return path


def remove_checkout(path: Path) -> None:
    subprocess.run(
        ["git", "worktree", "remove", "--force", str(path)], cwd=ROOT, capture_output=True
    )


def _use_checkout(root: Path) -> None:
    """Import ``pyro_slots`` (and ``pyro_slots.models``, the repository's ``models/``) from
    ``root`` in this process, instead of the editable install of this checkout."""
    import importlib.util

    sys.meta_path[:] = [
        f for f in sys.meta_path if "__editable__" not in getattr(f, "__module__", "")
    ]
    sys.path.insert(0, str(root))
    import pyro_slots

    if Path(pyro_slots.__file__).resolve().parents[1] != root.resolve():
        raise RuntimeError(f"{CHECKOUT_ENV}: pyro_slots came from {pyro_slots.__file__}")
    spec = importlib.util.spec_from_file_location(
        "pyro_slots.models", root / "models" / "__init__.py",
        submodule_search_locations=[str(root / "models")],
    )  # fmt: skip
    module = importlib.util.module_from_spec(spec)
    sys.modules["pyro_slots.models"] = module
    spec.loader.exec_module(module)
    pyro_slots.models = module


if os.environ.get(CHECKOUT_ENV):
    _use_checkout(Path(os.environ[CHECKOUT_ENV]))


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


def interleaved_medians(fns: dict, rounds: int, warmup: int = 1, warmup_each_round: int = 0):
    """``{name: median wall time}`` of every ``fns[name]()`` timed in ``rounds`` rounds, each
    round running every function once in turn, so that a change of load hits them alike.

    :param int warmup: untimed calls of each function before the first round.
    :param int warmup_each_round: untimed calls of a function before each of its timed calls.
    """
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            times[name].append(median_time(fn, 1, warmup_each_round))
    return {name: statistics.median(t) for name, t in times.items()}  # (even: the mean of two)


def tensor_peak_bytes(fn):
    """``(fn(), peak)``: the largest growth of the bytes held in CPU tensors while ``fn`` runs,
    from the CPU allocator's own record of every storage it allocates and frees
    (``torch.profiler`` with ``profile_memory=True``), counted from the start of the call.

    Unlike the peak resident set size, it does not depend on what glibc keeps in its heap or
    returns to the system, which moves RSS peaks by 100-250 MiB from run to run; it counts
    tensors only (no Python objects, no allocator slack) and is the same in every run.

    The profiler records the frees of the storages allocated while it runs only: a call that
    frees tensors made before it is counted without those frees, so the result is an upper
    bound of the growth there (exact for the benchmarks' calls, which free nothing older).
    """
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        value = fn()
    cpu = torch._C._autograd.DeviceType.CPU
    events = [
        e
        for e in prof.profiler.kineto_results.events()
        if e.name() == "[memory]" and e.device_type() == cpu
    ]
    running = peak = 0
    for e in sorted(events, key=lambda e: e.start_ns()):
        running += e.nbytes()
        peak = max(peak, running)
    return value, peak


def machine() -> str:
    import pyro
    import sklearn

    from pyro_slots.cli.runs import cpu_model

    try:
        commit = subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], text=True).strip()
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    return (
        f"{datetime.date.today()} · {platform.machine()} · {cpu_model()} "
        f"({torch.backends.cpu.get_cpu_capability()}) · "
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


def run_json_worker(module: str, argv: list, tune: bool) -> dict:
    """Run ``python -m module --worker-args...`` in a fresh process (``argv``, plus ``--tune``
    to apply :func:`~pyro_slots._allocator.tune_allocator` there: ``mallopt`` is process-wide
    and cannot be undone) and return the JSON object its last line of output prints."""
    cmd = [sys.executable, "-m", module, *argv] + (["--tune"] if tune else [])
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=root)
    return json.loads(out.stdout.strip().splitlines()[-1])
