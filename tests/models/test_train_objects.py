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


def test_train_objects_set_prediction(train_objects, tmp_path):
    """Reconstruction + set prediction on shapes: J falls on held-out scenes, AP is reported."""
    out = tmp_path / "results.json"
    args = train_objects.parse_args(
        [
            "--dataset",
            "shapes",
            "--num-slots",
            "6",
            "--objective",
            "both",
            "--num-steps",
            "20",
            "--batch-size",
            "8",
            "--lr",
            "2e-3",
            "--warmup-steps",
            "1",
            "--num-eval",
            "8",
            "--eval-batch-size",
            "8",
            "--num-val",
            "16",
            "--val-every",
            "20",
            "--threads",
            "1",
            "--output",
            str(out),
        ]
    )
    train_objects.main(args)
    results = json.loads(out.read_text())
    assert results["num_updates"] == 20
    for scores in (results["test"], results["validation"][-1]):
        assert set(scores["ap"]) == {"inf", "1.0", "0.5", "0.25", "0.125"}
        aps = [scores["ap"][t] for t in ("inf", "1.0", "0.5", "0.25", "0.125")]
        assert all(0.0 <= ap <= 1.0 for ap in aps)
        # A looser distance threshold can only accept more predictions.
        assert aps == sorted(aps, reverse=True)
    # J = MSE + 0.01 · set prediction, on the same 16 validation scenes before and after.
    val_j = results["validation_J"]
    assert val_j["final"] < 0.975 * val_j["initial"]  # observed: 0.961
    curve = results["curve"]
    assert {"J_own", "J_set"} <= set(curve[-1])
    assert curve[-1]["J"] == pytest.approx(curve[-1]["J_own"] + 0.01 * curve[-1]["J_set"])


def test_set_prediction_needs_a_slot_per_object(train_objects):
    args = train_objects.parse_args(["--dataset", "shapes", "--objective", "set-prediction"])
    with pytest.raises(ValueError, match="num_slots"):
        train_objects.main(args)
