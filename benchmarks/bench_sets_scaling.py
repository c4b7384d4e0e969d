"""Time and peak memory per point set up to 10⁵ sets, on 1 and 2 processes (issue 22, item 5).

Three methods on sets of M 2-d points from random 4-component mixtures (float32, drawn by
:func:`benchmarks.bench_em.point_sets`), K = 4:

* ``loglik``: the GMM log-likelihood at the true parameters, i.e. the model's ELBO (exact
  enumeration of the assignments, so ELBO = log p(x)) evaluated through the Pyro program in
  chunks of ``--chunk-size`` sets: the cost of one model evaluation. It is checked against the
  closed-form log-likelihood (:func:`benchmarks.bench_em.true_loglik`) on the first chunk.
* ``em``: ``refine(model, x, EM(100), seed=0, elbo_tol=3e-4, chunk_size=C)``: k-means++ seeding
  with 10 Lloyd steps, then batched EM, every set stopping on its own.
* ``reinitialize``: ``em`` with dead and duplicate slots redrawn before every step
  (``Reinitialize(EM(100), init=GaussianInit(slot_dim))``, the posterior's masks, default
  thresholds): one responsibilities pass more per step, and the replacement draws of the
  blocks of rows a chunk holds (``Reinitialize.draw``; before, every chunk drew for the whole
  batch at every step, a cost quadratic in the number of sets).
* ``slot_attention``: the learned rule (untrained weights, built as
  ``examples/amortized_clustering.py`` builds it: moments, Gaussian features, hidden 64) with
  T = 3 and ``record_history=False``, from the same k-means++ λ_0.

Each cell runs in a fresh process with one torch thread and glibc's default allocator settings,
as a user's ``refine`` call gets them. Under them the peak of a chunked loop includes some heap
fragmentation: tensors of a 4096-set chunk (31 MiB for ``(4096, K, 500)`` float32) fall under
glibc's dynamic mmap threshold (at most 32 MiB) and live in the heap. In a trial, 25 chunks of
``loglik`` peaked at 188 MiB after the first chunk and 347 MiB after the last; with
:func:`~pyro_slots.tune_allocator` (everything below 1 GiB in the heap, nothing trimmed) the
loop stayed at 157 MiB (before k-means++ worked in chunks, the λ_0 draw then kept 6.4-9.1 GiB
resident at 10⁵ sets; it now draws its random numbers for the whole batch and computes in chunks
of about 2 million measurements).
Cells of at most 1000 sets report the median time of 5 runs, the others one run. For ``em`` and
``slot_attention`` the cell first draws λ_0 for the whole batch (``initial_slots`` with the
generator that ``refine(seed=0)`` makes, exactly what ``refine`` does first) and then calls
``refine`` with these ``slots=`` and ``chunk_size``, so the two phases are timed and measured
apart; their sum is the work of one ``refine(seed=0, chunk_size=C)`` call (checked for equality
on the cells of at most 1000 sets). Peak memory is the growth of the peak resident set size
(``VmHWM`` of ``/proc/self/status``, reset through ``/proc/self/clear_refs`` before each phase,
after the input was generated and a warm-up run): a high-water mark that cannot be reset, such
as ``ru_maxrss``, would be masked by the data generation's own peak. ``result`` is the size of
the returned tensors (the responsibilities ``(1, sets, K, M)`` dominate), ``loop working`` the
loop's peak growth less the result: that is what chunking bounds. Because glibc's heap moves
those RSS peaks by 100-250 MiB from run to run, every cell also runs the loop once more, untimed,
under :func:`benchmarks.common.tensor_peak_bytes` (the CPU allocator's own count of the bytes in
tensors, through ``torch.profiler``): the ``tensor`` columns, the same in every run, which the
memory verdicts read.

Then the 2-process rows: the same cells under ``torchrun --nproc-per-node 2`` (``gloo`` on
loopback, one thread per process), ``refine(..., distributed=True)``; every rank draws the
random numbers of λ_0 for the whole batch but computes λ_0 (k-means++) for its own half of the
sets only, runs the loop on that half, then the shards are all-gathered (``loglik``: each rank
evaluates its half and the ELBOs are all-gathered); and again with ``refine(..., gather=False)``,
every rank keeping its own half of the results (``loglik``: no gather). Times are rank 0's, each
phase from a barrier to a barrier (the loop's includes the gather); the memory is rank 0's.

    python -m benchmarks.bench_sets_scaling            # the full table (~17 min, 1-2 cores)
    python -m benchmarks.bench_sets_scaling --quick    # tiny sizes: checks that the script runs
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import socket
import subprocess
import sys
import time

import numpy as np
import torch

from benchmarks.common import markdown_table, report, tensor_peak_bytes

METHODS = ("loglik", "em", "reinitialize", "slot_attention")
K, DIM, GEN_CHUNK = 4, 2, 4096
MIB = 2.0**20


# --------------------------------------------------------------------------- memory
def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def _settle() -> int:
    """Free what can be freed, reset the peak RSS to the current RSS and return it (bytes)."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to VmRSS (Linux >= 4.0)
    return _status_kib("VmRSS") * 1024


def _peak_growth(base: int) -> float:
    return (_status_kib("VmHWM") * 1024 - base) / MIB


def _result_bytes(result) -> int:
    """Bytes of the result's tensors (distinct storages), the input ``x_enc`` excepted."""
    tensors = [result.slots, result.elbo, result.history, result.residuals]
    tensors += [result.relative_residuals, result.initial_slots, result.steps]
    tensors += [result.responsibilities, result.state.slots, *result.state.aux, *result.trajectory]
    storages = {}
    for t in tensors:
        if torch.is_tensor(t):
            s = t.untyped_storage()
            storages[s.data_ptr()] = s.nbytes()
    return sum(storages.values())


# --------------------------------------------------------------------------- one cell
def _data(num_sets: int, num_points: int):
    """Point sets (float32) and their true slots, generated ``GEN_CHUNK`` sets at a time (set
    ``s`` depends on ``(s // GEN_CHUNK, num_points)`` only), so the generation peak stays small."""
    from benchmarks.bench_em import point_sets

    x = torch.empty(num_sets, num_points, DIM)
    truth = torch.empty(num_sets, K, 2 * DIM + 1)
    for lo in range(0, num_sets, GEN_CHUNK):
        hi = min(lo + GEN_CHUNK, num_sets)
        torch.manual_seed(lo // GEN_CHUNK)  # the Dirichlet weights use the global stream
        xs, means, scales, w = point_sets(hi - lo, num_points, K, DIM, lo // GEN_CHUNK)
        x[lo:hi] = xs
        truth[lo:hi] = torch.cat([means, scales.log(), w.log().unsqueeze(-1)], -1)
    return x, truth


def _build(method: str):
    from pyro_slots.inner import EM, GaussianFeatures, SlotAttention
    from pyro_slots.models import GaussianMixture

    model = GaussianMixture(K, DIM)
    if method == "em":
        return model, EM(100), dict(elbo_tol=3e-4)
    if method == "reinitialize":
        from pyro_slots import GaussianInit
        from pyro_slots.inner import Reinitialize

        init = GaussianInit(model.slot_dim, learnable=False)
        return model, Reinitialize(EM(100), init=init, seed=1), dict(elbo_tol=3e-4)
    if method == "slot_attention":
        torch.manual_seed(0)
        rule = SlotAttention(
            num_steps=3, slot_dim=model.slot_dim, input_dim=DIM, hidden_dim=64, moments=True,
            encoder=GaussianFeatures(DIM), feature_dim=2 * DIM + 1, norm_inputs=False,
        )  # fmt: skip
        return model, rule, dict(record_history=False)
    return model, None, {}


def _loglik(model, x, truth, chunk_size, shard=(0, None)):
    """ELBO at the true slots of sets ``shard``, ``chunk_size`` sets at a time."""
    from pyro_slots.inner import InnerProblem

    start, stop = shard[0], x.shape[0] if shard[1] is None else shard[1]
    out = torch.empty(stop - start)
    with torch.no_grad():
        for lo in range(start, stop, chunk_size):
            hi = min(lo + chunk_size, stop)
            out[lo - start : hi - start] = InnerProblem(model, x[lo:hi]).elbo(truth[lo:hi])
    return out


def _lambda0(model, rule, x, shard=None):
    """λ_0 drawn as ``refine(model, x, rule, seed=0)`` draws it: of the whole batch, or, with
    ``shard = (start, stop)``, of those datapoints only, as a rank of ``refine(seed=0,
    distributed=True)`` does (the other rows are zeros, which the rank never reads)."""
    from pyro_slots.refine import initial_slots, make_generator

    rows = None if shard is None else torch.arange(*shard)
    with torch.no_grad():
        slots = initial_slots(model, x, K, inner=rule, generator=make_generator(0), rows=rows)
    if rows is None:
        return slots
    full = slots.new_zeros(x.shape[0], *slots.shape[1:])
    full[rows] = slots
    return full


def _gather_equal_shards(local: torch.Tensor, world_size: int) -> torch.Tensor:
    import torch.distributed as dist

    out = local.new_empty(world_size * local.shape[0], *local.shape[1:])
    dist.all_gather(list(out.chunk(world_size)), local.contiguous())
    return out


def run_cell(
    method: str, num_sets: int, num_points: int, chunk_size: int, distributed: bool,
    gather: bool = True,
):  # fmt: skip
    """Time (s) and peak growths (MiB) of one cell; returns a dict (printed as JSON). Under
    ``distributed``, ``gather=False`` leaves every rank's results on the rank."""
    torch.set_num_threads(1)
    import pyro_slots as ps

    world_size, rank = 1, 0
    if distributed:
        import torch.distributed as dist

        dist.init_process_group("gloo")
        world_size, rank = dist.get_world_size(), dist.get_rank()
        if num_sets % world_size:
            raise ValueError(f"sets: {num_sets} do not split evenly over {world_size} ranks")

    def barrier():
        if distributed:
            dist.barrier()

    model, rule, options = _build(method)
    x, truth = _data(num_sets, num_points)
    # Warm-up on a few sets: kernels, Pyro's first trace.
    warm = x[: min(64, num_sets)]
    if rule is None:
        _loglik(model, warm, truth[: warm.shape[0]], chunk_size)
    else:
        ps.refine(model, warm, rule, seed=0, chunk_size=chunk_size, **options)
    out = dict(method=method, sets=num_sets, points=num_points, processes=world_size)
    out["gather"] = gather
    if distributed and not gather:
        options = dict(options, gather=False)
    out["input_mib"] = x.numel() * x.element_size() / MIB

    def measured(name, fn):
        """``fn()`` timed from a barrier to a barrier, with the peak RSS growth it causes."""
        barrier()
        base = _settle()
        start = time.perf_counter()
        value = fn()
        barrier()
        out.setdefault(name + "_runs", []).append(time.perf_counter() - start)
        out.setdefault(name + "_peak_mib", _peak_growth(base))  # the first run's
        return value

    shard = (num_sets * rank // world_size, num_sets * (rank + 1) // world_size)

    def loglik():
        elbo = _loglik(model, x, truth, chunk_size, shard)
        return _gather_equal_shards(elbo, world_size) if distributed and gather else elbo

    # Few sets take milliseconds: the median of 5 runs (the memory is the first run's).
    for _ in range(5 if num_sets <= 1000 else 1):
        if rule is None:
            elbo = measured("loop", loglik)
        else:
            own = shard if distributed else None
            slots = measured("lambda0", lambda own=own: _lambda0(model, rule, x, own))
            result = measured(
                "loop",
                lambda slots=slots: ps.refine(
                    model, x, rule, slots=slots, chunk_size=chunk_size, distributed=distributed,
                    **options,
                ),
            )  # fmt: skip
    for name in ("lambda0", "loop"):
        if name + "_runs" in out:
            out[name + "_s"] = float(np.median(out[name + "_runs"]))
    # The loop once more, untimed, under the allocator's own count of tensor bytes: the same in
    # every run, where the RSS peak above moves with glibc's heap.
    if rule is None:
        _, peak = tensor_peak_bytes(loglik)
    else:
        _, peak = tensor_peak_bytes(
            lambda: ps.refine(
                model,
                x,
                rule,
                slots=slots,
                chunk_size=chunk_size,
                distributed=distributed,
                **options,
            )  # fmt: skip
        )
    out["loop_tensor_peak_mib"] = peak / MIB
    if rule is None:
        out["result_mib"] = elbo.numel() * elbo.element_size() / MIB
        out["steps"] = 0.0
        # The ELBO at the true parameters is the closed-form log-likelihood.
        from benchmarks.bench_em import true_loglik

        n = min(num_sets, chunk_size)
        means, log_scales, logits = truth[:n].split([DIM, DIM, 1], -1)
        closed = true_loglik(x[:n].double(), means.double(), log_scales.double().exp(),
                             logits.squeeze(-1).double().exp())  # fmt: skip
        out["check"] = abs(elbo[:n].double().mean().item() / num_points - closed)
    else:
        out["result_mib"] = _result_bytes(result) / MIB
        out["steps"] = result.steps.double().mean().item()
        if num_sets <= 1000 and not distributed:
            whole = ps.refine(model, x, rule, seed=0, **options)  # unchunked, λ_0 inside
            out["check"] = max(
                (whole.slots - result.slots).abs().max().item(),
                (whole.elbo - result.elbo).abs().max().item() / num_points,
            )
    if distributed:
        dist.destroy_process_group()
    return out if rank == 0 else None


# --------------------------------------------------------------------------- the grid
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def measure(method, num_sets, num_points, chunk_size, processes, gather=True) -> dict:
    """One cell in a fresh process (or ``processes`` under torchrun, the results gathered
    onto every rank or, with ``gather=False``, left on each)."""
    cell = ["-m", "benchmarks.bench_sets_scaling", "--cell", method, str(num_sets),
            str(num_points), "--chunk-size", str(chunk_size)]  # fmt: skip
    if not gather:
        cell.append("--no-gather")
    if processes == 1:
        command = [sys.executable, *cell]
    else:
        command = [
            sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(processes),
            "--master-addr", "127.0.0.1", "--master-port", str(_free_port()), *cell,
            "--distributed",
        ]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", GLOO_SOCKET_IFNAME="lo")
    proc = subprocess.run(command, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{proc.stderr[-3000:]}")
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    cell = json.loads(lines[-1])
    print(json.dumps(cell), flush=True)
    return cell


def _total(cell) -> float:
    return cell.get("lambda0_s", 0.0) + cell["loop_s"]


def _row(cell) -> list:
    n = cell["sets"]
    lam = cell.get("lambda0_s")
    return [
        cell["method"], n, cell["points"], 1e3 * _total(cell) / n,
        "-" if lam is None else 1e3 * lam / n,
        "-" if cell["method"] == "loglik" else f"{cell['steps']:.1f}",
        cell["input_mib"], cell.get("lambda0_peak_mib", "-"), cell["loop_peak_mib"],
        cell["result_mib"], cell["loop_peak_mib"] - cell["result_mib"],
        cell["loop_tensor_peak_mib"], cell["loop_tensor_peak_mib"] - cell["result_mib"],
    ]  # fmt: skip


def _exponent(cells) -> float:
    sets = np.log([c["sets"] for c in cells])
    return float(np.polyfit(sets, np.log([_total(c) for c in cells]), 1)[0])


def run(args) -> str:
    load_before = os.getloadavg()
    single, rows, fits, memory_notes, checks = {}, [], [], [], []
    grid = [(n, args.base_points) for n in args.sets]
    grid += [(args.points_sets, m) for m in args.points if m != args.base_points]
    for method in args.methods:
        for num_sets, num_points in grid:
            cell = measure(method, num_sets, num_points, args.chunk_size, 1)
            single[method, num_sets, num_points] = cell
            rows.append(_row(cell))
            if "check" in cell:
                checks.append(cell["check"])
        by_sets = [single[method, n, args.base_points] for n in args.sets]
        big = [c for c in by_sets if c["sets"] >= 10 * args.sets[0]]
        fit = (
            f"`{method}`: time ∝ sets^{_exponent(by_sets):.3f} over {args.sets[0]}–{args.sets[-1]}"
        )
        if len(big) >= 2:
            fit += f", ^{_exponent(big):.3f} from {big[0]['sets']} sets"
        fits.append(fit)
        beyond = [c for c in by_sets if c["sets"] > args.chunk_size]
        if len(beyond) >= 2:
            # The verdict reads the tensor count (the RSS growth is printed beside it).
            work = [c["loop_tensor_peak_mib"] - c["result_mib"] for c in beyond]
            rss = [c["loop_peak_mib"] - c["result_mib"] for c in beyond]
            flat = work[-1] <= 1.25 * work[0] + 16
            note = (
                f"`{method}`: loop working memory in tensors {work[0]:.0f} MiB at "
                f"{beyond[0]['sets']} sets, {work[-1]:.0f} MiB at {beyond[-1]['sets']} sets: "
                + ("flat beyond one chunk" if flat else "NOT flat beyond one chunk")
                + f" (RSS growth {rss[0]:.0f} and {rss[-1]:.0f} MiB)"
            )
            if "lambda0_peak_mib" in beyond[0]:
                lam = [c["lambda0_peak_mib"] for c in beyond]
                note += (
                    f"; the λ_0 draw (k-means++ in chunks of 2²¹ measurements) peaks at "
                    f"{lam[0]:.0f} and {lam[-1]:.0f} MiB (×{lam[-1] / max(lam[0], 1e-9):.1f} for "
                    f"×{beyond[-1]['sets'] / beyond[0]['sets']:.0f} sets)"
                )
            memory_notes.append(note)
    table = markdown_table(
        ["method", "sets", "M", "ms / set", "λ_0 ms / set", "mean steps", "input MiB",
         "λ_0 peak MiB", "loop peak MiB", "result MiB", "loop working MiB",
         "loop tensor peak MiB", "loop tensor working MiB"],
        rows,
    )  # fmt: skip

    dist_rows = []
    for method in args.methods if args.distributed_sets else ():
        for num_sets in args.distributed_sets:
            cell = measure(method, num_sets, args.base_points, args.chunk_size, 2)
            kept = measure(method, num_sets, args.base_points, args.chunk_size, 2, gather=False)
            one = single.get((method, num_sets, args.base_points))
            t1 = _total(one) if one else float("nan")
            dist_rows.append([
                method, num_sets, args.base_points, 1e3 * t1 / num_sets,
                1e3 * _total(cell) / num_sets, f"{t1 / _total(cell):.2f}×",
                1e3 * _total(kept) / num_sets, f"{t1 / _total(kept):.2f}×",
                cell.get("lambda0_s", 0.0) / _total(cell), cell.get("lambda0_peak_mib", "-"),
                cell["loop_peak_mib"], kept["loop_peak_mib"], cell["loop_tensor_peak_mib"],
                kept["loop_tensor_peak_mib"],
            ])  # fmt: skip
    load_after = os.getloadavg()
    dist_table = markdown_table(
        ["method", "sets", "M", "1 process ms / set", "2 processes, gathered: ms / set",
         "speedup", "2 processes, kept per rank: ms / set", "speedup",
         "λ_0 share of 2-process time (gathered)", "rank 0 λ_0 peak MiB",
         "rank 0 loop peak MiB: gathered", "kept", "rank 0 loop tensor peak MiB: gathered",
         "kept"],
        dist_rows,
    )  # fmt: skip
    worst = max(checks) if checks else float("nan")
    return (
        f"One torch thread per process everywhere (the 1-process rows too, so that the "
        f"2-process speedup compares like with like); float32; K = 4; chunk_size = "
        f"{args.chunk_size}; every cell a fresh process (glibc's default allocator), the "
        "median of 5 runs for ≤ 1000 sets, else one run (the rows of few sets carry the fixed "
        "per-call overhead, as a user's single call does). `ms / set` is the wall time of "
        "λ_0 + loop per set; the `peak` and `working` memory columns are growths of the peak "
        "RSS (MiB) over the input already in memory, the `tensor` ones the largest growth of "
        "the bytes in CPU tensors during one more, untimed run of the loop (the allocator's own "
        "count through torch.profiler's profile_memory: the same in every run, where the RSS "
        "moves with glibc's heap). `loglik` = ELBO at the true parameters "
        "(exact log-likelihood), chunked by the benchmark; `em` = refine(EM(100), "
        "elbo_tol=3e-4) from k-means++; `reinitialize` = the same with dead and duplicate slots "
        "redrawn (Reinitialize(EM(100), init=GaussianInit)); `slot_attention` = the learned "
        "rule, T = 3, "
        f"record_history=False.\n\n{table}\n\n"
        "Log-log fits of the total time against the number of sets (1 = linear):\n\n"
        + "\n".join(f"* {f}" for f in fits)
        + "\n\nMemory:\n\n"
        + "\n".join(f"* {n}" for n in memory_notes)
        + f"\n\nChecks: the loglik ELBO per point equals the closed-form log-likelihood, and the "
        "split λ_0 + chunked refine equals one unchunked refine(seed=0) (cells ≤ 1000 sets), "
        f"largest difference {worst:.2e} (per point for ELBOs).\n\n"
        "Two processes (`torchrun --nproc-per-node 2`, gloo on loopback, one thread each, "
        "`refine(..., distributed=True)`; every rank computes λ_0 and runs the loop for its own "
        "half of the sets; *gathered*: the results all-gathered onto every rank, as by "
        "default; *kept per rank*: `gather=False`, every rank returns its own half):\n\n"
        f"{dist_table}\n\n"
        f"Load average (1, 5, 15 min) before: {', '.join(f'{v:.2f}' for v in load_before)}; "
        f"after: {', '.join(f'{v:.2f}' for v in load_after)}. The machine has 2 cores shared "
        "with other jobs: the 2-process rows need both, so another job on either core slows "
        "them.\n"
    )


def main(args):
    if args.cell:
        method, num_sets, num_points = args.cell
        out = run_cell(
            method, int(num_sets), int(num_points), args.chunk_size, args.distributed,
            not args.no_gather,
        )  # fmt: skip
        if out is not None:
            print(json.dumps(out))
        return None
    return report(
        args, "sets_scaling", "Time and memory per set up to 10⁵ sets, 1 and 2 processes", run(args)
    )


def parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    p.add_argument("--sets", nargs="+", type=int, default=[100, 1000, 10_000, 100_000])
    p.add_argument("--base-points", type=int, default=500, help="M of the rows over sets")
    p.add_argument("--points", nargs="+", type=int, default=[100, 500, 2000])
    p.add_argument("--points-sets", type=int, default=10_000, help="sets of the rows over M")
    p.add_argument("--distributed-sets", nargs="*", type=int, default=[10_000, 100_000],
                   help="sets of the torchrun rows (none: skip them)")  # fmt: skip
    p.add_argument("--chunk-size", type=int, default=4096)
    p.add_argument("--quick", action="store_true", help="tiny sizes, to check the script runs")
    p.add_argument("--cell", nargs=3, metavar=("METHOD", "SETS", "POINTS"), help=argparse.SUPPRESS)
    p.add_argument("--distributed", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--no-gather", action="store_true", help=argparse.SUPPRESS)
    return p


def parse(argv=None):
    args = parser().parse_args(argv)
    if args.quick:
        args.sets, args.points, args.base_points, args.points_sets = [20, 80], [30, 60], 60, 40
        args.distributed_sets, args.chunk_size = [80], 16
    if args.chunk_size < 1:
        raise ValueError(f"--chunk-size: expected an integer >= 1, got {args.chunk_size}")
    if min(args.sets) < 1 or min(args.points) < 1:
        raise ValueError("--sets, --points: expected integers >= 1")
    return args


if __name__ == "__main__":
    main(parse())
