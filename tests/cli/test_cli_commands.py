"""Every subcommand in a subprocess on tiny settings: the files and numbers it produces."""

import json
import re

import numpy as np
import pytest
import torch
import yaml
from scipy.special import logsumexp
from scipy.stats import norm

from pyro_slots.checkpoint import load_checkpoint
from pyro_slots.cli.evaluate import infer
from pyro_slots.cli.runs import load_run
from pyro_slots.cli.streams import HELD_OUT_START
from pyro_slots.data import sample_point_sets


def _records(folder):
    with open(folder / "metrics.jsonl") as f:
        return [json.loads(line) for line in f]


def test_train_writes_checkpoint_metrics_config_and_pictures(gmm_run):
    names = {p.name for p in gmm_run.iterdir()}
    assert {"checkpoint.pt", "metrics.jsonl", "config.yaml"} <= names
    for picture in ("training_curve.png", "inner_elbo.png", "gmm_fits.png"):
        assert (gmm_run / picture).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    records = _records(gmm_run)
    train = [r for r in records if r["split"] == "train"]
    held = [r for r in records if r["split"] == "validation"]
    assert [r["step"] for r in train] == list(range(1, 7))
    assert [r["step"] for r in held] == [3, 6]
    for r in train:
        # J = -ELBO averaged over the batch, computed by Pyro's TraceEnum_ELBO on one side and by
        # the per-datapoint ELBO of the inner loop on the other, at the same final slots.
        assert r["J"] == pytest.approx(-r["elbo"], rel=1e-4), (
            "J (Pyro's TraceEnum_ELBO) and the inner loop's per-datapoint ELBO disagree"
        )
        assert r["elbo_per_measurement"] == pytest.approx(r["elbo"] / 30, rel=1e-6)
        assert r["steps_per_s"] > 0
    payload = load_checkpoint(gmm_run / "checkpoint.pt")
    assert payload["step"] == 6
    config = yaml.safe_load((gmm_run / "config.yaml").read_text())
    assert config == payload["config"]
    # The resolved configuration: the defaults are filled in.
    assert (config["model"], config["inner"], config["dataset"]) == ("gmm", "em", "points")
    assert (config["init"], config["lr"], config["inner_steps"]) == ("learned", 0.05, 5)


def _true_loglik_per_point(num, num_points, seed=0):
    """Mean log-density of held-out points under their true mixtures, with scipy."""
    sets = sample_point_sets(num, num_points, seed=seed, start=HELD_OUT_START)
    x, means, scales, weights = (t.double().numpy() for t in sets[:4])
    total = 0.0
    for s in range(num):
        comp = norm.logpdf(x[s][:, None, :], means[s][None], scales[s][None]).sum(-1)
        total += logsumexp(comp + np.log(weights[s])[None], axis=1).sum()
    return total / (num * num_points)


def test_evaluate_json_numbers(gmm_run, cli):
    proc = cli("evaluate", gmm_run, "--json", "--num", 8, "--threads", 1)
    metrics = json.loads(proc.stdout)
    assert metrics["step"] == 6 and metrics["num_datapoints"] == 8
    # The fit's log-likelihood (the Pyro program's ELBO: assignments enumerated exactly) equals
    # scipy's mixture density at the slots the run infers for the same held-out sets.
    inference = infer(load_run(gmm_run), 8)
    loc, scale, log_w = (
        t.double().numpy()
        for t in load_run(gmm_run).components.model.component_params(inference.result.slots[0])
    )
    x = inference.batch.x.double().numpy()
    expected = np.mean(
        [
            logsumexp(
                norm.logpdf(x[s][:, None], loc[s][None], scale[s][None]).sum(-1) + log_w[s],
                axis=1,
            ).mean()
            for s in range(8)
        ]
    )
    assert metrics["loglik_per_point"] == pytest.approx(expected, abs=1e-4)
    assert metrics["true_loglik_per_point"] == pytest.approx(
        _true_loglik_per_point(8, 30), abs=1e-4
    )
    assert metrics["gap_to_true_per_point"] == pytest.approx(
        metrics["true_loglik_per_point"] - metrics["loglik_per_point"], abs=1e-6
    )
    # 100 EM steps from k-means++ fit these 30-point sets at least as well as the true mixtures.
    assert metrics["reference_em_loglik_per_point"] > metrics["true_loglik_per_point"]
    assert -1 <= metrics["ari"] <= 1 and metrics["mse"] > 0


def test_evaluate_table_and_pictures(gmm_run, cli, tmp_path):
    proc = cli("evaluate", gmm_run / "checkpoint.pt", "--num", 4, "--pictures", tmp_path)
    lines = [line for line in proc.stdout.splitlines() if not line.startswith("wrote")]
    loaded = re.escape(str(gmm_run / "checkpoint.pt"))
    assert re.fullmatch(rf"weights: {loaded} \(update 6\)", lines[-1])
    rows = dict(line.split() for line in lines[:-1] if line.count(" "))
    assert float(rows["loglik_per_point"]) == pytest.approx(float(rows["elbo_per_point"]), abs=1e-3)
    assert {p.name for p in tmp_path.iterdir()} == {
        "training_curve.png",
        "inner_elbo.png",
        "gmm_fits.png",
    }


def test_diagnose_writes_report(gmm_run, cli, tmp_path):
    out = tmp_path / "report"
    proc = cli("diagnose", gmm_run, "--out", out, "--num", 3, "--restarts", 2, "--threads", 1)
    assert str(out) in proc.stdout
    names = {p.name for p in out.iterdir()}
    assert {"report.md", "summary.csv", "inference_data.nc", "elbo_trajectories.png"} <= names
    report = (out / "report.md").read_text()
    assert "datapoints: 3, restarts (chains): 2, inner steps: 5" in report
    # The trained slot initialization is the one diagnosed (not k-means++).
    assert "- slot initialization: `GaussianInit(" in report


def test_diagnose_a_run_with_reinitialization(cli, tmp_path):
    """A gmm run trained with --reinitialize (the rule is Reinitialize(EM), whose slot_init
    cannot be set) is diagnosed from its trained initializer: the report's final ELBOs are
    those of refine from that initializer (rebuilt here from the checkpoint), not those from
    k-means++, the model's own."""
    import arviz as az

    import pyro_slots as ps
    from pyro_slots.cli.runs import load_run

    run, out = tmp_path / "run", tmp_path / "report"
    cli("train", "--steps", 2, "--batch-size", 8, "--num-points", 50, "--eval-every", 0,
        "--reinitialize", "--threads", 1, "--no-progress", "--no-pictures",
        "--out", run)  # fmt: skip
    cli("diagnose", run, "--out", out, "--num", 3, "--restarts", 2, "--threads", 1,
        "--draws", "point")  # fmt: skip
    report = (out / "report.md").read_text()
    assert (
        "inner rule: `Reinitialize(" in report and "slot initialization: `GaussianInit(" in report
    )
    c = load_run(run / "checkpoint.pt", {"tensorboard": False}, "cpu").components
    x = c.stream.held_out(3).x
    elbo = az.from_netcdf(str(out / "inference_data.nc")).sample_stats["elbo"].values
    elbo = torch.as_tensor(elbo).reshape(2, -1, 3)[:, 0]  # (restarts, datapoints)
    trained = ps.refine(c.model, x, c.inner, num_restarts=2, seed=0, init=c.init).elbo
    own = ps.refine(c.model, x, c.inner, num_restarts=2, seed=0).elbo
    torch.testing.assert_close(elbo, trained.to(elbo.dtype))
    assert not torch.allclose(elbo, own.to(elbo.dtype))


def test_diagnose_defaults_to_the_final_tests_inner_steps(cli, tiny, tmp_path):
    """A run tested at ``eval_inner_steps`` = 3 (trained at T = 5) is diagnosed at T = 3: its
    ELBO trajectories hold λ_0..λ_3; ``inner_steps`` given replaces it."""
    import arviz as az

    from pyro_slots.cli import diagnose

    run = tmp_path / "run"
    cli("train", *tiny, "--eval-inner-steps", 3, "--out", run)
    for given, expected in ((None, 3), (2, 2)):
        out = diagnose(run, tmp_path / f"report-{given}", num=3, restarts=2, inner_steps=given)
        history = az.from_netcdf(f"{out}/inference_data.nc").sample_stats["elbo_history"]
        assert history.sizes["inner_step"] == expected + 1
        report = (tmp_path / f"report-{given}" / "report.md").read_text()
        assert f"inner steps: {expected}," in report


def test_demo_gmm_prints_loglik_and_pictures(cli, tmp_path):
    proc = cli(
        "demo", "--model", "gmm", "--steps", 3, "--out", tmp_path, "--no-progress", "--threads", 1
    )
    assert "log-likelihood per point" in proc.stdout
    assert "true mixtures" in proc.stdout
    for name in ("training_curve.png", "inner_elbo.png", "gmm_fits.png"):
        assert str(tmp_path / "pictures" / name) in proc.stdout
        assert (tmp_path / "pictures" / name).stat().st_size > 10_000
    assert load_checkpoint(tmp_path / "checkpoint.pt")["step"] == 3


def test_image_model_train_and_evaluate(cli, tmp_path):
    cli(
        "train", "--model", "slot-autoencoder", "--steps", 2, "--batch-size", 2,
        "--slot-dim", 8, "--eval-every", 2, "--eval-size", 2, "--threads", 1, "--no-progress",
        "--out", tmp_path,
    )  # fmt: skip
    assert (tmp_path / "slots.png").stat().st_size > 10_000
    held = [r for r in _records(tmp_path) if r["split"] == "validation"]
    assert len(held) == 1 and -1 <= held[0]["fg_ari"] <= 1
    metrics = json.loads(cli("evaluate", tmp_path, "--json", "--num", 3).stdout)
    assert -1 <= metrics["fg_ari"] <= 1 and -1 <= metrics["ari"] <= 1
    # The task objective of the slot autoencoder is the reconstruction MSE.
    assert metrics["J"] == pytest.approx(metrics["mse"], rel=1e-5)


def test_python_dash_m_and_console_script_agree(cli):
    assert "train" in cli("--help").stdout


def test_diagnose_a_clip_run_reports_its_first_frames(tmp_path):
    """A moving-shapes run: the clips (B, T, 3, H, W) reached the image encoder (a traceback);
    the report diagnoses the clips' first frames, the inference from the trained initializer:
    its final ELBOs are those of refine on frame 0 (rebuilt here from the checkpoint)."""
    import arviz as az

    import pyro_slots as ps
    from pyro_slots.cli import diagnose
    from pyro_slots.cli.config import TrainConfig
    from pyro_slots.cli.runs import load_run
    from pyro_slots.cli.train import train

    config = TrainConfig(
        model="slot-autoencoder", dataset="moving-shapes", steps=1, batch_size=2, eval_every=0,
        test_size=0, num_frames=2, out=str(tmp_path / "run"),
    )  # fmt: skip
    train(config, progress=False, pictures=False, echo=lambda *a: None)
    from pyro_slots.diagnostics import RhatWarning

    with pytest.warns(RhatWarning, match="1 draw"):
        out = diagnose(tmp_path / "run", tmp_path / "report", num=2, restarts=2, draws="point",
                       inner_steps=2)  # fmt: skip
    c = load_run(tmp_path / "run" / "checkpoint.pt", {"tensorboard": False}, "cpu").components
    frames = c.stream.held_out(2).x[:, 0]
    elbo = az.from_netcdf(f"{out}/inference_data.nc").sample_stats["elbo"].values
    want = ps.refine(c.model, frames, c.inner, num_steps=2, num_restarts=2, seed=0, init=c.init)
    want = want.elbo
    torch.testing.assert_close(torch.as_tensor(elbo).reshape(2, 2), want, rtol=1e-5, atol=1e-4)
