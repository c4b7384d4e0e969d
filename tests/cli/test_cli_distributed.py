"""``torchrun -m pyro_slots train`` on 2 CPU processes matches one process with the global batch."""

import json
import os
import subprocess
import sys

import pytest

OPTIONS = ["--num-points", "30", "--eval-every", "3", "--eval-size", "4", "--no-progress",
           "--no-pictures", "--steps", "3"]  # fmt: skip


def _j(folder):
    with open(folder / "metrics.jsonl") as f:
        return [r["J"] for r in map(json.loads, f) if r["split"] == "train"]


@pytest.mark.slow
def test_torchrun_two_ranks_match_one_process(tmp_path, cli):
    # torchrun's module ships with torch: no skip needed.
    torchrun = [sys.executable, "-m", "torch.distributed.run"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    two = tmp_path / "two"
    subprocess.run(
        [*torchrun, "--nproc-per-node", "2", "-m", "pyro_slots", "train", "--batch-size", "4",
         *OPTIONS, "--out", str(two)],
        check=True, env=env, capture_output=True, timeout=300,
    )  # fmt: skip
    one = tmp_path / "one"
    cli("train", "--batch-size", 8, *OPTIONS, "--out", one)
    # The same global batches and slot draws: J agrees up to float32 reduction order.
    assert _j(two) == pytest.approx(_j(one), rel=1e-4)
    assert sorted(p.name for p in two.iterdir()) == ["checkpoint.pt", "config.yaml",
                                                    "metrics.jsonl"]  # fmt: skip
