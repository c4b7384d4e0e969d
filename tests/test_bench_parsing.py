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


def test_compare_matches_cells_and_flags_slower_times_and_changed_memory(tmp_path):
    from benchmarks import compare

    table = (
        "## 1. Overhead\n\n| method | ms / step | × hand |\n|---|---|---|\n"
        "| lean | {lean} | 1.0 |\n| torch | 10.0 | 1 |\n\n"
        "## 3. Memory\n\n| gradient | T | graph MiB |\n|---|---|---|\n"
        "| unrolled | 1 | 20.0 |\n| unrolled | 3 | {mem} |\n"
    )
    before, after = tmp_path / "before.md", tmp_path / "after.md"
    before.write_text(table.format(lean="8.0", mem="24.0"))
    after.write_text(table.format(lean="8.8", mem="24.0"))
    cells = compare.cells(before)
    assert cells[("3. Memory", "graph MiB", "unrolled / T=3")] == 24.0
    rows, flagged = compare.compare(cells, compare.cells(after), tolerance=0.05)
    ratios = {(r[1], r[2]): r[5] for r in rows}
    assert ratios[("lean", "ms / step")] == 8.8 / 8.0  # 10 % slower: flagged
    assert flagged == ["1. Overhead / lean / ms / step: 1.100×"]
    after.write_text(table.format(lean="8.2", mem="30.0"))
    _, flagged = compare.compare(cells, compare.cells(after), tolerance=0.05)
    assert flagged == ["3. Memory / unrolled / T=3 / graph MiB: 1.250×"]
