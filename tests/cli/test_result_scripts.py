"""pyro-slots summarize and examples/iodine_elbo_probe.py on runs of the trainer."""

import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from pyro_slots.cli.config import TrainConfig
from pyro_slots.cli.runs import load_run
from pyro_slots.cli.train import train

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


@pytest.fixture
def examples_on_path():
    sys.path.insert(0, str(EXAMPLES))
    try:
        yield
    finally:
        sys.path.remove(str(EXAMPLES))


def _tiny(out, **options):
    config = dict(model="slot-autoencoder", steps=2, batch_size=2, slot_dim=8, eval_every=1,
                  eval_size=2, checkpoint_every=1, test_size=3, out=str(out))  # fmt: skip
    return train(TrainConfig(**{**config, **options}), progress=False, pictures=False,
                 echo=lambda *a: None)  # fmt: skip


def test_summary_across_seeds_is_the_spread_of_the_run_means(tmp_path, monkeypatch, capsys):
    """Mean ± sample std (n - 1) over runs of the per-run test means, against numpy; the table
    has one row per run and the validation curve one row per evaluation."""
    from pyro_slots.cli import main
    from pyro_slots.cli import summarize as summary

    folders = [str(tmp_path / f"s{seed}") for seed in range(3)]
    for seed, folder in enumerate(folders):
        _tiny(folder, seed=seed)
    runs = summary.load_runs(folders)
    values = [json.loads(Path(f, "test.json").read_text())["metrics"]["fg_ari"] for f in folders]
    mean, std = summary.across_runs(runs, "fg_ari")
    assert mean == pytest.approx(np.mean(values)) and std == pytest.approx(np.std(values, ddof=1))
    assert main(["summarize", *folders]) == 0
    text = capsys.readouterr().out
    assert f"**{np.mean(values):.3f} ± {np.std(values, ddof=1):.3f}**" in text
    assert text.count("| `") == 3 and "| 2 |" in text
    # The validation curve carries each point's training seconds; the end-to-end benchmark
    # reads the same records back (the first point at or above a threshold, per seed).
    record = [r for r in runs[0]["validation"] if r["step"] == 1][0]
    assert f"| 1 | {record['fg_ari']:.3f} ({record['train_seconds']:.0f} s) |" in text
    from benchmarks import bench_end_to_end

    monkeypatch.setattr(bench_end_to_end, "HEADLINE", [Path(folders[0])])
    monkeypatch.setattr(bench_end_to_end, "ROOT", tmp_path.parent)
    expected = f"s0: {record['train_seconds']:.0f} s (FG-ARI {record['fg_ari']:.3f})"
    assert bench_end_to_end.wall_time_to_fg_ari(record["fg_ari"]).startswith(expected)
    # --reach: per run, the first validation record at or above the score, found by brute force
    threshold = min(r["fg_ari"] for r in runs[1]["validation"])
    assert main(["summarize", *folders, "--reach", str(threshold)]) == 0
    text = capsys.readouterr().out
    for run in runs:
        hits = [r for r in run["validation"] if r["fg_ari"] >= threshold]
        cell = "not reached"
        if hits:
            first = min(hits, key=lambda r: r["step"])
            cell = f"{first['step']:,} ({first['fg_ari']:.3f}) | {first['train_seconds'] / 60:.1f}"
        assert f"| `{run['path']}` | {run['seed']} | {cell} |" in text
    assert main(["summarize", str(tmp_path)]) == 2
    assert "no test.json (train with --test-size N)" in capsys.readouterr().err
    # a record kept without checkpoints: test.json and config.yaml only
    kept = tmp_path / "kept"
    kept.mkdir()
    for name in ("test.json", "config.yaml"):
        (kept / name).write_text(Path(folders[0], name).read_text())
    row = summary.test_table(summary.load_runs([str(kept)]))
    seconds = json.loads((kept / "test.json").read_text())["train_seconds"]
    tested = json.loads((kept / "test.json").read_text())["metrics"]["inner_steps"]
    cells = f"| 0 | 2 | {seconds / 60:.1f} | final (2) | T = {tested} | {values[0]:.3f} |"
    assert f"| `{kept}` {cells}" in row and "tested differently" not in row
    # runs tested differently: a line says their mean mixes procedures
    again = json.loads((kept / "test.json").read_text())
    again["metrics"].update(inner_steps=20, restarts=4, reinitialize="attention")
    (kept / "test.json").write_text(json.dumps(again))
    # two runs of seed 0: the validation columns are named by folder
    curves = summary.validation_table(summary.load_runs([folders[0], folders[0]]))
    assert curves.splitlines()[0] == "| update | `s0` | `s0` |"
    table = summary.test_table(summary.load_runs([folders[0], str(kept)]))
    assert "| final (2) | T = 20, 4 restarts (elbo), re-initialized (attention masks) |" in table
    assert f"tested differently (T = {tested}; T = 20, 4 restarts (elbo), re-initialized" in table
    assert "different machines" not in table  # both finished here
    # test.json names the machine; runs finished on different ones get a line under the table
    machine = json.loads(Path(folders[0], "test.json").read_text())["machine"]
    assert machine["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert machine["torch_threads"] == torch.get_num_threads()
    assert machine["cores"] == os.cpu_count() and machine["torch"] == torch.__version__
    again["machine"] = {**machine, "cpu_capability": "AVX512", "torch_threads": 2}
    (kept / "test.json").write_text(json.dumps(again))
    table = summary.test_table(summary.load_runs([folders[0], str(kept)]))
    here = f"{machine['cpu']} ({machine['cpu_capability']}), {machine['torch_threads']} torch"
    assert f"different machines ({here} thread" in table
    assert f"; {machine['cpu']} (AVX512), 2 torch threads)" in table


def test_summarize_a_gmm_run_shows_its_log_likelihood(tmp_path, capsys):
    """A gmm run (selected by the log-likelihood per point): the test table has its
    loglik_per_point column (test.json's number) and the validation curve, by default, that
    score, every record's value printed."""
    from pyro_slots.cli import main
    from pyro_slots.cli import summarize as summary

    out = tmp_path / "gmm"
    config = dict(model="gmm", steps=4, batch_size=8, num_points=50, eval_every=2, eval_size=8,
                  test_size=16, checkpoint_every=2, out=str(out))  # fmt: skip
    train(TrainConfig(**config), progress=False, pictures=False, echo=lambda *a: None)
    tested = json.loads((out / "test.json").read_text())["metrics"]["loglik_per_point"]
    runs = summary.load_runs([str(out)])
    assert summary.default_metric(runs) == "loglik_per_point"
    assert main(["summarize", str(out)]) == 0
    text = capsys.readouterr().out
    assert "log-lik / point" in text and f"| {tested:.4f} |" in text
    assert "Validation loglik_per_point:" in text
    for record in runs[0]["validation"]:
        assert f"| {record['step']} | {record['loglik_per_point']:.3f} (" in text


def test_iodine_elbo_probe_parts_agree_with_pyros_elbo(examples_on_path, tmp_path):
    """The probe's hand-written parts, at a near-deterministic guide (σ = e^-14), add up to the
    ELBO that Pyro's TraceEnum_ELBO computes (soft-mask log-likelihood - KL; 256 particles, so
    the Monte Carlo log q - log p is within ~0.4 nats of the analytic KL); hard masks can only
    score higher; and the script runs end to end on a run folder, climbing the ELBO."""
    import iodine_elbo_probe as probe

    run = _tiny(tmp_path / "iodine", model="iodine", test_size=0)
    model = load_run(run.config.out).components.model
    x = run.components.stream.validation(3).x
    g = torch.Generator().manual_seed(0)
    loc = torch.randn(3, 4, model.latent_dim, generator=g)
    slots = torch.cat([loc, torch.full_like(loc, -14.0)], -1)
    with torch.no_grad():
        parts = probe.elbo_parts(model, x, slots, particles=256)
    expected = parts["loglik_soft_masks"] - parts["kl"]
    assert torch.allclose(parts["elbo"], expected, rtol=0.0, atol=2.0)
    normal = torch.distributions.Normal
    kl = torch.distributions.kl_divergence(
        normal(loc, (-14.0 * torch.ones_like(loc)).exp()), normal(0.0, 1.0)
    ).sum((1, 2))
    assert torch.allclose(parts["kl"], kl, rtol=1e-5)
    assert (parts["loglik_hard_masks"] >= parts["loglik_soft_masks"]).all()

    out = tmp_path / "probe.json"
    flags = ["--num-iterations", "2", "--ascent-steps", "5", "--num-scenes", "3"]
    results = probe.main([run.config.out, *flags, "--particles", "2", "--output", str(out)])
    rows = results[run.config.out]
    assert json.loads(out.read_text())[run.config.out] == rows
    assert rows["+ 5 Adam steps"]["elbo"] > rows["rule T=2"]["elbo"]
    assert 0 <= rows["rule T=2"]["split"] <= 3


def test_summarize_into_a_closed_pipe_exits_without_a_traceback():
    """``pyro-slots summarize RUN | head`` where the reader has gone: exit status 1 and nothing
    on stderr (Python would print a BrokenPipeError traceback, then a second error at exit)."""
    import os
    import subprocess

    record = Path(__file__).resolve().parents[2] / "examples/results/objects/cli/tet-s0"
    read, write = os.pipe()
    os.close(read)  # the reader is gone before the first line is written
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "pyro_slots", "summarize", str(record)],
            stdout=write, stderr=subprocess.PIPE, text=True, timeout=120,
        )  # fmt: skip
    finally:
        os.close(write)
    assert proc.returncode == 1
    assert proc.stderr == ""


def test_the_default_metric_of_summarize_is_the_score_runs_were_selected_by():
    """A clip run's validation records hold the per-frame fg_ari beside video_fg_ari, the
    score --select-best chose its weights by (train.SELECT_BY): summarize showed the curve
    and --reach times of fg_ari."""
    from pyro_slots.cli import summarize as summary
    from pyro_slots.cli.train import SELECT_BY

    def runs(*keys):
        return [{"validation": [{k: 0.5 for k in keys}]}]

    assert summary.default_metric(runs("fg_ari", "video_fg_ari")) == SELECT_BY["videos"]
    assert summary.default_metric(runs("fg_ari", "ari")) == SELECT_BY["images"]
    assert summary.default_metric(runs("loglik_per_point")) == SELECT_BY["points"]
