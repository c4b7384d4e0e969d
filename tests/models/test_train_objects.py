"""examples/train_objects.py runs end to end with tiny arguments (as Pyro's test_examples)."""

import json
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


@pytest.fixture
def train_objects():
    sys.path.insert(0, str(EXAMPLES))
    try:
        import train_objects

        yield train_objects
    finally:
        sys.path.remove(str(EXAMPLES))


@pytest.mark.parametrize("model", ["slot_autoencoder", "iodine"])
def test_train_objects_tiny(train_objects, tmp_path, model):
    out = tmp_path / "results.json"
    args = train_objects.parse_args(
        [
            "--model",
            model,
            "--num-steps",
            "2",
            "--batch-size",
            "4",
            "--num-eval",
            "6",
            "--eval-batch-size",
            "4",
            "--num-val",
            "4",
            "--val-every",
            "2",
            "--threads",
            "1",
            "--output",
            str(out),
        ]
    )
    train_objects.main(args)
    results = json.loads(out.read_text())
    assert results["num_updates"] == 2
    assert len(results["validation"]) == 1
    test = results["test"]
    assert {k: test[k]["n"] for k in test} == {"fg_ari": 6, "ari": 6, "mean_iou": 6, "mse": 6}
    assert -1.0 <= test["fg_ari"]["mean"] <= 1.0 and 0.0 <= test["mean_iou"]["mean"] <= 1.0
    assert 0.0 < test["mse"]["mean"] < 1.0
