"""The end-to-end benchmark reads the time to FG-ARI 0.9 from the headline runs' kept records."""

import json

from benchmarks import bench_end_to_end


def _run(folder, curve):
    folder.mkdir(parents=True)
    (folder / "test.json").write_text(
        json.dumps({"weights": "final", "step": 3, "metrics": {"fg_ari": 0.5}})
    )
    records = [{"step": i, "split": "train", "J": 1.0} for i in (1, 2)]
    for step, score, seconds in curve:
        record = {"step": step, "split": "held_out", "fg_ari": score}
        records.append(record if seconds is None else {**record, "train_seconds": seconds})
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


def test_time_to_fg_ari_is_the_first_record_at_or_above_the_threshold(tmp_path, monkeypatch):
    """Per seed, the training seconds of the first validation record at or above the threshold
    (records out of order, a train record between them); a record without a clock gives its
    update; a run without records says so."""
    _run(tmp_path / "tet-s0", [(1000, 0.905, 212.4), (500, 0.672, 104.0), (1500, 0.88, 320.0)])
    _run(tmp_path / "tet-s1", [(500, 0.173, 157.0), (1000, 0.877, 266.0), (1500, 0.9, 386.0)])
    _run(tmp_path / "tet-s2", [(500, 0.95, None)])
    (tmp_path / "tet-s3").mkdir()
    runs = [tmp_path / f"tet-s{s}" for s in range(4)]
    monkeypatch.setattr(bench_end_to_end, "HEADLINE", runs)
    monkeypatch.setattr(bench_end_to_end, "ROOT", tmp_path.parent)
    text = bench_end_to_end.wall_time_to_fg_ari(0.9)
    assert text.startswith(
        "tet-s0: 212 s (FG-ARI 0.905); tet-s1: 386 s (FG-ARI 0.900); "
        "tet-s2: update 500 (FG-ARI 0.950; no clock); tet-s3: no validation records kept"
    )
    assert "tet-s0: not reached in 320 s" in bench_end_to_end.wall_time_to_fg_ari(0.95)


def test_em_benchmark_configurations_parse_and_bad_ones_are_named():
    """``R[:S[:L]]``: restarts, the step after which the best is kept (``-``: never; ``s=k,...``
    a schedule of stages) and the Lloyd steps (default 10, as the benchmark's rows without
    one)."""
    import argparse

    import pytest

    from benchmarks.bench_em import parse, parse_config

    assert parse_config("8") == (8, None, 10)
    assert parse_config("6:1:0") == (6, 1, 0)
    assert parse_config("6:-:3") == (6, None, 3)
    assert parse_config("6:0=2,1=1:0") == (6, ((0, 2), (1, 1)), 0)
    for bad in ("6:x", "1:2:3:4", "", "6:0=2,1"):
        with pytest.raises(argparse.ArgumentTypeError, match="--configs"):
            parse_config(bad)
    assert parse([]).configs == ["1", "8", "6:1:1", "6:1:0", "6:0=3,1=1:0"]


def test_em_benchmark_point_sets_depend_on_their_seed_alone():
    """The benchmark's sets are the same whatever state torch's global stream is in, and
    drawing them leaves that state alone; the mixing weights are the Dirichlet draw of a
    stream seeded with ``seed`` (recomputed here), every set's weights on the simplex."""
    import torch

    from benchmarks.bench_em import point_sets

    torch.manual_seed(1)
    first = point_sets(5, 20, 3, 2, seed=7)
    torch.manual_seed(2)
    second = point_sets(5, 20, 3, 2, seed=7)
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    assert not torch.equal(point_sets(5, 20, 3, 2, seed=8)[0], first[0])
    torch.manual_seed(2)
    state = torch.get_rng_state()
    point_sets(5, 20, 3, 2, seed=7)
    assert torch.equal(torch.get_rng_state(), state)
    torch.manual_seed(7)
    expected = torch.distributions.Dirichlet(torch.full((3,), 3.0, dtype=torch.float64)).sample(
        (5,)
    )
    assert torch.equal(first[3], expected)
    assert torch.allclose(first[3].sum(-1), torch.ones(5, dtype=torch.float64))
