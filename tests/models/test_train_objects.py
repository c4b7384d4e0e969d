"""examples/train_objects.py runs end to end with tiny arguments (as Pyro's test_examples)."""

import json
import sys
from pathlib import Path

import pytest
import torch

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


@pytest.fixture
def train_objects():
    sys.path.insert(0, str(EXAMPLES))
    try:
        import train_objects

        yield train_objects
    finally:
        sys.path.remove(str(EXAMPLES))


def parse_error(train_objects, capsys, argv) -> str:
    """What train_objects' parser prints when it refuses ``argv``."""
    with pytest.raises(SystemExit):
        train_objects.parse_args(argv)
    return capsys.readouterr().err


@pytest.mark.parametrize(
    "model, extra", [("slot_autoencoder", []), ("iodine", []), ("iodine", ["--refinement-inputs"])]
)
def test_train_objects_tiny(train_objects, tmp_path, model, extra):
    out = tmp_path / "results.json"
    argv = f"--model {model} --num-steps 2 --batch-size 4 --num-eval 6 --eval-batch-size 4"
    argv += " --num-val 4 --val-every 2 --threads 1"
    args = train_objects.parse_args([*extra, *argv.split(), "--output", str(out)])
    train_objects.main(args)
    results = json.loads(out.read_text())
    assert results["num_updates"] == 2
    assert len(results["validation"]) == 1
    test = results["test"]
    assert {k: test[k]["n"] for k in test} == {k: 6 for k in train_objects.SCORES}
    assert -1.0 <= test["fg_ari"]["mean"] <= 1.0 and 0.0 <= test["mean_iou"]["mean"] <= 1.0
    assert 0.0 < test["mse"]["mean"] < 1.0
    # and the summary script reads what the run wrote
    import summarize_objects

    text = summarize_objects.main([str(out)])
    assert f"{test['fg_ari']['mean']:.3f} ± {test['fg_ari']['std']:.3f}" in text


def test_train_objects_set_prediction(train_objects, tmp_path):
    """Reconstruction + set prediction on shapes: J falls on held-out scenes, AP is reported."""
    out = tmp_path / "results.json"
    argv = "--dataset shapes --num-slots 6 --objective both --num-steps 20 --batch-size 8"
    argv += " --lr 2e-3 --warmup-steps 1 --num-eval 8 --eval-batch-size 8 --num-val 16"
    argv += " --val-every 20 --threads 1"
    args = train_objects.parse_args([*argv.split(), "--output", str(out)])
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


def test_iodine_with_the_mse_objective(train_objects, tmp_path):
    """--objective mse: IODINE's inner ELBO refines λ, J is the decoded image's MSE (a number in
    (0, 1), where IODINE's own J, the negative ELBO, is in the thousands), and it falls."""
    from pyro_slots.objectives import Reconstruction

    out = tmp_path / "results.json"
    argv = "--model iodine --objective mse --num-steps 20 --batch-size 8 --lr 2e-3"
    argv += " --warmup-steps 1 --num-eval 4 --eval-batch-size 4 --num-val 16 --threads 1"
    args = train_objects.parse_args([*argv.split(), "--output", str(out)])
    model = train_objects.build_model(args, 35)
    objective, head = train_objects.build_objective(args, model)
    assert isinstance(objective, Reconstruction) and head is None
    train_objects.main(args)
    results = json.loads(out.read_text())
    val_j = results["validation_J"]
    assert 0.05 < val_j["initial"] < 0.3  # observed: 0.127 (an MSE, not a negative ELBO)
    assert val_j["final"] < 0.9 * val_j["initial"]  # observed: 0.109 / 0.127 = 0.861


def test_iodine_with_the_elbo_plus_mse_objective(train_objects, tmp_path, capsys):
    """--objective elbo+mse: J = -ELBO + w MSE with w = C H W / (2 σ_x²) by default, logged
    part by part; refused for the autoencoder and --mse-weight refused without it."""
    out = tmp_path / "results.json"
    argv = "--model iodine --objective elbo+mse --num-steps 2 --batch-size 4 --log-every 1"
    argv += " --num-eval 4 --eval-batch-size 4 --num-val 4 --threads 1"
    args = train_objects.parse_args([*argv.split(), "--output", str(out)])
    model = train_objects.build_model(args, 35)
    assert train_objects.mse_weight(args, model) == pytest.approx(3 * 35 * 35 / (2 * 0.1**2))
    train_objects.main(args)
    last = json.loads(out.read_text())["curve"][-1]
    # the running means are those of J and its parts, so the identity holds for them too
    assert last["J"] == pytest.approx(last["J_own"] + 183_750.0 * last["J_mse"], rel=1e-6)
    assert 0.0 < last["J_mse"] < 1.0 and last["J_own"] > 1_000.0  # an MSE; a negative ELBO
    with pytest.raises(ValueError, match="elbo\\+mse is only for --model iodine"):
        train_objects.build_objective(
            train_objects.parse_args(["--objective", "elbo+mse"]), model=None
        )
    assert "--mse-weight: only with --objective elbo+mse" in parse_error(
        train_objects, capsys, ["--mse-weight", "10"]
    )


@pytest.mark.parametrize("model", ["slot_autoencoder", "iodine"])
def test_objective_names_mean_what_the_command_line_means(train_objects, model):
    """reconstruction and elbo build the command line's objectives (pyro_slots.cli.registry);
    own is the model's own J; mse is reconstruction's older name; elbo needs IODINE."""
    from pyro_slots.cli.registry import OBJECTIVES as CLI_OBJECTIVES
    from pyro_slots.objectives import NegativeELBO, Reconstruction

    def built(name):
        args = train_objects.parse_args(["--model", model, "--objective", name])
        return train_objects.build_objective(args, train_objects.build_model(args, 35))

    assert type(built("reconstruction")[0]) is type(CLI_OBJECTIVES["reconstruction"](None))
    assert type(built("mse")[0]) is Reconstruction
    own = NegativeELBO if model == "iodine" else Reconstruction
    assert type(built("own")[0]) is own
    assert train_objects.parse_args([]).objective == "own"
    if model == "iodine":
        assert type(built("elbo")[0]) is type(CLI_OBJECTIVES["elbo"](None))
    else:
        with pytest.raises(ValueError, match="objective: elbo is only for --model iodine"):
            built("elbo")


def test_set_prediction_needs_a_slot_per_object(train_objects):
    args = train_objects.parse_args(["--dataset", "shapes", "--objective", "set-prediction"])
    with pytest.raises(ValueError, match="num_slots"):
        train_objects.main(args)


def test_summary_across_seeds_is_the_spread_of_the_run_means(train_objects, tmp_path):
    """Mean ± sample std (n - 1) over runs of the per-run test means, against numpy."""
    import numpy as np
    import summarize_objects

    rng = np.random.default_rng(0)
    paths, means = [], {m: [] for m in summarize_objects.METRICS}
    for seed in range(3):
        test = {}
        for m in summarize_objects.METRICS:
            value = float(rng.uniform(0, 1))
            means[m].append(value)
            test[m] = {"mean": value, "std": 0.1, "n": 10}
        run = {"args": {"seed": seed}, "num_updates": 5, "train_seconds": 60.0, "test": test}
        run["validation"] = [{"step": 2, "seconds": 30.0, "fg_ari": test["fg_ari"]}]
        paths.append(tmp_path / f"run{seed}.json")
        paths[-1].write_text(json.dumps(run))
    runs = summarize_objects.load([str(p) for p in paths])
    for m in summarize_objects.METRICS:
        mean, std = summarize_objects.across_runs(runs, m)
        assert mean == pytest.approx(np.mean(means[m]))
        assert std == pytest.approx(np.std(means[m], ddof=1))
    text = summarize_objects.main([str(p) for p in paths])
    mean, std = np.mean(means["fg_ari"]), np.std(means["fg_ari"], ddof=1)
    assert f"**{mean:.3f} ± {std:.3f}**" in text
    broken = tmp_path / "broken.json"
    broken.write_text(json.dumps({"test": {"fg_ari": {}}}))
    with pytest.raises(ValueError, match="no test metrics"):
        summarize_objects.load([str(broken)])


@pytest.mark.parametrize("flag", ["--num-val", "--num-eval", "--batch-size", "--eval-batch-size"])
def test_empty_sizes_are_refused_before_any_work(train_objects, capsys, flag):
    with pytest.raises(SystemExit):
        train_objects.parse_args([flag, "0"])
    assert f"{flag}: expected an integer >= 1" in capsys.readouterr().err


def test_eval_only_reproduces_the_test_scores_of_a_run(train_objects, tmp_path):
    """Train 2 updates with a checkpoint, then --eval-only on it: the same seven test scores
    (segmentation, reconstruction and segmentation errors) from the saved weights."""
    ckpt, out, again = tmp_path / "w.pt", tmp_path / "a.json", tmp_path / "b.json"
    common = ["--num-eval", "6", "--eval-batch-size", "3", "--num-val", "4", "--threads", "1"]
    common += ["--checkpoint", str(ckpt)]
    train_objects.main(
        train_objects.parse_args(
            [*common, "--num-steps", "2", "--batch-size", "4", "--output", str(out)]
        )
    )
    train_objects.main(train_objects.parse_args([*common, "--eval-only", "--output", str(again)]))
    first, second = json.loads(out.read_text()), json.loads(again.read_text())
    assert second["eval_only"] and "curve" not in second
    import summarize_objects  # an --eval-only file has no training to report: dashes

    fg = second["test"]["fg_ari"]
    row = f"| 0 | – | – | {fg['mean']:.3f} ± {fg['std']:.3f} |"
    assert row in summarize_objects.main([str(again)])
    for name in ("fg_ari", "ari", "mean_iou", "mse", "split", "merged", "background_share"):
        assert second["test"][name]["mean"] == pytest.approx(first["test"][name]["mean"], abs=1e-6)
    assert (
        0 <= second["test"]["split"]["mean"] <= 3
        and 0 < second["test"]["background_share"]["mean"] <= 1
    )
    with pytest.raises(SystemExit):
        train_objects.parse_args(["--eval-only"])


def test_refused_updates_are_skipped_up_to_a_limit(train_objects, tmp_path, monkeypatch):
    """NestedSVI raises FloatingPointError (weights unchanged) on a non-finite update: the run
    skips that batch and goes on, and stops once more than --max-skipped were refused."""
    original = train_objects.NestedSVI.step
    calls = []

    def flaky(self, *args, **kwargs):
        calls.append(1)
        if len(calls) in (2, 3):
            raise FloatingPointError("NestedSVI: non-finite gradient (injected)")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(train_objects.NestedSVI, "step", flaky)
    out = tmp_path / "r.json"
    argv = ["--num-steps", "4", "--batch-size", "2", "--num-eval", "2", "--num-val", "2"]
    argv += ["--threads", "1", "--output", str(out)]
    results = train_objects.main(train_objects.parse_args(argv))
    assert results["skipped_updates"] == [2, 3] and results["num_updates"] == 4
    calls.clear()
    with pytest.raises(FloatingPointError, match="injected"):
        train_objects.main(train_objects.parse_args([*argv, "--max-skipped", "1"]))


def test_cosine_schedule_anneals_over_the_budget_that_ends_first(train_objects):
    """Warm-up, then ½(1 + cos πp) from 1 to the final factor; p is the larger of the step and
    wall-time fractions of the budget."""
    import math
    import time

    f = train_objects.cosine_learning_rate
    assert f(0, 0.0, warmup=4, final=0.1) == pytest.approx(0.25)  # warm-up: (0 + 1) / 4
    assert f(10, 0.0, warmup=4, final=0.1) == pytest.approx(1.0)
    assert f(10, 0.5, warmup=4, final=0.1) == pytest.approx(0.55)  # halfway: (1 + 0.1) / 2
    assert f(10, 1.0, warmup=4, final=0.1) == pytest.approx(0.1)
    assert f(10, 3.0, warmup=4, final=0.1) == pytest.approx(0.1)  # past the end: stays final
    p = 0.3
    assert f(10, p, 4, 0.0) == pytest.approx(0.5 * (1 + math.cos(math.pi * p)))

    args = train_objects.parse_args(
        ["--lr-schedule", "cosine", "--num-steps", "1000", "--max-minutes", "2"]
    )
    args.warmup_steps, args.final_lr_factor = 1, 0.0
    schedule = train_objects.Schedule(args)
    schedule.start()
    assert schedule(250) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.25)), abs=1e-3)
    schedule.started = time.time() - 60.0  # half the wall time gone, a quarter of the steps
    assert schedule(250) == pytest.approx(0.5, abs=1e-3)
    exponential = train_objects.Schedule(
        train_objects.parse_args(["--decay-half-life", "10", "--warmup-steps", "5"])
    )
    assert exponential(20) == pytest.approx(0.25)  # warm-up over, two half-lives
    assert exponential(1) == pytest.approx(2 / 5 * 0.5**0.1)


def test_select_best_tests_the_weights_of_the_best_validation_score(train_objects, tmp_path):
    """--select-best keeps the update with the highest validation FG-ARI of the curve, saves its
    weights beside the checkpoint, and its test scores equal an --eval-only run on that file."""
    ckpt, out, again = tmp_path / "w.pt", tmp_path / "a.json", tmp_path / "b.json"
    common = ["--num-eval", "6", "--eval-batch-size", "3", "--num-val", "4", "--threads", "1"]
    argv = [*common, "--num-steps", "4", "--batch-size", "4", "--val-every", "1", "--lr", "3e-3"]
    argv += ["--warmup-steps", "1", "--lr-schedule", "cosine", "--select-best", "--log-every", "1"]
    train_objects.main(
        train_objects.parse_args([*argv, "--checkpoint", str(ckpt), "--output", str(out)])
    )
    results = json.loads(out.read_text())
    scores = [v["fg_ari"]["mean"] for v in results["validation"]]
    best = results["selected"]
    assert best["step"] == results["validation"][scores.index(max(scores))]["step"]
    assert best["val_fg_ari"] == pytest.approx(max(scores))
    lrs = [entry["lr"] for entry in results["curve"]]
    assert lrs[-1] < lrs[1]  # annealed over the 4 updates
    best_file = tmp_path / "w.best.pt"
    train_objects.main(
        train_objects.parse_args(
            [*common, "--eval-only", "--checkpoint", str(best_file), "--output", str(again)]
        )
    )
    rerun = json.loads(again.read_text())["test"]
    for name in ("fg_ari", "ari", "mean_iou", "mse"):
        assert rerun[name]["mean"] == pytest.approx(best["test"][name]["mean"], abs=1e-6)
    # The summary reads the selected weights' scores on request, and refuses runs without them.
    import summarize_objects

    text = summarize_objects.main([str(out), "--weights", "selected"])
    fg = best["test"]["fg_ari"]
    assert f"| {best['step']:,} | {fg['mean']:.3f} ± {fg['std']:.3f} |" in text
    with pytest.raises(ValueError, match="select-best"):
        summarize_objects.load([str(again)], weights="selected")
    with pytest.raises(SystemExit):
        train_objects.parse_args(["--select-best"])  # no validation curve to select on
    with pytest.raises(SystemExit):
        train_objects.parse_args(["--final-lr-factor", "1.5"])


def test_test_time_restarts_keep_the_best_restart_of_every_image(train_objects):
    """infer_slots with R restarts: per image, the restart of the lowest reconstruction MSE
    (checked by decoding every restart on its own) or of the highest inner ELBO."""
    import torch

    from pyro_slots import refine
    from pyro_slots.metrics import reconstruction_mse

    args = train_objects.parse_args(["--num-slots", "3"])
    torch.manual_seed(0)
    model = train_objects.build_model(args, 35)
    rule = train_objects.build_rule(args, model)
    x = train_objects.make_batch("tetrominoes", 5, 0, 0)["image"]
    result = refine(model, x, rule, num_slots=3, num_restarts=4, seed=7)
    per_restart = torch.stack([reconstruction_mse(x, model.decode(s)[0]) for s in result.slots])
    best = per_restart.argmin(0)
    assert len(set(best.tolist())) > 1  # the choice differs between images
    expected = torch.stack([result.slots[r, b] for b, r in enumerate(best.tolist())])
    chosen = train_objects.infer_slots(
        model, rule, x, 3, torch.Generator().manual_seed(7), num_restarts=4, criterion="mse"
    )
    assert torch.allclose(chosen, expected)
    by_elbo = train_objects.infer_slots(
        model, rule, x, 3, torch.Generator().manual_seed(7), num_restarts=4
    )
    top = result.elbo.argmax(0)
    assert torch.allclose(by_elbo, torch.stack([result.slots[r, b] for b, r in enumerate(top)]))
    longer = train_objects.infer_slots(
        model, rule, x, 3, torch.Generator().manual_seed(7), num_steps=5
    )
    assert torch.allclose(longer, refine(model, x, rule, num_slots=3, num_steps=5, seed=7).slots)
    with pytest.raises(SystemExit):
        train_objects.parse_args(["--eval-restarts", "0"])


def test_eval_on_validation_scores_the_validation_scenes(train_objects, tmp_path):
    """--eval-only --eval-on validation reproduces the last point of the validation curve, which
    is scored with the test-time --eval-iterations (here 5, not the 3 of training)."""
    ckpt, out, again = tmp_path / "w.pt", tmp_path / "a.json", tmp_path / "b.json"
    common = ["--num-val", "6", "--batch-size", "3", "--eval-batch-size", "3", "--threads", "1"]
    common += ["--checkpoint", str(ckpt), "--eval-iterations", "5"]
    train_objects.main(
        train_objects.parse_args(
            [
                *common,
                "--num-steps",
                "2",
                "--val-every",
                "2",
                "--num-eval",
                "2",
                "--output",
                str(out),
            ]
        )
    )
    args = [*common, "--eval-only", "--eval-on", "validation", "--output", str(again)]
    train_objects.main(train_objects.parse_args(args))
    last = json.loads(out.read_text())["validation"][-1]
    rerun = json.loads(again.read_text())
    assert rerun["eval_on"] == "validation" and rerun["test"]["fg_ari"]["n"] == 6
    for name in ("fg_ari", "ari", "mean_iou", "mse"):
        assert rerun["test"][name]["mean"] == pytest.approx(last[name]["mean"], abs=1e-6)
    three = train_objects.main(train_objects.parse_args([*args, "--eval-iterations", "3"]))
    assert three["test"]["mse"]["mean"] != pytest.approx(last["mse"]["mean"], abs=1e-6)


def test_init_from_starts_training_from_a_finished_runs_weights(train_objects, tmp_path):
    """--init-from loads a run's weights (zero further updates score exactly as --eval-only on
    that checkpoint), --first-scene shifts the training stream, and a checkpoint of another
    architecture is refused naming the flag."""
    ckpt = tmp_path / "w.pt"
    common = ["--num-eval", "6", "--eval-batch-size", "3", "--num-val", "4", "--threads", "1"]
    train_objects.main(
        train_objects.parse_args(
            [*common, "--num-steps", "10", "--batch-size", "4", "--lr", "3e-3"]
            + ["--warmup-steps", "1", "--checkpoint", str(ckpt)]
        )
    )
    evaluated = train_objects.main(
        train_objects.parse_args([*common, "--eval-only", "--checkpoint", str(ckpt)])
    )
    warm = train_objects.main(
        train_objects.parse_args([*common, "--num-steps", "0", "--init-from", str(ckpt)])
    )
    cold = train_objects.main(train_objects.parse_args([*common, "--num-steps", "0"]))
    for name in ("fg_ari", "mse", "split"):
        assert warm["test"][name]["mean"] == pytest.approx(
            evaluated["test"][name]["mean"], abs=1e-6
        )
    # ... and the loaded weights are not those of a fresh model (the scores are deterministic:
    # float noise is ~1e-7, ten updates moved the MSE by ~6e-4).
    assert abs(warm["test"]["mse"]["mean"] - cold["test"]["mse"]["mean"]) > 1e-4

    starts = []
    original = train_objects.make_batch

    def recording(name, num_images, seed, start):
        if num_images == 4:  # a training batch (the test and validation sets have 6 and 5)
            starts.append(start)
        return original(name, num_images, seed, start)

    train_objects.make_batch = recording
    try:
        argv = [*common, "--num-val", "5", "--num-steps", "3", "--batch-size", "4"]
        train_objects.main(
            train_objects.parse_args([*argv, "--init-from", str(ckpt), "--first-scene", "12"])
        )
    finally:
        train_objects.make_batch = original
    assert starts == [12, 16, 20]

    with pytest.raises(ValueError, match="init_from: .* does not hold weights"):
        train_objects.main(
            train_objects.parse_args(
                [*common, "--model", "iodine", "--num-steps", "1", "--init-from", str(ckpt)]
            )
        )


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--first-scene", "-1"], "--first-scene: expected an integer >= 0"),
        (["--init-from", "/nonexistent/w.pt"], "--init-from: no such file"),
    ],
)
def test_init_from_arguments_are_checked(train_objects, capsys, argv, message):
    with pytest.raises(SystemExit):
        train_objects.parse_args(argv)
    assert message in capsys.readouterr().err


def test_latent_dim_sizes_iodines_slots_only(train_objects, capsys):
    """--latent-dim 8 gives IODINE slots of 2 × 8 numbers (μ and log σ); the flag is refused
    for the autoencoder and below 1."""
    args = train_objects.parse_args(["--model", "iodine", "--latent-dim", "8"])
    model = train_objects.build_model(args, 35)
    assert (model.latent_dim, model.slot_dim) == (8, 16)
    default = train_objects.build_model(train_objects.parse_args(["--model", "iodine"]), 35)
    assert default.slot_dim == 32
    with pytest.raises(ValueError, match="latent_dim: only for --model iodine"):
        train_objects.build_model(train_objects.parse_args(["--latent-dim", "8"]), 35)
    iodine_strides = ["--model", "iodine", "--encoder-strides", "2,1,2,1"]
    with pytest.raises(ValueError, match="encoder_strides: only for --model slot_autoencoder"):
        train_objects.build_model(train_objects.parse_args(iodine_strides), 35)
    assert "--latent-dim: expected an integer >= 1" in parse_error(
        train_objects, capsys, ["--model", "iodine", "--latent-dim", "0"]
    )


def test_pixel_scale_sets_iodines_likelihood(train_objects, capsys):
    """--pixel-scale 0.3: the default elbo+mse weight C H W / (2 σ_x²) follows it; refused for
    the autoencoder and at 0."""
    args = train_objects.parse_args(["--model", "iodine", "--pixel-scale", "0.3"])
    model = train_objects.build_model(args, 35)
    assert model.pixel_scale == 0.3
    assert train_objects.mse_weight(args, model) == pytest.approx(3 * 35 * 35 / (2 * 0.09))
    with pytest.raises(ValueError, match="pixel_scale: only for --model iodine"):
        train_objects.build_model(train_objects.parse_args(["--pixel-scale", "0.3"]), 35)
    assert "--pixel-scale: expected a number > 0" in parse_error(
        train_objects, capsys, ["--model", "iodine", "--pixel-scale", "0"]
    )


def test_decoder_flags_build_a_full_resolution_broadcast_decoder(train_objects, capsys):
    """--decoder-upsample 0 broadcasts at the decoding resolution (18 x 18 here) and the
    hidden layers are stride-1 convolutions of --decoder-channels with --kernel-size; the
    weight count against a hand count, and the decoded images of the right size."""
    flags = "--model iodine --decoder-resolution 18 --decoder-upsample 0"
    flags += " --decoder-channels 32,32,32 --kernel-size 3"
    model = train_objects.build_model(train_objects.parse_args(flags.split()), 35)
    decoder = model.decoder
    assert decoder.broadcast_resolution == (18, 18) and decoder.num_upsample == 0
    z, c = model.latent_dim, 32
    # position embedding: Linear(4 -> z); convolutions z -> 32 -> 32 -> 32 (3 x 3), then
    # 32 -> RGB + mask logit (3 x 3)
    count = (4 * z + z) + (z * c * 9 + c) + 2 * (c * c * 9 + c) + (c * 4 * 9 + 4)
    assert sum(p.numel() for p in decoder.parameters()) == count
    convs = [m for m in decoder.net if isinstance(m, torch.nn.Conv2d)]
    assert [m.kernel_size for m in convs] == [(3, 3)] * 4
    rgb, logits = model.decode_latents(torch.zeros(2, 4, z))
    assert rgb.shape == (2, 4, 3, 35, 35) and logits.shape == (2, 4, 35, 35)
    for argv, message in [
        (["--decoder-upsample", "-1"], "--decoder-upsample: expected an integer >= 0"),
        (["--kernel-size", "4"], "--kernel-size: expected an odd integer >= 1"),
        (["--decoder-channels", "32,0"], "expected positive integers like 32,32,32"),
    ]:
        assert message in parse_error(train_objects, capsys, argv)


def test_iodine_elbo_probe_parts_agree_with_pyros_elbo(train_objects, tmp_path):
    """The probe's hand-written parts, at a near-deterministic guide (σ = e^-14), add up to the
    ELBO that Pyro's TraceEnum_ELBO computes (soft-mask log-likelihood - KL; 256 particles, so
    the Monte Carlo log q - log p is within ~0.4 nats of the analytic KL); hard masks can only
    score higher; and the script runs end to end on a checkpoint, climbing the ELBO."""
    import iodine_elbo_probe as probe
    import torch

    ckpt = tmp_path / "w.pt"
    argv = ["--model", "iodine", "--num-steps", "2", "--batch-size", "2", "--num-eval", "2"]
    argv += ["--num-val", "2", "--threads", "1", "--checkpoint", str(ckpt)]
    train_objects.main(train_objects.parse_args(argv))
    args = train_objects.parse_args(["--model", "iodine"])
    model = train_objects.build_model(args, 35)
    x = train_objects.make_batch("tetrominoes", 3, 5, 0)["image"]
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
    results = probe.main([str(ckpt), *flags, "--particles", "2", "--output", str(out)])
    rows = results[str(ckpt)]
    assert json.loads(out.read_text())[str(ckpt)] == rows
    assert rows["+ 5 Adam steps"]["elbo"] > rows["rule T=2"]["elbo"]
    assert 0 <= rows["rule T=2"]["split"] <= 3
