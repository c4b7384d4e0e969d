"""AdaSlot's slot selection (models/slot_selection.py): SlotSelector, masked_softmax, the
``active_slots`` option of SlotAutoencoder, NestedSVI's ``slot_sparsity`` penalty and the
trainer's ``--slot-sparsity`` with its ``kept_slots`` metric."""

import copy
import json

import pyro
import pytest
import torch

from pyro_slots import NestedSVI
from pyro_slots.cli import main
from pyro_slots.inner import SoftKMeans
from pyro_slots.models import GaussianMixture, SlotSelector, masked_softmax
from pyro_slots.objectives import Reconstruction
from tests.conftest import tiny_autoencoder


def _by_first_coordinate(selector, scale):
    """Set the scorer to ``logit π_k = scale · λ_k[0]`` (hidden units ``relu(±λ_k[0])``)."""
    first, _, last = selector.scorer
    with torch.no_grad():
        for p in selector.parameters():
            p.zero_()
        first.weight[0, 0], first.weight[1, 0] = 1.0, -1.0
        last.weight[0, 0], last.weight[0, 1] = scale, -scale


def _slots_with_first_coordinates(first, dim, seed=0):
    g = torch.Generator().manual_seed(seed)
    slots = torch.randn(*first.shape, dim, generator=g, dtype=first.dtype)
    slots[..., 0] = first
    return slots


def _pi_by_hand(selector, slots):
    """``sigmoid(W_2 relu(W_1 λ + b_1) + b_2)`` from the scorer's weights."""
    first, _, last = selector.scorer
    hidden = torch.relu(slots @ first.weight.T + first.bias)
    return torch.sigmoid((hidden @ last.weight.T + last.bias)[..., 0])


# ------------------------------------------------------------- (a) hard mask = sliced slots
@pytest.mark.parametrize("training", [True, False])
def test_a_hard_mask_decodes_what_the_kept_slots_alone_decode(float64, training):
    """With every π in {0, 1} (logits ±100 or less), the decoded image, masks and the
    Reconstruction objective of every image equal those of the same decoder run on the kept
    slots only (the slots sliced, no selector); dropped masks are exactly 0; an image whose
    slots are all dropped keeps its most probable one (slot 1 below)."""
    model = tiny_autoencoder(active_slots=True).double()
    _by_first_coordinate(model.slot_selector, 100.0)
    model.train(training)
    first = torch.tensor([[1.0, -1.0, 1.0], [-1.0, -1.0, 1.0], [1.0, 1.0, 1.0], [-1.0, -0.6, -2.0]])
    kept = [[0, 2], [2], [0, 1, 2], [1]]
    slots = _slots_with_first_coordinates(first, model.slot_dim)
    x = torch.rand(4, 3, 12, 12, generator=torch.Generator().manual_seed(1), dtype=torch.float64)

    selection = model.slot_selector(slots)
    assert selection.num_kept.tolist() == [len(k) for k in kept]
    recon, rgb, masks = model.decode(slots)
    loss = Reconstruction()(model, x, None, slots)

    plain = copy.deepcopy(model)
    plain.slot_selector = None
    for n, keep in enumerate(kept):
        sliced = slots[n : n + 1, keep]
        recon_n, rgb_n, masks_n = plain.decode(sliced)
        torch.testing.assert_close(recon[n], recon_n[0], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(rgb[n, keep], rgb_n[0], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(masks[n, keep], masks_n[0], rtol=1e-12, atol=1e-12)
        dropped = [k for k in range(3) if k not in keep]
        assert torch.equal(masks[n, dropped], torch.zeros_like(masks[n, dropped]))
        by_hand = (recon_n[0] - x[n]).pow(2).mean()
        assert loss[n].item() == pytest.approx(by_hand.item(), rel=1e-12)


def test_masked_softmax_is_the_softmax_of_the_kept_logits_and_its_gradient_the_surrogates(
    float64,
):
    """With a hard mask it is the softmax with the dropped logits at -inf; its gradient in
    (logits, keep) is that of the function (central finite differences, gradcheck), so the
    straight-through gradient reaches the mask. A row keeping nothing or a
    misshaped mask is refused."""
    g = torch.Generator().manual_seed(0)
    logits = 3 * torch.randn(2, 4, 3, 2, generator=g, dtype=torch.float64)
    keep = torch.tensor([[1.0, 0.0, 1.0, 0.0], [0.0, 0.0, 0.0, 1.0]])
    masks = masked_softmax(logits, keep)
    infinite = logits.masked_fill(keep[..., None, None] == 0, -torch.inf)
    torch.testing.assert_close(masks, torch.softmax(infinite, 1), rtol=1e-12, atol=1e-14)
    logits.requires_grad_(True)
    keep.requires_grad_(True)
    assert torch.autograd.gradcheck(masked_softmax, (logits, keep))
    with pytest.raises(ValueError, match="keep: every datapoint must keep at least one slot"):
        masked_softmax(logits, torch.tensor([[1.0, 0, 0, 0], [0, 0, 0, 0]]))
    with pytest.raises(ValueError, match=r"keep: expected shape \(batch, K\) = \(2, 4\)"):
        masked_softmax(logits, torch.ones(2, 3))


def test_masked_softmax_derivative_in_a_dropped_dominant_slots_mask_is_bounded(float64):
    """Slot 1 is dropped but its logit dominates the pixel by 20: the derivative of the masks in
    z is the analytic one of the capped surrogate α_k = z_k e_k / Σ z_j e_j, e = exp(min(l, m))
    with m the largest kept logit (by hand below), at most 1 in size; the uncapped surrogate's
    would be e^20 ≈ 5e8."""
    logits = torch.tensor([[[0.5], [20.7], [0.7], [-1.0]]])  # (1, K=4, 1 pixel)
    keep = torch.tensor([[1.0, 0.0, 1.0, 1.0]], requires_grad=True)
    jac = torch.autograd.functional.jacobian(lambda z: masked_softmax(logits, z)[0, :, 0], keep)
    m = 0.7  # the largest kept logit
    e = torch.exp(torch.minimum(logits[0, :, 0], torch.tensor(m)))
    z = keep.detach()[0]
    s = (z * e).sum()
    expected = torch.diag(e) / s - (z * e)[:, None] * e[None, :] / s**2  # d α_j / d z_k
    torch.testing.assert_close(jac[:, 0, :], expected, rtol=1e-12, atol=1e-14)
    assert jac.abs().max() <= 1.0
    assert jac[:, 0, 1].abs().max() < 0.5  # the dropped slot's column, e^20-sized uncapped


# -------------------------------------------------------- (b) the straight-through gradient
def test_b_straight_through_gradient_is_the_relaxed_samples(float64):
    """In training the mask is hard (1[y > 1/2], the top slot where none is kept) and its
    gradient w.r.t. the scorer's weights is that of the relaxed sample
    y = softmax((log π + g_keep, log(1 - π) + g_drop) / τ)[keep] with the same Gumbel noise:
    by autograd on y computed by hand from the weights, and by central finite differences."""
    torch.manual_seed(0)
    selector = SlotSelector(5, hidden_dim=7, temperature=0.7).double()
    g = torch.Generator().manual_seed(3)
    slots = torch.randn(4, 3, 5, generator=g, dtype=torch.float64)
    noise = selector.gumbel_noise((4, 3, 2), torch.float64, generator=g)
    weights = torch.randn(4, 3, generator=g, dtype=torch.float64)
    params = list(selector.parameters())

    def relaxed():
        pi = _pi_by_hand(selector, slots)
        logp = torch.stack([torch.log(pi), torch.log1p(-pi)], -1)
        return torch.softmax((logp + noise) / 0.7, -1)[..., 0]

    selection = selector(slots, noise=noise)
    y = relaxed()
    hard = y > 0.5
    none = ~hard.any(-1)
    hard[none, selection.probs[none].argmax(-1)] = True
    assert torch.equal(selection.keep, hard.double())
    st = torch.autograd.grad((weights * selection.keep).sum(), params)
    surrogate = torch.autograd.grad((weights * y).sum(), params)
    for a, b in zip(st, surrogate):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)

    bias = selector.scorer[2].bias  # the last layer's: every slot's logit moves
    eps = 1e-6
    with torch.no_grad():
        bias += eps
        up = (weights * relaxed()).sum().item()
        bias -= 2 * eps
        down = (weights * relaxed()).sum().item()
        bias += eps
    assert st[-1].item() == pytest.approx((up - down) / (2 * eps), rel=1e-6)
    with pytest.raises(ValueError, match=r"noise: expected Gumbel draws of shape \(4, 3, 2\)"):
        selector(slots, noise=noise[..., 0])


def test_selector_noise_comes_from_its_generator_and_the_state_dict_carries_it():
    """Two draws differ; a selector loaded from another's state_dict draws the same next mask
    (the generator's state is the module's extra state)."""
    torch.manual_seed(0)
    selector = SlotSelector(4, seed=5)
    _by_first_coordinate(selector, 0.0)  # π = 1/2: the noise decides
    slots = torch.randn(64, 6, 4)
    first = selector(slots).keep
    state = copy.deepcopy(selector.state_dict())
    second = selector(slots).keep
    assert not torch.equal(first, second)
    other = SlotSelector(4, seed=9)
    other.load_state_dict(state)
    assert torch.equal(other(slots).keep, second)
    with pytest.raises(ValueError, match="temperature: expected a finite number > 0"):
        SlotSelector(4, temperature=0.0)
    with pytest.raises(ValueError, match=r"slots: expected shape \(2, num_slots, 4\)"):
        selector(torch.randn(2, 3, 5))


# ---------------------------------------------------------------------- (c) the penalty
def test_c_penalty_is_lambda_times_the_mean_keep_probability(float64):
    """J(λ) - J(0) = λ · mean_{n,k} π(λ*) with π from the scorer's weights at the final slots;
    in evaluation mode (no straight-through path) its gradient w.r.t. the last bias is
    λ · mean π(1 - π). Without a selector or with λ < 0 the option is refused."""
    torch.manual_seed(0)
    model = tiny_autoencoder(active_slots=True).double().eval()
    x = torch.rand(3, 3, 12, 12, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    lam = 0.37

    def svi(**kwargs):
        rule = SoftKMeans(num_steps=2, temperature=model.variance)
        return NestedSVI(model, rule, Reconstruction(), pyro.optim.Adam({"lr": 1e-3}), seed=4,
                         **kwargs)  # fmt: skip

    loss, result = svi(slot_sparsity=lam).loss_and_result(x)
    base = svi().loss(x)
    with torch.no_grad():
        pi = _pi_by_hand(model.slot_selector, result.slots[0])
    assert (loss - base).item() == pytest.approx(lam * pi.mean().item(), rel=1e-10)
    (grad,) = torch.autograd.grad(loss, model.slot_selector.scorer[2].bias)
    assert grad.item() == pytest.approx(lam * (pi * (1 - pi)).mean().item(), rel=1e-10)
    with pytest.raises(ValueError, match="slot_sparsity: expected a finite number >= 0"):
        svi(slot_sparsity=-1.0)
    gmm = GaussianMixture(3, 2)
    with pytest.raises(ValueError, match="slot_sparsity: .*GaussianMixture has none"):
        NestedSVI(gmm, SoftKMeans(2), Reconstruction(), pyro.optim.Adam({}), slot_sparsity=0.1)


# ------------------------------------------------------------------ (d) evaluation mode
def test_d_evaluation_keeps_the_slots_above_one_half_deterministically(float64):
    """In evaluation mode two calls agree, the kept slots are exactly those with π > 1/2, and an
    image with none keeps its most probable slot; the model's masks are 0 on the others."""
    model = tiny_autoencoder(active_slots=True).double().eval()
    _by_first_coordinate(model.slot_selector, 1.0)
    first = torch.tensor([[0.3, -0.2, 0.1], [-0.3, -0.1, -0.5], [0.05, 0.2, -0.05]])
    slots = _slots_with_first_coordinates(first, model.slot_dim)
    pi = torch.sigmoid(first)
    expected = (pi > 0.5).double()
    expected[1, 1] = 1.0  # none above 1/2: the most probable
    selection = model.slot_selector(slots)
    torch.testing.assert_close(selection.probs, pi, rtol=1e-12, atol=0)
    assert torch.equal(selection.keep, expected)
    assert torch.equal(model.slot_selector(slots).keep, selection.keep)
    assert selection.num_kept.tolist() == [2, 1, 2]
    masks = model.decode(slots)[2]
    assert torch.equal(model.decode(slots)[2], masks)
    assert torch.equal(masks.flatten(2).amax(-1) > 0, expected.bool())


def test_evaluate_loss_is_the_evaluation_mode_loss_and_restores_the_training_mode(float64):
    """NestedSVI.evaluate_loss on a model in training mode is J of the same model in evaluation
    mode (kept slots thresholded at 1/2, no Gumbel draw: the selector's generator does not
    move) with the same outer draws; the model is back in training mode afterwards."""
    torch.manual_seed(0)
    model = tiny_autoencoder(active_slots=True).double().train()
    x = torch.rand(3, 3, 12, 12, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    rule = SoftKMeans(num_steps=2, temperature=model.variance)
    svi = NestedSVI(model, rule, Reconstruction(), pyro.optim.Adam({"lr": 1e-3}), seed=4,
                    slot_sparsity=0.1)  # fmt: skip
    noise = model.slot_selector.get_extra_state().clone()
    value = svi.evaluate_loss(x)
    assert model.training and model.slot_selector.training
    assert torch.equal(model.slot_selector.get_extra_state(), noise)
    model.eval()
    expected = svi.loss(x, differentiable=False).item()  # the generator was restored: same λ_0
    assert value == pytest.approx(expected, rel=1e-12)
    model.train()
    assert svi.loss(x, differentiable=False).item() != pytest.approx(expected, rel=1e-6)


def test_shard_draws_keeps_this_ranks_rows_of_the_global_draw():
    """After shard_draws(rank, 2), a draw of (4, 3, 2) is rows 4r..4r+3 of the (8, 3, 2) draw
    an unsharded selector with the same generator state makes; a bad rank is refused."""
    whole, ranks = SlotSelector(5, seed=7), [SlotSelector(5, seed=7) for _ in range(2)]
    expected = whole.gumbel_noise((8, 3, 2))
    for rank, selector in enumerate(ranks):
        selector.shard_draws(rank, 2)
        assert torch.equal(selector.gumbel_noise((4, 3, 2)), expected[4 * rank : 4 * rank + 4])
    with pytest.raises(ValueError, match="rank: expected 0 <= rank < 2, got 2"):
        whole.shard_draws(2, 2)


def test_training_keeps_the_top_slot_when_every_slot_is_dropped(float64):
    """Keep probabilities near 0 drop every slot: each image keeps exactly its top slot."""
    torch.manual_seed(0)
    selector = SlotSelector(4)
    _by_first_coordinate(selector, 100.0)
    first = -1 - torch.rand(5, 3)
    selection = selector(_slots_with_first_coordinates(first, 4))
    assert torch.equal(selection.keep, torch.eye(3)[first.argmax(-1)])


# ---------------------------------------------------------------- (e) the command line
#: A tiny slot-autoencoder run: two updates on 16x16 shapes.
TINY = ["train", "--model", "slot-autoencoder", "--dataset", "shapes", "--image-size", "16",
        "--num-slots", "4", "--slot-dim", "8", "--steps", "2", "--batch-size", "2",
        "--eval-every", "1", "--eval-size", "2", "--test-size", "3", "--checkpoint-every", "2",
        "--threads", "1", "--no-progress", "--no-pictures"]  # fmt: skip


def test_e_slot_sparsity_trains_and_reports_the_kept_slots(tmp_path, capsys):
    """``--slot-sparsity`` writes kept_slots within [1, K] into every validation record and
    test.json; ``pyro-slots evaluate`` on the same held-out data scores the same number."""
    out = tmp_path / "run"
    assert main([*TINY, "--slot-sparsity", "0.1", "--out", str(out)]) == 0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    held_out = [r for r in records if r["split"] == "validation"]
    assert len(held_out) == 2 and all(1 <= r["kept_slots"] <= 4 for r in held_out)
    final = json.loads((out / "test.json").read_text())["metrics"]
    assert 1 <= final["kept_slots"] <= 4
    capsys.readouterr()
    assert main(["evaluate", str(out), "--json", "--num", "3"]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert metrics["kept_slots"] == pytest.approx(final["kept_slots"], abs=1e-12)
    assert metrics["J"] == pytest.approx(final["J"], rel=1e-6)


@pytest.mark.parametrize(
    "argv, message",
    [
        ([*TINY, "--slot-sparsity", "-1"],
         "slot_sparsity: expected a finite number >= 0, got -1.0"),
        ([*TINY, "--slot-sparsity", "nan"],
         "slot_sparsity: expected a finite number >= 0, got nan"),
        (["train", "--model", "gmm", "--steps", "1", "--slot-sparsity", "0.1"],
         "slot_sparsity: only for --model slot-autoencoder"),
    ],
)  # fmt: skip
def test_e_bad_slot_sparsity_exits_naming_the_option(tmp_path, capsys, argv, message):
    """A negative or non-finite value, or a model without a decoder mixture to select from,
    exits with status 2 and one line naming the option."""
    argv = [*argv, "--out", str(tmp_path / "run")]
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("pyro-slots: error: ") and err.count("\n") == 1, err
    assert message in err
