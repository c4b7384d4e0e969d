"""The end-to-end benchmark reads the time to FG-ARI 0.9 from the results file's seed curves."""

from pathlib import Path

from benchmarks import bench_end_to_end


def test_time_to_fg_ari_is_the_first_point_at_or_above_the_threshold(tmp_path, monkeypatch):
    doc = tmp_path / "examples" / "results" / "objects.md"
    doc.parent.mkdir(parents=True)
    doc.write_text(
        "text\n\n| update | seed 0 | seed 1 |\n|---:|---:|---:|\n"
        "| 500 | 0.672 (104 s) | 0.173 (157 s) |\n"
        "| 1,000 | 0.905 (212 s) | 0.877 (266 s) |\n"
        "| 1,500 | 0.880 (320 s) | 0.900 (386 s) |\n\nmore text\n"
    )
    monkeypatch.setattr(bench_end_to_end, "OBJECTS", Path(doc))
    text = bench_end_to_end.wall_time_to_fg_ari(0.9)
    assert text.startswith("seed 0: 212 s (FG-ARI 0.905); seed 1: 386 s (FG-ARI 0.900)")
    assert "seed 0: not reached in 320 s" in bench_end_to_end.wall_time_to_fg_ari(0.95)
