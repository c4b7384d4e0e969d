"""Reinitialize: dead and duplicate slots redrawn inside the inner loop."""

import math

import numpy as np
import pytest
import torch

import pyro_slots as ps
import pyro_slots.inner.reinit as reinit_module
from pyro_slots.inner import (
    EM,
    GradientAscent,
    InnerProblem,
    InnerState,
    Reinitialize,
    Safeguarded,
    decoder_masks,
    duplicate_mask,
    posterior_masks,
)
from pyro_slots.models import GaussianMixture
from pyro_slots.validation import CapabilityError


def _clusters(num_sets=4, per_cluster=30, seed=0):
    """Three clusters at (-6, 0), (0, 0), (6, 0) with std 0.5 in every set."""
    g = torch.Generator().manual_seed(seed)
    centers = torch.tensor([[-6.0, 0.0], [0.0, 0.0], [6.0, 0.0]])
    x = centers.repeat_interleave(per_cluster, 0) + 0.5 * torch.randn(
        num_sets, 3 * per_cluster, 2, generator=g
    )
    return x, centers


def _slots(model, locs):
    """Slots of unit variance and equal weights at ``locs`` ``(batch, K, 2)``."""
    return model.slot_spec.pack(
        {"loc": locs, "log_scale": torch.zeros_like(locs), "logit": torch.zeros(locs.shape[:2])}
    )


def _stuck(batch):
    """Two slots on the left cluster (duplicates), one far away (dead): the middle and right
    clusters are left to nobody."""
    locs = torch.tensor([[-6.0, 0.1], [-6.0, 0.1], [0.0, 60.0]])
    return locs.expand(batch, -1, -1).clone()


def test_duplicate_mask_keeps_the_first_of_each_group():
    features = torch.tensor([[[1.0, 0.0], [2.0, 0.0], [0.0, 1.0], [0.1, 1.0]]])
    # slot 1 is parallel to slot 0; slot 3 is at cos 0.995 to slot 2
    assert duplicate_mask(features, 0.99).tolist() == [[False, True, False, True]]
    assert duplicate_mask(features, 0.999).tolist() == [[False, True, False, False]]
    assert ps.diagnostics.duplicate_slots(features, 0.99).tolist() == [2]
    # Slot 0 dead: slot 1 (parallel to it) is the live one of its group, not a duplicate
    dead = torch.tensor([[True, False, False, False]])
    assert duplicate_mask(features, 0.99, dead).tolist() == [[False, False, False, True]]


def test_a_live_slot_is_not_redrawn_as_the_duplicate_of_a_dead_one(float64):
    """Two components collapsed onto one cluster, weights 0.004 and 0.496: the first is dead,
    the second has the same (scaled) responsibilities. Both were redrawn, the cluster lost its
    only live slot and the ELBO fell (111 -> 12 after one EM step); only the dead one is."""
    g = torch.Generator().manual_seed(0)
    x = torch.cat(
        [
            torch.randn(1, 50, 2, generator=g) * 0.1 + torch.tensor([-3.0, 0.0]),
            torch.randn(1, 50, 2, generator=g) * 0.1 + torch.tensor([3.0, 0.0]),
        ],
        1,
    )
    gmm = GaussianMixture(3, 2)
    slots = gmm.slot_spec.pack(
        {
            "loc": torch.tensor([[[-3.0, 0.0], [-3.0, 0.0], [3.0, 0.0]]]),
            "log_scale": torch.full((1, 3, 2), math.log(0.1)),
            "logit": torch.tensor([[0.004, 0.496, 0.5]]).log(),
        }
    )
    problem = InnerProblem(gmm, x)
    rule = Reinitialize(EM(5), ps.GaussianInit(gmm.slot_dim))
    assert rule.replaced(problem, slots).tolist() == [[True, False, False]]
    state, _ = rule.step(rule.init(problem, slots)._replace(step=1), problem)
    assert problem.elbo(state.slots).item() >= problem.elbo(slots).item()


def _seeded(seed, step, block):
    """The generator of block ``block`` of the draw at ``step`` (Reinitialize.draw)."""
    return torch.Generator().manual_seed(reinit_module._block_seed(seed, step, block))


def test_block_seeds_are_distinct_63_bit_ints():
    seeds = {reinit_module._block_seed(s, t, b) for s in range(4) for t in range(8)
             for b in range(16)}  # fmt: skip
    assert len(seeds) == 4 * 8 * 16
    assert all(0 <= v < 2**63 for v in seeds)
    # SplitMix64's finalizer of 0 is 0, the only fixed point: (0, 0, 0) maps there
    assert reinit_module._block_seed(0, 0, 0) == 0 and reinit_module._block_seed(0, 0, 1) > 0


def test_the_dead_and_duplicate_slots_are_redrawn_before_the_rule_steps(float64):
    """At λ_1 the duplicate (slot 1, the same responsibilities as slot 0) and the dead slot
    (slot 2, responsibilities ~0) are replaced by the initializer's draws from a generator
    seeded by ``seed``, the step and the block; slot 0 is kept; the EM step then runs from the
    patched slots."""
    x, _ = _clusters()
    model = GaussianMixture(3, 2)
    init = ps.GaussianInit(model.slot_dim, learnable=False)
    rule = Reinitialize(EM(1), init=init, seed=5)
    problem = InnerProblem(model, model.encode(x))
    slots = _slots(model, _stuck(4))
    state = rule.init(problem, slots)
    assert rule.replaced(problem, slots).tolist() == [[False, True, True]] * 4
    new, _ = rule.step(InnerState(slots, 1, state.aux), problem)

    fresh = init(4, 3, generator=_seeded(5, 1, 0))
    patched = slots.clone()
    patched[:, 1:] = fresh[:, 1:]
    expected, _ = EM(1).step(EM(1).init(problem, patched), problem)
    torch.testing.assert_close(new.slots, expected.slots)
    # step 0 is never patched: the rule's own step from λ_0
    first, _ = rule.step(InnerState(slots, 0, state.aux), problem)
    torch.testing.assert_close(first.slots, EM(1).step(InnerState(slots, 0), problem)[0].slots)
    # rank 1 of 2 (shard_draws): the rows 4..7 of the draw for the global batch of 8
    sharded = Reinitialize(EM(1), init=init, seed=5)
    sharded.shard_draws(1, 2)
    sharded.init(problem, slots)
    new, _ = sharded.step(InnerState(slots, 1, ()), problem)
    patched[:, 1:] = init(8, 3, generator=_seeded(5, 1, 0))[4:, 1:]
    expected, _ = EM(1).step(EM(1).init(problem, patched), problem)
    torch.testing.assert_close(new.slots, expected.slots)


def _box_init(model):
    def init(batch, num_slots, generator=None, dtype=None):
        """Unit-variance slots of equal weight, uniform over the data's box."""
        u = torch.rand(batch, num_slots, 2, generator=generator, dtype=dtype)
        return _slots(model, u * torch.tensor([14.0, 2.0], dtype=dtype) - torch.tensor([7.0, 1.0]))

    return init


def test_reinitialize_frees_em_from_a_stuck_start(float64):
    """EM from the stuck start keeps two slots on one cluster and a dead one forever (its ELBO
    stays far below that of EM started at the true centers, the global optimum of these
    separated clusters); with re-initialization every set climbs out of it."""
    x, centers = _clusters()
    model = GaussianMixture(3, 2)
    x_enc = model.encode(x)
    init = _box_init(model)
    stuck = _slots(model, _stuck(4))
    plain = ps.refine(model, x, EM(60), slots=stuck).elbo[0]
    reinit = ps.refine(model, x, Reinitialize(EM(60), init=init, seed=1), slots=stuck).elbo[0]
    best = ps.refine(model, x, EM(60), slots=_slots(model, centers.expand(4, -1, -1))).elbo[0]
    num_points = x_enc.shape[1]
    assert ((best - plain) / num_points > 0.5).all()  # stuck: half a nat per point and more
    # Every set leaves the stuck start, by more than 0.1 nat per point, and none passes the
    # optimum; half of them reach it. Redrawing does not cure every local optimum: a slot spread
    # over two clusters while two others split the third is neither dead nor a duplicate.
    assert ((reinit - plain) / num_points > 0.1).all()
    assert (reinit <= best + 1e-9 * num_points).all()
    reached = (best - reinit).abs() < 1e-6 * num_points
    assert reached.sum() >= 2


@pytest.mark.parametrize("block", [1024, 4])
def test_chunks_and_early_stopped_neighbours_do_not_change_a_datapoints_replacements(
    block, float64, monkeypatch
):
    """A datapoint's replacement slots are its rows of the whole batch's draw: refine in chunks
    (restarts included) gives the unchunked result, and a datapoint that never stopped ends
    where it ends when nobody stops. Three sets start at the true centres (they stop after a
    few steps with elbo_tol), three stuck (slots redrawn for more steps). Also with draws in
    blocks of 4 rows (of the 12 rows of 2 restarts × 6 sets), so chunks span blocks."""
    monkeypatch.setattr(reinit_module, "DRAW_BLOCK", block)
    x, centers = _clusters(num_sets=6, seed=1)
    model = GaussianMixture(3, 2)
    stuck = _slots(model, _stuck(6))
    stuck[:3] = _slots(model, centers.expand(3, -1, -1))
    start = torch.stack([stuck, stuck.flip(0)])  # 2 restarts: the stuck sets differ
    rule = Reinitialize(EM(25), init=_box_init(model), seed=3)
    whole = ps.refine(model, x, rule, slots=start, num_restarts=2)
    for chunk_size in (1, 4):
        chunked = ps.refine(model, x, rule, slots=start, num_restarts=2, chunk_size=chunk_size)
        torch.testing.assert_close(chunked.slots, whole.slots, rtol=0, atol=1e-12)
    # the replacements mattered: without them the stuck sets stay half a nat per point lower
    plain = ps.refine(model, x, EM(25), slots=start, num_restarts=2)
    assert ((whole.elbo - plain.elbo).max(0).values[3:] / x.shape[1] > 0.1).all()

    # Stopping: every datapoint ends where the run without stopping was at its last step.
    # (a slot is dead below 0.3 of the points: the stuck sets are redrawn for several steps)
    rule = Reinitialize(EM(25), init=_box_init(model), seed=3, dead_threshold=0.3)
    path = ps.refine(model, x, rule, slots=start[0], keep_trajectory=True).trajectory
    stopped = ps.refine(model, x, rule, slots=start[0], elbo_tol=1e-5)
    steps = stopped.steps[0].tolist()
    assert max(steps[:3]) < min(steps[3:]) and max(steps) > 8  # stuck sets go on alone
    for n, t in enumerate(steps):
        torch.testing.assert_close(stopped.slots[0, n], path[t][0, n], rtol=0, atol=1e-12)


def test_inner_problem_rows_are_checked():
    model = GaussianMixture(3, 2)
    x = torch.zeros(4, 5, 2)
    with pytest.raises(ValueError, match="rows, num_rows: give both"):
        InnerProblem(model, x, rows=torch.arange(4))
    with pytest.raises(ValueError, match=r"rows: expected one index per datapoint \(4\), got 3"):
        InnerProblem(model, x, rows=torch.arange(3), num_rows=8)
    with pytest.raises(ValueError, match=r"rows: expected indices in \[0, 4\)"):
        InnerProblem(model, x, rows=torch.arange(4) + 1, num_rows=4)
    with pytest.raises(ValueError, match="rows: expected distinct indices"):
        InnerProblem(model, x, rows=torch.tensor([0, 2, 2, 3]), num_rows=4)
    problem = InnerProblem(model, x, rows=torch.tensor([5, 1, 7, 2]), num_rows=8)
    assert problem.row_index().tolist() == [5, 1, 7, 2]
    assert problem.subset(torch.tensor([2, 0])).row_index().tolist() == [7, 5]
    assert InnerProblem(model, x).row_index().tolist() == [0, 1, 2, 3]


def test_a_draw_is_the_rows_of_the_blocks_and_draws_only_the_blocks_it_touches(monkeypatch):
    """Reinitialize.draw with blocks of 4 rows in a batch of 10 (blocks 0-3, 4-7, 8-9): any
    rows, in any order, are those rows of the three blocks' draws concatenated, and only the
    blocks holding them are drawn."""
    monkeypatch.setattr(reinit_module, "DRAW_BLOCK", 4)
    sizes = []

    def init(batch, num_slots, generator=None, dtype=None):
        sizes.append(batch)
        return torch.randn(batch, num_slots, 3, generator=generator, dtype=dtype)

    rule = Reinitialize(EM(1), init=init, seed=9)
    whole = torch.cat([init(n, 2, generator=_seeded(9, 6, b)) for b, n in enumerate((4, 4, 2))])
    sizes.clear()
    torch.testing.assert_close(rule.draw(torch.arange(10), 10, 2, step=6), whole)
    assert sizes == [4, 4, 2]
    rows = torch.tensor([9, 1, 8, 2])
    sizes.clear()
    torch.testing.assert_close(rule.draw(rows, 10, 2, step=6), whole[rows])
    assert sizes == [4, 2]  # block 1 is not drawn
    assert not torch.equal(rule.draw(rows, 10, 2, step=7), whole[rows])  # a new step, new draws


def test_reinitialize_refuses_a_model_without_assignments_and_a_rule_without_init():
    model = GaussianMixture(3, 2)
    model.assignment_site = None
    with pytest.raises(CapabilityError, match="Reinitialize needs the slots' responsibilities"):
        Reinitialize(GradientAscent(1), init=ps.GaussianInit(5)).check_model(model)
    with pytest.raises(ValueError, match="init: EM has no slot_init"):
        Reinitialize(EM(1))
    with pytest.raises(ValueError, match="duplicate_threshold"):
        Reinitialize(EM(1), init=ps.GaussianInit(5), duplicate_threshold=0)
    # a share of the measurements: above 1 every slot is dead at every step
    with pytest.raises(
        ValueError, match=r"dead_threshold: a share of the measurements in \[0, 1\]"
    ):
        Reinitialize(EM(1), init=ps.GaussianInit(5), dead_threshold=1.5)
    # replacements are drawn without the datapoints (an amortized one crashed at the first
    # redraw, in the loop)
    amortized = ps.AmortizedInit(2, 3, 5)
    with pytest.raises(ValueError, match="init: replacements are drawn without the datapoints"):
        Reinitialize(EM(1), init=amortized)
    # Safeguarded's merit would go stale at a redraw (it kept redrawn slots the ELBO of -1048
    # as 116.9): the other nesting is the one that works
    with pytest.raises(ValueError, match=r"Safeguarded\(Reinitialize\(rule\)\)"):
        Reinitialize(Safeguarded(EM(1)), init=ps.GaussianInit(5))
    Safeguarded(Reinitialize(EM(1), init=ps.GaussianInit(5)))
    with pytest.raises(ValueError, match="rank: expected 0 <= rank < 2, got 2"):
        Reinitialize(EM(1), init=ps.GaussianInit(5)).shard_draws(2, 2)


def test_trainer_wraps_the_rule_and_draws_from_the_runs_initializer(tmp_path):
    """--reinitialize: the trained rule is Reinitialize(rule) drawing from the model's own
    initializer (slot autoencoder) or the learned one (gmm); its refinement equals the wrapper
    built by hand; k-means++ seeds (gmm --init model) have nothing to redraw from."""
    from pyro_slots.cli.config import ConfigError, TrainConfig
    from pyro_slots.cli.registry import build, resolve
    from pyro_slots.inner import SlotAttention

    images = build(resolve(TrainConfig(model="slot-autoencoder", dataset="tetrominoes",
                                       slot_dim=8, reinitialize=True)))  # fmt: skip
    assert isinstance(images.inner, Reinitialize) and isinstance(images.inner.rule, SlotAttention)
    assert images.inner.replacement is images.model.slot_init
    assert images.inner.masks is decoder_masks
    attention = build(resolve(TrainConfig(model="slot-autoencoder", dataset="tetrominoes",
                                          slot_dim=8, reinitialize=True,
                                          reinitialize_masks="attention")))  # fmt: skip
    assert attention.inner.masks == attention.inner.rule.attention_masks
    points = build(resolve(TrainConfig(model="gmm", inner="em", init="learned", reinitialize=True)))
    assert points.inner.replacement is points.init and points.inner.masks is posterior_masks
    x = points.stream.batch(0).x[:4]
    by_hand = Reinitialize(EM(5), init=points.init, seed=0)
    a = ps.refine(points.model, x, points.inner, init=points.init, seed=3).slots
    b = ps.refine(points.model, x, by_hand, init=points.init, seed=3).slots
    torch.testing.assert_close(a, b)
    with pytest.raises(ConfigError, match="reinitialize: --model gmm .* no slot initializer"):
        build(resolve(TrainConfig(model="gmm", inner="slot-attention", init="model",
                                  reinitialize=True)))  # fmt: skip


def test_decoder_masks_flag_a_slot_that_draws_what_another_draws():
    """With masks=decoder_masks the duplicates and dead slots are judged on the decoder's masks:
    a slot equal to an earlier one draws the same mask (a duplicate, whatever the feature
    mixture's posterior says), and a slot is dead when its mean mask, computed here from
    model.decode directly, is under the threshold."""
    from pyro_slots.inner import SlotAttention
    from pyro_slots.models import SlotAutoencoder

    torch.manual_seed(0)
    model = SlotAutoencoder(image_size=16, num_slots=4, slot_dim=8)
    x = torch.rand(3, 3, 16, 16)
    problem = InnerProblem(model, model.encode(x))
    slots = torch.randn(3, 4, 8)
    slots[:, 2] = slots[:, 0]  # slot 2 repeats slot 0 in every image
    rule = Reinitialize(SlotAttention(num_steps=1, slot_dim=8, input_dim=8),
                        init=ps.GaussianInit(8), masks=decoder_masks)  # fmt: skip
    rule.check_model(model)
    with torch.no_grad():
        masks = model.decode(slots)[2].flatten(2).double().numpy()  # (3, 4, 256)
    share = masks.mean(-1)
    unit = masks / np.linalg.norm(masks, axis=-1, keepdims=True)
    cos = np.einsum("bkn,bjn->bkj", unit, unit)
    for duplicate in (0.95, 0.999999):
        for dead in (0.0, float(share.min()) + 1e-6):
            rule.dead_threshold, rule.duplicate_threshold = dead, duplicate
            expected = share < dead
            for k in range(4):  # brute force: a slot at cosine > threshold with an earlier one
                expected[:, k] |= (cos[:, k, :k] > duplicate).any(-1)
            assert torch.equal(rule.replaced(problem, slots), torch.from_numpy(expected))
            assert expected[:, 2].all()  # the repeated slot, at any threshold
            if (duplicate, dead) == (0.999999, 0.0):
                assert expected.sum() == 3  # nothing but the repeated slot
    with pytest.raises(CapabilityError, match="needs the decoder's masks: GaussianMixture"):
        Reinitialize(EM(1), init=ps.GaussianInit(5), masks=decoder_masks).check_model(
            GaussianMixture(3, 2)
        )
    with pytest.raises(TypeError, match="masks: expected a function masks"):
        Reinitialize(EM(1), init=ps.GaussianInit(5), masks="decoder")


def _layer_norm(a):
    return (a - a.mean(-1, keepdims=True)) / np.sqrt(a.var(-1, keepdims=True) + 1e-5)


@pytest.mark.parametrize("num_heads", [1, 2])
def test_attention_masks_are_slot_attentions_softmax_over_slots(num_heads, float64):
    """SlotAttention.attention_masks: softmax over the slots of LN(s) W_q (LN(x) W_k)^T / √d
    (per head, then averaged over the heads) plus eps, computed here in numpy from the weights;
    a repeated slot attends exactly as the one it repeats, so Reinitialize(masks=...) flags it."""
    from pyro_slots.inner import SlotAttention

    torch.manual_seed(1)
    rule = SlotAttention(1, slot_dim=8, input_dim=8, hidden_dim=8, num_heads=num_heads,
                         encoder=False, slot_init=ps.GaussianInit(8))  # fmt: skip
    for norm in (rule.norm_slots, rule.norm_inputs):  # LayerNorms away from (1, 0)
        torch.nn.init.normal_(norm.weight)
        torch.nn.init.normal_(norm.bias)
    model = GaussianMixture(4, 8)
    x, slots = torch.randn(2, 10, 8), torch.randn(2, 4, 8)
    slots[:, 3] = slots[:, 1]
    problem = InnerProblem(model, x)
    got = rule.attention_masks(problem, slots)
    p = {name: t.detach().numpy() for name, t in rule.named_parameters()}
    s = _layer_norm(slots.numpy()) * p["norm_slots.weight"] + p["norm_slots.bias"]
    n = _layer_norm(x.numpy()) * p["norm_inputs.weight"] + p["norm_inputs.bias"]
    q, k = s @ p["to_q.weight"].T, n @ p["to_k.weight"].T  # (B, K, d), (B, M, d)
    head = 8 // num_heads
    expected = 0
    for h in range(num_heads):
        part = slice(h * head, (h + 1) * head)
        logits = np.einsum("bkd,bmd->bkm", q[..., part], k[..., part]) / np.sqrt(head)
        e = np.exp(logits - logits.max(1, keepdims=True))
        expected = expected + (e / e.sum(1, keepdims=True) + rule.eps) / num_heads
    np.testing.assert_allclose(got.detach().numpy(), expected, rtol=1e-10, atol=1e-12)
    unit = expected / np.linalg.norm(expected, axis=-1, keepdims=True)
    cos = np.einsum("bkn,bjn->bkj", unit, unit)
    for duplicate in (0.95, 0.999999):
        wrapped = Reinitialize(rule, masks=rule.attention_masks, duplicate_threshold=duplicate,
                               dead_threshold=0.1)  # fmt: skip
        flagged = expected.mean(-1) < 0.1
        for j in range(4):  # brute force: a slot at cosine > threshold with an earlier one
            flagged[:, j] |= (cos[:, j, :j] > duplicate).any(-1)
        assert torch.equal(wrapped.replaced(problem, slots), torch.from_numpy(flagged))
        assert flagged[:, 3].all()  # the repeated slot
