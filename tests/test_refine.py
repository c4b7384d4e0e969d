import pyro.optim
import pytest
import torch

import pyro_slots as ps
from pyro_slots.inner import EM, GradientAscent, InnerRule, SoftKMeans
from pyro_slots.models import GaussianMixture
from pyro_slots.refine import best_restart, run_inner
from tests.conftest import gmm_responsibilities, make_point_sets


class SpyRule(EM):
    """EM that counts its steps, to check that validation happens before any work."""

    calls = 0

    def step(self, state, problem, create_graph=False):
        SpyRule.calls += 1
        return super().step(state, problem, create_graph)


@pytest.mark.parametrize(
    "x, kwargs, match",
    [
        (torch.full((2, 5, 2), float("nan")), {}, "x: contains"),
        (torch.tensor([[[0.0, float("inf")]]]).expand(2, 5, 2), {}, "x: contains"),
        (torch.randn(5, 2), {}, r"x: expected shape \(batch, measurements, features\)"),
        (torch.randn(2, 5, 3), {}, "x: expected 2 features"),
        (torch.randn(2, 5, 2), {"num_slots": 0}, "num_slots: expected an integer >= 1"),
        (torch.randn(2, 5, 2), {"num_steps": 0}, "num_steps: expected an integer >= 1"),
        (torch.randn(2, 5, 2), {"num_restarts": -1}, "num_restarts"),
        (torch.randn(2, 5, 2), {"keep_best_after": 1}, "keep_best_after: .* num_restarts > 1"),
        (
            torch.randn(2, 5, 2),
            {"keep_best_after": 3, "num_restarts": 2},
            r"keep_best_after: expected 0 <= keep_best_after < num_steps = 3, got 3",
        ),
        (torch.randn(2, 5, 2), {"keep_best_after": -1, "num_restarts": 2}, "keep_best_after"),
        (
            torch.randn(2, 5, 2),
            {"keep_best_after": {0: 2, 1: 2}, "num_restarts": 4},
            r"keep_best_after: the restarts kept must decrease from 4 stage by stage, got 2 at "
            r"step 1 after 2",
        ),
        (
            torch.randn(2, 5, 2),
            {"keep_best_after": {1: 1, 0: 4}, "num_restarts": 4},
            "got 4 at step 0 after 4",
        ),
        (
            torch.randn(2, 5, 2),
            {"keep_best_after": {0: 2, 3: 1}, "num_restarts": 4},
            r"keep_best_after: expected 0 <= keep_best_after < num_steps = 3, got 3",
        ),
        (torch.randn(2, 5, 2), {"keep_best_after": {}, "num_restarts": 2}, "non-empty dict"),
        (
            torch.randn(2, 5, 2),
            {"keep_best_after": {0: 0}, "num_restarts": 2},
            r"keep_best_after\[0\]: expected an integer >= 1",
        ),
        (torch.randn(2, 5, 2), {"tol": -1.0}, "tol: expected a finite number > 0"),
        (torch.randn(2, 5, 2), {"slots": torch.randn(2, 3, 4)}, r"slots: expected shape \(1, 2,"),
        (torch.randn(2, 5, 2), {"slots": torch.randn(3, 3, 5)}, r"slots: .* got \(3, 3, 5\)"),
    ],
)
def test_bad_input_raises_before_any_work(x, kwargs, match):
    SpyRule.calls = 0
    with pytest.raises(ValueError, match=match):
        ps.refine(GaussianMixture(3, 2), x, SpyRule(3), **kwargs)
    assert SpyRule.calls == 0


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: EM(0), "num_steps"),
        (lambda: GradientAscent(3, step_size=0.0), "step_size"),
        (lambda: GradientAscent(3, betas=(0.9, 1.0)), "betas"),
        (lambda: SoftKMeans(3, temperature=-1), "temperature"),
        (lambda: GaussianMixture(0, 2), "num_slots"),
        (lambda: ps.GaussianInit(3, scale=0.0), "scale"),
    ],
)
def test_bad_hyperparameters_raise_in_constructor(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_nested_svi_rejects_unknown_modes():
    gmm = GaussianMixture(2, 2)
    with pytest.raises(ValueError, match="gradient: expected one of"):
        ps.NestedSVI(gmm, EM(2), ps.objectives.NegativeELBO(), pyro.optim.Adam({}), gradient="x")
    with pytest.raises(TypeError, match="optim: expected a pyro.optim"):
        ps.NestedSVI(gmm, EM(2), ps.objectives.NegativeELBO(), torch.optim.Adam)


def test_em_without_m_step_derives_it_or_is_refused(float64):
    """No hand-written m_step: EM derives it from the trace (the same steps as the GMM's own);
    a component parameter that is no known function of one slot part is refused by name."""

    class NoEM(GaussianMixture):
        m_step = None

    class DoubledMeans(NoEM):
        def component_params(self, slots):
            loc, scale, log_weights = super().component_params(slots)
            return 2 * loc, scale, log_weights

    x, _ = make_point_sets(3, 20, seed=0)
    derived = ps.refine(NoEM(2, 2), x, EM(3), seed=0)
    closed = ps.refine(GaussianMixture(2, 2), x, EM(3), seed=0)
    assert torch.allclose(derived.slots, closed.slots, atol=1e-10)
    with pytest.raises(ps.CapabilityError, match="parameter 'loc' of site 'obs'"):
        ps.refine(DoubledMeans(2, 2), x, EM(3), seed=0)


def test_restarts_are_independent_and_best_picks_max(float64):
    x, _ = make_point_sets(4, 30, seed=0)
    gmm = GaussianMixture(3, 2)
    res = ps.refine(gmm, x, EM(10), seed=1, num_restarts=3)
    assert res.slots.shape == (3, 4, 3, 5) and res.history.shape == (11, 3, 4)
    assert not torch.allclose(res.initial_slots[0], res.initial_slots[1])
    # Each restart equals a single run from the same initial slots.
    for r in range(3):
        single = ps.refine(gmm, x, EM(10), slots=res.initial_slots[r])
        assert torch.allclose(single.elbo, res.elbo[r], atol=1e-10)
    best = res.best()
    assert torch.equal(best.elbo[0], res.elbo.max(0).values)
    assert best.slots.shape == (1, 4, 3, 5)
    # select() with the argmax is best(); an int picks one restart for every datapoint.
    assert torch.equal(res.select(res.elbo.argmax(0)).slots, best.slots)
    assert torch.equal(res.select(2).history[:, 0], res.history[:, 2])
    with pytest.raises(ValueError, match="index: expected a restart"):
        res.select(3)
    with pytest.raises(ValueError, match=r"index: expected restarts in \[0, 3\)"):
        res.select(torch.tensor([0, 1, 3, 0]))
    for mask in (True, torch.tensor([True, False, True, True])):  # a bool is not a restart
        with pytest.raises(ValueError, match=r"index: expected an int or a \(4,\) integer"):
            res.select(mask)


def test_best_restart_keeps_the_first_of_restarts_tied_up_to_rounding():
    """Brute force: the first restart within 16 ε |best| of the column's best; NaN never wins."""
    eps = torch.finfo(torch.float64).eps
    scores = torch.tensor(
        [
            [-100.0, 1.0, float("nan"), -5.0, float("nan"), -float("inf")],
            [-100.0 * (1 - 3 * eps), 2.0, 3.0, -5.0 + 1e-3, float("nan"), -float("inf")],
            [-100.0 * (1 - 12 * eps), 2.0 * (1 + eps), 3.0, -4.0, float("nan"), -float("inf")],
        ],
        dtype=torch.float64,
    )
    # Column 0: restart 2 is the largest, 0 and 1 lie within 16 ε |best| below it; column 1:
    # restarts 1 and 2 within it; column 2: NaN loses; 3: no ties; 4, 5: all NaN, all -inf.
    assert best_restart(scores).tolist() == [0, 1, 1, 2, 0, 0]
    assert scores[:, 0].argmax() == 2 and scores[:, 1].argmax() == 2


def test_keep_best_after_and_best_keep_the_first_of_tied_restarts(float64):
    """Restart 1 starts from restart 0's slots with the components permuted: the same ELBO but
    for the order of the sums over K. Restart 0 is kept, whichever rounds higher (before, a
    GPU kept the other one now and then)."""
    x, _ = make_point_sets(6, 40, seed=4)
    gmm = GaussianMixture(3, 2)
    start = ps.refine(gmm, x, EM(1), seed=0).initial_slots[0]
    slots = torch.stack([start, start[:, [2, 0, 1]], start + 0.5])
    res = ps.refine(gmm, x, EM(8), slots=slots, num_restarts=3, keep_best_after=2)
    assert torch.equal(res.steps[1], torch.full((6,), 2))  # the permuted copy is pruned
    at = res.history[2]
    assert bool((at[0] >= at[2]).all())  # (so restart 0 or 1 wins every datapoint)
    assert torch.equal(res.best().slots[0], res.slots[0])


class _EvaluateThenStep(EM):
    """EM pruned the general way: the ELBO evaluated at λ_t, then the winners stepped (EM
    itself prunes by the ELBO its E-step reports, the step run on every restart)."""

    step_is_elbo_evaluation = False


@pytest.mark.parametrize("rule", [EM, _EvaluateThenStep])
@pytest.mark.parametrize("after", [0, 2])
@pytest.mark.parametrize("chunk_size", [None, 2])
def test_keep_best_after_is_best_of_the_first_steps_then_that_restart_alone(
    float64, rule, after, chunk_size
):
    # Overlapping clusters: every restart's ELBO still moves at every step (checked below), so
    # a record of the wrong step would show.
    x, _ = make_point_sets(5, 60, num_components=4, seed=3, spread=1.0)
    gmm = GaussianMixture(3, 2, init_lloyd_steps=0)
    pruned = ps.refine(
        gmm, x, rule(6), seed=2, num_restarts=4, keep_best_after=after, chunk_size=chunk_size
    )
    # Independent answer, in two calls: every restart for `after` steps, the best one by its
    # ELBO there, then that restart alone for the remaining steps.
    full = ps.refine(gmm, x, EM(6), seed=2, num_restarts=4, keep_trajectory=True)
    assert bool(((full.history[1:] - full.history[:-1]).abs() > 1e-3).all())
    at = full.history[after]  # (R, batch): the ELBO at λ_after
    winner = at.argmax(0)
    rest = ps.refine(gmm, x, EM(6 - after), slots=full.trajectory[after][winner, range(5)])
    rows = torch.arange(5)
    assert torch.allclose(pruned.slots[winner, rows], rest.slots[0], atol=1e-10)
    assert torch.allclose(pruned.elbo[winner, rows], rest.elbo[0], atol=1e-10)
    assert torch.equal(pruned.steps[winner, rows], torch.full((5,), 6))
    losers = torch.ones(4, 5, dtype=torch.bool)
    losers[winner, rows] = False
    # A pruned restart stays at λ_after: its slots, its final ELBO (the one it lost by), steps.
    assert torch.allclose(
        pruned.slots[losers], torch.stack(full.trajectory)[after][losers], atol=1e-12
    )
    assert torch.allclose(pruned.elbo[losers], at[losers], atol=1e-10)
    assert torch.equal(pruned.steps[losers], torch.full((15,), after))
    assert torch.allclose(pruned.history[: after + 1], full.history[: after + 1], atol=1e-10)
    # ... and its history repeats that ELBO from step `after` on, as a converged datapoint's.
    history = pruned.history.permute(1, 2, 0)[losers]  # (15, T + 1)
    assert torch.allclose(history[:, after:], at[losers].unsqueeze(1).expand(-1, 7 - after))
    # EM is monotone: best() ends where the restart that ran on ends (or at a tie with it, a
    # restart that had converged to the same optimum, its components permuted).
    assert torch.allclose(pruned.best().elbo[0], rest.elbo[0], atol=1e-10)


@pytest.mark.parametrize("rule", [EM, _EvaluateThenStep])
@pytest.mark.parametrize("chunk_size", [None, 2])
def test_keep_best_after_in_stages_is_successive_halving_of_the_restarts(float64, rule, chunk_size):
    """``keep_best_after={0: 2, 2: 1}`` against its definition, computed from one run of every
    restart: the 2 best of 4 restarts by the ELBO at λ_0 run on, the better of those 2 at λ_2
    runs alone to the end; each loser stays where it lost (slots, ELBO, steps)."""
    x, _ = make_point_sets(5, 60, num_components=4, seed=3, spread=1.0)
    gmm = GaussianMixture(3, 2, init_lloyd_steps=0)
    staged = ps.refine(
        gmm, x, rule(6), seed=2, num_restarts=4, keep_best_after={2: 1, 0: 2},
        chunk_size=chunk_size,
    )  # fmt: skip
    full = ps.refine(gmm, x, EM(6), seed=2, num_restarts=4, keep_trajectory=True)
    trajectory = torch.stack(full.trajectory)  # (T + 1, R, batch, K, slot)
    rows = torch.arange(5)
    first = full.history[0].argsort(0, descending=True)[:2]  # (2, batch): kept at λ_0
    second = first[full.history[2][first, rows].argmax(0), rows]  # the winner at λ_2
    assert len(set(full.history[0].flatten().tolist())) == 20  # no ties to break
    assert torch.allclose(staged.slots[second, rows], full.slots[second, rows], atol=1e-10)
    assert torch.equal(staged.steps[second, rows], torch.full((5,), 6))
    runner_up = first.sum(0) - second
    assert torch.equal(staged.steps[runner_up, rows], torch.full((5,), 2))
    assert torch.allclose(staged.slots[runner_up, rows], trajectory[2][runner_up, rows], atol=1e-12)
    assert torch.allclose(staged.elbo[runner_up, rows], full.history[2][runner_up, rows])
    lost_at_start = torch.ones(4, 5, dtype=torch.bool)
    lost_at_start[first, rows] = False
    assert torch.equal(staged.steps[lost_at_start], torch.zeros(10, dtype=torch.long))
    assert torch.allclose(staged.slots[lost_at_start], trajectory[0][lost_at_start])
    assert torch.allclose(staged.elbo[lost_at_start], full.history[0][lost_at_start])
    assert torch.allclose(staged.best().elbo[0], full.elbo[second, rows], atol=1e-10)


def test_same_seed_same_result_and_history_starts_at_initial_elbo(float64):
    x, _ = make_point_sets(3, 30, seed=1)
    gmm = GaussianMixture(3, 2)
    a = ps.refine(gmm, x, EM(5), seed=3)
    b = ps.refine(gmm, x, EM(5), seed=3)
    assert torch.equal(a.slots, b.slots)
    assert a.slots.shape == (1, 3, 3, 5)  # the restart axis is kept for R = 1
    assert torch.allclose(a.history[0, 0], ps.per_datapoint_elbo(gmm, x, a.initial_slots[0]))
    assert torch.allclose(a.history[-1], a.elbo)


def test_early_stopping_at_tolerance(float64):
    x, _ = make_point_sets(3, 30, seed=2, spread=8.0)
    gmm = GaussianMixture(3, 2)
    res = ps.refine(gmm, x, EM(500), seed=0, tol=1e-8)
    assert res.num_steps < 500
    assert (res.residuals[-1] < 1e-8).all()
    assert res.history.shape == (res.num_steps + 1, 1, 3)


def test_dict_slots_and_test_time_num_slots(float64):
    x, _ = make_point_sets(2, 30, seed=3)
    gmm = GaussianMixture(3, 2)
    init = gmm.init_slots(x, 5, torch.Generator().manual_seed(0))
    res = ps.refine(gmm, x, EM(5), slots=gmm.slot_spec.split(init))
    assert res.slots.shape == (1, 2, 5, 5)
    assert res.responsibilities.shape == (1, 2, 5, 30)
    assert torch.allclose(res.responsibilities.sum(2), torch.ones(1, 2, 30))


def test_inner_rule_base_requires_step():
    class Incomplete(InnerRule):
        pass

    with pytest.raises(TypeError, match="must define step"):
        ps.refine(GaussianMixture(2, 2), torch.randn(1, 4, 2), Incomplete(2))


def test_best_keeps_encoded_data_and_final_state(float64):
    x, _ = make_point_sets(4, 30, seed=5)
    gmm = GaussianMixture(3, 2)
    rule = GradientAscent(4, 0.05, adam=True)
    res = ps.refine(gmm, x, rule, seed=2, num_restarts=3)
    assert res.state.slots.shape == (3, 4, 3, 5) and res.state.aux[0].shape == (3, 4, 3, 5)
    best = res.best()
    assert torch.equal(best.x_enc, x)
    assert torch.equal(best.state.slots, best.slots)
    idx = res.elbo.argmax(0)
    for n in range(4):
        assert torch.equal(best.state.aux[1][0, n], res.state.aux[1][idx[n], n])


@pytest.mark.parametrize("criterion", ["tol", "elbo_tol"])
def test_each_datapoint_stops_on_its_own_and_matches_a_solo_run(float64, criterion):
    x, _ = make_point_sets(6, 40, seed=21)
    gmm = GaussianMixture(3, 2)
    slots0 = gmm.init_slots(x, 3, torch.Generator().manual_seed(2))
    kwargs = {"tol": 1e-3} if criterion == "tol" else {"elbo_tol": 1e-4}
    res = ps.refine(gmm, x, EM(200), slots=slots0, **kwargs).select(0)
    assert res.steps.shape == (1, 6) and int(res.steps.max()) == res.num_steps
    assert len(set(res.steps[0].tolist())) > 1  # datapoints really stopped at different steps
    for n in range(6):
        k = int(res.steps[0, n])
        solo = ps.refine(gmm, x[n : n + 1], EM(k), slots=slots0[n : n + 1])
        assert torch.allclose(res.slots[0, n], solo.slots[0, 0], atol=1e-12)
        assert torch.allclose(res.history[: k + 1, 0, n], solo.history[:, 0, 0], atol=1e-10)
        assert (res.history[k:, 0, n] == res.elbo[0, n]).all()
        assert (res.residuals[k:, 0, n] == 0).all()


def test_every_rule_yields_the_posterior_at_the_final_slots(float64):
    """Responsibilities do not depend on the rule: a gradient rule, which computes none itself,
    gets the closed-form posterior of the GMM at its final slots."""
    x, _ = make_point_sets(3, 25, seed=8)
    gmm = GaussianMixture(3, 2)
    for rule in (GradientAscent(4, step_size=0.05), EM(4)):
        res = ps.refine(gmm, x, rule, seed=0, num_restarts=2)
        expected = torch.stack([gmm_responsibilities(gmm, x, s) for s in res.slots])
        assert torch.allclose(res.responsibilities, expected, atol=1e-10)


def test_nested_svi_stops_datapoints_on_their_own_before_the_differentiated_step(float64):
    """One meaning of tol: in training too, each datapoint's graph-free steps stop at its own
    tolerance, then the differentiated step runs on every datapoint (first_order: one)."""
    x, _ = make_point_sets(5, 40, seed=21)
    model = GaussianMixture(3, 2, encoder=torch.nn.Linear(2, 2))
    svi = ps.NestedSVI(
        model,
        EM(200),
        ps.objectives.Reconstruction(),
        pyro.optim.SGD({"lr": 1e-3}),
        gradient="first_order",
        tol=1e-3,
        seed=0,
    )
    _, result = svi.loss_and_result(x)
    steps = result.steps[0]
    assert len(set(steps.tolist())) > 1 and int(steps.max()) < 200
    with torch.no_grad():
        x_enc = model.encode(x)
    for n in range(5):
        k = int(steps[n])
        solo = run_inner(model, x_enc[n : n + 1], EM(k), result.initial_slots[0, n : n + 1], k)
        assert torch.allclose(result.slots[0, n], solo.slots[0, 0], atol=1e-10)


def test_refine_shares_the_default_estimator_and_checks_a_program_once(monkeypatch):
    """Problems built without an estimator share DEFAULT_ESTIMATOR: a second refine of the same
    data runs the distributions' argument checks and the observations' support check no more
    (before, every InnerProblem built its own estimator and repeated both), and the ELBO is
    unchanged."""
    from pyro_slots.elbo import DEFAULT_ESTIMATOR
    from pyro_slots.elbo import lean as lean_module
    from pyro_slots.inner.base import InnerProblem

    x, _ = make_point_sets(5, 30, num_components=3, seed=1)
    model = GaussianMixture(3, 2)
    assert InnerProblem(model, x).estimator is DEFAULT_ESTIMATOR
    checks, full_runs = [], []
    original_check = lean_module.check_observation
    original_estimate = DEFAULT_ESTIMATOR.lean._estimate
    monkeypatch.setattr(
        lean_module, "check_observation", lambda fn, v: checks.append(1) or original_check(fn, v)
    )

    def estimate(model, x, slots, check_observed=False, **kwargs):
        full_runs.append(not check_observed)  # True: run with every argument check
        return original_estimate(model, x, slots, check_observed, **kwargs)

    monkeypatch.setattr(DEFAULT_ESTIMATOR.lean, "_estimate", estimate)
    first = ps.refine(model, x, EM(3), seed=0)
    count = (len(checks), sum(full_runs))
    second = ps.refine(model, x, EM(3), seed=0)
    assert torch.equal(first.elbo, second.elbo)
    assert sum(full_runs) == count[1] <= 1  # the program's argument checks: once at most
    assert len(checks) == count[0] >= 1  # the observations' support: not checked again
    assert len(full_runs) == 2 * 4  # three EM steps and the final ELBO per call, all lean


@pytest.mark.parametrize("mode", [torch.no_grad, torch.inference_mode])
def test_observations_are_checked_once_per_active_set_also_under_inference_mode(monkeypatch, mode):
    """Under inference_mode the loop's batch (the restarts' repeat, the stopped datapoints'
    subsets) keeps a version counter, so its support check is remembered as under no_grad:
    one check per distinct observed tensor, not one per step."""
    from pyro_slots.elbo import lean as lean_module

    x, _ = make_point_sets(6, 40, seed=0)
    x = x + 0.0  # a tensor no other test's estimator has seen
    checks = []
    original = lean_module.check_observation

    def check(fn, value):
        if value.shape[1:] == (40, 2):  # the observations (not the enumerated assignments)
            checks.append(value.shape)
        return original(fn, value)

    monkeypatch.setattr(lean_module, "check_observation", check)
    with mode():
        result = ps.refine(GaussianMixture(3, 2), x, EM(8), seed=0, num_restarts=2, elbo_tol=1e-2)
    steps = result.steps.flatten().tolist()
    # The active set changes each time some datapoints stop, except the last time, when all
    # have stopped: one tensor per distinct step count, the first the whole (2 * 6)-row batch.
    assert len(set(steps)) > 1
    assert len(checks) == len(set(steps))
    assert checks[0] == (12, 40, 2)


@pytest.mark.parametrize("kind", ["em", "soft-kmeans", "slot-attention", "safeguarded", "reinit"])
def test_refine_under_inference_mode_equals_no_grad(kind):
    """Gradient-free rules run under ``torch.inference_mode`` (tensors without version
    counters, including an encoder's output) and give no_grad's result, bit for bit."""
    from torch import nn

    from pyro_slots.init import GaussianInit
    from pyro_slots.inner import EM, Reinitialize, Safeguarded, SlotAttention, SoftKMeans
    from pyro_slots.models import GaussianMixture

    torch.manual_seed(0)
    x = torch.randn(6, 40, 2, generator=torch.Generator().manual_seed(1))
    model = GaussianMixture(3, 2, encoder=nn.Linear(2, 2))
    attention = SlotAttention(3, slot_dim=5, input_dim=2, hidden_dim=16)
    rule = {
        "em": lambda: EM(3),
        "soft-kmeans": lambda: SoftKMeans(3),
        "slot-attention": lambda: attention,
        "safeguarded": lambda: Safeguarded(attention, fallback=EM(1)),
        "reinit": lambda: Reinitialize(attention, GaussianInit(5), seed=2),
    }[kind]()
    assert not rule.uses_elbo_gradient
    results = []
    for mode in (torch.no_grad, torch.inference_mode):
        with mode():
            results.append(ps.refine(model, x, rule, num_steps=3, seed=0, responsibilities=True))
    plain, inference = results
    assert inference.slots.is_inference()
    for name in ("slots", "elbo", "history", "responsibilities"):
        assert torch.equal(getattr(plain, name), getattr(inference, name)), name


def test_a_later_pruning_stage_ranks_an_earlier_loser_by_the_elbo_it_lost_with(float64):
    """Successive halving with a rule that can lower the ELBO (scripted: each restart visits
    given slots, so every ELBO is known). Restart C is good at λ_1 and terrible at λ_2, where
    the stage {2: 2} prunes it; at the stage {3: 1} it must compete with L(λ_2), not the
    L(λ_1) its history row 2 used to repeat, so A (the better running restart) runs on to
    step 10 and reaches the good fit, as the brute-force choice over the known ELBOs says."""
    from pyro_slots.inner import InnerProblem, InnerState, StepInfo

    g = torch.Generator().manual_seed(0)
    x = torch.cat([torch.randn(1, 20, 2, generator=g) * 0.3 - 2,
                   torch.randn(1, 20, 2, generator=g) * 0.3 + 2], 1).double()  # fmt: skip
    gmm = GaussianMixture(2, 2)
    good = ps.refine(gmm, x, EM(50), seed=0).slots[0]
    medium, worse, bad = good.clone(), good.clone(), good.clone()
    medium[..., :2] += 0.6
    worse[..., :2] += 0.8
    bad[..., :2] = 10.0
    steps = 10
    # A: a plateau, then the good fit; B likewise, lower; C: good at λ_1, bad from λ_2 on
    visits = {0: [medium] * 4 + [good] * (steps - 3),
              1: [worse] * 4 + [good] * (steps - 3),
              2: [medium, good] + [bad] * (steps - 1)}  # fmt: skip

    class Scripted(InnerRule):
        def step(self, state, problem, create_graph=False):
            rows = problem.row_index().tolist()
            slots = torch.cat([visits[r][state.step + 1] for r in rows])
            return InnerState(slots, state.step + 1), StepInfo(problem.elbo(state.slots))

    elbo = {k: InnerProblem(gmm, x).elbo(v).item() for k, v in
            dict(good=good, medium=medium, worse=worse, bad=bad).items()}  # fmt: skip
    # brute force: at step 2 C (bad) loses to A and B (medium, worse); at step 3 A (medium)
    # beats B (worse) and C's L(λ_2) = L(bad), so A alone runs on to the good fit
    assert elbo["good"] > elbo["medium"] > elbo["worse"] > elbo["bad"]
    start = torch.stack([visits[r][0] for r in range(3)])
    result = ps.refine(gmm, x, Scripted(steps), slots=start, num_restarts=3,
                       keep_best_after={2: 2, 3: 1})  # fmt: skip
    assert result.steps[:, 0].tolist() == [steps, 3, 2]
    assert result.elbo[:, 0].tolist() == pytest.approx([elbo["good"], elbo["worse"], elbo["bad"]])
    assert result.history[2, 2, 0].item() == pytest.approx(elbo["bad"])  # C's row 2: L(λ_2)
