"""SlotAutoencoder and IODINE: shapes, exact likelihoods, every compatible rule, tiny training."""

import math

import numpy as np
import pyro
import pyro.optim
import pytest
import torch
from pyro import poutine
from scipy.special import logsumexp

from pyro_slots import CapabilityError, NestedSVI, per_datapoint_elbo
from pyro_slots.inner import (
    EM,
    GradientAscent,
    InnerProblem,
    LearnedGradient,
    SlotAttention,
    SoftKMeans,
)
from pyro_slots.models import IODINE, SlotAutoencoder
from pyro_slots.models.blocks import (
    CNNEncoder,
    SoftPositionEmbed,
    SpatialBroadcastDecoder,
    build_grid,
)
from pyro_slots.objectives import NegativeELBO, Reconstruction
from pyro_slots.refine import run_inner
from tests.conftest import tiny_autoencoder

SIZE = 12  # side of the synthetic test images


def tiny_iodine(**kwargs):
    config = dict(
        image_size=SIZE,
        num_slots=3,
        latent_dim=4,
        decoder_channels=(8, 8),
        decoder_upsample=1,
        kernel_size=3,
    )
    config.update(kwargs)
    return IODINE(**config)


def squares(num_images, size=SIZE, seed=0):
    """Images ``(N, 3, size, size)`` with two coloured 4x4 squares on black, and their masks."""
    g = torch.Generator().manual_seed(seed)
    images = torch.zeros(num_images, 3, size, size)
    masks = torch.zeros(num_images, size, size, dtype=torch.int64)
    palette = torch.eye(3)
    for n in range(num_images):
        colors = torch.randperm(3, generator=g)[:2]
        for j, c in enumerate(colors.tolist()):
            r, q = torch.randint(0, size - 4, (2,), generator=g).tolist()
            images[n, :, r : r + 4, q : q + 4] = palette[c].view(3, 1, 1)
            masks[n, r : r + 4, q : q + 4] = j + 1
    return images, masks


# ----------------------------------------------------------------------------------- blocks
def test_position_embedding_is_linear_map_of_grid():
    embed = SoftPositionEmbed(5, (3, 4))
    features = torch.randn(2, 5, 3, 4)
    out = embed(features)
    grid = build_grid(3, 4)
    assert torch.allclose(grid[2, 3], torch.tensor([1.0, 1.0, 0.0, 0.0]))
    for i, j in [(0, 0), (1, 2), (2, 3)]:
        expected = features[:, :, i, j] + embed.proj.weight @ grid[i, j] + embed.proj.bias
        assert torch.allclose(out[:, :, i, j], expected, atol=1e-6)


def test_encoder_and_decoder_shapes():
    encoder = CNNEncoder(35, channels=(4, 4, 4), strides=(1, 2, 1), kernel_size=5, feature_dim=6)
    x = encoder(torch.rand(2, 3, 35, 35))
    assert encoder.output_resolution == (18, 18)
    assert x.shape == (2, 18 * 18, 6)
    # The final LayerNorm: zero mean and unit (biased) variance per measurement at init.
    assert torch.allclose(x.mean(-1), torch.zeros(2, 324), atol=1e-5)
    assert torch.allclose(x.var(-1, unbiased=False), torch.ones(2, 324), atol=1e-3)
    decoder = SpatialBroadcastDecoder(
        7, 35, channels=(4, 4, 4), num_upsample=2, broadcast_resolution=9
    )
    assert decoder(torch.randn(5, 7)).shape == (5, 4, 35, 35)
    with pytest.raises(ValueError, match="broadcast_resolution"):
        SpatialBroadcastDecoder(7, 35, channels=(4,), num_upsample=1, broadcast_resolution=9)
    with pytest.raises(ValueError, match="images"):
        encoder(torch.rand(2, 3, 34, 35))


def test_decoder_at_lower_resolution_is_a_bilinear_resize_of_the_same_convolutions():
    """decode_resolution=(h, w): the convolutions of a decoder built for (h, w), then a bilinear
    resize to the image size, checked against a resize written out by hand (the four
    neighbours of every output pixel centre, half-pixel centres, edges clamped)."""
    torch.manual_seed(0)
    kwargs = dict(channels=(4, 4), num_upsample=1, broadcast_resolution=5)
    low = SpatialBroadcastDecoder(7, 9, **kwargs)
    resized = SpatialBroadcastDecoder(7, 17, decode_resolution=9, **kwargs)
    resized.load_state_dict(low.state_dict())
    assert resized.broadcast_resolution == (5, 5)
    v = torch.randn(3, 7, dtype=torch.float64)
    small, big = low.double()(v), resized.double()(v)
    assert small.shape == (3, 4, 9, 9) and big.shape == (3, 4, 17, 17)
    scale = 9 / 17
    expected = torch.empty_like(big)
    for i in range(17):
        for j in range(17):
            y = min(max((i + 0.5) * scale - 0.5, 0.0), 8.0)
            x = min(max((j + 0.5) * scale - 0.5, 0.0), 8.0)
            y0, x0 = int(y), int(x)
            y1, x1 = min(y0 + 1, 8), min(x0 + 1, 8)
            dy, dx = y - y0, x - x0
            expected[..., i, j] = (
                (1 - dy) * (1 - dx) * small[..., y0, x0]
                + (1 - dy) * dx * small[..., y0, x1]
                + dy * (1 - dx) * small[..., y1, x0]
                + dy * dx * small[..., y1, x1]
            )
    assert torch.allclose(big, expected, atol=1e-12)
    with pytest.raises(ValueError, match="decode_resolution"):
        SpatialBroadcastDecoder(7, 9, decode_resolution=17, **kwargs)
    with pytest.raises(ValueError, match="broadcast_resolution"):
        SpatialBroadcastDecoder(7, 40, decode_resolution=20, **kwargs)
    model = SlotAutoencoder(image_size=64, num_slots=2, decoder_resolution=32)
    assert model.decoder.broadcast_resolution == (8, 8)
    _, rgb, masks = model.decode(torch.randn(1, 2, model.slot_dim))
    assert rgb.shape == (1, 2, 3, 64, 64) and masks.shape == (1, 2, 64, 64)
    assert IODINE(image_size=64, decoder_resolution=32).decoder.decode_resolution == (32, 32)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(resolution=16, channels=(6, 5), num_upsample=1),  # CPU size: upsampling after
        dict(resolution=(9, 7), channels=(6,), kernel_size=3),  # paper size, non-square
        dict(resolution=5, channels=(4,), kernel_size=7),  # kernel wider than the grid
    ],
)
def test_folded_first_layer_equals_convolving_the_tiled_grid(float64, kwargs):
    """fold_broadcast: conv(v ⊗ 1 + P) as v S + conv(P) gives the tiled convolution's output
    and every gradient (vectors, kernel, bias, position map, later layers) to rounding."""
    torch.manual_seed(0)
    decoder = SpatialBroadcastDecoder(7, **kwargs)
    v = torch.randn(4, 7, requires_grad=True)
    g = None
    outputs, grads = [], []
    for fold in (True, False):
        decoder.fold_broadcast = fold
        out = decoder(v)
        g = torch.randn_like(out) if g is None else g
        outputs.append(out)
        grads.append(torch.autograd.grad((out * g).sum(), [v, *decoder.parameters()]))
    assert torch.allclose(outputs[0], outputs[1], atol=1e-12)
    for a, b in zip(*grads):
        assert torch.allclose(a, b, atol=1e-11)
    # The tiled grid is channels-last by construction; the folded layer keeps that layout.
    decoder.fold_broadcast = True
    first = decoder._broadcast_conv(v, decoder.net[0])
    assert first.is_contiguous(memory_format=torch.channels_last)


def test_folded_first_layer_is_skipped_for_other_first_layers(float64):
    """A transposed (upsampling) first layer is convolved as is."""
    decoder = SpatialBroadcastDecoder(3, 8, channels=(4,), num_upsample=1)
    assert isinstance(decoder.net[0], torch.nn.ConvTranspose2d)
    v = torch.randn(2, 3)
    a = decoder(v)
    decoder.fold_broadcast = False
    assert torch.equal(a, decoder(v))


# ------------------------------------------------------------------------- SlotAutoencoder
def test_slot_autoencoder_shapes():
    model = tiny_autoencoder()
    images, _ = squares(2)
    x = model.encode(images)
    assert x.shape == (2, 36, 16) and model.num_measurements == 36
    slots = model.init_slots(x, 3, generator=torch.Generator().manual_seed(0))
    assert slots.shape == (2, 3, 16)
    recon, rgb, masks = model.decode(slots)
    assert recon.shape == (2, 3, SIZE, SIZE)
    assert rgb.shape == (2, 3, 3, SIZE, SIZE) and masks.shape == (2, 3, SIZE, SIZE)
    assert torch.allclose(masks.sum(1), torch.ones(2, SIZE, SIZE), atol=1e-6)
    assert torch.allclose(recon, (masks.unsqueeze(2) * rgb).sum(1), atol=1e-6)
    assert torch.equal(model.reconstruct(x, slots, images), recon)
    assert per_datapoint_elbo(model, x, slots).shape == (2,)
    assert InnerProblem(model, x).elbo_and_responsibilities(slots)[1].shape == (2, 3, 36)
    # Reconstruction (the default J) is the MSE of the decoded image.
    j = Reconstruction()(model, images, x, slots)
    assert torch.allclose(j, (recon - images).pow(2).flatten(1).mean(1))


def test_slot_autoencoder_paper_size_shapes():
    model = SlotAutoencoder.paper_size(image_size=35, num_slots=4)
    x = model.encode(torch.rand(1, 3, 35, 35))
    assert x.shape == (1, 35 * 35, 64)
    recon, rgb, masks = model.decode(torch.randn(1, 4, 64))
    assert recon.shape == (1, 3, 35, 35) and masks.shape == (1, 4, 35, 35)
    assert model.decoder.broadcast_resolution == (35, 35)


def test_slot_autoencoder_decoder_is_permutation_equivariant():
    model = tiny_autoencoder()
    slots = torch.randn(2, 3, 16)
    perm = torch.tensor([2, 0, 1])
    recon, rgb, masks = model.decode(slots)
    recon_p, rgb_p, masks_p = model.decode(slots[:, perm])
    assert torch.allclose(recon, recon_p, atol=1e-6)
    assert torch.allclose(masks[:, perm], masks_p, atol=1e-6)


@pytest.mark.parametrize("slot_dim", [None, 5])
def test_slot_autoencoder_elbo_equals_brute_force(float64, slot_dim):
    model = tiny_autoencoder(feature_dim=4, slot_dim=slot_dim, variance=0.7)
    g = torch.Generator().manual_seed(1)
    batch, num_measurements, num_slots = 2, 7, 3
    x = torch.randn(batch, num_measurements, 4, generator=g)
    slots = torch.randn(batch, num_slots, model.slot_dim, generator=g)
    elbo = per_datapoint_elbo(model, x, slots)
    means = model.component_means(slots).detach().numpy()
    xs, var = x.numpy(), 0.7
    for n in range(batch):
        total = 0.0
        for m in range(num_measurements):
            terms = []
            for k in range(num_slots):
                sq = ((xs[n, m] - means[n, k]) ** 2).sum()
                terms.append(
                    math.log(1 / num_slots) - 0.5 * sq / var - 2 * math.log(2 * math.pi * var)
                )
            total += logsumexp(terms)
        assert abs(elbo[n].item() - total) < 1e-9


def test_soft_kmeans_step_is_em_of_the_inner_mixture(float64):
    model = tiny_autoencoder(feature_dim=4, variance=0.5)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(3, 20, 4, generator=g)
    slots = torch.randn(3, 3, 4, generator=g)
    new = run_inner(model, x, SoftKMeans(1, temperature=0.5), slots, 1).slots[0]
    # Independent: responsibilities by Bayes' rule in numpy, then weighted means.
    d2 = ((x.numpy()[:, None] - slots.numpy()[:, :, None]) ** 2).sum(-1)  # (B, K, M)
    r = np.exp(-0.5 * d2 / 0.5 - logsumexp(-0.5 * d2 / 0.5, axis=1, keepdims=True))
    expected = np.einsum("bkm,bmf->bkf", r, x.numpy()) / r.sum(-1)[..., None]
    assert np.allclose(new.numpy(), expected, atol=1e-10)
    # The rules take the E-step from the Pyro program: the same posterior.
    _, resp_pyro = InnerProblem(model, x).elbo_and_responsibilities(slots)
    assert np.allclose(resp_pyro.numpy(), r, atol=1e-10)
    # EM never lowers the ELBO; with the model's own temperature the history is monotone.
    for rule in (SoftKMeans(15, temperature=0.5), EM(15)):
        result = run_inner(model, x, rule, slots, 15)
        assert (result.history[1:] - result.history[:-1] >= -1e-9).all()
        assert (result.history[-1] > result.history[0] + 1e-3).all()
    with pytest.raises(ValueError, match="temperature"):
        run_inner(model, x, SoftKMeans(2, temperature=1.0), slots, 2)


def test_m_step_with_projection_is_least_squares(float64):
    model = tiny_autoencoder(feature_dim=6, slot_dim=3, variance=1.0)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 15, 6, generator=g)
    resp = torch.softmax(torch.randn(2, 4, 15, generator=g), dim=1)
    slots = model.m_step(x, resp).requires_grad_()
    # Stationary point of the expected complete log-likelihood in λ (a concave quadratic).
    means = model.component_means(slots)
    q = -(resp * ((x.unsqueeze(1) - means.unsqueeze(2)) ** 2).sum(-1)).sum()
    (grad,) = torch.autograd.grad(q, slots)
    assert grad.abs().max() < 1e-9


# ---------------------------------------------------------------------------------- IODINE
def test_iodine_shapes():
    model = tiny_iodine()
    images, _ = squares(2)
    x = model.encode(images)
    assert x.shape == (2, SIZE * SIZE, 3)
    assert torch.equal(model.to_image(x), images)
    assert torch.equal(x[1, 5 * SIZE + 7], images[1, :, 5, 7])
    slots = model.init_slots(x, 3, generator=torch.Generator().manual_seed(0))
    assert slots.shape == (2, 3, 8) and model.slot_spec.fields["log_scale"] == (4,)
    recon, rgb, masks = model.decode(slots)
    assert recon.shape == (2, 3, SIZE, SIZE) and rgb.shape == (2, 3, 3, SIZE, SIZE)
    assert torch.allclose(masks.sum(1), torch.ones(2, SIZE, SIZE), atol=1e-6)
    assert per_datapoint_elbo(model, x, slots).shape == (2,)
    assert per_datapoint_elbo(model, x, slots, num_particles=3).shape == (2,)
    paper = IODINE.paper_size(image_size=35)
    assert paper.decode(torch.randn(1, 4, paper.slot_dim))[1].shape == (1, 4, 3, 35, 35)


def test_iodine_elbo_equals_brute_force(float64):
    model = tiny_iodine(image_size=4, decoder_channels=(4,), decoder_upsample=0, pixel_scale=0.3)
    model.double()
    g = torch.Generator().manual_seed(4)
    batch, num_slots = 2, 3
    x = torch.rand(batch, 16, 3, generator=g, dtype=torch.float64)
    slots = 0.5 * torch.randn(batch, num_slots, model.slot_dim, generator=g, dtype=torch.float64)
    pyro.set_rng_seed(11)
    z = poutine.trace(model.guide).get_trace(x, slots).nodes["z"]["value"]
    pyro.set_rng_seed(11)
    elbo = per_datapoint_elbo(model, x, slots)
    # Independent: the spatial mixture by loops over pixels and slots, with scipy's logsumexp.
    parts = model.slot_spec.split(slots)
    loc, scale = parts["loc"].numpy(), parts["log_scale"].exp().numpy()
    rgb, logits = (t.detach().numpy() for t in model.decode_latents(z))
    zs, xs, s = z.detach().numpy(), x.numpy(), 0.3
    for n in range(batch):
        total = 0.0
        for k in range(num_slots):
            total += (-0.5 * zs[n, k] ** 2 - 0.5 * math.log(2 * math.pi)).sum()
            total -= (
                -0.5 * ((zs[n, k] - loc[n, k]) / scale[n, k]) ** 2
                - np.log(scale[n, k])
                - 0.5 * math.log(2 * math.pi)
            ).sum()
        for m in range(16):
            i, j = divmod(m, 4)
            log_pi = logits[n, :, i, j] - logsumexp(logits[n, :, i, j])
            terms = [
                log_pi[k]
                + (
                    -0.5 * ((xs[n, m] - rgb[n, k, :, i, j]) / s) ** 2
                    - math.log(s)
                    - 0.5 * math.log(2 * math.pi)
                ).sum()
                for k in range(num_slots)
            ]
            total += logsumexp(terms)
        assert abs(elbo[n].item() - total) < 1e-8


@pytest.mark.parametrize("num_particles", [1, 3])
@pytest.mark.parametrize("make_model", [tiny_autoencoder, tiny_iodine])
def test_elbo_strategies_agree(float64, make_model, num_particles):
    # The lean log-sum-exp path and Pyro's TraceEnum_ELBO contraction, same guide samples.
    model = make_model(image_size=4, decoder_channels=(4,), decoder_upsample=0).double()
    g = torch.Generator().manual_seed(5)
    x = torch.rand(2, 3, 4, 4, generator=g, dtype=torch.float64)
    x_enc = model.encode(x).detach()
    slots = torch.randn(2, 3, model.slot_dim, generator=g, dtype=torch.float64)
    values = []
    for strategy in ("lean", "trace_enum"):
        pyro.set_rng_seed(7)
        values.append(per_datapoint_elbo(model, x_enc, slots, num_particles, strategy=strategy))
    assert torch.allclose(values[0], values[1], rtol=1e-10, atol=1e-8)


# --------------------------------------------------------------- every compatible rule
def _slot_attention(model):
    if isinstance(model, SlotAutoencoder):
        return SlotAttention(
            2,
            slot_dim=model.slot_dim,
            input_dim=model.feature_dim,
            hidden_dim=model.slot_dim,
            encoder=False,
        )
    return SlotAttention(2, slot_dim=model.slot_dim, input_dim=model.feature_dim, hidden_dim=16)


def _learned_gradient(model):
    return LearnedGradient(2, slot_dim=model.slot_dim, hidden_dim=16)


RULES = {
    "soft_kmeans": lambda m: SoftKMeans(2, temperature=m.variance),
    "em": lambda m: EM(2),
    "gradient_ascent": lambda m: GradientAscent(2, step_size=0.05),
    "slot_attention": _slot_attention,
    "learned_gradient": _learned_gradient,
}
CASES = [
    (tiny_autoencoder, Reconstruction, rule)
    for rule in ("soft_kmeans", "em", "gradient_ascent", "slot_attention", "learned_gradient")
] + [
    (tiny_iodine, NegativeELBO, rule)
    for rule in ("gradient_ascent", "slot_attention", "learned_gradient")
]


@pytest.mark.parametrize(
    "make_model, make_objective, rule", CASES, ids=[f"{m.__name__}-{r}" for m, _, r in CASES]
)
def test_forward_and_gradients_with_every_rule(make_model, make_objective, rule):
    model = make_model()
    inner = RULES[rule](model)
    images, _ = squares(4)
    svi = NestedSVI(
        model,
        inner,
        make_objective(),
        pyro.optim.Adam({"lr": 1e-3}),
        iteration_weights="uniform",
        seed=0,
    )
    loss, result = svi.loss_and_result(images)
    # J recomputed from the trajectory the inner loop produced (uniform over λ_1..λ_T).
    x_enc = result.x_enc
    terms = [make_objective()(model, images, x_enc, s[0]).mean() for s in result.trajectory[1:]]
    assert len(terms) == 2
    if make_objective is Reconstruction:
        assert torch.allclose(loss, sum(terms) / 2, rtol=1e-5)
    else:  # one reparameterized sample per evaluation: compare the magnitude only
        assert abs(loss.item() - (sum(terms) / 2).item()) < 0.05 * abs(loss.item())
    grads = torch.autograd.grad(loss, svi.parameters(), allow_unused=True)
    named = dict(zip((n for n, _ in svi.named_parameters()), grads))
    assert all(g is None or torch.isfinite(g).all() for g in grads)
    decoder = [g for n, g in named.items() if n.startswith("model.decoder") and g is not None]
    assert decoder and max(g.abs().max() for g in decoder) > 0
    learned = [g for n, g in named.items() if n.startswith("inner.")]
    if rule in ("slot_attention", "learned_gradient"):
        assert learned and any(g is not None and g.abs().max() > 0 for g in learned)
    else:
        assert not learned
    if isinstance(model, SlotAutoencoder):  # the encoder is trained through J
        assert named["model.encoder.convs.0.weight"].abs().max() > 0


def test_iodine_rejects_closed_form_rules():
    with pytest.raises(CapabilityError):
        NestedSVI(tiny_iodine(), SoftKMeans(2), NegativeELBO(), pyro.optim.Adam({"lr": 1e-3}))
    # EM's M-step is derived from the trace at the first step, which names the culprit: the
    # continuous latent z (GeneralizedEM handles such models).
    svi = NestedSVI(tiny_iodine(), EM(2), NegativeELBO(), pyro.optim.Adam({"lr": 1e-3}))
    with pytest.raises(CapabilityError, match="latent site 'z'.*GeneralizedEM"):
        svi.step(squares(2)[0])


# ------------------------------------------------------------------------ tiny training
def _train(svi, images, held_out, num_updates):
    before = svi.evaluate_loss(held_out)
    for i in range(num_updates):
        svi.step(images[8 * (i % 4) : 8 * (i % 4) + 8])
    return before, svi.evaluate_loss(held_out)


def test_slot_autoencoder_training_lowers_reconstruction_error():
    torch.manual_seed(0)
    model = tiny_autoencoder()
    images, _ = squares(32, seed=1)
    held_out, _ = squares(16, seed=2)
    svi = NestedSVI(
        model,
        SoftKMeans(2, temperature=model.variance),
        Reconstruction(),
        pyro.optim.Adam({"lr": 1e-2}),
        seed=0,
    )
    before, after = _train(svi, images, held_out, 60)
    # Independent reference: the all-black image (the background) scores mean(x²) = 0.067;
    # 60 updates reach 0.061 (the objects' colours start to appear), a plateau until more
    # training separates the objects.
    black = held_out.pow(2).mean().item()
    assert after < 0.9 * before and after < 0.95 * black, (before, after, black)


def test_iodine_training_lowers_negative_elbo():
    torch.manual_seed(0)
    model = tiny_iodine()
    images, _ = squares(32, seed=1)
    held_out, _ = squares(16, seed=2)
    svi = NestedSVI(
        model,
        GradientAscent(2, step_size=0.1),
        NegativeELBO(),
        pyro.optim.Adam({"lr": 3e-3}),
        iteration_weights="linear",
        seed=0,
    )
    pyro.set_rng_seed(0)
    before, after = _train(svi, images, held_out, 60)
    assert after < 0.6 * before, (before, after)


def test_refinement_inputs_are_iodines_auxiliary_inputs(float64):
    """The stack against a direct computation; the encoding is equivariant in the slots."""
    from pyro_slots.inner import InnerProblem, LearnedGradient
    from pyro_slots.models import RefinementInputs

    torch.manual_seed(0)
    model = tiny_iodine().double()
    images, _ = squares(2)
    x = model.encode(images.double())
    slots = model.init_slots(x, 3, generator=torch.Generator().manual_seed(0))
    feats = RefinementInputs(out_dim=5, channels=4).double()
    stack = feats.inputs(model, x, slots)
    assert stack.shape == (2, 3, 13, SIZE, SIZE)
    _, rgb, masks = model.decode(slots)
    k, b, i, j = 1, 0, 4, 6  # one slot, one pixel, by hand
    pixel = images[b, :, i, j].double()
    loglik = torch.stack(
        [-0.5 * ((pixel - rgb[b, s, :, i, j]) ** 2).sum() / model.pixel_scale**2 for s in range(3)]
    )
    post = torch.softmax(masks[b, :, i, j].log() + loglik, 0)[k]
    expected = [*pixel, *rgb[b, k, :, i, j], masks[b, k, i, j], post, *(pixel - rgb[b, k, :, i, j])]
    expected += [-1 + 2 * i / (SIZE - 1), -1 + 2 * j / (SIZE - 1)]
    assert torch.allclose(stack[b, k, :, i, j], torch.stack([torch.as_tensor(v) for v in expected]))
    problem = InnerProblem(model, x)
    out = feats(problem, slots)
    perm = [2, 0, 1]
    assert out.shape == (2, 3, 5)
    assert torch.allclose(feats(problem, slots[:, perm]), out[:, perm], atol=1e-12)
    # wired into IODINE's refinement rule, its weights are trained with the rule
    rule = LearnedGradient(2, slot_dim=model.slot_dim, hidden_dim=8, features=feats, extra_dim=5)
    svi = NestedSVI(model, rule.double(), NegativeELBO(), pyro.optim.Adam({"lr": 1e-3}), seed=0)
    svi.loss_and_grads(images[:2].double())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in feats.parameters())
    with pytest.raises(TypeError, match="problem.model"):
        feats(InnerProblem(object(), x), slots)


def test_refinement_inputs_posterior_pooling_by_hand(float64):
    """pooling="posterior": the feature map's mean next to its average weighted by the slot's
    posterior mask, pooled by hand over the adaptive bins (floor/ceil bounds); equivariant."""
    import math

    from pyro_slots.inner import InnerProblem
    from pyro_slots.models import RefinementInputs

    torch.manual_seed(1)
    model = tiny_iodine().double()
    images, _ = squares(2)
    x = model.encode(images.double())
    slots = model.init_slots(x, 3, generator=torch.Generator().manual_seed(1))
    feats = RefinementInputs(out_dim=5, channels=4, pooling="posterior").double()
    problem = InnerProblem(model, x)
    out = feats(problem, slots)
    b, k = 1, 2
    stack = feats.inputs(model, x, slots)
    maps = feats.net(stack[b, k].unsqueeze(0))[0]  # (channels, h, w)
    post = stack[b, k, 7]  # image, rgb (3 + 3), mask, then the posterior mask
    (height, width), (h, w) = post.shape, maps.shape[-2:]
    cells = torch.zeros(h, w, dtype=post.dtype)
    for i in range(h):
        for j in range(w):
            rows = slice(i * height // h, math.ceil((i + 1) * height / h))
            cols = slice(j * width // w, math.ceil((j + 1) * width / w))
            cells[i, j] = post[rows, cols].mean()
    weighted = (maps * cells).sum((-2, -1)) / cells.sum()
    expected = feats.out(torch.cat([maps.mean((-2, -1)), weighted]))
    assert torch.allclose(out[b, k], expected, atol=1e-10)
    perm = [1, 2, 0]
    assert torch.allclose(feats(problem, slots[:, perm]), out[:, perm], atol=1e-12)
    with pytest.raises(ValueError, match="pooling"):
        RefinementInputs(pooling="max")


def test_first_order_warns_about_the_models_own_learned_slot_init():
    """With no ``init`` and no rule initializer, λ_0 comes from the model's ``slot_init``
    (the autoencoder's learnable GaussianInit, loc and log-scale of slot_dim each): first-order
    gradients leave exactly those 2 · slot_dim numbers untrained, and the warning counts them."""
    model = tiny_autoencoder()
    rule = _slot_attention(model)
    count = sum(p.numel() for p in model.slot_init.parameters())
    assert count == 2 * model.slot_dim
    with pytest.warns(UserWarning, match=f"none of the {count} trainable parameters of the slot "):
        NestedSVI(
            model, rule, Reconstruction(), pyro.optim.Adam({"lr": 1e-3}), gradient="first_order"
        )


@pytest.mark.parametrize("cls", ["SlotAutoencoder", "IODINE"])
def test_paper_size_at_a_lower_decoding_resolution_broadcasts_at_it(cls):
    """paper_size broadcast at the image's size whatever decoder_resolution: the convolutions
    ran on the full grid and only its top-left corner (positions up to 0.48) was kept. Its
    grid is the decoded resolution, as the plain constructor's default."""
    import pyro_slots.models as zoo

    model = getattr(zoo, cls).paper_size(image_size=32, num_slots=3, decoder_resolution=16)
    assert model.decoder.broadcast_resolution == (16, 16)
    assert model.decoder.decode_resolution == (16, 16)
    assert getattr(zoo, cls).paper_size(image_size=32).decoder.broadcast_resolution == (32, 32)
