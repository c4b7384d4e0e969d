"""Scenes over time: the moving-shapes clips, the video metrics on hand-built clips whose
correct tracking is known, and the inner loop carried from frame to frame."""

import numpy as np
import pytest
import torch
from sklearn.metrics import adjusted_rand_score

import pyro_slots as ps
from pyro_slots.data import generate_moving_shapes, generate_shapes
from pyro_slots.inner import EM
from pyro_slots.metrics import fg_ari, slot_keeping, video_fg_ari
from pyro_slots.models import GaussianMixture


def test_frame_zero_is_the_shapes_scene_and_objects_bounce_at_constant_speed():
    clips = generate_moving_shapes(8, num_frames=30, image_size=24, max_speed=0.1, seed=4)
    scenes = generate_shapes(8, image_size=24, min_objects=2, max_objects=3, seed=4)
    assert torch.equal(clips["mask"][:, 0], scenes["mask"])
    assert torch.equal(clips["video"][:, 0], scenes["image"])
    # Frame 0's positions are the scene's, absent objects at 0 in every frame (the fold of the
    # reflection had moved them to (0.2, 0.2)), and which objects are present is said.
    assert torch.equal(clips["present"], scenes["present"]) and not scenes["present"].all()
    torch.testing.assert_close(clips["position"][:, 0], scenes["attr_position"])
    assert (clips["position"].transpose(1, 2)[~clips["present"]] == 0).all()
    present = clips["present"].numpy()
    pos, vel = clips["position"].double().numpy(), clips["velocity"].double().numpy()
    # Inside the box [0.1, 0.9] always; between bounces the displacement per frame is the
    # velocity up to its sign, and no step is longer than it.
    inside = pos.transpose(0, 2, 1, 3)[present]  # (present objects, T, 2)
    assert (inside >= 0.1 - 1e-6).all() and (inside <= 0.9 + 1e-6).all()
    step = np.abs(np.diff(pos, axis=1))  # (N, T-1, M, 2)
    assert (step <= np.abs(vel)[:, None] + 1e-5).all()
    assert (np.abs(step - np.abs(vel)[:, None]) < 1e-5).mean() > 0.8
    # Unfolded by hand: a reflected coordinate p(t) satisfies p(t) = 0.1 + tri(p0 - 0.1 + v t).
    p0, t = pos[:, 0], np.arange(30)
    unfolded = p0[:, None] - 0.1 + vel[:, None] * t[None, :, None, None]
    phase = np.mod(unfolded, 1.6)
    folded = 0.1 + np.minimum(phase, 1.6 - phase)
    for n in range(8):
        np.testing.assert_allclose(pos[n][:, present[n]], folded[n][:, present[n]], atol=1e-5)
    # Identity: the colour of object j's pixels is the same in every frame.
    video, mask = clips["video"], clips["mask"]
    for n in range(8):
        for j in range(1, int(clips["num_objects"][n]) + 1):
            colors = {
                tuple(video[n, f, :, mask[n, f] == j][:, 0].tolist())
                for f in range(30)
                if (mask[n, f] == j).any()
            }
            assert len(colors) == 1


def _two_objects(swap_at=None):
    """Two objects over three 2×3 frames; predicted slots are 1 and 2 (0 the background)."""
    true = torch.tensor([[[1, 1, 0], [0, 2, 2]]] * 3).unsqueeze(0)  # (1, T=3, 2, 3)
    pred = true.clone()
    if swap_at is not None:
        frame = pred[0, swap_at]
        pred[0, swap_at] = torch.where(frame == 1, 2, torch.where(frame == 2, 1, frame))
    return true, pred


def test_video_metrics_on_a_clip_whose_tracking_is_known():
    true, good = _two_objects()
    _, swapped = _two_objects(swap_at=2)
    assert video_fg_ari(true, good).item() == 1.0
    assert slot_keeping(true, good).item() == 1.0
    # Swapping the slots in the last frame keeps every frame perfect but breaks tracking.
    per_frame = fg_ari(true.flatten(0, 1), swapped.flatten(0, 1))
    assert (per_frame == 1).all()
    fg = true.flatten() != 0
    expected = adjusted_rand_score(true.flatten()[fg].numpy(), swapped.flatten()[fg].numpy())
    assert video_fg_ari(true, swapped).item() == pytest.approx(expected, abs=1e-12)
    assert expected < 1
    assert slot_keeping(true, swapped).item() == 0.0
    # Soft masks give the same answers at their argmax.
    soft = torch.nn.functional.one_hot(swapped, 3).permute(0, 1, 4, 2, 3).double()
    assert video_fg_ari(true, soft).item() == pytest.approx(expected, abs=1e-12)
    with pytest.raises(ValueError, match="pred_masks: expected leading shape"):
        video_fg_ari(true, swapped[:, :2])
    # Labels with the pixel count but not the frame shape (transposed) are refused, as fg_ari
    # refuses them frame by frame; they were scored against the wrong pixels.
    with pytest.raises(ValueError, match="pred_masks: slot labels must have the shape"):
        video_fg_ari(true, swapped.transpose(-1, -2))  # 2×3 frames as 3×2
    with pytest.raises(ValueError, match="pred_masks: slot labels must have the shape"):
        video_fg_ari(true, swapped.flatten(-2)[..., None, :])


def test_carried_slots_start_where_the_last_frame_ended():
    g = torch.Generator().manual_seed(0)
    video = torch.randn(3, 4, 30, 2, generator=g, dtype=torch.float64)  # 4 frames of point sets
    gmm = GaussianMixture(3, 2)
    results = ps.refine_video(gmm, video, EM(5), seed=0)
    assert len(results) == 4
    for before, after in zip(results, results[1:]):
        assert torch.equal(after.initial_slots, before.slots)
    fresh = ps.refine_video(gmm, video, EM(5), seed=0, carry=False)
    solo = ps.refine(gmm, video[:, 2], EM(5), slots=fresh[2].initial_slots)
    assert torch.equal(fresh[2].slots, solo.slots)
    assert not torch.equal(fresh[2].initial_slots, results[1].slots)

    def shift(slots):
        return slots + 1.0

    moved = ps.refine_video(gmm, video, EM(5), seed=0, transition=shift)
    assert torch.equal(moved[1].initial_slots[0], moved[0].slots[0] + 1.0)
    with pytest.raises(ValueError, match="num_restarts"):
        ps.refine_video(gmm, video, EM(5), num_restarts=2)


def test_nested_svi_on_clips_sums_j_over_frames_and_differentiates_through_carried_slots(
    float64,
):
    """sequence=True: J = Σ_t -ELBO_t at the frames' final slots (those of refine_video from
    the same λ_0), and its unrolled gradient, through the slots carried from frame to frame and
    a learned transition, against central finite differences."""
    import pyro.optim

    from pyro_slots.objectives import NegativeELBO

    g = torch.Generator().manual_seed(1)
    video = torch.randn(2, 3, 20, 2, generator=g)
    torch.manual_seed(0)
    gmm = GaussianMixture(3, 2, encoder=torch.nn.Linear(2, 2).double())
    transition = torch.nn.Linear(5, 5).double()
    with torch.no_grad():
        transition.weight.copy_(torch.eye(5) + 0.01 * torch.randn(5, 5, generator=g))
        transition.bias.zero_()
    svi = ps.NestedSVI(
        gmm,
        EM(2),
        NegativeELBO(),
        pyro.optim.SGD({"lr": 0.0}),
        sequence=True,
        transition=transition,
        seed=0,
    )
    assert {"transition.weight", "transition.bias"} <= {n for n, _ in svi.named_parameters()}

    def loss():
        svi.generator.manual_seed(0)
        return svi.loss_and_result(video)

    value, results = loss()
    assert len(results) == 3
    with torch.no_grad():
        frames = [gmm.encode(video[:, t]) for t in range(3)]
        expected = -sum(
            ps.per_datapoint_elbo(gmm, f, r.slots[0]).mean() for f, r in zip(frames, results)
        )
    assert value.item() == pytest.approx(expected.item(), rel=1e-10)
    assert torch.allclose(results[1].initial_slots[0], transition(results[0].slots[0]))
    weights = [gmm.encoder.weight, transition.weight]
    grads = torch.autograd.grad(value, weights)
    for weight, grad in zip(weights, grads):
        eps = 1e-6
        with torch.no_grad():
            weight[0, 1] += eps
            up = loss()[0]
            weight[0, 1] -= 2 * eps
            down = loss()[0]
            weight[0, 1] += eps
        assert grad[0, 1].item() == pytest.approx(((up - down) / (2 * eps)).item(), rel=1e-5)
    with pytest.raises(ValueError, match="needs sequence=True"):
        ps.NestedSVI(gmm, EM(2), NegativeELBO(), pyro.optim.SGD({"lr": 0.0}), transition=transition)
