"""Summarize ``train_objects.py`` runs: test metrics per run and across seeds, validation curves.

Every run writes a JSON file (``--output``); this script reads several of them (e.g. the three
training seeds of one configuration) and prints markdown: one row per run with its test metrics
(mean ± std over the test images), a row with the mean ± standard deviation *across runs* of the
per-run means (the seed-to-seed spread, which is what "± over 3 seeds" reports), and the
validation FG-ARI of every run at every validation step. ``--weights selected`` reports the
test scores of the weights with the best validation FG-ARI (runs trained with ``--select-best``)
instead of the final ones.

Example::

    python examples/summarize_objects.py /tmp/objects/sa_tet_s0.json /tmp/objects/sa_tet_s1.json
"""

from __future__ import annotations

import argparse
import json
import math

METRICS = ("fg_ari", "ari", "mean_iou", "mse")
HEADER = ("FG-ARI", "ARI", "mean IoU", "MSE")
WEIGHTS = ("final", "selected")


def load(paths: list[str], weights: str = "final") -> list[dict]:
    """The runs' JSON files; ``run["test"]`` holds the scores of ``weights`` ("final" or
    "selected": the best validation FG-ARI of a ``--select-best`` run, whose update goes to
    ``run["selected_step"]``)."""
    if weights not in WEIGHTS:
        raise ValueError(f"weights: expected one of {WEIGHTS}, got {weights!r}")
    runs = []
    for path in paths:
        with open(path) as f:
            run = json.load(f)
        if weights == "selected":
            if "selected" not in run:
                raise ValueError(f"{path}: no selected weights (train with --select-best)")
            run["test"] = run["selected"]["test"]
            run["selected_step"] = run["selected"]["step"]
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
    selected = any("selected_step" in run for run in runs)
    extra = "selected update | " if selected else ""
    lines = [
        "| run | seed | updates | train min | " + extra + " | ".join(HEADER) + " |",
        "|---|---:|---:|---:|" + "---:|" * (len(METRICS) + selected),
    ]
    for run in runs:
        cells = [f"{run['test'][m]['mean']:.3f} ± {run['test'][m]['std']:.3f}" for m in METRICS]
        if selected:
            cells.insert(0, f"{run['selected_step']:,}")
        seed = run.get("args", {}).get("seed", "?")
        # An --eval-only run (weights scored again) has no training of its own to report.
        updates = f"{run['num_updates']:,}" if "num_updates" in run else "–"
        minutes = f"{run['train_seconds'] / 60:.1f}" if "train_seconds" in run else "–"
        lines.append(
            f"| `{run['path']}` | {seed} | {updates} | {minutes} | " + " | ".join(cells) + " |"
        )
    if len(runs) > 1:
        cells = [""] if selected else []
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
    parser.add_argument(
        "--weights",
        default="final",
        choices=WEIGHTS,
        help="test scores of the final weights or of the best validation FG-ARI (--select-best)",
    )
    args = parser.parse_args(argv)
    runs = load(args.paths, args.weights)
    which = "final weights" if args.weights == "final" else "weights of the best validation FG-ARI"
    text = (
        f"Test (held-out images, {which}; per run mean ± std over images):\n\n"
        + test_table(runs)
        + f"\n\nValidation {args.metric} (seconds of training in brackets):\n\n"
        + validation_table(runs, args.metric)
    )
    print(text)
    return text


if __name__ == "__main__":
    main()
