"""How well, and how fast, does a rule fit Gaussian mixtures? A table of methods on point sets.

Every method maps a batch of point sets (:class:`~pyro_slots.data.PointSets` of one set size)
to the log-likelihood per point of its fit, ``(S,)``; :func:`compare_methods` runs each on groups
of held-out sets of increasing size and times it per set (wall and CPU time, after one untimed
warm-up call). The methods of the amortized-clustering study are built by
:func:`baseline_methods` (the true parameters, scikit-learn's ``GaussianMixture``, EM and
gradient ascent through :func:`~pyro_slots.refine`) and :func:`learned_methods` (a learned rule
at several T, safeguarded, followed by EM steps); :func:`comparison_table` writes the markdown
table.

Example::

    >>> groups = point_set_groups(50, 100, 500, num_groups=5)
    >>> rows = compare_methods({**baseline_methods(), **learned_methods(model, rule)}, groups)
    >>> print(comparison_table(rows))
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable

import numpy as np
import torch

from ..data import PointSets, sample_point_sets, true_log_likelihood
from ..inner import EM, GradientAscent, Hybrid, Safeguarded
from ..refine import refine

__all__ = [
    "ORACLE",
    "baseline_methods",
    "compare_methods",
    "comparison_table",
    "learned_methods",
    "point_set_groups",
    "refine_loglik",
    "sklearn_loglik",
]

#: Name of the row of the true parameters, the reference of every gap.
ORACLE = "oracle (true parameters)"


def point_set_groups(
    num_sets: int,
    min_points: int,
    max_points: int,
    num_groups: int = 5,
    num_components: int = 4,
    dim: int = 2,
    seed: int = 1,
) -> list[PointSets]:
    """``num_sets`` held-out sets in ``num_groups`` groups of equal set size, the sizes evenly
    spaced from ``min_points`` to ``max_points`` (consecutive sets of the generator ``seed``)."""
    if not 1 <= min_points <= max_points:
        raise ValueError(
            f"min_points, max_points: expected 1 <= min <= max, got {min_points}, {max_points}"
        )
    if num_groups < 1 or num_sets < num_groups:
        raise ValueError(
            f"num_sets, num_groups: expected 1 <= num_groups <= num_sets (every group holds a "
            f"set), got {num_sets}, {num_groups}"
        )
    # (one group: the max_points sets, which the "largest sets" columns describe)
    sizes = (
        np.linspace(min_points, max_points, num_groups).round() if num_groups > 1 else [max_points]
    )
    # Sets spread over the groups as evenly as they go (counts differ by at most one), so the
    # last group is always the max_points one.
    counts = [len(part) for part in np.array_split(np.arange(num_sets), num_groups)]
    groups, start = [], 0
    for count, n in zip(counts, sizes):
        groups.append(sample_point_sets(count, int(n), num_components, dim, seed, start))
        start += count
    return groups


def sklearn_loglik(sets: PointSets, num_components: int, n_init: int = 1, seed: int = 0):
    """Log-likelihood per point of scikit-learn's diagonal ``GaussianMixture`` fit of every set
    (default ``max_iter`` and ``tol``), ``(S,)`` float64; set ``i`` uses ``random_state=seed+i``."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.mixture import GaussianMixture

    scores = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        for i, points in enumerate(sets.x.double().numpy()):
            gm = GaussianMixture(
                num_components, covariance_type="diag", n_init=n_init, random_state=seed + i
            )
            scores.append(gm.fit(points).score(points))
    return torch.tensor(scores, dtype=torch.float64)


def refine_loglik(model, sets: PointSets, rule, num_steps: int, seed: int = 0, record=True):
    """Log-likelihood per point after ``num_steps`` of ``rule`` from ``model``'s initialization,
    ``(S,)`` (the mixture's ELBO with enumerated assignments is its exact log-likelihood).

    A rule that does not differentiate the ELBO runs under ``torch.inference_mode``: no autograd
    bookkeeping at all, the same numbers in less time (most for small batches, where the cost
    per operation dominates).

    :param bool record: record the ELBO at every step; ``False`` computes only the final one
        (``refine(..., record_history=False)``, for rules whose update does not use it).
    """
    with torch.inference_mode(not rule.uses_elbo_gradient):
        result = refine(
            model, sets.x, rule, num_steps=num_steps, seed=seed, record_history=record,
            responsibilities=False,
        )  # fmt: skip
        return result.elbo[0].double() / sets.x.shape[1]


def baseline_methods(
    num_components: int = 4, dim: int = 2, seed: int = 0, ga_step_size: float = 0.05
) -> dict[str, Callable]:
    """The oracle, scikit-learn (``n_init`` 1 and 5), EM (10 and 100 steps) and gradient ascent
    (Adam, 100 steps); EM and gradient ascent start as scikit-learn does (k-means++ seeding and
    10 Lloyd iterations, :class:`~pyro_slots.models.GaussianMixture`'s default)."""
    from pyro_slots.models import GaussianMixture

    model = GaussianMixture(num_slots=num_components, dim=dim)
    ga = GradientAscent(num_steps=100, step_size=ga_step_size, adam=True)
    return {
        ORACLE: lambda s: true_log_likelihood(s.x, s.means, s.scales, s.weights).double().mean(1),
        "sklearn GaussianMixture (diag, n_init=1)": lambda s: sklearn_loglik(
            s, num_components, 1, seed
        ),
        "sklearn GaussianMixture (diag, n_init=5)": lambda s: sklearn_loglik(
            s, num_components, 5, seed
        ),
        "EM, 10 steps": lambda s: refine_loglik(model, s, EM(10), 10, seed),
        "EM, 100 steps": lambda s: refine_loglik(model, s, EM(100), 100, seed),
        "GradientAscent (Adam), 100 steps": lambda s: refine_loglik(model, s, ga, 100, seed),
    }


def learned_methods(
    model,
    rule,
    test_steps=(1, 3, 5, 10),
    train_steps: int = 3,
    seed: int = 0,
    fast: bool = False,
    safeguarded: bool = False,
) -> dict[str, Callable]:
    """The learned ``rule`` at every T of ``test_steps``; with ``safeguarded`` also
    :class:`~pyro_slots.inner.Safeguarded` (EM fallback) at every T; ``train_steps`` learned
    steps followed by 1 and 5 EM steps (:class:`~pyro_slots.inner.Hybrid`); and ``train_steps``
    learned steps from the baselines' initialization.

    :param bool fast: skip the per-step ELBO (a ``history recorded`` row at ``train_steps``
        keeps the other timing).
    """
    from pyro_slots.models import GaussianMixture

    record = not fast
    methods = {}
    for t in test_steps:
        methods[f"learned, T={t}"] = lambda s, t=t: refine_loglik(model, s, rule, t, seed, record)
        if fast and t == train_steps:
            methods[f"learned, T={t} (history recorded)"] = lambda s, t=t: refine_loglik(
                model, s, rule, t, seed
            )
    if safeguarded:
        safe = Safeguarded(rule, fallback=EM(1))
        for t in test_steps:
            methods[f"learned, T={t}, safeguarded (EM fallback)"] = lambda s, t=t: refine_loglik(
                model, s, safe, t, seed, record
            )
    for k in (1, 5):
        hybrid = Hybrid(rule, EM(1), num_fixed_steps=k, num_learned_steps=train_steps)
        methods[f"learned T={train_steps} + {k} EM"] = lambda s, h=hybrid: refine_loglik(
            model, s, h, h.num_steps, seed, record
        )
    baseline = GaussianMixture(num_slots=model.num_slots, dim=model.dim)
    methods[f"learned, T={train_steps}, from the EM baselines' init"] = lambda s: refine_loglik(
        baseline, s, rule, train_steps, seed, record
    )
    return methods


def compare_methods(
    methods: dict[str, Callable], groups: list[PointSets], repeats: int = 1
) -> list[dict]:
    """Score and time every method on every group, under ``torch.no_grad()``.

    The methods take turns: every round runs each method once on each group, and a method's
    time on a group is its median over ``repeats`` rounds, so that a machine slowing down for a
    while (other jobs, a busy host) weighs on every method alike instead of on the ones that
    happened to run then. The scores are the first round's.

    :param int repeats: rounds, >= 1.
    :returns: one dict per method: ``method``, ``loglik_per_point`` (mean over sets) and its
        ``stderr``, ``ms_per_set`` / ``cpu_ms_per_set`` (all sets) and ``..._largest`` (the last
        group), ``gap_to_oracle`` (the :data:`ORACLE` row minus this one; NaN without it) and
        ``speedup_vs_sklearn`` / ``cpu_speedup_vs_sklearn`` (against the first scikit-learn row;
        NaN without one) and ``cpu_speedup_vs_sklearn_largest`` (on the last group alone).
    """
    if not groups:
        raise ValueError("groups: expected at least one group of point sets")
    if not isinstance(repeats, int) or repeats < 1:
        raise ValueError(f"repeats: expected an int >= 1, got {repeats!r}")
    warmup = type(groups[0])(*(t[:2] for t in groups[0]))
    scores = {name: [] for name in methods}
    wall = {name: [[] for _ in groups] for name in methods}
    cpu = {name: [[] for _ in groups] for name in methods}
    with torch.no_grad():
        for fn in methods.values():
            fn(warmup)  # imports, allocator and Pyro's first-call costs are not timed
        for round_ in range(repeats):
            for g, sets in enumerate(groups):
                for name, fn in methods.items():
                    start, cpu_start = time.perf_counter(), time.process_time()
                    score = fn(sets).double()
                    wall[name][g].append(time.perf_counter() - start)
                    cpu[name][g].append(time.process_time() - cpu_start)
                    if round_ == 0:
                        scores[name].append(score)
    rows = []
    for name in methods:
        every = torch.cat(scores[name])
        seconds = [float(np.median(t)) for t in wall[name]]
        cpu_seconds = [float(np.median(t)) for t in cpu[name]]
        rows.append(
            {
                "method": name,
                "loglik_per_point": every.mean().item(),
                "stderr": (every.std() / math.sqrt(len(every))).item()
                if len(every) > 1
                else math.nan,
                "ms_per_set": 1e3 * sum(seconds) / len(every),
                "ms_per_set_largest": 1e3 * seconds[-1] / len(groups[-1].x),
                "cpu_ms_per_set": 1e3 * sum(cpu_seconds) / len(every),
                "cpu_ms_per_set_largest": 1e3 * cpu_seconds[-1] / len(groups[-1].x),
            }
        )
    by_name = {r["method"]: r for r in rows}
    oracle = by_name.get(ORACLE)
    sklearn = next((r for r in rows if r["method"].startswith("sklearn")), None)
    for row in rows:
        row["gap_to_oracle"] = (
            oracle["loglik_per_point"] - row["loglik_per_point"] if oracle else math.nan
        )
        for key, time_key in (
            ("speedup_vs_sklearn", "ms_per_set"),
            ("cpu_speedup_vs_sklearn", "cpu_ms_per_set"),
            ("cpu_speedup_vs_sklearn_largest", "cpu_ms_per_set_largest"),
        ):
            row[key] = (
                sklearn[time_key] / row[time_key] if sklearn and row[time_key] > 0 else math.nan
            )
    return rows


def _ratio(value: float) -> str:
    return "—" if math.isnan(value) else f"{value:.1f}x"


def comparison_table(rows: list[dict], largest: str = "largest sets") -> str:
    """The rows of :func:`compare_methods` as a markdown table."""
    lines = [
        "| method | log-lik / point | ± s.e. | gap to oracle | wall ms / set | CPU ms / set "
        f"| CPU ms / set ({largest}) | CPU speed-up vs sklearn n_init=1 "
        f"| CPU speed-up ({largest}) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['method']} | {r['loglik_per_point']:.4f} | {r['stderr']:.4f} | "
            f"{r['gap_to_oracle']:+.4f} | {r['ms_per_set']:.3f} | {r['cpu_ms_per_set']:.3f} "
            f"| {r['cpu_ms_per_set_largest']:.3f} | {_ratio(r['cpu_speedup_vs_sklearn'])} "
            f"| {_ratio(r['cpu_speedup_vs_sklearn_largest'])} |"
        )
    return "\n".join(lines)
