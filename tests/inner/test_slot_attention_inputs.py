"""SlotAttention keeps the inputs it derives from ``x`` with the problem, not on the rule."""

import gc
import pickle
import weakref

import torch

from pyro_slots.inner import SlotAttention
from pyro_slots.inner.base import InnerProblem
from pyro_slots.models import GaussianMixture
from tests.inner.test_learned_rules import _data, _slots


def _counting_rule(**kwargs):
    torch.manual_seed(0)
    rule = SlotAttention(3, slot_dim=5, input_dim=2, hidden_dim=8, **kwargs)
    calls = []
    rule.encoder.register_forward_hook(lambda *_: calls.append(1))
    return rule, calls


def test_inputs_are_encoded_once_per_problem_and_the_steps_equal_fresh_ones(float64):
    rule, calls = _counting_rule(moments=True)
    model, x = GaussianMixture(3, 2), _data()
    problem = InnerProblem(model, x)
    state = rule.init(problem, _slots(model, x, 3))
    states = [state]
    for _ in range(3):
        states.append(rule.step(states[-1], problem)[0])
    assert len(calls) == 1
    # Independent answer: every step on a new problem (inputs encoded afresh each time).
    for before, after in zip(states[:-1], states[1:]):
        fresh = rule.step(before, InnerProblem(model, x))[0]
        assert torch.equal(fresh.slots, after.slots)
        assert torch.equal(fresh.aux[0], after.aux[0])
    assert len(calls) == 1 + 3


def test_the_derived_inputs_live_and_die_with_the_problem(float64):
    torch.manual_seed(0)
    rule = SlotAttention(3, slot_dim=5, input_dim=2, hidden_dim=8)
    model, x = GaussianMixture(3, 2), _data()
    problem = InnerProblem(model, x)
    rule.step(rule.init(problem, _slots(model, x, 3)), problem)
    inputs = rule.normalized_inputs(problem)
    assert inputs.shape == (x.shape[0], x.shape[1], 8)
    from pyro_slots.inner.slot_attention import _DERIVED_ATTR

    assert getattr(problem, _DERIVED_ATTR)[(rule, "inputs")].value[0] is inputs
    assert not any(isinstance(v, dict) for k, v in vars(rule).items() if not k.startswith("_"))
    gone = weakref.ref(inputs)
    del inputs, problem
    gc.collect()
    assert gone() is None  # nothing on the rule (nor in module state) keeps them
    clone = pickle.loads(pickle.dumps(rule))  # the rule holds no cache to pickle
    assert torch.equal(clone.to_q.weight, rule.to_q.weight)


def test_the_inputs_are_recomputed_when_x_or_the_grad_mode_changes(float64):
    rule, calls = _counting_rule()
    model, x = GaussianMixture(3, 2), _data()
    problem = InnerProblem(model, x)
    with torch.no_grad():
        detached = rule.normalized_inputs(problem)
    assert not detached.requires_grad and len(calls) == 1
    with_graph = rule.normalized_inputs(problem)  # grad mode on: a graph to the encoder
    assert with_graph.requires_grad and len(calls) == 2
    x.mul_(2.0)  # in place: the measurements changed
    changed = rule.normalized_inputs(problem)
    assert len(calls) == 3
    assert torch.allclose(changed, rule._encode(x)[0])
    assert not torch.allclose(changed, with_graph)
