"""benchmarks.common.interleaved_medians: the rounds, the warm-ups and the medians."""

import itertools

from benchmarks import common


def test_interleaved_medians_runs_in_rounds_and_takes_each_median(monkeypatch):
    """With a clock that advances by a scripted amount at every call, each function's timed
    calls last the scripted durations; the calls come round by round (a, b, a, b, ...) after
    the warm-ups, and each median is the middle of its own durations."""
    calls = []
    durations = {"a": iter([5.0, 1.0, 3.0]), "b": iter([2.0, 9.0, 4.0])}
    clock = itertools.count()  # perf_counter: 0, 1, 2, ... plus the scripted durations
    elapsed = [0.0]

    def perf_counter():
        return elapsed[0] + next(clock)

    def make(name):
        def fn():
            calls.append(name)
            if len(calls) > 2 * 2:  # after warmup=2 of a and of b: a timed or per-round call
                if calls.count(name) % 2 == 0:  # warmup_each_round=1: every second call timed
                    elapsed[0] += next(durations[name])

        return fn

    monkeypatch.setattr(common.time, "perf_counter", perf_counter)
    medians = common.interleaved_medians(
        {"a": make("a"), "b": make("b")}, rounds=3, warmup=2, warmup_each_round=1
    )
    # each timed call also spans one tick of the counting clock
    assert medians == {"a": 3.0 + 1, "b": 4.0 + 1}
    assert calls == ["a", "a", "b", "b"] + ["a", "a", "b", "b"] * 3


def test_interleaved_medians_of_an_even_number_of_rounds_is_the_mean_of_the_middle_two():
    """sorted(t)[len(t) // 2] was the upper middle value: 3.0 for the rounds 1, 2, 3, 4."""
    import statistics

    import benchmarks.common as common
    from benchmarks.common import interleaved_medians

    times = iter([1.0, 2.0, 3.0, 4.0])
    real, common.median_time = common.median_time, lambda fn, repeats, warmup: next(times)
    try:
        medians = interleaved_medians({"f": lambda: None}, 4, warmup=0)
    finally:
        common.median_time = real
    assert medians["f"] == statistics.median([1.0, 2.0, 3.0, 4.0]) == 2.5
