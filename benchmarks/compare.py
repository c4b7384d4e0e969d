"""Two runs of the benchmark suite side by side: every number of every table, before and after.

    python -m benchmarks.compare BEFORE.md AFTER.md [--out benchmarks/results/compare.md]

``BEFORE.md`` and ``AFTER.md`` are ``RESULTS.md`` files written by ``python -m benchmarks.run``
(for instance one from a checkout of the older commit). A cell is matched by its section, its
table's column name and its row's first cell; the ratio ``after / before`` is flagged where a
time (a column in ms or s) grew, a throughput (per s) fell, or a memory (MiB) changed by more
than ``--tolerance`` (5 % by default).
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from benchmarks.common import markdown_table

NUMBER = re.compile(r"^-?[\d,]*\.?\d+(e[-+]?\d+)?$", re.I)


def cells(path: str | Path) -> dict:
    """``{(section, column, row): value}`` of every numeric table cell of a results file."""
    out, section, header = {}, "", None
    for line in Path(path).read_text().splitlines():
        if line.startswith("#"):
            section, header = line.lstrip("#").strip(), None
            continue
        if not line.startswith("|"):
            header = None
            continue
        row = [c.strip() for c in line.strip().strip("|").split("|")]
        if header is None:
            header = row
        elif not set(line) <= set("|-: "):
            values = [v.replace("×", "").replace(",", "").strip() for v in row]
            # A row is named by its non-numeric cells (method, allocator, gradient, ...) and
            # its leading cells (the T of a memory row, the M of a scaling row).
            label = " / ".join(
                v for i, v in enumerate(row) if i == 0 or not NUMBER.match(values[i])
            )
            for i, (column, value) in enumerate(zip(header, values)):
                if i > 0 and NUMBER.match(value):
                    keyed = i > 1 and NUMBER.match(values[1])
                    key = (section, column, f"{label} / {header[1]}={row[1]}" if keyed else label)
                    out[key] = float(value)
    return out


def kind(column: str) -> str | None:
    if re.search(r"\bMiB\b|memory|RSS", column):
        return "memory"
    if re.search(r"/s\b|per s\b", column):
        return "throughput"
    if re.search(r"\bms\b|\(s\)|\bs /|seconds|\btime\b", column):
        return "time"
    return None


def compare(before: dict, after: dict, tolerance: float) -> tuple[list[list], list[str]]:
    rows, flagged = [], []
    for key in before.keys() & after.keys():
        section, column, label = key
        what = kind(column)
        if what is None or before[key] == 0:
            continue
        ratio = after[key] / before[key]
        worse = {
            "time": ratio > 1 + tolerance,
            "throughput": ratio < 1 - tolerance,
            "memory": abs(ratio - 1) > tolerance,
        }[what]
        rows.append([section, label, column, before[key], after[key], ratio, "!" if worse else ""])
        if worse:
            flagged.append(f"{section} / {label} / {column}: {ratio:.3f}×")
    rows.sort(key=lambda r: (r[0], r[1], r[2]))
    return rows, flagged


def main(argv=None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("before")
    parser.add_argument("after")
    parser.add_argument("--tolerance", type=float, default=0.05)
    parser.add_argument("--out", default=None, help="also write the table to this file")
    args = parser.parse_args(argv)
    rows, flagged = compare(cells(args.before), cells(args.after), args.tolerance)
    header = ["section", "row", "column", "before", "after", "after / before", ""]
    text = markdown_table(header, rows)
    text += "\n\n" + (
        f"Beyond {args.tolerance:.0%}: " + "; ".join(flagged)
        if flagged
        else f"Nothing beyond {args.tolerance:.0%} (times slower, memory changed)."
    )
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return text


if __name__ == "__main__":
    main()
