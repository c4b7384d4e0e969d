"""Memory of one outer step as the number of inner steps T grows (issue 9, target 3).

One ``NestedSVI.loss_and_grads`` of :class:`~pyro_slots.models.SlotAutoencoder` with the
:class:`~pyro_slots.inner.SlotAttention` rule and the reconstruction objective, for T = 1, 3, 10,
30 under the ``first_order``, ``implicit`` and ``unrolled`` gradient modes. Two measures, both
taken in a fresh subprocess per configuration so that nothing is cached between them:

* **graph**: bytes of the tensors saved for backward that are still alive when J has been
  computed (``torch.autograd.graph.saved_tensors_hooks`` + weak references, as
  ``tests/test_nested.py::_saved_bytes``): what the autograd graph holds across the inner loop;
* **peak RSS**: the process's peak resident set during the step (``VmHWM``, reset just before
  it) minus its resident set just before it (glibc's default allocator, which returns large
  blocks at once).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import warnings
import weakref
from pathlib import Path

import torch

from benchmarks.common import markdown_table, report

MODES = ("first_order", "implicit", "unrolled")
STEPS = (1, 3, 10, 30)


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def _peak_rss_bytes() -> int:
    """High-water mark of this process's resident set (``VmHWM``; unlike ``ru_maxrss`` it is
    not inherited from the parent that forked the process)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise OSError("VmHWM not found in /proc/self/status")


def _reset_peak_rss() -> bool:
    """Reset ``VmHWM`` to the current resident set (Linux >= 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def worker(args) -> dict:
    import pyro.optim

    import pyro_slots as ps
    from pyro_slots.data import generate_tetrominoes
    from pyro_slots.inner import SlotAttention
    from pyro_slots.models import SlotAutoencoder
    from pyro_slots.objectives import Reconstruction

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    images = generate_tetrominoes(args.batch, seed=0)["image"]
    model = SlotAutoencoder(image_size=images.shape[-1], num_slots=4)
    rule = SlotAttention(
        args.steps, slot_dim=model.slot_dim, input_dim=model.feature_dim,
        hidden_dim=model.slot_dim, encoder=False,
    )  # fmt: skip
    svi = ps.NestedSVI(
        model, rule, Reconstruction(), pyro.optim.Adam({"lr": 1e-4}),
        gradient=(
            ps.ImplicitAdjoint(max_iter=args.implicit_max_iter)
            if args.mode == "implicit" else args.mode
        ), seed=0,
    )  # fmt: skip
    params = svi.parameters()
    saved = []

    def pack(t):
        saved.append(weakref.ref(t))
        return t

    reset = _reset_peak_rss()
    rss_before = _rss_bytes()
    peak_before = _peak_rss_bytes()
    with warnings.catch_warnings():
        # A learned rule at initialization is no fixed point; the adjoint may not converge.
        warnings.simplefilter("ignore")
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = svi.loss(images)
        alive = {}
        for ref in saved:
            t = ref()
            if t is not None:
                alive[(t.data_ptr(), t.numel())] = t.numel() * t.element_size()
        del saved[:]
        torch.autograd.grad(loss, params, allow_unused=True)
    peak = _peak_rss_bytes()
    if not reset and peak_before > rss_before:
        raise OSError("cannot reset the peak resident set: the step's peak would be hidden")
    return {"graph": sum(alive.values()), "peak_rss": peak - rss_before}


def _run_worker(mode, steps, args) -> dict:
    cmd = [
        sys.executable, "-m", "benchmarks.bench_memory", "--worker", "--mode", mode,
        "--steps", str(steps), "--batch", str(args.batch), "--threads", str(args.threads),
        "--implicit-max-iter", str(args.implicit_max_iter),
    ]  # fmt: skip
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=root)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _slope(xs, ys) -> float:
    """Least-squares slope of ys against xs."""
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)


def run(args) -> str:
    steps = (1, 3) if args.quick else STEPS
    res = {(m, t): _run_worker(m, t, args) for m in MODES for t in steps}
    mib = 2.0**-20
    rows = []
    for m in MODES:
        base = res[(m, steps[0])]
        for t in steps:
            r = res[(m, t)]
            rows.append(
                [m, t, r["graph"] * mib, r["graph"] / base["graph"], r["peak_rss"] * mib,
                 r["peak_rss"] / base["peak_rss"]]
            )  # fmt: skip
    lines = []
    for m in MODES[:2]:
        worst_graph = max(res[(m, t)]["graph"] / res[(m, steps[0])]["graph"] for t in steps)
        worst_rss = max(res[(m, t)]["peak_rss"] / res[(m, steps[0])]["peak_rss"] for t in steps)
        ok = worst_graph <= 1.2 and worst_rss <= 1.2
        lines.append(
            f"- {m}: at most {worst_graph:.2f}× T=1 (graph), {worst_rss:.2f}× T=1 (peak RSS) — "
            f"target ≤ 1.2×: {'met' if ok else 'NOT met'}"
        )
    g = [res[("unrolled", t)]["graph"] * mib for t in steps]
    p = [res[("unrolled", t)]["peak_rss"] * mib for t in steps]
    growth = [(g[i] - g[0]) / (t - steps[0]) for i, t in enumerate(steps) if i]
    linear = min(growth) > 0 and max(growth) <= 1.2 * min(growth)
    lines.append(
        f"- unrolled: slope {_slope(steps, g):.2f} MiB per inner step (graph), "
        f"{_slope(steps, p):.2f} MiB per inner step (peak RSS); graph growth per extra step "
        f"from T={steps[0]}: {', '.join(f'{v:.2f}' for v in growth)} MiB — target about linear "
        f"growth (equal increments within 20%): {'met' if linear else 'NOT met'}"
    )
    table = markdown_table(
        ["gradient", "T", "graph MiB", "× T=1", "peak RSS MiB", "× T=1"],
        rows,
    )
    return (
        f"SlotAutoencoder (CPU size, tetrominoes 35×35, batch {args.batch}, K=4), SlotAttention "
        f"rule, reconstruction objective, one `loss` + `autograd.grad` per fresh process; "
        f"implicit: adjoint solve of at most {args.implicit_max_iter} iterations.\n\n"
        f"{table}\n\n" + "\n".join(lines)
    )


def main(args):
    if args.worker:
        print(json.dumps(worker(args)))
        return None
    return report(
        args, "memory", "Memory of one outer step against the number of inner steps", run(args)
    )


def parser():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--implicit-max-iter", type=int, default=100)
    p.add_argument("--quick", action="store_true", help="tiny sizes, to check the script runs")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--mode", default="unrolled", help=argparse.SUPPRESS)
    p.add_argument("--steps", type=int, default=1, help=argparse.SUPPRESS)
    return p


def parse(argv=None):
    args = parser().parse_args(argv)
    if args.quick:
        args.batch, args.implicit_max_iter = 2, 5
    return args


if __name__ == "__main__":
    main(parse())
