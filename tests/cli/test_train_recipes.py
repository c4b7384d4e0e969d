"""The trainer's recipe options (the former examples/train_objects.py), at tiny sizes.

Every property the example's tests checked is checked here on ``pyro_slots.cli.train.train``:
the final test and its agreement with ``pyro-slots evaluate``, select-best, test-time restarts,
the cosine schedule, the objectives (set prediction, IODINE's elbo+mse), init_from and
first_scene, the architecture options and the fixed slot initializer of first-order recipes.
"""

import itertools
import json
import math
import sys
import warnings

import numpy as np
import pyro
import pytest
import torch

from pyro_slots.checkpoint import load_checkpoint
from pyro_slots.cli.config import ConfigError, TrainConfig
from pyro_slots.cli.evaluate import EvalData, evaluate_run, infer, metrics_of
from pyro_slots.cli.registry import mse_weight, resolve
from pyro_slots.cli.runs import TrainingClock, init_from, load_run, lr_factor, new_run
from pyro_slots.cli.streams import Batch
from pyro_slots.cli.train import train
from pyro_slots.data import generate_shapes, generate_tetrominoes
from pyro_slots.metrics import reconstruction_mse
from pyro_slots.objectives import NegativeELBO, Reconstruction, SetPrediction

#: A tiny slot-autoencoder run on tetrominoes (seconds).
TINY_IMAGES = dict(
    model="slot-autoencoder",
    dataset="tetrominoes",
    steps=2,
    batch_size=2,
    slot_dim=8,
    eval_every=1,
    eval_size=3,
    checkpoint_every=1,
)


def quiet(*args):
    pass


def _train(tmp_path, name="run", **options):
    config = TrainConfig(**{**TINY_IMAGES, "out": str(tmp_path / name), **options})
    return train(config, progress=False, pictures=False, echo=quiet)


def _records(run):
    with open(f"{run.config.out}/metrics.jsonl") as f:
        return [json.loads(line) for line in f]


def _test_report(run):
    with open(f"{run.config.out}/test.json") as f:
        return json.load(f)


@pytest.mark.parametrize("model", ["slot-autoencoder", "iodine"])
def test_final_test_scores_what_evaluate_scores(tmp_path, model):
    """test.json of a run (final weights, one restart) holds the metrics that
    ``pyro-slots evaluate`` computes on the same held-out data at the same T, for both image
    models; with T = 10 at test the inner loop ran 10 steps."""
    run = _train(tmp_path, model=model, test_size=5, eval_inner_steps=4)
    report = _test_report(run)
    assert (report["weights"], report["step"], report["inner_steps"]) == ("final", 2, 4)
    expected = evaluate_run(load_run(run.config.out), num=5, inner_steps=4)
    for key in ("fg_ari", "ari", "mean_iou", "mse", "elbo", "J"):
        assert report["metrics"][key] == pytest.approx(expected[key], rel=1e-5, abs=1e-6), key
    assert report["metrics"]["num_datapoints"] == 5 and report["metrics"]["inner_steps"] == 4


def test_evaluate_defaults_repeat_the_final_test(tmp_path, capsys):
    """Without options, ``evaluate_run(RUN)`` and ``pyro-slots evaluate RUN`` refine as the
    run's final test did (its T, restarts, criterion and re-initialization), so they print
    test.json's numbers; an option given replaces the test's, ``--no-reinitialize`` too."""
    from pyro_slots.cli import main

    run = _train(
        tmp_path, test_size=4, eval_inner_steps=4, eval_restarts=2, restart_criterion="mse",
        eval_reinitialize=True,
    )  # fmt: skip
    report = _test_report(run)
    assert (report["inner_steps"], report["restarts"], report["reinitialize"]) == (4, 2, True)
    # (the number of datapoints too: --test-size's, where it was 128 whatever the test's)
    default = evaluate_run(run.config.out)
    assert default["num_datapoints"] == 4
    assert (default["inner_steps"], default["restarts"]) == (4, 2)
    assert (default["restart_criterion"], default["reinitialize"]) == ("mse", True)
    for key in ("fg_ari", "ari", "mean_iou", "mse", "elbo", "J"):
        assert default[key] == pytest.approx(report["metrics"][key], rel=1e-5, abs=1e-6), key
    assert main(["evaluate", run.config.out, "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["mse"] == pytest.approx(report["metrics"]["mse"], rel=1e-5, abs=1e-6)
    # Each option given replaces the test's: one restart at the training T, no re-drawing.
    plain = evaluate_run(run.config.out, num=4, inner_steps=run.config.inner_steps, restarts=1,
                         reinitialize=False)  # fmt: skip
    assert (plain["inner_steps"], plain["restarts"]) == (run.config.inner_steps, 1)
    assert "reinitialize" not in plain and "restart_criterion" not in plain
    argv = ["evaluate", run.config.out, "--num", "4", "--json", "--restarts", "1",
            "--inner-steps", str(run.config.inner_steps), "--no-reinitialize"]  # fmt: skip
    assert main(argv) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["mse"] == pytest.approx(plain["mse"], rel=1e-6)
    assert printed["mse"] != pytest.approx(default["mse"], rel=1e-6)


def test_select_best_keeps_and_tests_the_best_validation_weights(tmp_path):
    """best.pt is the checkpoint of the highest validation FG-ARI in metrics.jsonl; the final
    test scores its weights (and keeps the final weights' scores beside them)."""
    run = _train(tmp_path, steps=4, select_best=True, test_size=3, lr=5e-3)
    held = [r for r in _records(run) if r["split"] == "validation"]
    assert [r["step"] for r in held] == [1, 2, 3, 4]
    scores = [r["fg_ari"] for r in held]
    best_step = held[int(np.argmax(scores))]["step"]  # first of equal maxima, as ">" keeps
    assert load_checkpoint(f"{run.config.out}/best.pt")["step"] == best_step
    report = _test_report(run)
    assert (report["weights"], report["step"]) == ("best", best_step)
    assert report["final_weights"]["step"] == 4
    best = load_run(f"{run.config.out}/best.pt")
    # The validation record of that step, recomputed from best.pt on the validation scenes.
    validation = run.components.stream.validation(3)
    again = metrics_of(best, infer(best, validation), reference=False)
    assert again["fg_ari"] == pytest.approx(max(scores), abs=1e-6)
    # evaluate RUN repeats the test: best.pt by default, checkpoint.pt with weights="last".
    for weights, record in ((None, report), ("last", report["final_weights"])):
        metrics = evaluate_run(run.config.out, num=3, inner_steps=report["inner_steps"],
                               weights=weights)  # fmt: skip
        assert metrics["step"] == record["step"]
        for key in ("fg_ari", "ari", "mse", "elbo"):
            assert metrics[key] == pytest.approx(record["metrics"][key], rel=1e-5, abs=1e-6), key


def test_validation_scenes_are_neither_training_nor_test_scenes(tmp_path):
    """The periodic evaluation scores generator scenes from 2**31 + 2**30 on; the test (and
    pyro-slots evaluate) those from 2**31; training those from first_scene."""
    run = new_run(resolve(TrainConfig(**{**TINY_IMAGES, "out": str(tmp_path)})))
    stream = run.components.stream
    val = generate_tetrominoes(2, seed=0, start=2**31 + 2**30)["image"]
    test = generate_tetrominoes(2, seed=0, start=2**31)["image"]
    assert torch.equal(stream.validation(2).x, val)
    assert torch.equal(stream.held_out(2).x, test)
    assert not torch.equal(val, test)


def test_test_time_restarts_keep_the_best_restart_of_every_image(tmp_path):
    """infer with R restarts and criterion mse: per image, the restart whose decoded slots
    reconstruct it best, checked against every restart refined and scored separately; with
    criterion elbo the restart of the highest inner ELBO."""
    run = _train(tmp_path, steps=1)
    batch = run.components.stream.held_out(4)
    from pyro_slots import refine

    c = run.components
    with torch.no_grad():
        all_r = refine(c.model, batch.x, c.inner, num_slots=4, num_restarts=3, seed=0)
        mses = torch.stack(
            [reconstruction_mse(batch.x, c.model.decode(all_r.slots[r])[0]) for r in range(3)]
        )
    for criterion, pick in (("mse", mses.argmin(0)), ("elbo", all_r.elbo.argmax(0))):
        chosen = infer(run, batch, restarts=3, criterion=criterion).result.slots[0]
        expected = all_r.slots[pick, torch.arange(4)]
        assert torch.equal(chosen, expected), criterion
    assert mses.argmin(0).tolist() != [0, 0, 0, 0] or all_r.elbo.argmax(0).tolist() != [0] * 4
    # evaluate_run (pyro-slots evaluate --restart-criterion) keeps the same restarts
    data = EvalData("held-out", 4, lambda i, j: Batch(batch.x[i:j], {
        k: v[i:j] for k, v in batch.truth.items()}))  # fmt: skip
    scores = evaluate_run(run, data, restarts=3, criterion="mse")
    chosen = infer(run, batch, restarts=3, criterion="mse")
    assert scores["restart_criterion"] == "mse"
    assert scores["mse"] == pytest.approx(metrics_of(run, chosen)["mse"], rel=1e-6)
    with pytest.raises(ConfigError, match="criterion: unknown kind 'ari'"):
        evaluate_run(run, data, restarts=3, criterion="ari")


def test_cosine_schedule_anneals_over_the_budget_that_ends_first():
    """Linear warm-up, then r + (1 - r)·½(1 + cos πp) from 1 to r = min_lr_ratio; p is the
    larger of step / steps and the elapsed fraction of max_minutes on the run's clock."""
    config = TrainConfig(steps=100, warmup_steps=10, lr_schedule="cosine", min_lr_ratio=0.1)

    def closed_form(step, p):
        return min(1.0, (step + 1) / 10) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * p)))

    for step in (0, 4, 9, 50, 99, 100):
        assert lr_factor(config, step) == pytest.approx(closed_form(step, step / 100))
    timed = TrainConfig(**{**config.to_dict(), "max_minutes": 2.0})
    clock = TrainingClock(before=90.0)  # 90 s of 120: p = 0.75 at step 10 of 100
    assert lr_factor(timed, 10, clock) == pytest.approx(closed_form(10, 0.75), rel=1e-3)
    assert lr_factor(timed, 90, clock) == pytest.approx(closed_form(90, 0.9))
    assert lr_factor(timed, 99, TrainingClock(before=500.0)) == pytest.approx(0.1)
    constant = TrainConfig(steps=100, warmup_steps=10)
    assert [lr_factor(constant, s) for s in (0, 9, 99)] == [0.1, 1.0, 1.0]


def test_max_minutes_stops_with_the_clock_saved(tmp_path, monkeypatch):
    """A run stops once its clock reaches max_minutes, with a checkpoint of that update that
    records the training seconds; a resumed run's clock continues from them (here a clock that
    advances 7 s per reading)."""
    readings = itertools.count()
    monkeypatch.setattr(TrainingClock, "seconds", lambda self: self.before + 7.0 * next(readings))
    run = _train(tmp_path, steps=50, max_minutes=1.0, lr_schedule="cosine", eval_every=0)
    assert 1 <= run.step < 50
    payload = load_checkpoint(f"{run.config.out}/checkpoint.pt")
    assert payload["step"] == run.step and payload["train_seconds"] >= 60.0
    resumed = load_run(run.config.out)
    assert resumed.clock.before == payload["train_seconds"]


def test_set_prediction_objective_trains_and_reports_ap(tmp_path):
    """reconstruction+set-prediction on shapes: the logged J is the MSE plus 0.01 × the matched
    set-prediction loss of the head (recomputed from the checkpoint), and the test reports AP at
    every threshold, non-increasing as the threshold tightens."""
    run = _train(
        tmp_path, dataset="shapes", image_size=32, objective="reconstruction+set-prediction",
        test_size=4, eval_every=0, steps=1,
    )  # fmt: skip
    loaded = load_run(run.config.out)
    c = loaded.components
    head = c.objective.parts[1]
    assert isinstance(head, SetPrediction) and c.objective.weights == (1.0, 0.01)
    batch = c.stream.held_out(4)
    scenes = generate_shapes(4, seed=0, start=2**31, image_size=32, max_objects=5)
    targets = head.targets_from_batch(scenes)
    inference = infer(loaded, batch)
    slots = inference.result.slots[0]
    with torch.no_grad():
        x_enc = c.model.encode(batch.x)
        expected = Reconstruction()(c.model, batch.x, x_enc, slots) + 0.01 * head(
            c.model, batch.x, x_enc, slots, *targets
        )
    metrics = metrics_of(loaded, inference, reference=False)
    assert metrics["J"] == pytest.approx(expected.mean().item(), rel=1e-5)
    ap = _test_report(run)["metrics"]["ap"]
    values = [ap[k] for k in ("inf", "1.0", "0.5", "0.25", "0.125")]
    assert all(0.0 <= v <= 1.0 for v in values)
    assert values == sorted(values, reverse=True)


def test_set_prediction_needs_a_slot_per_object(tmp_path):
    config = TrainConfig(**{**TINY_IMAGES, "dataset": "shapes", "num_slots": 4,
                            "objective": "set-prediction", "out": str(tmp_path)})  # fmt: skip
    with pytest.raises(ConfigError, match="num_slots: .* at least 5, got 4"):
        new_run(resolve(config))


def test_iodine_objectives(tmp_path):
    """IODINE with reconstruction: J is the MSE of the decoded mean image; with elbo+mse:
    -ELBO + w MSE, w = C H W / (2 σ_x²) by default (following --pixel-scale), or --mse-weight."""
    base = {**TINY_IMAGES, "model": "iodine", "out": str(tmp_path), "pixel_scale": 0.3}
    run = new_run(resolve(TrainConfig(**base, objective="elbo+mse")))
    model, objective = run.components.model, run.components.objective
    assert mse_weight(run.config, model) == pytest.approx(3 * 35 * 35 / (2 * 0.09))
    assert objective.weights == pytest.approx((1.0, 3 * 35 * 35 / 0.18))
    batch = run.components.stream.held_out(2)
    slots = infer(run, batch).result.slots[0]
    with torch.no_grad():
        x_enc = model.encode(batch.x)
        pyro.set_rng_seed(1)  # the ELBO draws z: the same draws on both sides
        j = objective(model, batch.x, x_enc, slots)
        pyro.set_rng_seed(1)
        expected = NegativeELBO()(model, batch.x, x_enc, slots)
        recon = model.decode(slots)[0]
        mse = reconstruction_mse(batch.x, recon)
    assert torch.allclose(j, expected + 3 * 35 * 35 / 0.18 * mse, rtol=1e-4)
    weighted = resolve(TrainConfig(**base, objective="elbo+mse", mse_weight=7.0))
    assert new_run(weighted).components.objective.weights == (1.0, 7.0)
    run = new_run(resolve(TrainConfig(**base, objective="reconstruction")))
    with torch.no_grad():
        j = run.components.objective(run.components.model, batch.x, None, slots)
    assert torch.allclose(j, reconstruction_mse(batch.x, run.components.model.decode(slots)[0]))
    with pytest.raises(ConfigError, match="elbo\\+mse is only for --model iodine"):
        resolve(TrainConfig(**{**base, "model": "slot-autoencoder", "pixel_scale": None},
                            objective="elbo+mse"))  # fmt: skip
    with pytest.raises(ConfigError, match="mse_weight: only with --objective elbo\\+mse"):
        resolve(TrainConfig(**base, mse_weight=2.0))


def test_pixel_scale_ramp(tmp_path, monkeypatch):
    """--pixel-scale-start A --pixel-scale-ramp N: update s runs at sigma_x = A + (B - A) s / N
    (B = --pixel-scale), then B; validation logs the sigma_x it ran at (the last update's), and
    the model is back at B for the final test; a resumed run continues the ramp where it
    stopped."""
    from pyro_slots.cli.runs import pixel_scale_at
    from pyro_slots.nested import NestedSVI

    config = TrainConfig(pixel_scale_start=0.5, pixel_scale_ramp=4)
    assert [pixel_scale_at(config, s, 0.9) for s in range(6)] == pytest.approx(
        [0.5, 0.6, 0.7, 0.8, 0.9, 0.9]
    )
    assert pixel_scale_at(TrainConfig(), 3, 0.9) == 0.9
    seen = []
    step = NestedSVI.step

    def spy(self, *args):
        seen.append(self.model.pixel_scale)
        return step(self, *args)

    monkeypatch.setattr(NestedSVI, "step", spy)
    options = dict(model="iodine", pixel_scale=0.9, pixel_scale_start=0.5, pixel_scale_ramp=4,
                   inner_steps=1, slot_dim=4, test_size=2)  # fmt: skip
    run = _train(tmp_path, steps=3, **options)
    assert seen == pytest.approx([0.5, 0.6, 0.7])
    validation = [r for r in _records(run) if r["split"] == "validation"]
    # validation runs at the sigma_x of the update it follows
    assert [r["pixel_scale"] for r in validation] == pytest.approx([0.5, 0.6, 0.7])
    assert run.components.model.pixel_scale == 0.9
    seen.clear()
    resumed = train(resume=str(tmp_path / "run"), overrides={"steps": 6}, progress=False,
                    pictures=False, echo=quiet)  # fmt: skip
    assert seen == pytest.approx([0.8, 0.9, 0.9])
    assert resumed.components.model.pixel_scale == 0.9
    base = dict(model="iodine", pixel_scale_start=0.5)
    for bad, match in [
        (base, "give both"),
        (dict(model="iodine", pixel_scale_ramp=3), "give both"),
        ({**base, "pixel_scale_ramp": -1}, "pixel_scale_ramp: expected an integer >= 0"),
        ({**base, "pixel_scale_start": 0.0, "pixel_scale_ramp": 3}, "pixel_scale_start: expected"),
        (dict(model="gmm", pixel_scale_start=0.5, pixel_scale_ramp=3),
         "pixel_scale_start: only for --model iodine"),
    ]:  # fmt: skip
        with pytest.raises(ConfigError, match=match):
            resolve(TrainConfig(**bad))


@pytest.mark.parametrize(
    "options, message",
    [
        ({"test_size": -1}, "test_size: expected an integer >= 0"),
        ({"eval_restarts": 0}, "eval_restarts: expected an integer >= 1"),
        ({"eval_inner_steps": 0}, "eval_inner_steps: expected an integer >= 1"),
        ({"restart_criterion": "best"}, "restart_criterion: unknown kind 'best'"),
        ({"lr_schedule": "step"}, "lr_schedule: unknown kind 'step'"),
        ({"min_lr_ratio": 1.5}, "min_lr_ratio: expected a number in [0, 1]"),
        ({"max_minutes": 0.0}, "max_minutes: expected finite minutes > 0"),
        ({"select_best": True, "eval_every": 0}, "select_best: needs the periodic validation"),
        ({"first_scene": -3}, "first_scene: expected an integer >= 0"),
        ({"temperature": 5.0}, "temperature: only for --inner soft-kmeans (the variance of soft "
         "k-means), not slot-attention"),
        ({"step_size": 0.5}, "step_size: only for --inner gradient or generalized-em"),
        ({"truncate": 3}, "truncate: the differentiated steps of --gradient truncated, not "
         "unrolled"),
        # 2**31 - 10 + 4 updates of 4 would reach the held-out scenes (2**31 on)
        ({"first_scene": 2**31 - 10, "steps": 4, "batch_size": 4},
         "first_scene: training would draw datapoints 2147483638 to 2147483653 (4 updates of 4), "
         "expected them below 2147483648"),
        ({"kernel_size": 4}, "kernel_size: expected an odd integer >= 1"),
        ({"decoder_upsample": -1}, "decoder_upsample: expected an integer >= 0"),
        ({"decoder_channels": "32,0"}, "decoder_channels: expected positive integers"),
        ({"encoder_strides": "2,x"}, "encoder_strides: expected positive integers"),
        ({"test_sweep": "1,0", "test_size": 2}, "test_sweep: expected positive integers like 1,3"),
        ({"test_sweep": "1,3"}, "test_sweep: needs the final test (--test-size N > 0)"),
        ({"model": "gmm", "dataset": None, "slot_dim": None, "paper_size": True},
         "paper_size: an image model's architecture"),
        ({"refinement_inputs": True}, "refinement_inputs: only for --model iodine"),
        ({"refinement_pooling": "posterior"}, "refinement_pooling: only with --refinement-inputs"),
        ({"init_from": "/no/such/run"}, "init_from: no such run folder or checkpoint"),
    ],
)  # fmt: skip
def test_bad_recipe_options_are_refused_before_any_work(tmp_path, options, message):
    config = TrainConfig(**{**TINY_IMAGES, "out": str(tmp_path / "never"), **options})
    with pytest.raises(ConfigError) as error:
        train(config, progress=False, pictures=False, echo=quiet)
    assert message in str(error.value)
    assert not (tmp_path / "never").exists()


def test_init_from_loads_weights_with_a_fresh_optimizer(tmp_path):
    """init_from: the finished run's weights exactly, update count 0 and no Adam moments; a
    run of another architecture is refused in one line naming init_from; first_scene shifts the
    training stream to the generator's scenes from that index."""
    first = _train(tmp_path, name="first", steps=2, eval_every=0)
    second = _train(tmp_path, name="second", steps=1, eval_every=0, init_from=first.config.out,
                    first_scene=4)  # fmt: skip
    fresh = new_run(resolve(TrainConfig(**{**TINY_IMAGES, "out": str(tmp_path / "x")})))
    assert fresh.svi.state_dict()["num_updates"] == 0
    assert init_from(fresh, first.config.out) == 2
    for name, value in first.components.model.state_dict().items():
        assert torch.equal(fresh.components.model.state_dict()[name], value), name
    assert second.step == 1 and second.svi.state_dict()["num_updates"] == 1
    expected = generate_tetrominoes(2, seed=0, start=4)["image"]
    assert torch.equal(second.components.stream.batch(0).x, expected)
    other = new_run(resolve(TrainConfig(**{**TINY_IMAGES, "slot_dim": 16, "out": str(tmp_path)})))
    with pytest.raises(ConfigError) as error:
        init_from(other, first.config.out)
    text = str(error.value)
    assert text.startswith("init_from: ") and "does not hold weights" in text
    assert "\n" not in text


def test_init_from_a_fixed_k_run_starts_active_slots_with_a_fresh_selector(tmp_path):
    """--slot-sparsity with --init-from a run without it: every shared weight is the finished
    run's, the selector keeps its own fresh weights (AdaSlot fine-tunes a fixed-K model); the
    other way round, a run without a selector refuses a checkpoint that has one."""
    first = _train(tmp_path, name="first", steps=2, eval_every=0)
    config = TrainConfig(**{**TINY_IMAGES, "slot_sparsity": 0.01, "out": str(tmp_path / "ada")})
    active = new_run(resolve(config))
    selector = {k: v.clone() for k, v in active.components.model.slot_selector.state_dict().items()
                if torch.is_tensor(v)}  # fmt: skip
    assert init_from(active, first.config.out) == 2
    loaded = active.components.model.state_dict()
    for name, value in first.components.model.state_dict().items():
        assert torch.equal(loaded[name], value), name
    for name, value in selector.items():
        assert torch.equal(loaded[f"slot_selector.{name}"], value), name
    trained = _train(tmp_path, name="ada2", steps=1, eval_every=0, slot_sparsity=0.01)
    plain = new_run(resolve(TrainConfig(**{**TINY_IMAGES, "out": str(tmp_path / "plain")})))
    with pytest.raises(ConfigError, match="does not hold weights"):
        init_from(plain, trained.config.out)


def test_architecture_options_build_the_asked_networks(tmp_path):
    """IODINE with --decoder-upsample 0 --decoder-resolution 18 --decoder-channels 32,32,32
    --kernel-size 3: a decoder broadcasting at 18 x 18 with the hand-counted weights; --latent-dim
    8 gives slots of 2 x 8 numbers; the autoencoder's --encoder-strides 2,1,2,1 gives
    9 x 9 = 81 measurements of a 35 x 35 image; --paper-size the paper's sizes."""
    config = TrainConfig(
        **{**TINY_IMAGES, "slot_dim": 8, "out": str(tmp_path)}, decoder_resolution=18,
        decoder_upsample=0, decoder_channels="32,32,32", kernel_size=3,
    )  # fmt: skip
    config = resolve(TrainConfig(**{**config.to_dict(), "model": "iodine"}))
    model = new_run(config).components.model
    decoder = model.decoder
    assert decoder.broadcast_resolution == (18, 18) and decoder.num_upsample == 0
    z, c = 8, 32
    count = (4 * z + z) + (z * c * 9 + c) + 2 * (c * c * 9 + c) + (c * 4 * 9 + 4)
    assert sum(p.numel() for p in decoder.parameters()) == count
    assert model.slot_spec.dim == 16
    rgb, logits = model.decode_latents(torch.zeros(2, 4, z))
    assert rgb.shape == (2, 4, 3, 35, 35) and logits.shape == (2, 4, 35, 35)
    strided = resolve(TrainConfig(**{**TINY_IMAGES, "out": str(tmp_path)},
                                  encoder_strides="2,1,2,1"))  # fmt: skip
    assert new_run(strided).components.model.num_measurements == 9 * 9
    paper = {**TINY_IMAGES, "slot_dim": None, "out": str(tmp_path), "model": "iodine"}
    paper = resolve(TrainConfig(**paper, paper_size=True))
    assert paper.slot_dim == 32
    assert new_run(paper).components.model.decoder.broadcast_resolution == (35, 35)


def test_first_order_recipes_get_a_fixed_initializer_without_a_warning(tmp_path):
    """first_order (and truncated shorter than T) resolve init auto to fixed: the model's own
    initializer stays at its start (its weights frozen, the same in every checkpoint), no
    NestedSVI UserWarning; unrolled keeps the learned initializer and trains it."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        run = _train(tmp_path, gradient="first_order", inner_steps=3, eval_every=0, lr=1e-2)
    assert run.config.init == "fixed"
    init = run.components.model.slot_init
    assert not list(init.parameters())
    assert torch.equal(init.loc, torch.zeros_like(init.loc))
    assert torch.equal(init.log_scale, torch.zeros_like(init.log_scale))
    truncated = resolve(TrainConfig(**TINY_IMAGES, gradient="truncated", truncate=1))
    assert truncated.init == "fixed"
    unrolled = _train(tmp_path, name="unrolled", eval_every=0, lr=1e-2)
    assert unrolled.config.init == "model"
    assert not torch.equal(unrolled.components.model.slot_init.loc, torch.zeros_like(init.loc)), (
        "the unrolled gradient trains the learned initializer"
    )


def test_latent_dim_is_the_slot_dim_flag(tmp_path, capsys):
    from pyro_slots.cli import build_parser

    args = build_parser().parse_args(["train", "--latent-dim", "8"])
    assert args.slot_dim == 8


def test_max_minutes_is_refused_with_several_processes(tmp_path, monkeypatch):
    """Each rank would read its own clock (stopping and annealing at different updates)."""
    trainer = sys.modules["pyro_slots.cli.train"]  # (pyro_slots.cli.train is also the function)
    monkeypatch.setattr(trainer, "distributed_context", lambda *args: (0, 2))
    config = TrainConfig(**{**TINY_IMAGES, "out": str(tmp_path / "never")}, max_minutes=1.0)
    with pytest.raises(ConfigError, match="max_minutes: not supported with several processes"):
        train(config, progress=False, pictures=False, echo=quiet)
    assert not (tmp_path / "never").exists()


def test_point_recipe_options_build_the_examples_rule(tmp_path):
    """features: gaussian gives SlotAttention the (1, z, z²) keys of GaussianFeatures without
    LayerNorm (5 numbers per 2-D point); init_lloyd_steps 0 keeps gmm's bare k-means++ seeds;
    both are refused where they mean nothing."""
    from pyro_slots.inner import GaussianFeatures

    base = dict(model="gmm", inner="slot-attention", steps=1, out=str(tmp_path))
    run = new_run(resolve(TrainConfig(**base, features="gaussian", init_lloyd_steps=0)))
    rule = run.components.inner
    assert isinstance(rule.encoder, GaussianFeatures) and rule.feature_dim == 2 * 2 + 1
    assert rule.norm_inputs is None
    assert run.components.model.init_lloyd_steps == 0
    plain = new_run(resolve(TrainConfig(**base)))
    assert plain.components.inner.norm_inputs is not None
    assert plain.components.model.init_lloyd_steps == 10
    with pytest.raises(ConfigError, match="features: only for --inner slot-attention"):
        resolve(TrainConfig(model="gmm", inner="em", features="gaussian"))
    with pytest.raises(ConfigError, match="init_lloyd_steps: only for --model gmm"):
        resolve(TrainConfig(model="iodine", init_lloyd_steps=0))
    with pytest.raises(ConfigError, match="features: unknown kind 'rbf'"):
        resolve(TrainConfig(**base, features="rbf"))
    seeds = new_run(resolve(TrainConfig(**base, gmm_init="kmeans++_seeds")))
    assert seeds.components.model.init == "kmeans++_seeds"
    with pytest.raises(ConfigError, match="gmm_init: unknown kind 'kmeans'"):
        resolve(TrainConfig(**base, gmm_init="kmeans"))
    with pytest.raises(ConfigError, match="gmm_init: only for --model gmm"):
        resolve(TrainConfig(model="iodine", gmm_init="kmeans++"))
    one = new_run(resolve(TrainConfig(**base, gmm_init="kmeans++_seeds", init_local_trials=1)))
    assert one.components.model.init_local_trials == 1
    assert seeds.components.model.init_local_trials is None
    with pytest.raises(ConfigError, match="init_local_trials: expected an integer >= 1"):
        resolve(TrainConfig(**base, init_local_trials=0))
    with pytest.raises(ConfigError, match="init_local_trials: only for --model gmm"):
        resolve(TrainConfig(model="iodine", init_local_trials=1))


def test_a_finished_run_resumed_with_test_options_is_only_tested_again(tmp_path):
    """--resume RUN --test-size N --eval-inner-steps T on a finished run trains nothing (the
    checkpoint's weights and step stay) and writes test.json at the new options, equal to
    pyro-slots evaluate at that T."""
    from pyro_slots.cli import main

    run = _train(tmp_path, eval_every=0)
    before = load_checkpoint(f"{run.config.out}/checkpoint.pt")
    argv = ["train", "--resume", run.config.out, "--test-size", "4", "--eval-inner-steps", "6"]
    assert main([*argv, "--no-progress", "--no-pictures"]) == 0
    after = load_checkpoint(f"{run.config.out}/checkpoint.pt")
    assert after["step"] == before["step"] == 2
    for name, value in before["model"].items():
        assert torch.equal(after["model"][name], value), name
    report = _test_report(run)
    assert report["inner_steps"] == 6 and report["metrics"]["num_datapoints"] == 4
    expected = evaluate_run(load_run(run.config.out), num=4, inner_steps=6)
    assert report["metrics"]["fg_ari"] == pytest.approx(expected["fg_ari"], abs=1e-6)


def test_resume_refuses_options_that_change_the_validation_it_selects_by(tmp_path, capsys):
    """With validate_as_tested the final test's options are the periodic validation's: a
    resume may not change them (--select-best would compare scores of two procedures); without
    it they may (the test above)."""
    from pyro_slots.cli import main

    run = _train(tmp_path, validate_as_tested=True)
    argv = ["train", "--resume", run.config.out, "--steps", "3", "--eval-inner-steps", "6"]
    assert main([*argv, "--no-progress", "--no-pictures"]) == 2
    err = capsys.readouterr().err
    assert "--eval-inner-steps: the run validates as it tests (validate_as_tested)" in err
    assert load_checkpoint(f"{run.config.out}/checkpoint.pt")["step"] == 2  # left as it was


def test_resume_refuses_another_validation_size_where_it_selects_the_best(tmp_path, capsys):
    """--select-best compares each validation score with the best so far: resumed with another
    --eval-size it compared scores of other scenes (a gain of 0.35 nats that was the scenes').
    Without selection the size may change."""
    from pyro_slots.cli import main

    run = _train(tmp_path, select_best=True)
    argv = ["train", "--resume", run.config.out, "--steps", "3", "--eval-size", "5"]
    assert main([*argv, "--no-progress", "--no-pictures"]) == 2
    assert "eval_size: --select-best compares every validation score" in capsys.readouterr().err
    assert load_checkpoint(f"{run.config.out}/checkpoint.pt")["step"] == 2  # left as it was
    plain = _train(tmp_path, name="plain", select_best=False)
    argv = ["train", "--resume", plain.config.out, "--steps", "3", "--eval-size", "5"]
    assert main([*argv, "--no-progress", "--no-pictures"]) == 0
    assert load_checkpoint(f"{plain.config.out}/checkpoint.pt")["step"] == 3


def test_test_sweep_scores_the_tested_weights_at_every_inner_steps(tmp_path, capsys):
    """test_sweep "1,3" repeats the final test of the tested weights at T = 1 and 3: each entry
    is what pyro-slots evaluate scores at that T on the same scenes (one chunk, the same seed),
    the entry at the test's own T is the test's metrics, and the metrics do change with T;
    pyro-slots evaluate --inner-steps 1,3 prints the same numbers, one row per T."""
    from pyro_slots.cli import main

    run = _train(tmp_path, test_size=4, eval_inner_steps=3, test_sweep="1,3")
    report = _test_report(run)
    assert sorted(report["sweep"], key=int) == ["1", "3"]
    for key in ("fg_ari", "ari", "mse", "elbo"):
        assert report["sweep"]["3"][key] == report["metrics"][key], key
    for t in (1, 3):
        expected = evaluate_run(load_run(run.config.out), num=4, inner_steps=t)
        for key in ("fg_ari", "ari", "mse", "elbo"):
            assert report["sweep"][str(t)][key] == pytest.approx(expected[key], abs=1e-6), key
    assert report["sweep"]["1"]["elbo"] != report["sweep"]["3"]["elbo"]
    assert main(["evaluate", run.config.out, "--num", "4", "--inner-steps", "1,3"]) == 0
    text = capsys.readouterr().out
    for t, row in report["sweep"].items():
        assert f"| {t} | {row['fg_ari']:.3f} | {row['ari']:.3f} |" in text
    assert main(["summarize", run.config.out]) == 0
    text = capsys.readouterr().out
    row = f"| {report['sweep']['1']['fg_ari']:.3f} | {report['sweep']['3']['fg_ari']:.3f} |"
    assert "| run | seed | T = 1 | T = 3 |" in text and row in text
    csv = str(tmp_path / "x.csv")
    argv = ["evaluate", run.config.out, "--inner-steps", "1,3", "--per-image", csv]
    assert main(argv) == 2
    assert "--per-image: needs a single --inner-steps T, got 1,3" in capsys.readouterr().err


def test_list_options_read_from_a_config_file_as_their_text(tmp_path):
    """A YAML list or a single integer for a list option (test_sweep, encoder_strides) reads as
    the comma-separated text a flag gives; other types are refused naming the key."""
    from pyro_slots.cli.config import merge_config

    path = tmp_path / "c.yaml"
    path.write_text("test_sweep: [1, 3, 5]\nencoder_strides: 2\n")
    from pyro_slots.cli.config import load_config_file

    config = merge_config(load_config_file(str(path)), {})
    assert (config.test_sweep, config.encoder_strides) == ("1,3,5", "2")
    path.write_text("test_sweep: [1, 2.5]\n")
    with pytest.raises(ConfigError, match="test_sweep expects an optional str"):
        merge_config(load_config_file(str(path)), {})
    # Numbers read as written: YAML 1.1 read "1e-3" (no dot) as text, refused for --lr, and
    # "032" as octal 26 and "1:30" as base-60 90, silently
    path.write_text("lr: 1e-3\nmin_lr_ratio: 5e-2\ndecoder_channels: 032\ntest_sweep: 1:30\n")
    config = merge_config(load_config_file(str(path)), {})
    assert (config.lr, config.min_lr_ratio) == (0.001, 0.05)
    assert (config.decoder_channels, config.test_sweep) == ("032", "1:30")


def test_evaluate_reinitialize_refines_with_the_trained_rule_wrapped(tmp_path, capsys):
    """evaluate_run(reinitialize=True) scores what refine scores with Reinitialize(trained rule,
    the run's initializer, seed = the run's seed, the decoder's masks), built by hand; it
    differs from the plain rule's result here (an untrained model's slots start as
    duplicates); and a run trained with --reinitialize is refused."""
    import pyro_slots as ps
    from pyro_slots.cli import main
    from pyro_slots.inner import Reinitialize, decoder_masks

    run = _train(tmp_path, eval_every=0)
    loaded = load_run(run.config.out)
    c, config = loaded.components, loaded.config
    batch = c.stream.held_out(4)
    got = infer(loaded, batch, reinitialize=True).result
    rule = Reinitialize(c.inner, init=c.init or c.model.slot_init, seed=config.seed,
                        masks=decoder_masks)  # fmt: skip
    want = ps.refine(c.model, batch.x, rule, num_slots=config.num_slots,
                     num_steps=config.inner_steps, init=c.init, seed=config.seed)  # fmt: skip
    assert torch.equal(got.slots, want.slots)
    # reinitialize="attention": judged by the slot-attention rule's own attention instead
    got = infer(loaded, batch, reinitialize="attention").result
    rule = Reinitialize(c.inner, init=c.init or c.model.slot_init, seed=config.seed,
                        masks=c.inner.attention_masks)  # fmt: skip
    want = ps.refine(c.model, batch.x, rule, num_slots=config.num_slots,
                     num_steps=config.inner_steps, init=c.init, seed=config.seed)  # fmt: skip
    assert torch.equal(got.slots, want.slots)
    assert evaluate_run(loaded, num=4, reinitialize="attention")["reinitialize"] == "attention"
    plain = infer(loaded, batch).result
    assert not torch.equal(plain.slots, got.slots)
    metrics = evaluate_run(loaded, num=4, reinitialize=True)
    assert metrics["reinitialize"] is True
    assert metrics["fg_ari"] == pytest.approx(
        metrics_of(loaded, infer(loaded, batch, reinitialize=True))["fg_ari"]
    )
    # eval_reinitialize: the final test of the same weights is evaluate --reinitialize's
    tested = _train(tmp_path, name="tested", eval_every=0, test_size=4, eval_reinitialize=True)
    report = _test_report(tested)
    expected = evaluate_run(load_run(tested.config.out), num=4, reinitialize=True)
    assert report["reinitialize"] is True
    for key in ("fg_ari", "ari", "mse"):
        assert report["metrics"][key] == pytest.approx(expected[key], abs=1e-6), key
    for options, message in [
        ({"reinitialize_masks": "attention"}, "used only with --reinitialize or --eval-"),
        ({"reinitialize": True, "reinitialize_masks": "masks"}, "unknown kind 'masks'"),
        ({"reinitialize": True, "reinitialize_masks": "attention", "inner": "soft-kmeans"},
         "attention needs --inner slot-attention"),
    ]:  # fmt: skip
        with pytest.raises(ConfigError, match=f"reinitialize_masks: {message}"):
            _train(tmp_path, name="gmm", **options)
    with pytest.raises(ConfigError, match="reinitialize: --model gmm .* no slot initializer"):
        _train(tmp_path, name="gmm", model="gmm", dataset=None, slot_dim=None, init="model",
               inner="slot-attention", eval_reinitialize=True)  # fmt: skip
    assert not (tmp_path / "gmm").exists()
    # trained with --reinitialize, a recipe's eval_reinitialize adds nothing: the test is the
    # trained rule's (not wrapped twice)
    trained = _train(tmp_path, name="reinit", eval_every=0, test_size=4, reinitialize=True,
                     eval_reinitialize=True)  # fmt: skip
    report = _test_report(trained)
    expected = evaluate_run(load_run(trained.config.out), num=4)
    assert report["reinitialize"] is True
    for key in ("fg_ari", "ari", "mse"):
        assert report["metrics"][key] == pytest.approx(expected[key], abs=1e-6), key
    assert main(["evaluate", trained.config.out, "--reinitialize", "--num", "2"]) == 2
    assert "re-initializes slots already" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:  # argparse refuses it
        main(["evaluate", trained.config.out, "--reinitialize", "masks"])
    assert exit_info.value.code == 2
    assert "invalid choice: 'masks' (choose from 'decoder'" in capsys.readouterr().err


def test_evaluate_on_the_validation_scenes_repeats_the_runs_last_validation_record(
    tmp_path, monkeypatch
):
    """--dataset validation scores the scenes of the periodic evaluation: the final weights on
    eval_size of them give the FG-ARI and J of metrics.jsonl's last validation record (both
    refine in chunks of CHUNK_SIZE, here 2 for 3 scenes), and they are not the test scenes."""
    from pyro_slots.cli import evaluate as evaluate_module
    from pyro_slots.cli import main

    monkeypatch.setattr(evaluate_module, "CHUNK_SIZE", 2)
    run = _train(tmp_path, steps=2, eval_every=2)
    last = [r for r in _records(run) if r["split"] == "validation"][-1]
    assert last["step"] == 2
    metrics = evaluate_run(load_run(run.config.out), dataset="validation", num=3, chunk_size=2)
    whole = evaluate_run(load_run(run.config.out), dataset="validation", num=3, chunk_size=3)
    assert whole["J"] != pytest.approx(last["J"], rel=1e-6)  # other initial slots
    assert metrics["dataset"] == "tetrominoes/validation"
    assert metrics["fg_ari"] == pytest.approx(last["fg_ari"], abs=1e-6)
    assert metrics["J"] == pytest.approx(last["J"], rel=1e-5)
    test = evaluate_run(load_run(run.config.out), num=3)
    assert test["mse"] != metrics["mse"]
    assert main(["evaluate", run.config.out, "--dataset", "validation", "--num", "3"]) == 0
    # validate_as_tested: the validation refines as the final test does (T = 3, re-initialized)
    options = dict(eval_inner_steps=3, eval_reinitialize=True)
    run = _train(tmp_path, name="as_tested", steps=2, eval_every=2, validate_as_tested=True,
                 **options)  # fmt: skip
    last = [r for r in _records(run) if r["split"] == "validation"][-1]
    as_tested = evaluate_run(load_run(run.config.out), dataset="validation", num=3,
                             inner_steps=3, reinitialize=True, chunk_size=2)  # fmt: skip
    assert last["inner_steps"] == 3
    assert last["fg_ari"] == pytest.approx(as_tested["fg_ari"], abs=1e-6)
    assert last["J"] == pytest.approx(as_tested["J"], rel=1e-5)
    assert last["J"] != pytest.approx(metrics["J"], rel=1e-5)  # not the training T's (8e-4 off)
    with pytest.raises(ConfigError, match="validate_as_tested: needs the periodic validation"):
        _train(tmp_path, name="never", eval_every=0, validate_as_tested=True)


def test_chunked_metrics_take_one_mean_over_every_datapoint(tmp_path, monkeypatch):
    """A chunk whose images have no foreground (FG-ARI NaN) made the whole test's FG-ARI NaN:
    each chunk's nan-mean was weighted by the chunk's size. The test's metric is the mean of
    the per-image values, NaN left out, as sklearn's scores of the same masks give it."""
    from sklearn.metrics import adjusted_rand_score

    import pyro_slots.cli.evaluate as evaluate

    run = _train(tmp_path, steps=1, test_size=0)
    batch = run.components.stream.held_out(6)
    batch.truth["mask"][:3] = 0  # the first chunk: background only
    monkeypatch.setattr(evaluate, "CHUNK_SIZE", 3)
    torch.manual_seed(0)
    chunked = evaluate.chunked_metrics(run, batch, reference=False)
    torch.manual_seed(0)  # the same inferences, chunk by chunk
    masks = torch.cat(
        [
            evaluate.decode(
                run.components.model, infer(run, evaluate._slice(batch, i, i + 3)).result
            )[2].argmax(1)
            for i in (0, 3)
        ]
    )
    scores = []
    for true, pred in zip(batch.truth["mask"], masks):
        fg = true.flatten() > 0
        if fg.any():
            scores.append(adjusted_rand_score(true.flatten()[fg], pred.flatten()[fg]))
    assert len(scores) == 3
    assert chunked["fg_ari"] == pytest.approx(np.mean(scores), abs=1e-9)
