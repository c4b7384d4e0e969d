"""Summarize ``train_objects.py`` runs: test metrics per run and across seeds, validation curves.

Every run writes a JSON file (``--output``); this script reads several of them (e.g. the three
training seeds of one configuration) and prints markdown: one row per run with its test metrics
(mean ± std over the test images), a row with the mean ± standard deviation *across runs* of the
per-run means (the seed-to-seed spread, which is what "± over 3 seeds" reports), and the
validation FG-ARI of every run at every validation step.

Example::

    python examples/summarize_objects.py /tmp/objects/sa_tet_s0.json /tmp/objects/sa_tet_s1.json
"""

from __future__ import annotations

import argparse
import json
import math

METRICS = ("fg_ari", "ari", "mean_iou", "mse")
HEADER = ("FG-ARI", "ARI", "mean IoU", "MSE")


def load(paths: list[str]) -> list[dict]:
    runs = []
    for path in paths:
        with open(path) as f:
            run = json.load(f)
        missing = [m for m in METRICS if m not in run.get("test", {})]
        if missing:
            raise ValueError(f"{path}: no test metrics {missing} (did the run finish?)")
        run["path"] = path
        runs.append(run)
    if not runs:
        raise ValueError("paths: expected at least one run's JSON file")
    return runs


def across_runs(runs: list[dict], metric: str) -> tuple[float, float]:
    """Mean and sample standard deviation (n - 1) of the runs' test means; std 0 for one run."""
    values = [run["test"][metric]["mean"] for run in runs]
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, 0.0
    var = sum((v - mean) ** 2 for v in values) / (len(values) - 1)
    return mean, math.sqrt(var)


def test_table(runs: list[dict]) -> str:
    lines = [
        "| run | seed | updates | train min | " + " | ".join(HEADER) + " |",
        "|---|---:|---:|---:|" + "---:|" * len(METRICS),
    ]
    for run in runs:
        cells = [f"{run['test'][m]['mean']:.3f} ± {run['test'][m]['std']:.3f}" for m in METRICS]
        seed = run.get("args", {}).get("seed", "?")
        lines.append(
            f"| `{run['path']}` | {seed} | {run['num_updates']:,} | "
            f"{run['train_seconds'] / 60:.1f} | " + " | ".join(cells) + " |"
        )
    if len(runs) > 1:
        cells = []
        for m in METRICS:
            mean, std = across_runs(runs, m)
            cells.append(f"**{mean:.3f} ± {std:.3f}**")
        lines.append(f"| mean ± std over {len(runs)} runs | | | | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def validation_table(runs: list[dict], metric: str = "fg_ari") -> str:
    steps = sorted({v["step"] for run in runs for v in run.get("validation", [])})
    if not steps:
        return "(no validation curve)"
    lines = [
        "| update | "
        + " | ".join(f"seed {run.get('args', {}).get('seed', '?')}" for run in runs)
        + " |",
        "|---:|" + "---:|" * len(runs),
    ]
    for step in steps:
        cells = []
        for run in runs:
            hit = [v for v in run.get("validation", []) if v["step"] == step]
            cells.append(f"{hit[0][metric]['mean']:.3f} ({hit[0]['seconds']:.0f} s)" if hit else "")
        lines.append(f"| {step:,} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("paths", nargs="+", help="JSON files written by train_objects.py")
    parser.add_argument("--metric", default="fg_ari", choices=METRICS, help="validation metric")
    args = parser.parse_args(argv)
    runs = load(args.paths)
    text = (
        "Test (held-out images; per run mean ± std over images):\n\n"
        + test_table(runs)
        + f"\n\nValidation {args.metric} (seconds of training in brackets):\n\n"
        + validation_table(runs, args.metric)
    )
    print(text)
    return text


if __name__ == "__main__":
    main()
