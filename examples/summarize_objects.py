"""Summarize ``pyro-slots train`` runs: test metrics per run and across seeds, validation curves.

Every run trained with ``--test-size N`` writes ``test.json`` into its folder (the final test,
of the ``best.pt`` weights with ``--select-best``); this script reads several run folders (e.g.
the three seeds of one recipe) and prints markdown: one row per run with its test metrics, a row
with the mean ± sample standard deviation *across runs* of the per-run means (the seed-to-seed
spread, which is what "± over 3 seeds" reports), and the validation score of every run at every
periodic evaluation (``metrics.jsonl``). ``--weights final`` reports the final weights of a
``--select-best`` run instead of its best ones.

Example::

    for S in 0 1 2; do pyro-slots train --config tetrominoes-slot-attention --seed $S \\
        --out runs/tet-s$S --threads 1; done
    python examples/summarize_objects.py runs/tet-s0 runs/tet-s1 runs/tet-s2

(The JSON files in ``examples/results/objects/`` were written by the former
``examples/train_objects.py``, whose own summary script is in the history at the commits that
``examples/results/objects.md`` names.)
"""

from __future__ import annotations

import argparse
import json
import math
import os

import yaml

from pyro_slots.checkpoint import load_checkpoint

METRICS = ("fg_ari", "ari", "mean_iou", "mse")
HEADER = ("FG-ARI", "ARI", "mean IoU", "MSE")
WEIGHTS = ("tested", "final")


def load(folders: list[str], weights: str = "tested") -> list[dict]:
    """Per run folder: ``seed``, ``updates``, ``minutes`` of training, the tested ``step`` and its
    ``test`` metrics (``weights="tested"``: those of ``test.json``, the best validation weights of
    a ``--select-best`` run; ``"final"``: the final weights'), and its ``validation`` records."""
    if weights not in WEIGHTS:
        raise ValueError(f"weights: expected one of {WEIGHTS}, got {weights!r}")
    if not folders:
        raise ValueError("folders: expected at least one run folder")
    runs = []
    for folder in folders:
        path = os.path.join(folder, "test.json")
        if not os.path.exists(path):
            raise ValueError(f"{folder}: no test.json (train with --test-size N)")
        with open(path) as f:
            report = json.load(f)
        if weights == "final" and "final_weights" in report:
            report = {**report, **report["final_weights"], "weights": "final"}
        with open(os.path.join(folder, "config.yaml")) as f:
            config = yaml.safe_load(f)
        payload = load_checkpoint(os.path.join(folder, "checkpoint.pt"))
        with open(os.path.join(folder, "metrics.jsonl")) as f:
            records = [json.loads(line) for line in f if line.strip()]
        runs.append(
            {
                "path": folder,
                "seed": config["seed"],
                "updates": payload["step"],
                "minutes": payload.get("train_seconds", math.nan) / 60,
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


def test_table(runs: list[dict]) -> str:
    lines = [
        "| run | seed | updates | train min | weights (update) | " + " | ".join(HEADER) + " |",
        "|---|---:|---:|---:|---|" + "---:|" * len(METRICS),
    ]
    for run in runs:
        cells = [f"{run['test'][m]:.3f}" for m in METRICS]
        lines.append(
            f"| `{run['path']}` | {run['seed']} | {run['updates']:,} | {run['minutes']:.1f} | "
            f"{run['weights']} ({run['step']:,}) | " + " | ".join(cells) + " |"
        )
    if len(runs) > 1:
        cells = ["**{:.3f} ± {:.3f}**".format(*across_runs(runs, m)) for m in METRICS]
        lines.append(f"| mean ± std over {len(runs)} runs | | | | | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def validation_table(runs: list[dict], metric: str = "fg_ari") -> str:
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


def main(argv=None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folders", nargs="+", help="run folders of pyro-slots train")
    parser.add_argument("--metric", default="fg_ari", choices=METRICS, help="validation metric")
    parser.add_argument("--weights", default="tested", choices=WEIGHTS)
    args = parser.parse_args(argv)
    runs = load(args.folders, args.weights)
    text = (
        f"Test (held-out data, {args.weights} weights; per run means):\n\n"
        + test_table(runs)
        + f"\n\nValidation {args.metric}:\n\n"
        + validation_table(runs, args.metric)
    )
    print(text)
    return text


if __name__ == "__main__":
    main()
