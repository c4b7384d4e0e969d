"""``pyro-slots summarize``: the test metrics of several runs and their spread, as markdown.

Every run trained with ``--test-size N`` writes ``test.json`` into its folder (the final test,
of the ``best.pt`` weights with ``--select-best``). This command reads several run folders (e.g.
the three seeds of one recipe) and prints one row per run with its test metrics, a row with the
mean ± sample standard deviation *across runs* of the per-run means (the seed-to-seed spread,
which is what "± over 3 seeds" reports), and the validation score of every run at every periodic
evaluation with its training seconds (``metrics.jsonl``). ``--weights final`` reports the final
weights of a ``--select-best`` run instead of its best ones. A folder holding only ``test.json``
and ``config.yaml`` (a run's record, kept without its checkpoints) is summarized from those.

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
from pyro_slots.plots.training import read_metrics

from .config import ConfigError

__all__ = ["METRICS", "WEIGHTS", "across_runs", "load_runs", "summary"]

#: Test metrics of the table, and their headers.
METRICS = ("fg_ari", "ari", "mean_iou", "mse", "objects_split", "objects_merged",
           "video_fg_ari", "slot_keeping")  # fmt: skip
HEADER = ("FG-ARI", "ARI", "mean IoU", "MSE", "split / image", "merged / image", "video FG-ARI",
          "slot keeping")  # fmt: skip
#: Decimals of each metric's cells.
DECIMALS = {"mse": 4}
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
                "validation": [r for r in records if r.get("split") == "held_out"],
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


def test_table(runs: list[dict]) -> str:
    metrics = [m for m in METRICS if all(m in run["test"] for run in runs)]
    header = [h for m, h in zip(METRICS, HEADER) if m in metrics]
    lines = [
        "| run | seed | updates | train min | weights (update) | " + " | ".join(header) + " |",
        "|---|---:|---:|---:|---|" + "---:|" * len(metrics),
    ]
    for run in runs:
        cells = [f"{run['test'][m]:.{DECIMALS.get(m, 3)}f}" for m in metrics]
        lines.append(
            f"| `{run['path']}` | {_cell(run['seed'], 'd')} | {run['updates']:,} | "
            f"{_cell(run['minutes'], '.1f')} | {run['weights']} ({run['step']:,}) | "
            + " | ".join(cells)
            + " |"
        )
    if len(runs) > 1:
        cells = [
            "**{0:.{2}f} ± {1:.{2}f}**".format(*across_runs(runs, m), DECIMALS.get(m, 3))
            for m in metrics
        ]
        lines.append(f"| mean ± std over {len(runs)} runs | | | | | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def validation_table(runs: list[dict], metric: str = "fg_ari") -> str:
    """One row per evaluated update: every run's score, with its training seconds where the
    record has them (``0.905 (212 s)``, the form ``benchmarks/bench_end_to_end.py`` reads)."""
    steps = sorted({v["step"] for run in runs for v in run["validation"]})
    if not steps:
        return "(no validation curve)"
    lines = [
        "| update | " + " | ".join(f"seed {run['seed']}" for run in runs) + " |",
        "|---:|" + "---:|" * len(runs),
    ]
    for step in steps:
        cells = []
        for run in runs:
            hit = [v for v in run["validation"] if v["step"] == step and metric in v]
            seconds = hit[0].get("train_seconds") if hit else None
            time = f" ({seconds:.0f} s)" if seconds is not None else ""
            cells.append(f"{hit[0][metric]:.3f}{time}" if hit else "")
        lines.append(f"| {step:,} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def summary(folders: list[str], metric: str = "fg_ari", weights: str = "tested") -> str:
    """The markdown ``pyro-slots summarize`` prints."""
    runs = load_runs(folders, weights)
    return (
        f"Test (held-out data, {weights} weights; per run means):\n\n"
        + test_table(runs)
        + f"\n\nValidation {metric}:\n\n"
        + validation_table(runs, metric)
    )
