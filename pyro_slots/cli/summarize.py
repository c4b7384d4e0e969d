"""``pyro-slots summarize``: the test metrics of several runs and their spread, as markdown.

Every run trained with ``--test-size N`` writes ``test.json`` into its folder (the final test,
of the ``best.pt`` weights with ``--select-best``). This command reads several run folders (e.g.
the three seeds of one recipe) and prints one row per run with its test metrics, a row with the
mean ± sample standard deviation *across runs* of the per-run means (the seed-to-seed spread,
which is what "± over 3 seeds" reports), and the validation score of every run at every periodic
evaluation with its training seconds (``metrics.jsonl``). ``--weights final`` reports the final
weights of a ``--select-best`` run instead of its best ones. A run trained with ``--test-sweep
1,3,5,10,20`` also gets its test score against the inner steps T, and ``--reach 0.95`` prints
the update and minutes at which each run's validation score first reached 0.95. A folder
holding only ``test.json`` and ``config.yaml`` (a run's record, kept without its checkpoints) is
summarized from those.

Example::

    for S in 0 1 2; do pyro-slots train --config tetrominoes-slot-attention --seed $S \\
        --out runs/tet-s$S --threads 1; done
    pyro-slots summarize runs/tet-s0 runs/tet-s1 runs/tet-s2
"""

from __future__ import annotations

import json
import math
import os

import yaml

from pyro_slots.checkpoint import load_checkpoint
from pyro_slots.plots.training import is_validation, read_metrics

from .config import ConfigError
from .runs import describe_machine

__all__ = [
    "METRICS",
    "WEIGHTS",
    "across_runs",
    "default_metric",
    "first_reaching",
    "load_runs",
    "reach_table",
    "steps_table",
    "summary",
    "sweep_table",
]

#: Test metrics of the table, and their headers.
METRICS = ("fg_ari", "ari", "mean_iou", "loglik_per_point", "mse", "objects_split",
           "objects_merged", "video_fg_ari", "slot_keeping")  # fmt: skip
HEADER = ("FG-ARI", "ARI", "mean IoU", "log-lik / point", "MSE", "split / image",
          "merged / image", "video FG-ARI", "slot keeping")  # fmt: skip
#: Decimals of each metric's cells.
DECIMALS = {"mse": 4, "loglik_per_point": 4}
#: The validation score of each kind of run (the one ``--select-best`` selects by), in the
#: order :func:`default_metric` looks for them.
#: (clip runs' records hold the per-frame ``fg_ari`` too: their own score comes first)
SCORES = ("video_fg_ari", "fg_ari", "loglik_per_point")
#: Which tested weights: those of test.json (best with --select-best), or the final ones.
WEIGHTS = ("tested", "final")


def load_runs(folders: list[str], weights: str = "tested") -> list[dict]:
    """Per run folder: ``path``, ``seed``, ``updates`` and ``minutes`` of training (``None``
    when the folder has no checkpoint and its test.json no clock), the tested ``step`` and its
    ``test`` metrics, and its ``validation`` records.

    :raises ConfigError: for an unknown ``weights``, no folders, or a folder without test.json.
    """
    if weights not in WEIGHTS:
        raise ConfigError(f"--weights: expected one of {WEIGHTS}, got {weights!r}")
    if not folders:
        raise ConfigError("folders: expected at least one run folder")
    runs = []
    for folder in folders:
        path = os.path.join(folder, "test.json")
        if not os.path.exists(path):
            raise ConfigError(f"{folder}: no test.json (train with --test-size N)")
        with open(path) as f:
            report = json.load(f)
        final = report.get("final_weights", report)
        if weights == "final":
            report = {**report, **final, "weights": "final"}
        config_file = os.path.join(folder, "config.yaml")
        seed = None
        if os.path.exists(config_file):
            with open(config_file) as f:
                seed = (yaml.safe_load(f) or {}).get("seed")
        checkpoint = os.path.join(folder, "checkpoint.pt")
        updates, seconds = final["step"], report.get("train_seconds")
        if os.path.exists(checkpoint):
            payload = load_checkpoint(checkpoint)
            updates, seconds = payload["step"], payload.get("train_seconds", seconds)
        metrics_file = os.path.join(folder, "metrics.jsonl")
        records = read_metrics(metrics_file) if os.path.exists(metrics_file) else []
        runs.append(
            {
                "path": folder,
                "seed": seed,
                "updates": updates,
                "minutes": None if seconds is None else seconds / 60,
                "weights": report["weights"],
                "step": report["step"],
                "test": report["metrics"],
                "sweep": report.get("sweep", {}) if weights == "tested" else {},
                "validation": [r for r in records if is_validation(r)],
                "machine": report.get("machine"),
            }
        )
    return runs


def across_runs(runs: list[dict], metric: str) -> tuple[float, float]:
    """Mean and sample standard deviation (n - 1) of the runs' test means; std 0 for one run."""
    values = [run["test"][metric] for run in runs]
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, 0.0
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def _cell(value, fmt: str) -> str:
    return "—" if value is None else format(value, fmt)


def tested_with(metrics: dict) -> str:
    """How a test refined its slots, from its metrics: ``T = 20``, then ``R restarts`` and
    ``re-initialized`` (test-time re-initialization, with its masks) where they were used."""
    parts = [f"T = {metrics['inner_steps']}" if "inner_steps" in metrics else "T = ?"]
    if metrics.get("restarts", 1) > 1:
        parts.append(f"{metrics['restarts']} restarts ({metrics.get('restart_criterion', 'elbo')})")
    kind = metrics.get("reinitialize")
    if kind:
        parts.append("re-initialized" + (f" ({kind} masks)" if isinstance(kind, str) else ""))
    return ", ".join(parts)


def test_table(runs: list[dict]) -> str:
    """One row per run (its test means and how it was tested), and the mean ± std over the
    runs; a line under it says so when the runs were tested differently (the mean then mixes
    test procedures: compare them at equal T in :func:`sweep_table`)."""
    metrics = [m for m in METRICS if all(m in run["test"] for run in runs)]
    header = [h for m, h in zip(METRICS, HEADER) if m in metrics]
    lines = [
        "| run | seed | updates | train min | weights (update) | tested at | "
        + " | ".join(header)
        + " |",
        "|---|---:|---:|---:|---|---|" + "---:|" * len(metrics),
    ]
    for run in runs:
        cells = [f"{run['test'][m]:.{DECIMALS.get(m, 3)}f}" for m in metrics]
        lines.append(
            f"| `{run['path']}` | {_cell(run['seed'], 'd')} | {run['updates']:,} | "
            f"{_cell(run['minutes'], '.1f')} | {run['weights']} ({run['step']:,}) | "
            f"{tested_with(run['test'])} | " + " | ".join(cells) + " |"
        )
    if len(runs) > 1:
        cells = [
            "**{0:.{2}f} ± {1:.{2}f}**".format(*across_runs(runs, m), DECIMALS.get(m, 3))
            for m in metrics
        ]
        lines.append(f"| mean ± std over {len(runs)} runs | | | | | | " + " | ".join(cells) + " |")
    procedures = list(dict.fromkeys(tested_with(run["test"]) for run in runs))
    if len(procedures) > 1:
        lines.append(
            f"\nThe runs were tested differently ({'; '.join(procedures)}): the mean mixes "
            "test procedures; the T sweep compares the weights at equal T."
        )
    machines = list(dict.fromkeys(describe_machine(r["machine"]) for r in runs if r["machine"]))
    if len(machines) > 1:
        lines.append(
            f"\nThe runs finished on different machines ({'; '.join(machines)}): equal minutes "
            "are not equal updates; the validation table compares them at equal updates."
        )
    return "\n".join(lines)


def steps_table(sweep: dict) -> str:
    """One row per inner steps T of a sweep (``{"T": metrics}``): the test metrics at that T."""
    rows = list(sweep.values())
    metrics = [m for m in METRICS if all(m in row for row in rows)]
    header = [h for m, h in zip(METRICS, HEADER) if m in metrics]
    lines = ["| T | " + " | ".join(header) + " |", "|---:|" + "---:|" * len(metrics)]
    for t, row in sweep.items():
        cells = [f"{row[m]:.{DECIMALS.get(m, 3)}f}" for m in metrics]
        lines.append(f"| {t} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def sweep_table(runs: list[dict], metric: str = "fg_ari") -> str:
    """Every run's test ``metric`` at every inner steps T of its ``test_sweep`` (one row per run,
    one column per T; the mean over the runs when there are several); ``""`` without sweeps."""
    steps = sorted({int(t) for run in runs for t in run["sweep"]})
    if not steps:
        return ""
    lines = [
        "| run | seed | " + " | ".join(f"T = {t}" for t in steps) + " |",
        "|---|---:|" + "---:|" * len(steps),
    ]

    def value(run, t):
        row = run["sweep"].get(str(t))
        return None if row is None or metric not in row else row[metric]

    for run in runs:
        cells = [_cell(value(run, t), ".3f") for t in steps]
        lines.append(f"| `{run['path']}` | {_cell(run['seed'], 'd')} | " + " | ".join(cells) + " |")
    if len(runs) > 1:
        cells = []
        for t in steps:
            values = [value(run, t) for run in runs]
            cells.append("—" if None in values else f"**{sum(values) / len(values):.3f}**")
        lines.append(f"| mean over {len(runs)} runs | | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def first_reaching(run: dict, threshold: float, metric: str = "fg_ari") -> dict | None:
    """The first validation record of ``run`` whose ``metric`` is >= ``threshold`` (``None``
    when none is)."""
    for record in sorted(run["validation"], key=lambda r: r["step"]):
        if record.get(metric) is not None and record[metric] >= threshold:
            return record
    return None


def reach_table(runs: list[dict], threshold: float, metric: str = "fg_ari") -> str:
    """Per run: the update and the training minutes at which validation ``metric`` first
    reached ``threshold``."""
    lines = [
        f"| run | seed | first update with {metric} >= {threshold:g} | training minutes |",
        "|---|---:|---:|---:|",
    ]
    for run in runs:
        hit = first_reaching(run, threshold, metric)
        if hit is None:
            where, minutes = "not reached", "—"
        else:
            where = f"{hit['step']:,} ({hit[metric]:.3f})"
            seconds = hit.get("train_seconds")
            minutes = "—" if seconds is None else f"{seconds / 60:.1f}"
        lines.append(f"| `{run['path']}` | {_cell(run['seed'], 'd')} | {where} | {minutes} |")
    return "\n".join(lines)


def validation_table(runs: list[dict], metric: str = "fg_ari") -> str:
    """One row per evaluated update: every run's score, with its training seconds where the
    record has them (``0.905 (212 s)``, the form ``benchmarks/bench_end_to_end.py`` reads).
    The columns are named by seed, or by run folder where several runs share a seed."""
    steps = sorted({v["step"] for run in runs for v in run["validation"]})
    if not steps:
        return "(no validation curve)"
    seeds = [run["seed"] for run in runs]
    if len(set(seeds)) == len(seeds):
        names = [f"seed {seed}" for seed in seeds]
    else:  # several runs of one seed (components, recipes): name them by their folder
        names = [f"`{os.path.basename(os.path.normpath(run['path']))}`" for run in runs]
    lines = ["| update | " + " | ".join(names) + " |", "|---:|" + "---:|" * len(runs)]
    for step in steps:
        cells = []
        for run in runs:
            hit = [v for v in run["validation"] if v["step"] == step and metric in v]
            seconds = hit[0].get("train_seconds") if hit else None
            time = f" ({seconds:.0f} s)" if seconds is not None else ""
            cells.append(f"{hit[0][metric]:.3f}{time}" if hit else "")
        lines.append(f"| {step:,} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def default_metric(runs: list[dict]) -> str:
    """The validation score the runs were selected by: the first of :data:`SCORES` that every
    run's validation records hold (the clip FG-ARI for clips, FG-ARI for images, the
    log-likelihood per point for point sets); ``fg_ari`` where none is common to all."""
    for name in SCORES:
        if all(any(name in v for v in run["validation"]) for run in runs):
            return name
    return "fg_ari"


def summary(
    folders: list[str],
    metric: str | None = None,
    weights: str = "tested",
    reach: list[float] | tuple = (),
) -> str:
    """The markdown ``pyro-slots summarize`` prints.

    :param metric: the validation score of the curves (default :func:`default_metric`).
    :param reach: validation scores; for each, the update and minutes at which every run first
        reached it (:func:`reach_table`).
    """
    runs = load_runs(folders, weights)
    metric = default_metric(runs) if metric is None else metric
    parts = [f"Test (held-out data, {weights} weights; per run means):\n\n" + test_table(runs)]
    sweeps = sweep_table(runs, metric)
    if sweeps:
        parts.append(f"Test {metric} against the inner steps T (test_sweep):\n\n" + sweeps)
    parts.append(f"Validation {metric}:\n\n" + validation_table(runs, metric))
    for threshold in reach:
        parts.append(
            f"Validation {metric} first >= {threshold:g}:\n\n"
            + reach_table(runs, threshold, metric)
        )
    return "\n\n".join(parts)
