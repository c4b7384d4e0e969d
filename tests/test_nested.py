import math

import pyro.optim
import pytest
import torch
from torch import nn

import pyro_slots as ps
from pyro_slots.inner import EM, GradientAscent
from pyro_slots.models import GaussianMixture
from pyro_slots.objectives import NegativeELBO, Reconstruction
from tests.conftest import make_point_sets


def _model(seed=0):
    """GMM whose encoder is a near-identity map, scaled so the clusters have unit-order spread."""
    torch.manual_seed(seed)
    enc = nn.Linear(2, 2)
    with torch.no_grad():
        enc.weight.mul_(0.2).add_(2 * torch.eye(2))
    return GaussianMixture(3, 2, encoder=enc)


def _svi(model, rule, gradient="unrolled", objective=None, **kw):
    return ps.NestedSVI(
        model,
        rule,
        objective or Reconstruction(),
        pyro.optim.SGD({"lr": 1e-3}),
        gradient=gradient,
        seed=0,
        **kw,
    )


def _loss_at(svi, x, seed=0):
    svi.generator.manual_seed(seed)
    return svi.loss(x)


def test_unrolled_gradient_matches_central_finite_difference(float64):
    x, _ = make_point_sets(3, 25, seed=1)
    model = _model()
    svi = _svi(model, GradientAscent(6, step_size=0.3))
    w = model.encoder.weight
    (grad,) = torch.autograd.grad(_loss_at(svi, x), w)
    eps = 1e-6
    for i, j in [(0, 0), (0, 1), (1, 0)]:
        with torch.no_grad():
            w[i, j] += eps
            up = _loss_at(svi, x).item()
            w[i, j] -= 2 * eps
            down = _loss_at(svi, x).item()
            w[i, j] += eps
        fd = (up - down) / (2 * eps)
        assert grad[i, j].item() == pytest.approx(fd, rel=1e-4, abs=1e-8)


@pytest.mark.parametrize("rule", [EM(300), GradientAscent(600, step_size=0.5)], ids=["em", "ga"])
def test_implicit_matches_unrolled_to_convergence(float64, rule):
    x, _ = make_point_sets(3, 30, seed=2)
    grads = {}
    for mode in ["unrolled", "implicit"]:
        model = _model()
        gradient = ps.ImplicitAdjoint(max_iter=500, tol=1e-10) if mode == "implicit" else mode
        svi = _svi(model, rule, gradient=gradient)
        grads[mode] = torch.autograd.grad(_loss_at(svi, x), model.encoder.weight)[0]
    rel = (grads["implicit"] - grads["unrolled"]).norm() / grads["unrolled"].norm()
    assert rel < 1e-3


def _saved_bytes(svi, x):
    """Bytes the autograd graph of J still holds for the backward pass once J is computed.

    Every tensor saved for backward is recorded by a weak reference; those still alive when the
    forward pass ends are the ones the graph keeps (transient graphs of the graph-free inner
    steps are freed by then).
    """
    import weakref

    saved = []

    def pack(t):
        saved.append(weakref.ref(t))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = _loss_at(svi, x)
    alive = {}
    for ref in saved:
        t = ref()
        if t is not None:
            alive[(t.data_ptr(), t.numel())] = t.numel() * t.element_size()
    torch.autograd.grad(loss, svi.model.encoder.weight)
    return sum(alive.values())


# Five EM steps are not a fixed point; the adjoint may not converge there, which is beside the
# point of a memory test.
@pytest.mark.filterwarnings("ignore::pyro_slots.ImplicitGradientWarning")
@pytest.mark.parametrize("mode", ["first_order", "truncated", "implicit"])
def test_graph_memory_does_not_grow_with_inner_steps(float64, mode):
    x, _ = make_point_sets(4, 30, seed=3)
    sizes = {}
    for steps in (5, 40):
        svi = _svi(_model(), EM(steps), gradient=mode, truncate=2)
        sizes[steps] = _saved_bytes(svi, x)
    assert sizes[40] <= 1.05 * sizes[5]
    unrolled = {s: _saved_bytes(_svi(_model(), EM(s)), x) for s in (5, 40)}
    assert unrolled[40] > 5 * unrolled[5]


def test_refine_leaves_no_gradient_in_shared_weights(float64):
    x, _ = make_point_sets(3, 20, seed=4)
    model = _model()
    ps.refine(model, x, GradientAscent(5, 0.1), seed=0)
    ps.refine(model, x, EM(5), seed=0)
    assert all(p.grad is None for p in model.parameters())


def test_step_writes_only_the_task_gradient(float64):
    """K = 1, one EM step is exact: J has a closed form in the scalar encoder weight w.

    x̃ = w x, λ* = (w x̄, log sqrt(v), 0) with v = (1 + r) w² s² (the variance floor r is
    relative to the data's variance), J = -ELBO / batch = M/2 log(2π v) + M / (2 (1 + r)),
    so dJ/dw = M / w.
    """
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 40, 1, generator=g)
    enc = nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        enc.weight.fill_(1.3)
    model = GaussianMixture(1, 1, encoder=enc, reg_covar=1e-3)
    svi = ps.NestedSVI(
        model, GradientAscent(1, 1e-9), NegativeELBO(), pyro.optim.SGD({"lr": 0.0}), seed=0
    )
    # A rule that ignores the data for T-1 steps and takes one closed-form EM step:
    svi.inner = EM(1)
    svi.num_steps = 1
    w, r, m = 1.3, 1e-3, x.shape[1]
    s2 = x.var(unbiased=False).item()

    def j_of(w):
        v = (1 + r) * w * w * s2
        return m / 2 * math.log(2 * math.pi * v) + m / (2 * (1 + r))

    dj = m / w
    assert svi.loss(x).item() == pytest.approx(j_of(w), rel=1e-9)
    loss = svi.loss_and_grads(x)
    assert loss == pytest.approx(j_of(w), rel=1e-9)
    assert enc.weight.grad.item() == pytest.approx(dj, rel=1e-7)
    fd = (j_of(w + 1e-6) - j_of(w - 1e-6)) / 2e-6
    assert enc.weight.grad.item() == pytest.approx(fd, rel=1e-6)


def test_step_updates_weights_with_sgd(float64):
    x, _ = make_point_sets(2, 20, seed=5)
    model = _model()
    svi = ps.NestedSVI(
        model, GradientAscent(3, 0.2), Reconstruction(), pyro.optim.SGD({"lr": 0.1}), seed=0
    )
    before = model.encoder.weight.detach().clone()
    svi.generator.manual_seed(0)
    grad = torch.autograd.grad(svi.loss(x), model.encoder.weight)[0]
    svi.generator.manual_seed(0)
    svi.step(x)
    assert torch.allclose(model.encoder.weight, before - 0.1 * grad, atol=1e-12)
    assert all(p.grad is None for p in model.parameters())


def test_learned_initializer_gets_gradient_in_mean_and_scale(float64):
    x, _ = make_point_sets(2, 20, seed=6)
    model = GaussianMixture(3, 2)
    init = ps.GaussianInit(model.slot_dim, loc=0.0, scale=0.5)
    svi = ps.NestedSVI(
        model,
        GradientAscent(3, 0.2),
        NegativeELBO(),
        pyro.optim.Adam({"lr": 1e-2}),
        init=init,
        seed=0,
    )
    names = [n for n, _ in svi.named_parameters()]
    assert names == ["init.loc", "init.log_scale"]

    def j(loc, log_scale):
        svi.generator.manual_seed(3)
        with torch.no_grad():
            init.loc.copy_(loc)
            init.log_scale.copy_(log_scale)
        return svi.loss(x)

    loc0, ls0 = init.loc.detach().clone(), init.log_scale.detach().clone()
    g_loc, g_ls = torch.autograd.grad(j(loc0, ls0), [init.loc, init.log_scale])
    assert g_loc.abs().sum() > 0 and g_ls.abs().sum() > 0
    e = torch.zeros_like(loc0)
    e[1] = 1e-6
    fd_loc = (j(loc0 + e, ls0).item() - j(loc0 - e, ls0).item()) / 2e-6
    fd_ls = (j(loc0, ls0 + e).item() - j(loc0, ls0 - e).item()) / 2e-6
    assert g_loc[1].item() == pytest.approx(fd_loc, rel=1e-4)
    assert g_ls[1].item() == pytest.approx(fd_ls, rel=1e-4)


def test_iteration_weights_linear(float64):
    """Linear weights: J = Σ_t (t / Σt) J(λ_t), checked against refine's trajectory."""
    x, _ = make_point_sets(2, 20, seed=7)
    model = _model()
    svi = _svi(model, EM(3), iteration_weights="linear")
    svi.generator.manual_seed(0)
    loss, result = svi.loss_and_result(x)
    loss = loss.item()
    traj = [s[0] for s in result.trajectory]
    obj = Reconstruction()
    x_enc = model.encode(x)
    expected = sum(t / 6 * obj(model, x, x_enc, traj[t]).mean().item() for t in (1, 2, 3))
    assert loss == pytest.approx(expected, rel=1e-10)


def test_nan_in_inner_loop_names_the_step(float64):
    x, _ = make_point_sets(2, 20, seed=8)
    model = GaussianMixture(3, 2)
    with pytest.raises(ps.InnerLoopError, match=r"inner step \d+"):
        ps.refine(model, x, GradientAscent(20, step_size=1e6), seed=0)


def test_non_finite_objective_does_not_update_weights(float64):
    class Broken(Reconstruction):
        def forward(self, *args):
            return super().forward(*args) * float("nan")

    x, _ = make_point_sets(2, 20, seed=9)
    model = _model()
    before = model.encoder.weight.detach().clone()
    svi = _svi(model, EM(2), objective=Broken())
    with pytest.raises(FloatingPointError, match="task objective"):
        svi.step(x)
    assert torch.equal(model.encoder.weight, before)


def test_implicit_falls_back_with_warning_when_adjoint_diverges(float64):
    """A step size large enough to make the update expansive: the fixed-point adjoint
    iteration diverges and falls back to the first-order gradient."""
    x, _ = make_point_sets(2, 20, seed=10)
    model = _model()
    svi = _svi(
        model,
        GradientAscent(3, step_size=5.0),
        gradient=ps.ImplicitAdjoint(max_iter=20, solver="fixed_point"),
    )
    with pytest.warns(ps.ImplicitGradientWarning):
        g_impl = torch.autograd.grad(_loss_at(svi, x), model.encoder.weight)[0]
    svi_fo = _svi(model, GradientAscent(3, step_size=5.0), gradient="first_order")
    g_fo = torch.autograd.grad(_loss_at(svi_fo, x), model.encoder.weight)[0]
    assert torch.allclose(g_impl, g_fo, atol=1e-10)
    assert svi.implicit.num_fallbacks == 1


@pytest.mark.parametrize("radius", [0.5, 3.0])
@pytest.mark.parametrize("solver", ["gmres", "fixed_point"])
def test_adjoint_solve_matches_a_dense_solve(float64, solver, radius):
    """f(λ) = A λ + b: the adjoint is (I - A)^{-T} g. GMRES solves it also when A is expansive
    (spectral radius 3), where the fixed-point iteration must diverge and fall back."""
    g = torch.Generator().manual_seed(0)
    n = 12
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=g))
    eigs = radius * torch.linspace(-1.0, 1.0, n)  # symmetric A with spectral radius `radius`
    eigs[eigs.abs() < 0.2] = 0.3  # keep I - A well conditioned
    a = q @ torch.diag(eigs) @ q.T + 0.1 * torch.randn(n, n, generator=g)  # and non-symmetric
    lam = torch.randn(n, generator=g, requires_grad=True)
    out = a @ lam + 1.0
    grad_out = torch.randn(n, generator=g)
    expected = torch.linalg.solve((torch.eye(n) - a).T, grad_out)
    adjoint = ps.ImplicitAdjoint(
        max_iter=50 if solver == "gmres" else 400, tol=1e-10, solver=solver
    )
    if solver == "fixed_point" and radius > 1:
        with pytest.warns(ps.ImplicitGradientWarning):
            got = adjoint.solve(grad_out, out, lam)
        assert torch.equal(got, grad_out) and adjoint.num_fallbacks == 1
        return
    got = adjoint.solve(grad_out, out, lam)
    assert torch.allclose(got, expected, atol=1e-8)
    assert adjoint.num_fallbacks == 0
    if solver == "gmres":
        assert adjoint.last_iterations <= n  # GMRES is exact after n Krylov vectors


@pytest.mark.parametrize("solver", ["gmres", "fixed_point"])
def test_adjoint_of_a_singular_system_falls_back_with_a_warning(float64, solver):
    """f(λ) = A λ + b with A = diag(1, 0.5): (I - A^T) u = g reads 0 u_0 = 1 for g = (1, 1),
    which has no solution. GMRES's Krylov space breaks down there; it returned the
    least-squares u (residual 0.7 of |g|) as a solution, without the fallback and warning."""
    a = torch.diag(torch.tensor([1.0, 0.5]))
    lam = torch.tensor([0.3, -0.2], requires_grad=True)
    g = torch.ones(2)
    adjoint = ps.ImplicitAdjoint(max_iter=50, tol=1e-6, solver=solver)
    with pytest.warns(ps.ImplicitGradientWarning):
        got = adjoint.solve(g, a @ lam + 1.0, lam)
    assert torch.equal(got, g) and adjoint.num_fallbacks == 1


def test_adjoint_solver_is_validated():
    with pytest.raises(ValueError, match="solver"):
        ps.ImplicitAdjoint(solver="broyden")


def test_evaluate_loss_with_negative_elbo_needs_no_gradients(float64):
    x, _ = make_point_sets(3, 20, seed=11)
    model = _model()
    svi = _svi(model, EM(3), objective=NegativeELBO())
    value = svi.evaluate_loss(x)
    svi.generator.manual_seed(0)
    _, result = svi.loss_and_result(x, differentiable=False)  # the same draws: state restored
    expected = -ps.per_datapoint_elbo(model, model.encode(x), result.slots[0]).mean()
    assert value == pytest.approx(expected.item(), rel=1e-9)


def test_objective_without_trainable_dependence_is_reported():
    x, _ = make_point_sets(2, 20, seed=12)
    svi = ps.NestedSVI(
        GaussianMixture(3, 2), EM(3), NegativeELBO(), pyro.optim.Adam({}), gradient="first_order"
    )
    with pytest.raises(ValueError, match="gradient='first_order'"):
        svi.step(x)


@pytest.mark.parametrize("scheduled", [False, True], ids=["adam", "adam+scheduler"])
def test_state_dict_resumes_exactly(float64, scheduled):
    """Train 4 steps; or 2 steps, save, rebuild, load, 2 steps: identical weights."""
    x, _ = make_point_sets(3, 20, seed=13)

    def build():
        model = _model()
        if scheduled:
            optim = pyro.optim.LambdaLR(
                {
                    "optimizer": torch.optim.Adam,
                    "optim_args": {"lr": 0.05},
                    "lr_lambda": lambda step: 0.5**step,
                }
            )
        else:
            optim = pyro.optim.Adam({"lr": 0.05})
        return model, ps.NestedSVI(model, EM(3), Reconstruction(), optim, seed=1)

    model_a, svi_a = build()
    for _ in range(4):
        svi_a.step(x)
        if scheduled:
            svi_a.optim.step()
    model_b, svi_b = build()
    for _ in range(2):
        svi_b.step(x)
        if scheduled:
            svi_b.optim.step()
    saved = {"model": model_b.state_dict(), "svi": svi_b.state_dict()}
    model_c, svi_c = build()
    model_c.load_state_dict(saved["model"])
    svi_c.load_state_dict(saved["svi"])
    for _ in range(2):
        svi_c.step(x)
        if scheduled:
            svi_c.optim.step()
    assert torch.equal(model_c.encoder.weight, model_a.encoder.weight)
    assert not torch.equal(model_c.encoder.weight, model_b.encoder.weight)


def test_load_state_dict_reads_the_v01_optimizer_format(float64):
    """v0.1 wrapped a plain optimizer's state as {"optimizer": ...}; Pyro's get_state (used
    now) stores the torch state dict itself. Both load to the same moments."""
    x, _ = make_point_sets(2, 20, seed=14)
    model = _model()
    svi = ps.NestedSVI(model, EM(2), Reconstruction(), pyro.optim.Adam({"lr": 0.05}), seed=1)
    svi.step(x)
    state = svi.state_dict()
    assert set(state["optim"]) == {n for n, _ in svi.named_parameters()}
    old = dict(state, optim={k: {"optimizer": v} for k, v in state["optim"].items()})
    for saved in (state, old):
        fresh = ps.NestedSVI(_model(), EM(2), Reconstruction(), pyro.optim.Adam({"lr": 0.05}))
        fresh.load_state_dict(saved)
        assert fresh.state_dict()["optim"].keys() == state["optim"].keys()
        for name, value in state["optim"].items():
            got = fresh.state_dict()["optim"][name]["state"][0]["exp_avg"]
            assert torch.equal(got, value["state"][0]["exp_avg"])
    with pytest.raises(ValueError, match="has not stepped yet"):
        svi.load_state_dict(state)


@pytest.mark.parametrize(
    "gradient, truncate, steps, weights",
    [
        ("first_order", 1, 3, "last"),
        ("truncated", 2, 3, "last"),
        # T = 1: first_order reached λ_0 with "last" and not with "uniform" (the same J)
        ("first_order", 1, 1, "last"),
        ("first_order", 1, 1, "uniform"),
    ],
)
def test_detached_modes_give_the_initializer_no_gradient(
    float64, gradient, truncate, steps, weights
):
    """first_order (and truncated with fewer steps than T) detach λ before the differentiated
    steps: J still depends on the learned initialization (a finite difference says so), but
    its gradient reaches no parameter of it, so such an initializer stays where it starts."""
    x, _ = make_point_sets(2, 20, seed=6)
    model = GaussianMixture(3, 2)
    init = ps.GaussianInit(model.slot_dim, loc=0.0, scale=0.5)
    rule, objective = GradientAscent(steps, 0.2), Reconstruction()
    # ... and the constructor says so, counting the initializer's trainable numbers.
    message = f"reaches none of the {2 * model.slot_dim} trainable parameters of the slot "
    with pytest.warns(UserWarning, match=message + "initializer GaussianInit"):
        svi = ps.NestedSVI(
            model,
            rule,
            objective,
            pyro.optim.Adam({"lr": 1e-2}),
            init=init,
            seed=0,
            gradient=gradient,
            truncate=truncate,
            iteration_weights=weights,
        )

    def j(shift):
        svi.generator.manual_seed(3)
        with torch.no_grad():
            init.loc.fill_(shift)
        return svi.loss(x)

    loss = j(0.0)
    grads = torch.autograd.grad(loss, [init.loc, init.log_scale], allow_unused=True)
    assert all(g is None or g.abs().max() == 0 for g in grads)
    assert abs(j(1e-3).item() - j(-1e-3).item()) > 1e-8


@pytest.mark.parametrize(
    "gradient, learnable", [("unrolled", True), ("truncated", True), ("first_order", False)]
)
def test_no_frozen_initializer_warning_when_the_gradient_reaches_it(gradient, learnable):
    """Unrolled (and truncated over all T steps) differentiate λ_0; a fixed initializer has
    nothing to train: no warning (warnings are errors in this suite)."""
    model = GaussianMixture(3, 2)
    init = ps.GaussianInit(model.slot_dim, learnable=learnable)
    svi = ps.NestedSVI(
        model,
        GradientAscent(3, 0.2),
        Reconstruction(),
        pyro.optim.Adam({"lr": 1e-2}),
        init=init,
        gradient=gradient,
        truncate=3,
    )
    assert svi._backprop_steps() == (1 if gradient == "first_order" else 3)


def test_a_transition_the_gradient_does_not_reach_is_said_and_stays_put(float64):
    """first_order detaches each frame's starting slots, the transition's output: its
    parameters get no gradient (though J depends on them: a finite difference), and the
    constructor says so; straight_through passes J's gradient on to them."""
    g = torch.Generator().manual_seed(0)
    clips = torch.randn(2, 3, 20, 2, generator=g, dtype=torch.float64)
    model = GaussianMixture(3, 2, encoder=nn.Linear(2, 2).double())
    transition = nn.Linear(model.slot_dim, model.slot_dim).double()

    def make(**kw):
        return ps.NestedSVI(model, GradientAscent(2, 0.2), Reconstruction(),
                            pyro.optim.Adam({"lr": 1e-2}), seed=0, sequence=True,
                            transition=transition, gradient="first_order", **kw)  # fmt: skip

    count = model.slot_dim * (model.slot_dim + 1)  # the Linear's weight and bias
    with pytest.warns(UserWarning, match=f"none of the {count} trainable parameters of the tran"):
        svi = make()

    def j(svi, shift=0.0):
        svi.generator.manual_seed(1)
        with torch.no_grad():
            transition.bias[0] += shift
        try:
            return svi.loss(clips)
        finally:
            with torch.no_grad():
                transition.bias[0] -= shift

    (grad,) = torch.autograd.grad(j(svi), transition.bias, allow_unused=True)
    assert grad is None or grad.abs().max() == 0
    assert abs(j(svi, 1e-4).item() - j(svi, -1e-4).item()) > 1e-9
    through = make(straight_through=True)
    (grad,) = torch.autograd.grad(j(through), transition.bias)
    assert grad.abs().max() > 0


@pytest.mark.parametrize("safeguarded", [True, False])
def test_implicit_gradients_refuse_rules_that_reject_steps(safeguarded):
    """A rejected step is the identity: (I - ∂f/∂λ) is singular there and the adjoint does not
    exist (GeneralizedEM near its optimum rejects most steps; the implicit gradient was 41 %
    off the dense implicit-function-theorem one, silently)."""
    from pyro_slots.inner import GeneralizedEM, Safeguarded

    model = GaussianMixture(3, 2)
    rule = GeneralizedEM(5, safeguarded=safeguarded)
    if safeguarded:
        with pytest.raises(ValueError, match="gradient: 'implicit' needs a rule .* GeneralizedEM"):
            _svi(model, rule, gradient="implicit")
    else:
        assert _svi(model, rule, gradient="implicit").gradient == "implicit"
    with pytest.raises(ValueError, match="Safeguarded accepts or rejects"):
        _svi(model, Safeguarded(GradientAscent(5, 0.1)), gradient="implicit")


def test_first_order_over_the_iterates_trains_the_rule_through_every_step(float64):
    """gradient="first_order" with iteration_weights="linear": J = Σ_t w_t J(λ_t) with
    λ_t = f(sg(λ_{t-1})), so every term reaches the rule's weights through its own step. The
    gradient equals the one computed here by hand from rule.step (each step from the detached
    iterate before it), and differs from the decoder-only early terms of detaching them all but
    the last (the former behaviour), which is also recomputed by hand."""
    from pyro_slots.inner import InnerProblem, SlotAttention

    x, _ = make_point_sets(3, 20, seed=5)
    model = _model()
    torch.manual_seed(0)
    rule = SlotAttention(3, slot_dim=model.slot_dim, input_dim=2, hidden_dim=8).double()
    svi = _svi(model, rule, gradient="first_order", iteration_weights="linear")
    svi.generator.manual_seed(0)
    loss, result = svi.loss_and_result(x)
    weights = [p for p in rule.parameters() if p.requires_grad]
    got = torch.autograd.grad(loss, weights, allow_unused=True)

    x_enc = model.encode(x)
    problem = InnerProblem(model, x_enc)
    lam = result.trajectory[0][0].detach()  # λ_0 (detached: first-order does not reach init)
    state = rule.init(problem, lam)
    obj = Reconstruction()
    terms, last_only = [], []
    for t in range(1, 4):
        state = ps.inner.InnerState(state.slots.detach(), state.step,
                                    tuple(a.detach() for a in state.aux))  # fmt: skip
        with torch.enable_grad():
            state, _ = rule.step(state, problem, create_graph=True)
        j = obj(model, x, x_enc, state.slots).mean()
        terms.append(t / 6 * j)
        last_only.append(
            t / 6 * (j if t == 3 else obj(model, x, x_enc, state.slots.detach()).mean())
        )
    want = torch.autograd.grad(sum(terms), weights, allow_unused=True, retain_graph=True)
    old = torch.autograd.grad(sum(last_only), weights, allow_unused=True)
    assert loss.item() == pytest.approx(sum(terms).item(), rel=1e-10)
    differs = False
    for g, w, o in zip(got, want, old):
        if w is None:
            assert g is None or torch.all(g == 0)
            continue
        torch.testing.assert_close(g, w, rtol=1e-8, atol=1e-10)
        differs |= not torch.allclose(w, o if o is not None else torch.zeros_like(w))
    assert differs


def test_resuming_twice_keeps_the_state_of_a_parameter_without_gradient_in_between(float64):
    """A head used on some batches only: after a resume, the first step gives it no gradient,
    so pyro.optim keeps its Adam state waiting (unreported); the next checkpoint lost it and
    a second resume restarted its moments from zero. The twice-resumed run must equal the
    uninterrupted one."""
    from pyro_slots.inner import EM
    from pyro_slots.objectives import Objective

    class Gated(Objective):
        def __init__(self):
            super().__init__()
            self.head = nn.Linear(5, 1)

        def forward(self, model, x, x_enc, slots, use_head):
            j = Reconstruction()(model, x, x_enc, slots)
            return j + self.head(slots).pow(2).mean((1, 2)) if bool(use_head.any()) else j

    g = torch.Generator().manual_seed(13)
    x = 4.0 * torch.randn(3, 1, 2, generator=g) + 0.5 * torch.randn(3, 20, 2, generator=g)
    flags = [True, False, False, True]

    def build(checkpoint=None):
        pyro.clear_param_store()
        torch.manual_seed(0)
        model, objective = GaussianMixture(3, 2, encoder=nn.Linear(2, 2)), Gated()
        svi = ps.NestedSVI(model, EM(2), objective, pyro.optim.Adam({"lr": 0.05}), seed=1)
        if checkpoint is not None:
            model.load_state_dict(checkpoint[0])
            objective.load_state_dict(checkpoint[1])
            svi.load_state_dict(checkpoint[2])
        return model, objective, svi

    def run(parts, steps):
        for s in steps:
            parts[2].step(x, torch.full((3,), flags[s]))
        return [p.state_dict() for p in parts]

    whole = build()
    run(whole, range(4))
    first = run(build(), range(2))
    second = run(build(first), [2])
    assert "objective.head.weight" in second[2]["optim"]
    resumed = build(second)
    run(resumed, [3])
    assert torch.equal(resumed[1].head.weight, whole[1].head.weight)
