"""Run every benchmark of issue 9 and write ``benchmarks/RESULTS.md``.

    python -m benchmarks.run            # the full suite (< 15 minutes on 2 cores)
    python -m benchmarks.run --quick    # tiny sizes: checks that every script runs

Each benchmark also writes its own ``benchmarks/results/<name>.md``. Where a target is not met,
RESULTS.md gets a short profile (pyinstrument if installed, else cProfile) of the workload that
misses it. The load average is recorded before and after every benchmark: timings taken on a
shared machine are only comparable within one table.
"""

from __future__ import annotations

import argparse
import cProfile
import importlib
import io
import os
import platform
import pstats
import time
from importlib import metadata
from pathlib import Path

import torch

from benchmarks.common import machine

RESULTS_MD = Path(__file__).resolve().parent / "RESULTS.md"

BENCHMARKS = {
    "overhead": ("bench_overhead", "1. Pyro overhead of one inner step"),
    "slot_attention": ("bench_slot_attention", "2. SlotAttention vs the slot-attention package"),
    "memory": ("bench_memory", "3. Memory across inner steps"),
    "scaling": ("bench_scaling", "4. Scaling with M, K and T"),
    "end_to_end": ("bench_end_to_end", "5. End to end"),
}


NOTES = """**Reading the numbers.** Two CPU cores shared with other engineers' jobs. With torch
threads = 2 every operation is split between two OpenMP threads that wait for each other at its
end: when another job holds one of the cores, each operation waits a scheduler time slice and a
step can take 10-50× longer than on one thread (measured here: a 32-image SlotAutoencoder step,
0.3 s on one thread, 1-3 s on two at load 2-3). Only tables taken at a load average well below
2 are meaningful at two threads; the end-to-end table also gives one thread. There is no GPU in
this environment: every table is CPU only."""


# --------------------------------------------------------------------------- profiles
def _profile_overhead(quick: bool):
    from benchmarks.bench_overhead import gmm_problem, inner_step
    from pyro_slots.elbo import PerDatapointELBO

    size = (16, 50) if quick else (256, 500)
    gmm, x, slots = gmm_problem(*size, 4, 2)
    lean = PerDatapointELBO(strategy="lean")

    def work():
        for _ in range(3 if quick else 20):
            inner_step(lambda lam: lean(gmm, x, lam), slots)

    return "lean inner step, GaussianMixture B={}, M={}".format(*size), work


def _profile_slot_attention(quick: bool):
    from benchmarks.bench_slot_attention import build

    batch, num_inputs = (2, 256) if quick else (32, 4096)
    inputs = torch.randn(batch, num_inputs, 64, requires_grad=True)
    loss_fn, _ = build("SlotAttention rule + Pyro ELBO")

    def work():
        for _ in range(1 if quick else 3):
            loss_fn(inputs).backward()

    return f"SlotAttention rule + Pyro ELBO, forward + backward, {batch} × {num_inputs}", work


def _profile_end_to_end(quick: bool):
    import pyro.optim

    import pyro_slots as ps
    from pyro_slots.data import generate_tetrominoes
    from pyro_slots.inner import SlotAttention
    from pyro_slots.models import SlotAutoencoder
    from pyro_slots.objectives import Reconstruction

    images = generate_tetrominoes(2 if quick else 32, seed=0)["image"]
    model = SlotAutoencoder(image_size=35, num_slots=4)
    rule = SlotAttention(3, slot_dim=64, input_dim=64, hidden_dim=64, encoder=False)
    svi = ps.NestedSVI(model, rule, Reconstruction(), pyro.optim.Adam({"lr": 4e-4}), seed=0)
    svi.step(images)

    def work():
        for _ in range(1 if quick else 3):
            svi.step(images)

    return "NestedSVI.step, SlotAutoencoder on tetrominoes", work


PROFILES = {
    "overhead": _profile_overhead,
    "slot_attention": _profile_slot_attention,
    "end_to_end": _profile_end_to_end,
}


def profile_excerpt(name: str, quick: bool, lines: int = 28) -> str | None:
    if name not in PROFILES:
        return None
    label, work = PROFILES[name](quick)
    try:
        from pyinstrument import Profiler
    except ImportError:
        Profiler = None
    if Profiler is not None:
        profiler = Profiler(interval=0.001)
        profiler.start()
        work()
        profiler.stop()
        text = profiler.output_text(unicode=False, color=False)
        tool = "pyinstrument"
    else:
        profiler = cProfile.Profile()
        profiler.enable()
        work()
        profiler.disable()
        out = io.StringIO()
        pstats.Stats(profiler, stream=out).sort_stats("cumulative").print_stats(lines)
        text = out.getvalue()
        tool = "cProfile"
    body = "\n".join(line for line in text.splitlines() if line.strip())
    body = "\n".join(body.splitlines()[:lines])
    return f"Profile ({tool}) of {label}:\n\n```\n{body}\n```"


# ---------------------------------------------------------------------------- the run
def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


def _load() -> str:
    return "{:.2f} {:.2f} {:.2f}".format(*os.getloadavg())


def main(args):
    names = args.only or list(BENCHMARKS)
    unknown = set(names) - set(BENCHMARKS)
    if unknown:
        raise ValueError(
            f"--only: unknown benchmarks {sorted(unknown)}; choose from {list(BENCHMARKS)}"
        )
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    sections = []
    for name in names:
        module_name, title = BENCHMARKS[name]
        module = importlib.import_module(f"benchmarks.{module_name}")
        argv = ["--threads", str(args.threads)] + (["--quick"] if args.quick else [])
        load_before, t0 = _load(), time.perf_counter()
        print(f"== {title} (load {load_before})", flush=True)
        body = module.main(module.parse(argv))
        seconds = time.perf_counter() - t0
        section = (
            f"## {title}\n\n"
            f"`python -m benchmarks.{module_name}` · {seconds:.0f} s · load average (1, 5, 15 "
            f"min) {load_before} before, {_load()} after\n\n{body}"
        )
        if "NOT met" in body:
            excerpt = profile_excerpt(name, args.quick)
            if excerpt:
                section += "\n\n" + excerpt
        sections.append(section)
    total = time.perf_counter() - start
    command = "python -m benchmarks.run" + (" --quick" if args.quick else "")
    if args.only:
        command += " --only " + " ".join(args.only)
    header = (
        "# Benchmarks (issue 9)\n\n"
        f"{machine()}\n\n"
        f"slot-attention {_version('slot-attention')} · pyinstrument {_version('pyinstrument')} "
        f"· libc {' '.join(platform.libc_ver())} · {platform.platform()}\n\n"
        f"Command: `{command}` ({total / 60:.1f} min in all). Every benchmark also writes "
        "`benchmarks/results/<name>.md`. Times are medians of several repeats; ratios are "
        "measured side by side in the same process (or, for the allocator, the same run). The "
        "machine is shared: the load average printed with every table says how much the other "
        "jobs weighed on it.\n"
    )
    targets = [
        f"- {line.strip().lstrip('-').strip().replace('**', '')}"
        for section in sections
        for line in section.splitlines()
        if ("target" in line.lower() and "met" in line) or line.startswith("**Wall time")
    ]
    summary = "## Targets\n\n" + "\n".join(targets) + "\n\n" + NOTES
    text = header + "\n" + summary + "\n\n" + "\n\n".join(sections) + "\n"
    if args.quick and not args.write_quick:
        print(text)
        print("(--quick: RESULTS.md not written; pass --write-quick to write it anyway)")
    else:
        RESULTS_MD.write_text(text)
        print(f"wrote {RESULTS_MD}")
    return text


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny sizes (passed to every script)")
    p.add_argument("--write-quick", action="store_true", help="write RESULTS.md after --quick")
    p.add_argument("--only", nargs="+", help=f"a subset of {list(BENCHMARKS)}")
    p.add_argument("--threads", type=int, default=2)
    return p.parse_args(argv)


if __name__ == "__main__":
    main(parse())
