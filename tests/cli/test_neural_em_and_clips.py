"""The trainer's Neural EM (fixed and learned rule) and clips (slots carried between frames).

The library pieces are tested against brute force and finite differences in
``tests/models/test_neural_em.py`` and ``tests/test_video.py``; here the trainer's plumbing is
checked against the library called directly: what ``pyro-slots train``/``evaluate`` build and
score is what ``refine_video`` and the metrics give by hand.
"""

import pytest
import torch

from pyro_slots import SlotTransition, refine_video
from pyro_slots.cli import main
from pyro_slots.cli.config import ConfigError, TrainConfig
from pyro_slots.cli.evaluate import decode, evaluate_run, infer
from pyro_slots.cli.registry import build, resolve
from pyro_slots.cli.runs import load_run
from pyro_slots.cli.train import train
from pyro_slots.inner import RNNEM, GeneralizedEM
from pyro_slots.metrics import fg_ari, slot_keeping, video_fg_ari
from pyro_slots.models import NeuralEM

TINY = dict(steps=2, batch_size=2, eval_every=1, eval_size=2, checkpoint_every=1, test_size=0)


def quiet(*args):
    pass


def _config(tmp_path=None, **options):
    out = {} if tmp_path is None else {"out": str(tmp_path / "run")}
    return TrainConfig(**{**TINY, **out, **options})


def test_neural_em_resolves_to_its_rules_and_sizes():
    """neural-em trains generalized EM on its own J by default, slot size 32; the rules are
    built with the model's sizes (RNN-EM's error encoder reads every pixel)."""
    config = resolve(_config(model="neural-em", dataset="tetrominoes"))
    assert (config.inner, config.objective, config.slot_dim, config.num_slots) == (
        "generalized-em", "elbo", 32, 4,
    )  # fmt: skip
    c = build(config)
    assert isinstance(c.model, NeuralEM) and c.model.pixel_scale == 0.25
    assert isinstance(c.inner, GeneralizedEM)
    assert (c.inner.step_size, c.inner.ascent_steps, c.inner.safeguarded) == (1.0, 1, False)
    rnn = build(resolve(_config(model="neural-em", dataset="tetrominoes", inner="rnn-em")))
    assert isinstance(rnn.inner, RNNEM)
    assert rnn.inner.num_measurements == 35 * 35 == rnn.model.num_pixels
    # --decoder-upsample broadcasts at the resolution the upsampling starts from
    up = build(resolve(_config(model="neural-em", dataset="shapes", image_size=32,
                               decoder_upsample=2)))  # fmt: skip
    assert up.model.component_means(torch.zeros(1, 6, 32)).shape == (1, 6, 32 * 32, 3)


def test_clips_resolve_with_a_slot_per_object_and_a_transition():
    config = resolve(_config(model="slot-autoencoder", dataset="moving-shapes",
                             transition="mlp"))  # fmt: skip
    assert config.num_slots == 4  # at most 3 objects and the background
    c = build(config)
    assert c.stream.kind == "videos" and isinstance(c.transition, SlotTransition)
    batch = c.stream.batch(0)
    assert batch.x.shape == (2, 8, 3, 32, 32) and batch.truth["mask"].shape == (2, 8, 32, 32)
    assert build(resolve(_config(model="neural-em", dataset="moving-shapes"))).transition is None


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(dataset="tetrominoes", transition="mlp"), "transition: mlp .*only for clips"),
        (dict(dataset="moving-shapes", transition="gru"), "transition: unknown kind 'gru'"),
        (
            dict(dataset="moving-shapes", transition="mlp", gradient="first_order"),
            "transition: mlp is trained only through every inner step or with --straight",
        ),
        (dict(dataset="tetrominoes", num_frames=4), "num_frames: only for --dataset moving"),
        (dict(dataset="moving-shapes", eval_restarts=2), "eval_restarts: clips .* got 2"),
        (dict(dataset="moving-shapes", num_frames=0), "num_frames"),
        (dict(model="neural-em", decoder_resolution=8), "decoder_resolution: not for .*neural"),
        (
            dict(model="slot-autoencoder", pixel_scale=0.3),
            "pixel_scale: only for --model iodine or neural-em",
        ),
        (dict(model="gmm", dataset="moving-shapes"), "works on points.*--dataset points"),
    ],
)
def test_clip_and_neural_em_options_are_refused_where_they_do_not_apply(options, message):
    base = dict(model="neural-em", dataset="tetrominoes")
    with pytest.raises(ConfigError, match=message):
        resolve(_config(**{**base, **options}))


def test_slot_transition_starts_as_the_identity_and_is_a_per_slot_residual_mlp():
    torch.manual_seed(0)
    transition = SlotTransition(6, hidden_dim=10)
    slots = torch.randn(3, 4, 6)
    assert torch.equal(transition(slots), slots)
    for p in transition.parameters():
        torch.nn.init.normal_(p)
    # by hand: layer norm, linear, relu, linear, residual
    ln = transition.norm
    normed = (slots - slots.mean(-1, keepdim=True)) / (
        slots.var(-1, unbiased=False, keepdim=True) + ln.eps
    ).sqrt() * ln.weight + ln.bias
    first, last = transition.mlp[0], transition.mlp[2]
    expected = slots + (normed @ first.weight.T + first.bias).relu() @ last.weight.T + last.bias
    torch.testing.assert_close(transition(slots), expected)
    perm = torch.randperm(4)
    torch.testing.assert_close(transition(slots[:, perm]), transition(slots)[:, perm])
    with pytest.raises(ValueError, match=r"slots: expected shape \(batch, num_slots, 6\)"):
        transition(torch.zeros(3, 6))


@pytest.fixture(scope="module")
def clip_run(tmp_path_factory):
    """Neural EM + generalized EM on clips with a learned transition, 2 updates."""
    out = tmp_path_factory.mktemp("clips") / "run"
    config = _config(model="neural-em", dataset="moving-shapes", transition="mlp", num_frames=3,
                     inner_steps=2, slot_dim=8, out=str(out))  # fmt: skip
    return train(config, progress=False, pictures=False, echo=quiet)


def test_clip_run_trains_the_transition_and_its_checkpoint_restores_it(clip_run):
    """With unrolled gradients through the carried slots, the transition's last layer (zero at
    init) is trained by the outer loop; load_run restores every weight exactly."""
    c = clip_run.components
    assert clip_run.config.gradient == "unrolled"
    assert clip_run.step == 2 and c.transition.mlp[-1].weight.abs().sum() > 0
    loaded = load_run(clip_run.config.out)
    for name, value in c.transition.state_dict().items():
        assert torch.equal(loaded.components.transition.state_dict()[name], value), name


def test_evaluate_on_clips_is_refine_video_and_the_video_metrics_by_hand(clip_run):
    """evaluate_run's per-frame FG-ARI, video FG-ARI and slot keeping equal refine_video with
    the run's rule, initialization and transition followed by the metrics; the masks of a
    Neural EM frame are the model's own posterior segmentation."""
    run, c = clip_run, clip_run.components
    for carry in (True, False):
        scores = evaluate_run(run, num=3, carry=carry)
        assert scores["carry"] is carry and scores["num_datapoints"] == 3
        batch = c.stream.held_out(3)
        frames = refine_video(c.model, batch.x, c.inner, carry=carry, transition=c.transition,
                              num_slots=run.config.num_slots, num_steps=run.config.inner_steps,
                              init=c.init, seed=run.config.seed)  # fmt: skip
        masks = torch.stack(
            [c.model.segment(c.model.encode(batch.x[:, t]), r.slots[0]) for t, r in
             enumerate(frames)], 1,
        ).detach()  # fmt: skip
        truth = batch.truth["mask"]
        per_frame = torch.stack([fg_ari(truth[:, t], masks[:, t]) for t in range(3)], 1)
        assert scores["fg_ari"] == pytest.approx(per_frame.double().mean().item(), abs=1e-6)
        assert scores["video_fg_ari"] == pytest.approx(
            video_fg_ari(truth, masks).double().mean().item(), abs=1e-6
        )
        assert scores["slot_keeping"] == pytest.approx(
            slot_keeping(truth, masks).double().mean().item(), abs=1e-6
        )
        elbo = sum(r.elbo[0] for r in frames)
        assert scores["elbo"] == pytest.approx(elbo.double().mean().item(), rel=1e-5)


def test_neural_em_frames_decode_to_the_posterior_weighted_image(clip_run):
    """decode() of a model without a decoder of masks: the reconstruction is Σ_k γ_k ψ_k and
    the masks the posterior responsibilities (NeuralEM.reconstruct / .segment)."""
    run, c = clip_run, clip_run.components
    inference = infer(run, 2)
    x = inference.batch.x[:, 1]
    result = inference.frames[1]
    recon, rgb, masks = decode(c.model, result)
    x_enc = c.model.encode(x)
    with torch.no_grad():
        torch.testing.assert_close(recon, c.model.reconstruct(x_enc, result.slots[0]))
        torch.testing.assert_close(masks, c.model.segment(x_enc, result.slots[0]))
    assert rgb.shape == (2, run.config.num_slots, 3, 32, 32)
    torch.testing.assert_close(masks.sum(1), torch.ones(2, 32, 32))


def test_evaluate_command_on_clips_takes_no_carry_and_refuses_restarts(clip_run, capsys):
    out = clip_run.config.out
    assert main(["evaluate", out, "--num", "2", "--no-carry", "--json"]) == 0
    assert '"carry": false' in capsys.readouterr().out
    assert main(["evaluate", out, "--num", "2", "--restarts", "2"]) == 2
    assert "--restarts: clips carry one trajectory of slots, got 2" in capsys.readouterr().err


def test_neural_em_upsampling_covers_an_odd_image_size():
    """35 x 35 tetrominoes upsampled twice: the broadcast grid was floor(35 / 4) = 8, whose
    32 x 32 does not cover the image (refused); it is ceil(35 / 4) = 9, as NeuralEM's own
    default and IODINE's."""
    import math

    c = build(resolve(_config(model="neural-em", dataset="tetrominoes", decoder_upsample=2)))
    side = math.ceil(35 / 4)
    assert c.model.decoder.broadcast_resolution == (side, side)
    assert c.model.component_means(torch.zeros(1, 4, 32)).shape == (1, 4, 35 * 35, 3)
