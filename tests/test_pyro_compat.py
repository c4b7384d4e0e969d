"""Every private Pyro internal pyro_slots uses (pyro_slots._pyro_compat), checked on tiny models
against the answer of Pyro's public API or a brute-force sum: a Pyro release that changes one of
them fails here, by name."""

import inspect
import itertools
import re
from pathlib import Path

import pyro
import pyro.distributions as dist
import pytest
import tomllib
import torch
from packaging.specifiers import SpecifierSet
from packaging.version import Version
from pyro import poutine
from pyro.infer import TraceEnum_ELBO
from pyro.infer.traceenum_elbo import _compute_model_factors
from pyro.infer.util import Dice
from pyro.ops.indexing import Vindex
from pyro.ops.rings import MarginalRing

from pyro_slots import _pyro_compat as compat
from pyro_slots.elbo import TraceEnumEstimator, marginal_model_costs

ROOT = Path(__file__).resolve().parents[1]


def test_installed_pyro_is_in_the_checked_range_and_pyproject_pins_it():
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    (pin,) = [d for d in deps if re.match(r"pyro-ppl\b", d)]
    assert SpecifierSet(pin[len("pyro-ppl") :]) == SpecifierSet(compat.CHECKED_PYRO_VERSIONS)
    assert Version(pyro.__version__) in SpecifierSet(compat.CHECKED_PYRO_VERSIONS), (
        f"pyro {pyro.__version__} is outside {compat.CHECKED_PYRO_VERSIONS}: re-check the "
        "internals in pyro_slots/_pyro_compat.py and move the pin"
    )


def test_private_signatures_are_the_checked_ones():
    assert list(inspect.signature(_compute_model_factors).parameters) == [
        "model_trace",
        "guide_trace",
    ]
    assert list(inspect.signature(TraceEnum_ELBO._get_traces).parameters) == [
        "self",
        "model",
        "guide",
        "args",
        "kwargs",
    ]
    assert list(inspect.signature(Dice.__init__).parameters) == ["self", "guide_trace", "ordering"]
    assert list(inspect.signature(Dice._get_log_factors).parameters) == ["self", "target_ordinal"]


def test_no_private_pyro_name_outside_the_adapter():
    """The library reaches Pyro's private names only through pyro_slots/_pyro_compat.py."""
    private = re.compile(
        r"(?<![A-Za-z0-9])(_compute_model_factors|_get_traces|_validate_sample|_validate_args"
        r"|_get_log_factors|_pyro_dims|_pyro_backward|_enumerate_dim|_postprocess_message"
        r"|_process_message|_get_optim|_get_grad_clip|_state_waiting_to_be_consumed)"
        r"|plate_to_symbol|\[\"packed\"\]|require_backward|optim_objs|\.grad_clip\b"
    )
    offenders = []
    for folder in ("pyro_slots", "models"):
        for path in (ROOT / folder).rglob("*.py"):
            if path.name == "_pyro_compat.py":
                continue
            for i, line in enumerate(path.read_text().splitlines(), 1):
                code = line.split("#")[0]
                if private.search(code) and "``" not in code:
                    offenders.append(f"{path.relative_to(ROOT)}:{i}: {line.strip()}")
    assert offenders == []


K, M = 3, 4


def _mixture_model(x, locs, logits):
    batch = x.shape[0]
    with pyro.plate("batch", batch, dim=-2) as n:
        with pyro.plate("points", x.shape[1], dim=-1):
            z = pyro.sample(
                "z",
                dist.Categorical(logits=logits.unsqueeze(-2)),
                infer={"enumerate": "parallel"},
            )
            pyro.sample("x", dist.Normal(Vindex(locs)[n.unsqueeze(-1), z], 1.0), obs=x)


def _empty_guide(x, locs, logits):
    pass


def _brute_force(x, locs, logits):
    """log p(x^n) by summing over every joint assignment of each datapoint."""
    out = []
    for n in range(x.shape[0]):
        total = []
        for zs in itertools.product(range(K), repeat=x.shape[1]):
            lp = sum(
                torch.log_softmax(logits[n], -1)[z] + dist.Normal(locs[n, z], 1.0).log_prob(x[n, m])
                for m, z in enumerate(zs)
            )
            total.append(lp)
        out.append(torch.logsumexp(torch.stack(total), 0))
    return torch.stack(out)


def _mixture_data():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, M, generator=g, dtype=torch.float64)
    locs = torch.randn(2, K, generator=g, dtype=torch.float64)
    logits = torch.randn(2, K, generator=g, dtype=torch.float64)
    return x, locs, logits


def _traces(model, guide, *args):
    elbo = TraceEnum_ELBO(max_plate_nesting=2, strict_enumeration_warning=False)
    return list(compat.get_traces(elbo, model, guide, args, {}))


def test_get_traces_packs_the_traces_pyro_scores():
    x, locs, logits = _mixture_data()
    pairs = _traces(_mixture_model, _empty_guide, x, locs, logits)
    assert len(pairs) == 1
    model_trace, _ = pairs[0]
    symbols = compat.plate_symbols(model_trace)
    assert set(symbols) >= {"batch", "points"}
    obs = model_trace.nodes["x"]
    packed = compat.packed_log_prob(obs)
    # The packed observation term holds the enumerated log-densities: K values per point.
    assert sorted(packed.shape) == sorted([K, 2, M])
    dims = compat.pyro_dims(packed)
    assert len(dims) == packed.dim() and symbols["batch"] in dims and symbols["points"] in dims
    assert torch.allclose(packed.sum(), obs["log_prob"].sum())


def test_compute_model_factors_marginalizes_like_pyro_and_brute_force():
    """The marginal costs from compute_model_factors sum to -TraceEnum_ELBO's loss (public) and,
    per datapoint, to the brute-force log-likelihood."""
    x, locs, logits = _mixture_data()
    ((model_trace, guide_trace),) = _traces(_mixture_model, _empty_guide, x, locs, logits)
    factors = compat.compute_model_factors(model_trace, guide_trace)
    assert isinstance(factors, tuple) and len(factors) == 5
    costs, _ = marginal_model_costs(model_trace, guide_trace)
    total = sum(t.sum() for terms in costs.values() for t in terms)
    loss = TraceEnum_ELBO(max_plate_nesting=2).loss(_mixture_model, _empty_guide, x, locs, logits)
    brute = _brute_force(x, locs, logits)
    assert total.item() == pytest.approx(-loss, abs=1e-10)
    assert torch.allclose(total, brute.sum(), atol=1e-10)


def test_dice_internals_give_pyro_s_loss_and_gradient_for_a_score_function_guide():
    """A non-reparameterized (discrete) guide site makes the per-datapoint estimator use
    dice_log_factors, require_marginal and backward_marginals: its sum over datapoints must equal
    TraceEnum_ELBO's surrogate loss, value and gradient, on the same draw."""

    def model(x, probs_q):
        with pyro.plate("batch", x.shape[0], dim=-1):
            c = pyro.sample("c", dist.Bernoulli(0.3))
            pyro.sample("x", dist.Normal(2.0 * c - 1.0, 1.0), obs=x)

    def guide(x, probs_q):
        with pyro.plate("batch", x.shape[0], dim=-1):
            pyro.sample("c", dist.Bernoulli(probs_q))

    class Wrapper:
        batch_plate = "batch"
        max_plate_nesting = 1

        def model(self, x, slots):
            model(x, slots)

        def guide(self, x, slots):
            guide(x, slots)

    x = torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64)
    probs_q = torch.tensor([0.2, 0.6, 0.9], dtype=torch.float64, requires_grad=True)
    pyro.set_rng_seed(4)
    per = TraceEnumEstimator()(Wrapper(), x, probs_q)
    pyro.set_rng_seed(4)
    elbo = TraceEnum_ELBO(max_plate_nesting=1, strict_enumeration_warning=False)
    loss = elbo.differentiable_loss(model, guide, x, probs_q)
    assert per.shape == (3,)
    assert torch.allclose(per.sum(), -loss, atol=1e-12)
    g_per = torch.autograd.grad(per.sum(), probs_q)[0]
    g_ref = torch.autograd.grad(-loss, probs_q)[0]
    assert torch.allclose(g_per, g_ref, atol=1e-12)
    assert g_ref.abs().sum() > 0  # the score-function term is there

    # dice_log_factors of the batch ordinal: the guide's log q(c), as DiCE uses it.
    pyro.set_rng_seed(4)
    ((model_trace, guide_trace),) = list(compat.get_traces(elbo, model, guide, (x, probs_q), {}))
    _, ordering = marginal_model_costs(model_trace, guide_trace)
    factors = compat.dice_log_factors(Dice(guide_trace, ordering), ordering["c"])
    tensors = [f for f in factors if torch.is_tensor(f)]
    assert len(tensors) == 1
    site = guide_trace.nodes["c"]
    # DiCE's magic box: log q - stop_gradient(log q), zero in value, the score in gradient.
    log_q = site["fn"].log_prob(site["value"])
    assert torch.equal(tensors[0].detach(), torch.zeros(3, dtype=torch.float64))
    (g_factor,) = torch.autograd.grad(tensors[0].sum(), probs_q, retain_graph=True)
    assert torch.allclose(g_factor, torch.autograd.grad(log_q.sum(), probs_q)[0])


def test_backward_marginals_are_the_brute_force_marginals():
    g = torch.Generator().manual_seed(1)
    a = compat.set_pyro_dims(torch.randn(3, generator=g, dtype=torch.float64), "a")
    ab = compat.set_pyro_dims(torch.randn(3, 4, generator=g, dtype=torch.float64), "ab")
    query = compat.set_pyro_dims(torch.zeros(3, dtype=torch.float64), "a")
    compat.require_marginal(query)
    root = MarginalRing().sumproduct([a, ab, query], {"a", "b"})
    (marginal,) = compat.backward_marginals(root, {"q": query}).values()
    brute = a + torch.logsumexp(ab, 1)  # log Σ_b exp(a + ab), unnormalized over a
    assert torch.allclose(marginal - marginal.logsumexp(0), brute - brute.logsumexp(0))
    assert torch.allclose(root, brute.logsumexp(0))


def test_is_enumerated_and_sample_messenger_see_enumerated_values():
    x, locs, logits = _mixture_data()
    seen = {}

    class Record(compat.SampleMessenger):
        def postprocess_sample(self, msg):
            seen[msg["name"]] = (compat.is_enumerated(msg), msg["value"])

    enumerated = poutine.enum(_mixture_model, first_available_dim=-3)
    with Record():
        enumerated(x, locs, logits)
    assert {"z", "x"} <= set(seen)
    assert seen["z"][0] is True and seen["x"][0] is False
    assert torch.equal(seen["z"][1].reshape(-1), torch.arange(K))  # the enumerated support
    assert torch.equal(seen["x"][1], x)  # observed: the data


def test_validate_sample_and_validates_args():
    checked = dist.Normal(torch.zeros(2), 1.0, validate_args=True)
    assert compat.validates_args(checked)
    assert not compat.validates_args(dist.Normal(torch.zeros(2), 1.0, validate_args=False))
    compat.validate_sample(checked, torch.tensor([0.5, -3.0]))
    with pytest.raises(ValueError):
        compat.validate_sample(checked, torch.tensor([0.5, float("nan")]))
    with pytest.raises(ValueError):
        compat.validate_sample(dist.Bernoulli(0.5, validate_args=True), torch.tensor(2.0))
