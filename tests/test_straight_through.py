"""Learned queries and the straight-through gradient to the slot initializer (BO-QSA)."""

import json
import warnings

import pyro.optim
import pytest
import torch

import pyro_slots as ps
from pyro_slots.inner import GradientAscent
from pyro_slots.objectives import NegativeELBO
from pyro_slots.refine import run_inner
from tests.conftest import make_point_sets
from tests.test_nested import _model

T = 3


def _svi(model, init, gradient="first_order", **kw):
    return ps.NestedSVI(model, GradientAscent(T, step_size=0.3), NegativeELBO(),
                        pyro.optim.SGD({"lr": 1e-3}), gradient=gradient, init=init, seed=0,
                        **kw)  # fmt: skip


def test_learned_queries_are_the_same_slots_for_every_datapoint():
    torch.manual_seed(0)
    init = ps.LearnedQueries(3, 5, scale=0.5)
    slots = init(4, 3)
    assert slots.shape == (4, 3, 5)
    for n in range(4):
        assert torch.equal(slots[n], init.queries)
    assert init.queries.std().item() == pytest.approx(0.5, rel=0.5)
    with pytest.raises(ValueError, match="num_slots: LearnedQueries holds 3 queries, got 4"):
        init(4, 4)


def test_straight_through_gradient_is_the_gradient_at_the_first_differentiated_step(float64):
    """With first-order gradients through T = 3 steps, the queries' gradient is that of the
    stated surrogate J(f(sg(λ_2) + q - sg(q))): d/dδ J(f(λ_2 + δ)) at δ = 0, by central finite
    differences of one inner step from λ_2 (δ shared by every datapoint, as q is). J's value and
    the other weights' gradients are those of plain first-order training."""
    x, _ = make_point_sets(3, 25, seed=1)
    model = _model()
    torch.manual_seed(1)
    init = ps.LearnedQueries(3, model.slot_dim).double()
    svi = _svi(model, init, straight_through=True)
    loss = svi.loss(x)
    grad_q, grad_w = torch.autograd.grad(loss, [init.queries, model.encoder.weight])

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        plain = _svi(model, init)
    assert any("reaches none of the" in str(w.message) for w in caught)
    plain_loss = plain.loss(x)
    assert plain_loss.item() == pytest.approx(loss.item(), rel=1e-12)
    plain_q, plain_w = torch.autograd.grad(plain_loss, [init.queries, model.encoder.weight],
                                           allow_unused=True)  # fmt: skip
    assert plain_q is None or torch.count_nonzero(plain_q) == 0
    torch.testing.assert_close(grad_w, plain_w)

    with torch.no_grad():
        x_enc = model.encode(x)
        rule = svi.inner
        lam = run_inner(model, x_enc, rule, init(3, 3), T - 1).slots[0]

        def surrogate(delta):
            last = run_inner(model, x_enc, rule, lam + delta, 1).slots[0]
            return NegativeELBO()(model, x, x_enc, last).mean().item()

        eps = 1e-6
        for k, d in [(0, 0), (1, 2), (2, 4), (2, model.slot_dim - 1)]:
            delta = torch.zeros_like(init.queries)
            delta[k, d] = eps
            fd = (surrogate(delta) - surrogate(-delta)) / (2 * eps)
            assert grad_q[k, d].item() == pytest.approx(fd, rel=1e-5, abs=1e-9), (k, d)
    assert grad_q.abs().sum() > 0


@pytest.mark.parametrize(
    "gradient, options, message",
    [
        ("unrolled", {}, "straight_through: only where .* not gradient='unrolled'"),
        ("implicit", {}, "not gradient='implicit'"),
        ("truncated", {"truncate": T}, f"with truncate={T}"),
    ],
)
def test_straight_through_is_refused_where_the_gradient_reaches_lambda_0(gradient, options,
                                                                         message):  # fmt: skip
    model = _model()
    init = ps.LearnedQueries(3, model.slot_dim)
    with pytest.raises(ValueError, match=message):
        _svi(model, init, gradient=gradient, straight_through=True, **options)


def test_truncated_straight_through_trains_the_queries(float64):
    """Truncated to 2 of T = 3 steps: the queries receive a non-zero gradient and one SGD step
    moves them by lr times it."""
    x, _ = make_point_sets(2, 20, seed=3)
    model = _model()
    init = ps.LearnedQueries(3, model.slot_dim).double()
    svi = _svi(model, init, gradient="truncated", truncate=2, straight_through=True)
    before = init.queries.detach().clone()
    (grad,) = torch.autograd.grad(svi.loss(x), init.queries)
    svi.step(x)
    torch.testing.assert_close(init.queries.detach(), before - 1e-3 * grad)


# ----------------------------------------------------------------- the command line
def test_trainer_trains_queries_under_first_order_with_straight_through(tmp_path):
    """--init queries --straight-through: the first update moves every query by Adam's first
    step, lr · warm-up factor · g / (|g| + eps) ≈ lr/warm-up in every coordinate whose gradient
    is not zero; without --straight-through the queries are refused, and auto keeps the
    model's learned initializer instead of fixing it."""
    from pyro_slots.cli.config import ConfigError, TrainConfig
    from pyro_slots.cli.registry import resolve
    from pyro_slots.cli.runs import new_run

    base = dict(model="slot-autoencoder", dataset="tetrominoes", gradient="first_order",
                inner_steps=3, batch_size=2, slot_dim=8, lr=1e-2, warmup_steps=10,
                out=str(tmp_path / "run"))  # fmt: skip
    with pytest.raises(ConfigError, match="init: queries are trained only through every"):
        resolve(TrainConfig(**base, init="queries"))
    with pytest.raises(ConfigError, match="straight_through: only where .* not --gradient unr"):
        resolve(TrainConfig(**{**base, "gradient": "unrolled"}, straight_through=True))
    assert resolve(TrainConfig(**base, straight_through=True)).init == "model"
    assert resolve(TrainConfig(**base)).init == "fixed"

    run = new_run(resolve(TrainConfig(**base, init="queries", straight_through=True)))
    init = run.components.init
    assert isinstance(init, ps.LearnedQueries) and init.queries.shape == (4, 8)
    before = init.queries.detach().clone()
    batch = run.components.stream.batch(0)
    run.svi.step(batch.x)
    moved = (init.queries.detach() - before).abs()
    # Adam's first step is lr_t · m / (sqrt(v) + eps) = lr_t · sign(g) where g != 0
    lr_t = 1e-2 * 1 / 10
    assert moved.max().item() == pytest.approx(lr_t, rel=1e-3)
    assert (moved > 0.5 * lr_t).float().mean() > 0.9
    # Restarts from learned queries would all be the same: refused before any work, here and
    # in the config (eval_restarts).
    from pyro_slots.cli.evaluate import infer

    with pytest.raises(ConfigError, match="--restarts: --init queries starts every restart at"):
        infer(run, 2, restarts=2)
    assert infer(run, 2, restarts=1).result.slots.shape == (1, 2, 4, 8)
    with pytest.raises(ConfigError, match="eval_restarts: --init queries starts every restart"):
        resolve(TrainConfig(**base, init="queries", straight_through=True, eval_restarts=3))


# ------------------------------------------------------- semi-amortized initialization
def test_amortized_init_is_a_permutation_invariant_guess_from_the_measurements():
    torch.manual_seed(0)
    init = ps.AmortizedInit(feature_dim=2, num_slots=3, dim=5, hidden_dim=16)
    x_enc = torch.randn(4, 30, 2)
    slots = init(4, 3, x_enc=x_enc)
    assert slots.shape == (4, 3, 5)
    torch.testing.assert_close(init(4, 3, x_enc=x_enc[:, torch.randperm(30)]), slots)
    by_hand = init.rho(init.phi(x_enc).mean(1)).reshape(4, 3, 5)
    torch.testing.assert_close(slots, by_hand)
    with pytest.raises(ValueError, match="x_enc: AmortizedInit predicts the slots"):
        init(4, 3)
    with pytest.raises(ValueError, match=r"x_enc: expected shape \(4, M, 2\)"):
        init(4, 3, x_enc=torch.randn(4, 30, 3))
    with pytest.raises(ValueError, match="num_slots: AmortizedInit predicts 3, got 2"):
        init(4, 2, x_enc=x_enc)


def test_init_regression_adds_the_distance_to_the_inner_solution_and_trains_the_guess(float64):
    """J(β) - J(0) = β · mean (λ_0 - λ_T)², with λ_0 the amortized guess and λ_T what refine
    finds from it; under first-order gradients the guess's weights receive exactly the gradient
    of that term with λ_T held fixed (central finite differences)."""
    x, _ = make_point_sets(3, 25, seed=1)
    model = _model()
    torch.manual_seed(2)
    init = ps.AmortizedInit(2, 3, model.slot_dim, hidden_dim=8).double()
    beta = 0.7
    svi = _svi(model, init, init_regression=beta)
    loss = svi.loss(x)
    with pytest.warns(UserWarning, match="reaches none of the 303 trainable parameters"):
        plain = _svi(model, init)
    base = plain.loss(x)
    with torch.no_grad():
        x_enc = model.encode(x)
        lam_0 = init(3, 3, x_enc=x_enc)
        result = ps.refine(model, x, svi.inner, num_steps=T, init=init)
        lam_T = result.slots[0]
        torch.testing.assert_close(result.initial_slots[0], lam_0)
    term = beta * (lam_0 - lam_T).pow(2).mean()
    assert (loss - base).item() == pytest.approx(term.item(), rel=1e-9)

    bias = init.rho[-1].bias
    (grad,) = torch.autograd.grad(loss, bias)

    def surrogate():
        with torch.no_grad():
            return beta * (init(3, 3, x_enc=x_enc) - lam_T).pow(2).mean().item()

    eps = 1e-6
    for i in grad.abs().topk(3).indices.tolist():
        with torch.no_grad():
            bias[i] += eps
            up = surrogate()
            bias[i] -= 2 * eps
            down = surrogate()
            bias[i] += eps
        assert grad[i].item() == pytest.approx((up - down) / (2 * eps), rel=1e-6)
    with pytest.raises(ValueError, match="init_regression"):
        _svi(model, init, init_regression=-1.0)


def test_trainer_trains_an_amortized_guess_by_regression(tmp_path):
    """--init amortized --init-regression β on images: the guess reads the encoder's features;
    one update moves its weights; the final test scores the run (T = 1 at test gives the
    refined guess); without a way to train it the option is refused."""
    from pyro_slots.cli.config import ConfigError, TrainConfig
    from pyro_slots.cli.registry import build, resolve
    from pyro_slots.cli.train import train

    base = dict(model="slot-autoencoder", dataset="tetrominoes", gradient="first_order",
                inner_steps=2, batch_size=2, slot_dim=8, steps=1, eval_every=0, test_size=2,
                eval_inner_steps=1, init="amortized", out=str(tmp_path / "run"))  # fmt: skip
    with pytest.raises(ConfigError, match="init: amortized are trained only through every"):
        resolve(TrainConfig(**base))
    with pytest.raises(ConfigError, match="init_regression: expected a number >= 0, got -1"):
        resolve(TrainConfig(**base, init_regression=-1.0))
    config = TrainConfig(**base, init_regression=1.0)
    torch.manual_seed(0)
    before = build(resolve(config)).init
    run = train(config, progress=False, pictures=False, echo=lambda *a: None)
    init = run.components.init
    assert isinstance(init, ps.AmortizedInit) and init.num_slots == 4
    features = run.components.model.encode(run.components.stream.held_out(1).x).shape[-1]
    assert init.feature_dim == features
    moved = [not torch.equal(a, b) for a, b in zip(init.parameters(), before.parameters())]
    assert all(moved)
    report = json.loads((tmp_path / "run" / "test.json").read_text())
    assert report["metrics"]["inner_steps"] == 1 and 0 <= report["metrics"]["fg_ari"] <= 1


def test_init_regression_on_clips_is_the_first_frames(float64):
    """On clips the regression term is the first frame's: J(β) - J(0) = β · mean (λ_0 - λ_T)²
    of frame 0 (the carried starts are the previous frame's results, not the initializer's)."""
    x, _ = make_point_sets(6, 20, seed=4)
    clips = x.reshape(3, 2, 20, 2)  # 3 clips of 2 frames
    model = _model()
    torch.manual_seed(3)
    init = ps.AmortizedInit(2, 3, model.slot_dim, hidden_dim=8).double()
    beta = 0.3
    loss = _svi(model, init, init_regression=beta, sequence=True).loss(clips)
    with pytest.warns(UserWarning, match="reaches none of the"):
        plain = _svi(model, init, sequence=True)
    base = plain.loss(clips)
    with torch.no_grad():
        first = ps.refine(model, clips[:, 0], plain.inner, num_steps=T, init=init)
        term = beta * (first.initial_slots[0] - first.slots[0]).pow(2).mean()
    assert (loss - base).item() == pytest.approx(term.item(), rel=1e-9)
