import itertools
import math
from fractions import Fraction

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.metrics import adjusted_rand_score

from pyro_slots.metrics import (
    AP_THRESHOLDS,
    ari,
    average_precision,
    fg_ari,
    mean_iou,
    reconstruction_mse,
    segmentation_covering,
    segmentation_errors,
)


def _random_maps(rng, batch, size, k_true, k_pred):
    true = rng.integers(0, k_true, (batch, size, size))
    pred = rng.integers(0, k_pred, (batch, size, size))
    # Structured cases: a prediction that equals the truth up to relabelling, one that is a
    # coarsening of it, and a truth with one object only.
    pred[0] = (true[0] * 7 + 3) % 11
    pred[1] = true[1] // 2
    true[2] = 1
    return torch.from_numpy(true), torch.from_numpy(pred)


@pytest.mark.parametrize("k_true, k_pred", [(2, 2), (4, 6), (6, 3), (1, 5)])
def test_ari_matches_sklearn(k_true, k_pred):
    rng = np.random.default_rng(k_true * 10 + k_pred)
    true, pred = _random_maps(rng, 8, 12, k_true, k_pred)
    got = ari(true, pred)
    got_fg = fg_ari(true, pred)
    for b in range(8):
        t, p = true[b].reshape(-1).numpy(), pred[b].reshape(-1).numpy()
        assert got[b].item() == pytest.approx(adjusted_rand_score(t, p), abs=1e-6)
        fg = t != 0
        if fg.any():
            assert got_fg[b].item() == pytest.approx(adjusted_rand_score(t[fg], p[fg]), abs=1e-6)
        else:
            assert math.isnan(got_fg[b].item())


@settings(max_examples=150, deadline=None)
@given(
    st.lists(st.tuples(st.integers(0, 3), st.integers(0, 3)), min_size=1, max_size=12),
)
def test_ari_matches_sklearn_on_tiny_labelings(pairs):
    # Covers one point, one cluster on either side, identical partitions, all-singletons.
    t = np.array([a for a, _ in pairs])
    p = np.array([b for _, b in pairs])
    got = ari(torch.from_numpy(t)[None], torch.from_numpy(p)[None])
    assert got.item() == pytest.approx(adjusted_rand_score(t, p), abs=1e-6)
    fg = t != 0
    got_fg = fg_ari(torch.from_numpy(t)[None], torch.from_numpy(p)[None]).item()
    if fg.any():
        assert got_fg == pytest.approx(adjusted_rand_score(t[fg], p[fg]), abs=1e-6)
    else:
        assert math.isnan(got_fg)


def test_edge_cases():
    one_object = torch.ones(1, 5, 5, dtype=torch.long)
    split = torch.zeros(1, 5, 5, dtype=torch.long)
    split[0, :, 2:] = 1
    background_only = torch.zeros(1, 5, 5, dtype=torch.long)
    assert fg_ari(one_object, split).item() == adjusted_rand_score(np.ones(25), split.flatten())
    assert fg_ari(one_object, torch.zeros_like(split)).item() == 1.0
    assert ari(background_only, background_only).item() == 1.0
    assert ari(background_only, split).item() == adjusted_rand_score(np.zeros(25), split.flatten())
    assert math.isnan(fg_ari(background_only, split).item())
    assert ari(one_object[:, :1, :1], split[:, :1, :1]).item() == 1.0  # a single pixel


def test_soft_masks_use_the_argmax_by_default():
    rng = np.random.default_rng(0)
    true = torch.from_numpy(rng.integers(0, 4, (6, 10, 10)))
    logits = torch.from_numpy(rng.normal(size=(6, 5, 10, 10)))
    soft = logits.softmax(1)
    hard = soft.argmax(1)
    np.testing.assert_allclose(ari(true, soft).numpy(), ari(true, hard).numpy(), atol=1e-12)
    for b in range(6):
        t, p = true[b].flatten().numpy(), hard[b].flatten().numpy()
        assert fg_ari(true, soft)[b].item() == pytest.approx(
            adjusted_rand_score(t[t != 0], p[t != 0]), abs=1e-6
        )
    # Flattened (batch, K, N) masks give the same.
    flat = ari(true.reshape(6, -1), soft.reshape(6, 5, -1))
    np.testing.assert_allclose(flat.numpy(), ari(true, soft).numpy(), atol=1e-12)
    # One-hot soft masks: the expected contingency table is the hard one.
    onehot = torch.nn.functional.one_hot(hard, 5).permute(0, 3, 1, 2).double()
    np.testing.assert_allclose(
        ari(true, onehot, soft="expected").numpy(), ari(true, hard).numpy(), atol=1e-12
    )


def test_expected_contingency_ari_hand_computed():
    # n_ij = [[1.5, 0], [0.5, 2]]: tp = 2.5, fp = 2, fn = 1.5, tn = 6, so
    # ARI = 2 (2.5*6 - 1.5*2) / (4*7.5 + 4.5*8) = 24/66 = 4/11.
    true = torch.tensor([[0, 0, 1, 1]])
    soft = torch.tensor([[[1.0, 0.5, 0.0, 0.0], [0.0, 0.5, 1.0, 1.0]]])
    assert ari(true, soft, soft="expected").item() == pytest.approx(4 / 11, abs=1e-12)
    # Not probabilities over the slots: scaled masks (which gave 0.95 for a true 0.24) and
    # logits (NaN) are refused, naming the argument; soft="argmax" still reads them.
    with pytest.raises(ValueError, match="pred: soft='expected' needs probabilities"):
        ari(true, 0.1 * soft, soft="expected")
    with pytest.raises(ValueError, match="pred: soft='expected' needs probabilities"):
        ari(true, (soft + 1e-9).log(), soft="expected")
    assert ari(true, (soft + 1e-9).log()).item() == ari(true, soft).item()


def test_metric_arguments_are_checked():
    true = torch.zeros(2, 4, 4, dtype=torch.long)
    with pytest.raises(ValueError, match="pred"):
        ari(true, torch.zeros(2, 4, 5, dtype=torch.long))
    with pytest.raises(ValueError, match="soft masks"):
        ari(true, torch.zeros(2, 3, 4, 5))
    with pytest.raises(TypeError, match="true_mask"):
        ari(true.float(), true)
    with pytest.raises(ValueError, match="soft"):
        ari(true, torch.zeros(2, 3, 4, 4), soft="mean")
    with pytest.raises(ValueError, match="x_hat"):
        reconstruction_mse(torch.zeros(2, 3), torch.zeros(2, 1))


def _iou_brute_force(true, pred, ignore_background=True):
    ids = [i for i in np.unique(true) if not (ignore_background and i == 0)]
    if not ids:
        return math.nan
    segments = np.unique(pred)
    # IoU table with one extra all-zero column per object: "left unmatched".
    table = np.zeros((len(ids), len(segments) + len(ids)))
    for r, i in enumerate(ids):
        for c, k in enumerate(segments):
            a, b = true == i, pred == k
            table[r, c] = (a & b).sum() / (a | b).sum()
    perms = np.array(list(itertools.permutations(range(table.shape[1]), len(ids))))
    best = table[np.arange(len(ids)), perms].sum(1).max()
    return best / len(ids)


@pytest.mark.parametrize("k", [1, 2, 3, 4, 5])
def test_mean_iou_equals_brute_force_matching(k):
    rng = np.random.default_rng(k)
    true = rng.integers(0, k + 1, (6, 8, 8))
    pred = np.where(rng.random((6, 8, 8)) < 0.6, true, rng.integers(0, k, (6, 8, 8)))
    pred[0] = 0  # one predicted segment for all objects
    got = mean_iou(torch.from_numpy(true), torch.from_numpy(pred))
    # With the background as an object: labels 0..k-1, so still at most k objects.
    true_all = np.minimum(true, k - 1)
    got_all = mean_iou(torch.from_numpy(true_all), torch.from_numpy(pred), ignore_background=False)
    for b in range(6):
        assert got[b].item() == pytest.approx(_iou_brute_force(true[b], pred[b]), abs=1e-12)
        assert got_all[b].item() == pytest.approx(
            _iou_brute_force(true_all[b], pred[b], False), abs=1e-12
        )


def test_segmentation_covering_equals_direct_definition():
    rng = np.random.default_rng(0)
    true = rng.integers(0, 4, (5, 9, 9))
    pred = rng.integers(0, 3, (5, 9, 9))
    soft = torch.nn.functional.one_hot(torch.from_numpy(pred), 3).permute(0, 3, 1, 2).float()
    msc = segmentation_covering(torch.from_numpy(true), soft)
    sc = segmentation_covering(torch.from_numpy(true), torch.from_numpy(pred), weighted=True)
    for b in range(5):
        best, sizes = [], []
        for i in range(1, 4):
            a = true[b] == i
            best.append(
                max(((a & (pred[b] == k)).sum() / (a | (pred[b] == k)).sum()) for k in range(3))
            )
            sizes.append(a.sum())
        assert msc[b].item() == pytest.approx(np.mean(best), abs=1e-12)
        assert sc[b].item() == pytest.approx(np.dot(best, sizes) / np.sum(sizes), abs=1e-12)
    assert math.isnan(
        mean_iou(
            torch.zeros(1, 3, 3, dtype=torch.long), torch.zeros(1, 3, 3, dtype=torch.long)
        ).item()
    )


def test_reconstruction_mse():
    x = torch.arange(24.0).reshape(2, 3, 4)
    x_hat = x + torch.tensor([1.0, 2.0]).reshape(2, 1, 1)
    np.testing.assert_allclose(reconstruction_mse(x, x_hat).numpy(), [1.0, 4.0])


def _ap_example():
    # Image 0: objects a1 = (shape 0, colour 1, (0.2, 0.2)), a2 = (1, 2, (0.8, 0.8));
    # image 1: object b1 = (2, 0, (0.5, 0.5)) and one padded entry.
    targets = {
        "present": torch.tensor([[True, True], [True, False]]),
        "position": torch.tensor([[[0.2, 0.2], [0.8, 0.8]], [[0.5, 0.5], [0.0, 0.0]]]),
        "shape": torch.tensor([[0, 1], [2, 0]]),
        "color": torch.tensor([[1, 2], [0, 0]]),
    }
    # Sorted by confidence: p1 (a1 at 0.05), q1 (b1 at 0.4), q2 (wrong shape), p2 (a2 at 0.3),
    # p3 (a1 again at 0), q3 (b1 again at 0).
    pred = {
        "confidence": torch.tensor([[0.9, 0.6, 0.3], [0.8, 0.7, 0.1]]),
        "position": torch.tensor(
            [[[0.25, 0.2], [0.8, 0.5], [0.2, 0.2]], [[0.5, 0.9], [0.5, 0.5], [0.5, 0.5]]]
        ),
        "shape": torch.tensor([[0, 1, 0], [2, 3, 2]]),
        "color": torch.tensor([[1, 2, 1], [0, 0, 0]]),
    }
    return pred, targets


@pytest.mark.parametrize(
    "threshold, expected",
    [
        # hits 1,1,0,1,0,0: precision 1, 1, 2/3, 3/4, ...; AP = 1/3 + 1/3 + 3/4 * 1/3.
        (math.inf, Fraction(11, 12)),
        (0.5, Fraction(11, 12)),
        # hits 1,0,0,0,0,1 (q3 is the first to claim b1): AP = 1/3 + 2/6 * 1/3.
        (0.25, Fraction(4, 9)),
        (0.125, Fraction(4, 9)),
        # hits 0,0,0,0,1,1 (p1 is too far, so p3 claims a1): AP = 2/6 * 1/3 + 2/6 * 1/3.
        (0.01, Fraction(2, 9)),
    ],
)
def test_average_precision_hand_computed(threshold, expected):
    pred, targets = _ap_example()
    assert average_precision(pred, targets, threshold) == pytest.approx(float(expected), abs=1e-7)


def test_average_precision_edge_cases():
    pred, targets = _ap_example()
    assert AP_THRESHOLDS == (math.inf, 1.0, 0.5, 0.25, 0.125)
    # position_scale multiplies distances: 0.25 at scale 2 is 0.125 at scale 1.
    assert average_precision(pred, targets, 0.25, position_scale=2.0) == pytest.approx(
        average_precision(pred, targets, 0.125)
    )
    perfect = dict(targets, confidence=targets["present"].float())
    assert average_precision(perfect, targets, 0.125) == pytest.approx(1.0)
    empty = dict(targets, present=torch.zeros(2, 2, dtype=torch.bool))
    assert math.isnan(average_precision(pred, empty, 1.0))
    with pytest.raises(ValueError, match="missing keys.*color"):
        average_precision({k: v for k, v in pred.items() if k != "color"}, targets, 1.0)
    with pytest.raises(ValueError, match="distance_threshold"):
        average_precision(pred, targets, 0.0)


def test_segmentation_errors_on_a_hand_made_scene():
    """4x4 image, objects 1 and 2 and a background; predicted slots a, b, c."""
    true = torch.tensor([[[0, 0, 1, 1], [0, 0, 1, 1], [2, 2, 0, 0], [2, 2, 0, 0]]])
    # object 1 split 2:2 between slots 1 and 2; object 2 all in slot 1 (merged with half of 1's
    # majority? its majority is slot 1, object 1's majority is slot 1 too: argmax of a tie -> 1)
    pred = torch.tensor([[[0, 0, 1, 2], [0, 3, 1, 2], [1, 1, 0, 0], [1, 1, 3, 3]]])
    out = segmentation_errors(true, pred)
    assert out["split"].tolist() == [1]
    assert out["merged"].tolist() == [2]
    # background: 8 pixels, 5 in slot 0, 3 in slot 3
    assert out["background_share"].tolist() == [5 / 8]
    # a perfect segmentation has no errors and one slot for the background
    perfect = segmentation_errors(true, true)
    assert perfect["split"].tolist() == [0] and perfect["merged"].tolist() == [0]
    assert perfect["background_share"].tolist() == [1.0]


def test_segmentation_errors_match_a_pixel_loop():
    g = torch.Generator().manual_seed(0)
    true = torch.randint(0, 4, (6, 5, 5), generator=g)
    soft = torch.randn(6, 3, 5, 5, generator=g)
    out = segmentation_errors(true, soft, threshold=0.2)
    pred = soft.argmax(1)
    for b in range(6):
        objects = [j for j in range(1, 4) if (true[b] == j).any()]
        counts = {
            j: [int(((true[b] == j) & (pred[b] == k)).sum()) for k in range(3)] for j in objects
        }
        split = sum(sum(c / sum(cs) > 0.2 for c in cs) >= 2 for cs in counts.values())
        majority = {j: max(range(3), key=lambda k: (counts[j][k], -k)) for j in objects}
        merged = sum(list(majority.values()).count(majority[j]) >= 2 for j in objects)
        bg = [int(((true[b] == 0) & (pred[b] == k)).sum()) for k in range(3)]
        assert out["split"][b] == split and out["merged"][b] == merged
        assert out["background_share"][b].item() == pytest.approx(max(bg) / sum(bg))


def test_segmentation_errors_validate_the_threshold():
    with pytest.raises(ValueError, match="threshold"):
        segmentation_errors(torch.zeros(1, 2, 2, dtype=torch.long), torch.zeros(1, 2, 2), 0.7)
