"""pyro_slots.plots: the numbers drawn are the numbers given, in the one palette."""

import json

import numpy as np
import pandas as pd
import pytest
import torch
from matplotlib.colors import to_rgb
from matplotlib.image import imread

from pyro_slots import plots

TAB10 = [
    to_rgb(f"tab:{c}")
    for c in ("blue", "orange", "green", "red", "purple", "brown", "pink", "gray", "olive", "cyan")
]


def test_one_palette_slots_then_mask_ids():
    np.testing.assert_allclose(plots.slot_colors(12), np.array(TAB10 + TAB10[:2]))
    np.testing.assert_allclose(plots.mask_colors(4), np.array([(0, 0, 0)] + TAB10[:3]))
    assert plots.mask_colors(1).shape == (1, 3) and plots.slot_colors(0).shape == (0, 3)


def test_scene_masks_are_drawn_in_the_mask_palette(tmp_path):
    g = torch.Generator().manual_seed(0)
    images = torch.rand(3, 3, 5, 6, generator=g)
    masks = torch.randint(0, 4, (3, 5, 6), generator=g)
    masks[0, 0, 0] = 3  # every id present
    fig = plots.plot_scenes(images, masks, path=tmp_path / "s.png", ncols=2)
    shown = [ax.images[0] for ax in fig.axes if ax.images]
    # Row by row: images 0, 1 | masks 0, 1 | image 2 | mask 2.
    image_panels, mask_panels = [shown[0], shown[1], shown[4]], [shown[2], shown[3], shown[5]]
    expected_rgb = np.array([(0, 0, 0)] + TAB10[:3])
    for i in range(3):
        np.testing.assert_allclose(image_panels[i].get_array(), images[i].permute(1, 2, 0))
        drawn = mask_panels[i].to_rgba(mask_panels[i].get_array())[..., :3]
        np.testing.assert_allclose(drawn, expected_rgb[masks[i].numpy()], atol=1e-6)
    assert imread(tmp_path / "s.png").shape[:2] == (round(3.2 * 2 * 100), round(1.6 * 2 * 100))


def test_slot_mask_heat_maps_are_the_masks():
    g = torch.Generator().manual_seed(1)
    resp = torch.softmax(torch.randn(3, 4, 6 * 5, generator=g), 1)
    fig = plots.plot_slot_masks(resp, (6, 5), max_datapoints=2)
    axes = np.array(fig.axes).reshape(2, 4)
    for n in range(2):
        for k in range(4):
            im = axes[n, k].images[0]
            np.testing.assert_allclose(im.get_array(), resp[n, k].reshape(6, 5).numpy())
            assert im.norm.vmin == 0 and im.norm.vmax == 1
            share = 100 * resp[n, k].mean().item()
            assert axes[n, k].get_title() == f"slot {k} ({share:.0f}%)"
    # The same figure from (B, K, H, W) masks, and all datapoints on request.
    fig = plots.plot_slot_masks(resp.reshape(3, 4, 6, 5), max_datapoints=None)
    assert len(fig.axes) == 3 * 4
    with pytest.raises(ValueError, match="image_shape: \\(5, 5\\) has 25 pixels"):
        plots.plot_slot_masks(resp, (5, 5))
    with pytest.raises(ValueError, match="image_shape: needed"):
        plots.plot_slot_masks(resp)


def test_slot_decomposition_panels_are_mask_times_slot_image(tmp_path):
    g = torch.Generator().manual_seed(2)
    b, k, h, w = 2, 3, 4, 5
    images, recon = torch.rand(b, 3, h, w, generator=g), torch.rand(b, 3, h, w, generator=g)
    rgb = torch.rand(b, k, 3, h, w, generator=g)
    masks = torch.softmax(torch.randn(b, k, 1, h, w, generator=g), 1)
    path = tmp_path / "slots.png"
    fig = plots.plot_slot_masks(
        masks, images=images, recon=recon, rgb=rgb, titles=["a", "b"], path=path
    )
    axes = np.array(fig.axes).reshape(b, k + 2)
    for n in range(b):
        np.testing.assert_allclose(axes[n, 0].images[0].get_array(), images[n].permute(1, 2, 0))
        np.testing.assert_allclose(axes[n, 1].images[0].get_array(), recon[n].permute(1, 2, 0))
        assert axes[n, 0].get_ylabel() == "ab"[n]
        for j in range(k):
            m = masks[n, j, 0].unsqueeze(-1).numpy()
            expected = m * rgb[n, j].permute(1, 2, 0).numpy() + (1 - m) * 0.8
            np.testing.assert_allclose(axes[n, j + 2].images[0].get_array(), expected, atol=1e-6)
    assert path.stat().st_size > 0
    with pytest.raises(ValueError, match="rgb: expected shape \\(2, 3, 3, 4, 5\\)"):
        plots.plot_slot_masks(masks, rgb=rgb[:, :2])


def test_gmm_fit_colours_mix_the_slot_palette_by_responsibility():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 7, 2, generator=g)
    resp = torch.softmax(torch.randn(2, 3, 7, generator=g), 1)
    loc, scale = torch.randn(2, 3, 2, generator=g), torch.rand(2, 3, 2, generator=g) + 0.1
    weights = torch.softmax(torch.randn(2, 3, generator=g), -1)
    fig = plots.plot_gmm_fits(x, resp, loc, scale, weights, ncols=2)
    for s, ax in enumerate(fig.axes[:2]):
        (points,) = ax.collections
        expected = resp[s].T.double().numpy() @ np.array(TAB10[:3])
        np.testing.assert_allclose(points.get_facecolors()[:, :3], expected, atol=1e-6)
        np.testing.assert_allclose(points.get_offsets(), x[s].numpy(), atol=1e-6)
        for k, ellipse in enumerate(ax.patches):
            assert ellipse.width == pytest.approx(4 * scale[s, k, 0].item())
            assert ellipse.height == pytest.approx(4 * scale[s, k, 1].item())
            assert ellipse.get_linewidth() == pytest.approx(0.8 + 3 * weights[s, k].item())
            np.testing.assert_allclose(ellipse.get_edgecolor()[:3], TAB10[k])


@pytest.mark.parametrize("restart_axis", [False, True])
def test_inner_elbo_lines_are_the_history(restart_axis):
    g = torch.Generator().manual_seed(4)
    history = torch.randn(6, 2, 3, generator=g) if restart_axis else torch.randn(6, 5, generator=g)
    fig = plots.plot_inner_elbo(history, num_measurements=10)
    lines = fig.axes[0].lines
    flat = history.reshape(6, -1).double().numpy() / 10
    for j in range(flat.shape[1]):
        np.testing.assert_allclose(lines[j].get_ydata(), flat[:, j])
    np.testing.assert_allclose(lines[flat.shape[1]].get_ydata(), flat.mean(1))
    with pytest.raises(ValueError, match="history: expected shape"):
        plots.plot_inner_elbo(torch.zeros(3))


def test_training_curve_draws_the_records_and_their_moving_average(tmp_path):
    g = np.random.default_rng(0)
    values = g.normal(size=60)
    records = [
        {"step": i, "split": "train", "J": float(v), "elbo_per_measurement": float(-v)}
        for i, v in enumerate(values)
    ]
    records += [{"step": 59, "split": "held_out", "J": 0.5, "elbo_per_measurement": -0.5}]
    path = tmp_path / "metrics.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in records) + "\nnot json\n")
    assert plots.read_metrics(path) == records
    fig = plots.plot_training_curve(records)
    raw, smooth, held = fig.axes[0].lines
    np.testing.assert_allclose(raw.get_ydata(), values)
    expected = pd.Series(values).rolling(3, min_periods=1).mean().to_numpy()  # window 60 // 20
    np.testing.assert_allclose(smooth.get_ydata(), expected)
    np.testing.assert_allclose(held.get_ydata(), [0.5])
    np.testing.assert_allclose(fig.axes[1].lines[0].get_ydata(), -values)


def test_diagnostic_figures_are_reexported_and_lazy():
    import pyro_slots.diagnostics as diagnostics
    from pyro_slots.plots import diagnostics as diagnostic_plots

    assert plots.plot_khat is diagnostic_plots.plot_khat is diagnostics.plot_khat
    assert plots.plot_slot_masks is diagnostics.plot_slot_masks
    with pytest.raises(AttributeError, match="plot_nothing"):
        plots.plot_nothing  # noqa: B018
