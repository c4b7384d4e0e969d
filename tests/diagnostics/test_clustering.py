"""pyro_slots.diagnostics.clustering: the method-comparison table of amortized clustering."""

import math

import numpy as np
import pytest
import torch
from scipy.special import logsumexp
from scipy.stats import norm
from sklearn.mixture import GaussianMixture as SkGaussianMixture

from pyro_slots.diagnostics import clustering


def test_groups_split_the_sets_over_evenly_spaced_sizes():
    groups = clustering.point_set_groups(7, 20, 40, num_groups=3, seed=5)
    assert [g.x.shape[:2] for g in groups] == [(3, 20), (2, 30), (2, 40)]
    # Every group holds a set and the last one has max_points (four sets in three groups
    # gave two groups of two, the largest at 75 points).
    groups = clustering.point_set_groups(4, 50, 100, num_groups=3)
    assert [g.x.shape[:2] for g in groups] == [(2, 50), (1, 75), (1, 100)]
    with pytest.raises(ValueError, match="min_points"):
        clustering.point_set_groups(4, 50, 40)
    with pytest.raises(ValueError, match="num_groups <= num_sets"):
        clustering.point_set_groups(2, 50, 100, num_groups=3)
    # one group: the max_points sets (np.linspace(a, b, 1) is [a]: 50-point "largest" sets)
    assert [g.x.shape[:2] for g in clustering.point_set_groups(3, 50, 100, num_groups=1)] == [
        (3, 100)
    ]


def test_baselines_match_scipy_and_sklearn():
    (sets,) = clustering.point_set_groups(3, 50, 50, num_groups=1)
    methods = clustering.baseline_methods(seed=2)
    oracle = methods[clustering.ORACLE](sets)
    for i in range(3):
        x, loc, scale = (t[i].double().numpy() for t in (sets.x, sets.means, sets.scales))
        log_pdf = norm.logpdf(x[:, None], loc[None], scale[None]).sum(-1)
        expected = logsumexp(log_pdf + np.log(sets.weights[i].double().numpy()), axis=1).mean()
        assert oracle[i].item() == pytest.approx(expected, abs=1e-5)
    sk = methods["sklearn GaussianMixture (diag, n_init=1)"](sets)
    points = sets.x[1].double().numpy()
    direct = SkGaussianMixture(4, covariance_type="diag", random_state=3).fit(points)
    assert sk[1].item() == pytest.approx(direct.score(points), abs=1e-9)


def test_compare_methods_times_and_derives_gaps_and_speedups():
    groups = clustering.point_set_groups(4, 10, 20, num_groups=2)
    constant = {
        clustering.ORACLE: lambda s: torch.full((len(s.x),), -2.0),
        "sklearn GaussianMixture (diag, n_init=1)": lambda s: torch.tensor([-1.0, -3.0]),
        "other": lambda s: torch.arange(len(s.x), dtype=torch.float64),
    }
    rows = {r["method"]: r for r in clustering.compare_methods(constant, groups)}
    sk = rows["sklearn GaussianMixture (diag, n_init=1)"]
    assert sk["loglik_per_point"] == pytest.approx(-2.0)
    assert sk["stderr"] == pytest.approx(np.std([-1, -3, -1, -3], ddof=1) / 2)
    assert rows["other"]["gap_to_oracle"] == pytest.approx(-2.0 - 0.5)
    assert sk["speedup_vs_sklearn"] == pytest.approx(1.0)
    other = rows["other"]
    assert other["speedup_vs_sklearn"] == pytest.approx(sk["ms_per_set"] / other["ms_per_set"])
    assert other["cpu_speedup_vs_sklearn_largest"] == pytest.approx(
        sk["cpu_ms_per_set_largest"] / other["cpu_ms_per_set_largest"]
    )
    table = clustering.comparison_table(list(rows.values()), "20 pts")
    assert table.count("\n") == 4 and "| other | 0.5000 |" in table
    assert math.isnan(
        clustering.compare_methods({"x": constant["other"]}, groups)[0]["gap_to_oracle"]
    )


def test_compare_methods_interleaves_rounds_and_takes_the_median_time(monkeypatch):
    """repeats=3: the methods take turns group by group in every round, each time is the
    median of its three rounds (a slow round of one method does not count), scores round 1's."""
    groups = clustering.point_set_groups(4, 10, 20, num_groups=2)
    clock = {"now": 0.0}

    class FakeTime:
        perf_counter = process_time = staticmethod(lambda: clock["now"])

    monkeypatch.setattr(clustering, "time", FakeTime)
    calls, costs = [], {"a": iter([0, 1.0, 2.0, 30.0, 2.0, 4.0, 2.0]), "b": iter([0] + [0.5] * 6)}

    def method(name):
        def run(sets):
            calls.append((name, sets.x.shape[1]))
            clock["now"] += next(costs[name])  # the first call is the untimed warm-up
            return torch.full((len(sets.x),), float(len(calls)))

        return run

    rows = clustering.compare_methods({"a": method("a"), "b": method("b")}, groups, repeats=3)
    # an untimed warm-up on two sets of the first group, then the rounds
    assert calls == [("a", 10), ("b", 10)] + [("a", 10), ("b", 10), ("a", 20), ("b", 20)] * 3
    a, b = rows
    # a's times on the first group are 1, 30, 4 s and on the second 2, 2, 2 s: medians 4 and 2
    assert a["ms_per_set"] == pytest.approx(1e3 * (4.0 + 2.0) / 4)
    assert a["cpu_ms_per_set_largest"] == pytest.approx(1e3 * 2.0 / 2)
    assert b["ms_per_set"] == pytest.approx(1e3 * 1.0 / 4)
    assert a["loglik_per_point"] == pytest.approx((3 + 3 + 5 + 5) / 4)  # the first round's
    assert b["loglik_per_point"] == pytest.approx((4 + 4 + 6 + 6) / 4)
    with pytest.raises(ValueError, match="repeats"):
        clustering.compare_methods({"a": method("a")}, groups, repeats=0)


@pytest.mark.parametrize("kind", ["em", "slot-attention", "gradient-ascent"])
@pytest.mark.parametrize("encoder", [False, True])
def test_refine_loglik_is_the_mixtures_log_likelihood_in_inference_mode(kind, encoder, monkeypatch):
    """refine_loglik is the scipy log-likelihood per point of the mixture at refine's final
    slots; rules that do not differentiate the ELBO run under torch.inference_mode (the lean
    estimator's and slot attention's caches then meet tensors without version counters, e.g.
    an encoder's output), gradient ascent does not."""
    from torch import nn

    from pyro_slots import refine
    from pyro_slots.inner import EM, GaussianFeatures, GradientAscent, SlotAttention
    from pyro_slots.models import GaussianMixture

    torch.manual_seed(0)
    (sets,) = clustering.point_set_groups(3, 60, 60, num_groups=1, seed=4)
    model = GaussianMixture(4, 2, encoder=nn.Linear(2, 2) if encoder else None)
    rule = {
        "em": EM(4),
        "slot-attention": SlotAttention(
            3, slot_dim=5, input_dim=2, hidden_dim=16, moments=True,
            encoder=GaussianFeatures(2), feature_dim=5, norm_inputs=False,
        ),
        "gradient-ascent": GradientAscent(3, step_size=0.05),
    }[kind]  # fmt: skip
    modes = []
    original = clustering.refine
    monkeypatch.setattr(
        clustering,
        "refine",
        lambda *a, **k: modes.append(torch.is_inference_mode_enabled()) or original(*a, **k),
    )
    got = clustering.refine_loglik(model, sets, rule, 3, seed=0, record=False)
    assert modes == [kind != "gradient-ascent"]
    with torch.no_grad():
        slots = refine(model, sets.x, rule, num_steps=3, seed=0, record_history=False).slots[0]
        x = model.encode(sets.x).double().numpy()
    loc, scale, log_w = (t.double().numpy() for t in model.component_params(slots))
    for i in range(3):
        log_pdf = norm.logpdf(x[i][:, None], loc[i][None], scale[i][None]).sum(-1)
        expected = logsumexp(log_pdf + log_w[i], axis=1).mean()
        assert got[i].item() == pytest.approx(expected, abs=1e-4)
