"""``pyro-slots evaluate --per-image`` on a gmm run, and a run trained on an HDF5 file."""

import csv
import json

import numpy as np
import pytest
from sklearn.metrics import adjusted_rand_score

from pyro_slots.cli import main
from pyro_slots.cli.evaluate import infer
from pyro_slots.cli.runs import load_run


def test_gmm_rows_are_the_json_means_and_score_against_sklearn(gmm_run, tmp_path, capsys):
    rows_path = tmp_path / "sets.csv"
    argv = ["evaluate", str(gmm_run), "--num", "5", "--json", "--per-image", str(rows_path)]
    assert main(argv) == 0
    metrics = json.loads(capsys.readouterr().out)
    with open(rows_path, newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 5 and [int(r["index"]) for r in rows] == list(range(5))
    for key in metrics:
        if key in rows[0]:
            column = np.array([float(r[key]) for r in rows])
            assert metrics[key] == pytest.approx(float(np.nanmean(column)), abs=1e-12), key
    # ARI of every set against scikit-learn on the same refined responsibilities.
    inference = infer(load_run(gmm_run), 5)
    truth = inference.batch.truth["assignments"].numpy()
    pred = inference.result.responsibilities[0].argmax(1).numpy()  # (S, K, N) -> (S, N)
    expected = [adjusted_rand_score(t, p) for t, p in zip(truth, pred)]
    np.testing.assert_allclose([float(r["ari"]) for r in rows], expected, atol=1e-10)


def test_a_folder_for_per_image_is_refused_before_any_work(gmm_run, tmp_path, capsys):
    assert main(["evaluate", str(gmm_run), "--per-image", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--per-image" in err and "is a folder" in err
