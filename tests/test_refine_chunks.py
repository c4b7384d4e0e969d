"""refine(chunk_size=...) and refine(distributed=True) return the unchunked one-process result."""

import importlib
import os
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import pyro_slots as ps
from pyro_slots.inner import EM, GaussianFeatures, Reinitialize, SlotAttention
from pyro_slots.models import GaussianMixture
from tests.conftest import gloo_group, make_point_sets

# The module (the package's ``refine`` attribute is the function).
refine_module = importlib.import_module("pyro_slots.refine")
gmm_module = importlib.import_module("pyro_slots.models.gmm")

BATCH = 37  # not a multiple of the chunk sizes or of 2 ranks: a short last chunk and shard


def _data():
    x, _ = make_point_sets(BATCH, 40, num_components=3, seed=5, spread=2.5)
    return x.double()


def _slot_attention(gmm):
    torch.manual_seed(11)
    rule = SlotAttention(
        num_steps=3, slot_dim=gmm.slot_dim, input_dim=2, hidden_dim=16, moments=True,
        encoder=GaussianFeatures(2), feature_dim=5, norm_inputs=False,
    )  # fmt: skip
    return rule.double()


_FIELDS = ("slots", "elbo", "history", "residuals", "relative_residuals", "initial_slots", "steps",
           "responsibilities", "x_enc")  # fmt: skip


def _plain(result) -> dict:
    """A RefineResult as tensors, lists and ints only (``torch.load(weights_only=True)``)."""
    out = {name: getattr(result, name) for name in _FIELDS}
    out.update(num_steps=result.num_steps, trajectory=list(result.trajectory))
    out.update(state_step=result.state.step, state_slots=result.state.slots)
    out["state_aux"] = [a for a in result.state.aux if torch.is_tensor(a)]
    return out


def _from_plain(d: dict) -> SimpleNamespace:
    """What :func:`_assert_same` reads of a result, from :func:`_plain`."""
    state = SimpleNamespace(step=d["state_step"], slots=d["state_slots"], aux=d["state_aux"])
    fields = {name: d[name] for name in _FIELDS}
    return SimpleNamespace(
        **fields, num_steps=d["num_steps"], trajectory=d["trajectory"], state=state
    )


def _assert_same(got, want):
    """Every field equal, NaN where NaN (the history without record_history)."""

    def same(a, b, name):
        assert a.shape == b.shape, (name, a.shape, b.shape)
        assert a.dtype == b.dtype, name
        assert torch.equal(a.isnan(), b.isnan()), name
        assert torch.allclose(a.nan_to_num(), b.nan_to_num(), rtol=0, atol=1e-12), (
            name,
            (a - b).abs().nan_to_num().max().item(),
        )

    for name in ("slots", "elbo", "history", "residuals", "relative_residuals", "initial_slots"):
        same(getattr(got, name), getattr(want, name), name)
    assert torch.equal(got.steps, want.steps)
    assert got.num_steps == want.num_steps == int(want.steps.max())
    if want.responsibilities is None:
        assert got.responsibilities is None
    else:
        same(got.responsibilities, want.responsibilities, "responsibilities")
    assert len(got.trajectory) == len(want.trajectory)
    for t, (a, b) in enumerate(zip(got.trajectory, want.trajectory)):
        same(a, b, f"trajectory[{t}]")
    assert got.state.step == want.state.step
    same(got.state.slots, want.state.slots, "state.slots")
    assert len(got.state.aux) == len(want.state.aux)
    for a, b in zip(got.state.aux, want.state.aux):
        same(a, b, "state.aux")
    assert got.x_enc is not None and torch.equal(got.x_enc, want.x_enc)


def _chunk_batches(monkeypatch):
    """Record the batch (restarts stacked) of every run_inner call."""
    seen, run_inner = [], refine_module.run_inner

    def recording(model, x_enc, *args, **kwargs):
        seen.append(x_enc.shape[0])
        return run_inner(model, x_enc, *args, **kwargs)

    monkeypatch.setattr(refine_module, "run_inner", recording)
    return seen


@pytest.mark.parametrize("chunk_size", [1, 8, 16])
def test_em_with_elbo_tol_in_chunks_is_the_unchunked_result(chunk_size, monkeypatch):
    gmm, x = GaussianMixture(4, 2), _data()
    want = ps.refine(gmm, x, EM(60), seed=0, elbo_tol=1e-4)
    # The datapoints stop at different steps, so chunks stop at different steps: the padding
    # of a chunk that stopped before the last one is exercised.
    assert int(want.steps.min()) < want.num_steps
    chunk_steps = [int(want.steps[:, lo : lo + chunk_size].max()) for lo in range(0, BATCH, 8)]
    assert len(set(chunk_steps)) > 1
    seen = _chunk_batches(monkeypatch)
    got = ps.refine(gmm, x, EM(60), seed=0, elbo_tol=1e-4, chunk_size=chunk_size)
    expected = [min(chunk_size, BATCH - lo) for lo in range(0, BATCH, chunk_size)]
    assert seen == expected
    _assert_same(got, want)


def test_restarts_stay_together_in_a_chunk(monkeypatch):
    gmm, x = GaussianMixture(4, 2), _data()
    want = ps.refine(gmm, x, EM(60), seed=1, elbo_tol=1e-4, num_restarts=3)
    seen = _chunk_batches(monkeypatch)
    got = ps.refine(gmm, x, EM(60), seed=1, elbo_tol=1e-4, num_restarts=3, chunk_size=10)
    assert seen == [30, 30, 30, 21]  # 10, 10, 10 and 7 datapoints, each with its 3 restarts
    assert got.slots.shape == (3, BATCH, 4, 5)
    _assert_same(got, want)
    _assert_same(got.best(), want.best())


def test_pruned_restarts_in_chunks_are_the_unchunked_result():
    gmm, x = GaussianMixture(4, 2), _data()
    kwargs = dict(seed=1, elbo_tol=1e-4, num_restarts=3, keep_best_after=2)
    want = ps.refine(gmm, x, EM(60), **kwargs)
    # Pruning froze two restarts of every datapoint at step 2; the third ran on, and stopped.
    assert int((want.steps == 2).sum()) >= 2 * BATCH and int(want.steps.max()) > 2
    got = ps.refine(gmm, x, EM(60), chunk_size=10, **kwargs)
    _assert_same(got, want)
    _assert_same(got.best(), want.best())


def test_keep_trajectory_in_chunks():
    gmm, x = GaussianMixture(4, 2), _data()
    kwargs = dict(seed=2, elbo_tol=1e-4, num_restarts=2, keep_trajectory=True)
    want = ps.refine(gmm, x, EM(60), **kwargs)
    got = ps.refine(gmm, x, EM(60), chunk_size=6, **kwargs)
    assert len(got.trajectory) == want.num_steps + 1
    # A datapoint that stopped keeps its final slots in the later steps of the trajectory.
    n = int(want.steps[0].argmin())
    assert torch.equal(got.trajectory[-1][0, n], want.slots[0, n])
    _assert_same(got, want)


@pytest.mark.parametrize("record_history", [True, False])
def test_slot_attention_in_chunks(record_history):
    gmm, x = GaussianMixture(4, 2), _data()
    rule = _slot_attention(gmm)
    want = ps.refine(gmm, x, rule, seed=3, record_history=record_history)
    got = ps.refine(gmm, x, rule, seed=3, record_history=record_history, chunk_size=9)
    assert got.history.isnan().any() != record_history
    assert len(got.state.aux) == 1 and got.state.aux[0].shape == (1, BATCH, 4, 16)
    _assert_same(got, want)


def test_chunk_size_larger_than_the_batch(monkeypatch):
    gmm, x = GaussianMixture(4, 2), _data()
    want = ps.refine(gmm, x, EM(30), seed=4, elbo_tol=1e-4)
    seen = _chunk_batches(monkeypatch)
    got = ps.refine(gmm, x, EM(30), seed=4, elbo_tol=1e-4, chunk_size=10 * BATCH)
    assert seen == [BATCH]
    _assert_same(got, want)


@pytest.mark.parametrize("bad", [0, -3])
def test_bad_chunk_size_is_rejected_before_any_work(bad, monkeypatch):
    seen = _chunk_batches(monkeypatch)
    with pytest.raises(ValueError, match=r"chunk_size: expected an integer >= 1, got " + str(bad)):
        ps.refine(GaussianMixture(4, 2), _data(), EM(5), seed=0, chunk_size=bad)
    with pytest.raises(TypeError, match="chunk_size: expected an integer >= 1, got 2.5"):
        ps.refine(GaussianMixture(4, 2), _data(), EM(5), seed=0, chunk_size=2.5)
    assert seen == []


def test_distributed_without_a_process_group_is_an_error():
    assert not dist.is_initialized()
    with pytest.raises(ValueError, match=r"distributed: True needs torch.distributed.init_"):
        ps.refine(GaussianMixture(4, 2), _data(), EM(5), seed=0, distributed=True)
    with pytest.raises(TypeError, match="distributed: expected True or False, got 'yes'"):
        ps.refine(GaussianMixture(4, 2), _data(), EM(5), seed=0, distributed="yes")
    with pytest.raises(ValueError, match=r"gather: False splits a distributed result, expected "):
        ps.refine(GaussianMixture(4, 2), _data(), EM(5), seed=0, gather=False)
    with pytest.raises(TypeError, match="gather: expected True or False, got 0"):
        ps.refine(GaussianMixture(4, 2), _data(), EM(5), seed=0, distributed=True, gather=0)


# ------------------------------------------------------------------ two processes (gloo)
def _cases(gmm, x):
    return {
        "em": lambda **kw: ps.refine(
            gmm, x, EM(60), seed=5, elbo_tol=1e-4, num_restarts=2, keep_trajectory=True, **kw
        ),
        "slot_attention": lambda **kw: ps.refine(
            gmm, x, _slot_attention(gmm), seed=6, record_history=False, **kw
        ),
        # replacement draws per datapoint (a slot below 0.2 of the points is redrawn: K = 4
        # slots for 3 clusters, so most sets redraw until they stop)
        "reinitialize": lambda **kw: ps.refine(
            gmm, x, _reinitialize(gmm), seed=7, elbo_tol=1e-4, num_restarts=2, **kw
        ),
    }


def _reinitialize(gmm):
    init = ps.GaussianInit(gmm.slot_dim, learnable=False).double()
    return Reinitialize(EM(40), init=init, seed=8, dead_threshold=0.2)


def _no_responsibilities(**kw):
    x = _data()
    return ps.refine(GaussianMixture(4, 2), x, EM(60), seed=5, elbo_tol=1e-4, num_restarts=2,
                     responsibilities=False, **kw)  # fmt: skip


class _Poisoned(EM):
    """EM that fails on a batch holding a datapoint far from the others (datapoint 30)."""

    def step(self, state, problem, create_graph=False):
        if bool((problem.x.abs() > 1e3).any()):
            raise ValueError("a poisoned datapoint")
        return super().step(state, problem, create_graph)


def _fail_on_one_rank():
    x = _data()
    x[30] += 1e4  # rank 1's shard [18, 37) only
    try:
        ps.refine(GaussianMixture(4, 2), x, _Poisoned(5), seed=0, distributed=True)
    except (ValueError, ps.InnerLoopError) as e:
        return f"{type(e).__name__}: {e}"
    return "no error"


def _fail_initial_slots_on_one_rank():
    """k-means++ seeds of rank 1's shard that overflow (a datapoint scaled by 1e160): the
    check of λ_0 raised on rank 1 only, and rank 0 returned rank 1's share of its next call's
    gather."""
    x, gmm = _data().double(), GaussianMixture(4, 2).double()
    x[30] *= 1e160  # rank 1's shard [18, 37) only
    try:
        ps.refine(gmm, x, EM(5), seed=0, distributed=True)
    except (ValueError, ps.InnerLoopError) as e:
        return f"{type(e).__name__}: {e}"
    return "no error"


def _shard_of(result, start: int, size: int) -> SimpleNamespace:
    """Datapoints ``[start, start + size)`` of a whole batch's result, as a rank that ran them
    alone records them: steps up to the last step one of them ran."""
    stop = start + size
    steps = int(result.steps[:, start:stop].max())

    def rows(t):
        return t[:, start:stop]

    def step_rows(t, n):
        return t[:n, :, start:stop]

    state = SimpleNamespace(
        step=steps,
        slots=rows(result.state.slots),
        aux=[rows(a) for a in result.state.aux if torch.is_tensor(a)],
    )
    return SimpleNamespace(
        **{name: rows(getattr(result, name)) for name in ("slots", "elbo", "initial_slots")},
        steps=rows(result.steps),
        history=step_rows(result.history, steps + 1),
        residuals=step_rows(result.residuals, steps),
        relative_residuals=step_rows(result.relative_residuals, steps),
        responsibilities=None if result.responsibilities is None else rows(result.responsibilities),
        trajectory=[rows(s) for s in result.trajectory[: steps + 1]] if result.trajectory else [],
        num_steps=steps,
        state=state,
        x_enc=result.x_enc[start:stop],
    )


def _video_case():
    """A 3-frame clip of every set (the points drift), EM with a transition between frames."""
    x = _data()
    video = torch.stack([x, x + 0.3, x - 0.2], 1)
    return GaussianMixture(4, 2), video, EM(6)


def _shifted(slots):
    return slots + 0.01


def _worker(rank, world_size, init_file, out_dir):
    with gloo_group(rank, world_size, init_file):
        seen, run_inner = [], refine_module.run_inner

        def recording(model, x_enc, *args, **kwargs):
            seen.append(x_enc.shape[0])
            return run_inner(model, x_enc, *args, **kwargs)

        refine_module.run_inner = recording
        seeded, kmeans_chunk = [], gmm_module._kmeans_chunk

        def seeding(x, *args):
            seeded.append(x.shape[0])
            return kmeans_chunk(x, *args)

        gmm_module._kmeans_chunk = seeding
        results = {}
        for name, run in _cases(GaussianMixture(4, 2), _data()).items():
            results[name] = _plain(run(distributed=True, chunk_size=7))
            results[name + "_whole_shard"] = _plain(run(distributed=True))
        refine_module.run_inner, gmm_module._kmeans_chunk = run_inner, kmeans_chunk
        results["em_no_responsibilities"] = _plain(_no_responsibilities(distributed=True))
        # gather=False: every rank keeps its own shard, and nothing is all-gathered
        gathered, all_gather = [], refine_module._all_gather

        def recording_gather(t, *args):
            gathered.append(tuple(t.shape))
            return all_gather(t, *args)

        refine_module._all_gather = recording_gather
        for name, run in _cases(GaussianMixture(4, 2), _data()).items():
            for chunk_size in (None, 7):
                shard = run(distributed=True, gather=False, chunk_size=chunk_size)
                results[f"{name}_shard_{chunk_size}"] = _plain(shard)
                results[f"{name}_shard_{chunk_size}_datapoints"] = (
                    shard.datapoints.start,
                    shard.datapoints.stop,
                )
        refine_module._all_gather = all_gather
        # refine_video carries every rank's own rows from frame to frame
        frames = ps.refine_video(
            *_video_case(), seed=0, transition=_shifted, distributed=True, gather=False
        )
        results["video_shard"] = [(r.slots, r.elbo, r.datapoints.start) for r in frames]
        failure = [_fail_on_one_rank(), _fail_initial_slots_on_one_rank()]
        out = {"results": results, "seen": seen, "seeded": seeded, "failure": failure,
               "gathered": gathered}  # fmt: skip
        torch.save(out, os.path.join(out_dir, f"{rank}.pt"))


def test_two_ranks_return_the_single_process_result(tmp_path):
    mp.spawn(_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    want = {name: run() for name, run in _cases(GaussianMixture(4, 2), _data()).items()}
    assert want["em"].num_steps > int(want["em"].steps[:, :18].max())  # ranks stop apart
    steps = want["reinitialize"].steps
    assert steps.min() < 10 and steps.max() > 20  # datapoints stop apart
    shards = {0: 18, 1: 19}  # 37 datapoints: rank 0 holds [0, 18), rank 1 [18, 37)
    for rank, size in shards.items():
        got = torch.load(tmp_path / f"{rank}.pt", weights_only=True)
        chunks = [min(7, size - lo) for lo in range(0, size, 7)]
        # em: the shard in chunks of 7 (2 restarts each), then whole; slot attention and
        # reinitialize (2 restarts) likewise
        restarts2 = [2 * c for c in chunks] + [2 * size]
        assert got["seen"] == restarts2 + chunks + [size] + restarts2
        # k-means++ seeded the rank's own datapoints only, not the batch (em: 2 restarts)
        assert got["seeded"] == [2 * size, 2 * size, size, size, 2 * size, 2 * size]
        start = 0 if rank == 0 else shards[0]
        for name, result in want.items():
            _assert_same(_from_plain(got["results"][name]), result)
            _assert_same(_from_plain(got["results"][name + "_whole_shard"]), result)
            for chunk_size in (None, 7):
                key = f"{name}_shard_{chunk_size}"
                assert got["results"][key + "_datapoints"] == (start, start + size)
                _assert_same(_from_plain(got["results"][key]), _shard_of(result, start, size))
        assert got["gathered"] == []
        whole = ps.refine_video(*_video_case(), seed=0, transition=_shifted)
        for frame, (slots, elbo, first) in zip(whole, got["results"]["video_shard"], strict=True):
            assert first == start
            torch.testing.assert_close(slots, frame.slots[:, start : start + size])
            torch.testing.assert_close(elbo, frame.elbo[:, start : start + size])
        # responsibilities=False: the same result without the posterior, nothing gathered
        _assert_same(_from_plain(got["results"]["em_no_responsibilities"]),
                     _no_responsibilities())  # fmt: skip
    # A loop that fails on one rank fails on both (rather than leaving rank 0 in the gather).
    failures = [torch.load(tmp_path / f"{r}.pt", weights_only=True)["failure"] for r in (0, 1)]
    assert [f[0] for f in failures] == [
        "InnerLoopError: distributed: the inner loop failed on rank 1 (its own error says why); "
        "this rank's shard ran",
        "ValueError: a poisoned datapoint",
    ]
    # ... and so does the initial slots' check of one rank's shard
    assert failures[0][1].startswith("InnerLoopError: distributed: the inner loop failed on rank 1")
    assert failures[1][1].startswith("NonFiniteError: initial slots: contains")


@pytest.mark.parametrize("chunk_size", [None, 10])
def test_without_responsibilities_the_result_is_the_same_but_for_them(chunk_size):
    """refine(responsibilities=False) returns the default result's every other field, and the
    default's responsibilities are the posterior of the assignment recomputed from the model
    at its final slots (brute force: softmax over K of the component log-densities)."""
    gmm, x = GaussianMixture(4, 2), _data()
    full = ps.refine(gmm, x, EM(60), seed=5, elbo_tol=1e-4, num_restarts=2, chunk_size=chunk_size)
    lean = _no_responsibilities(chunk_size=chunk_size)
    assert lean.responsibilities is None
    _assert_same(lean, SimpleNamespace(**{**vars(full), "responsibilities": None}))
    loc, scale, log_w = gmm.component_params(full.slots.flatten(0, 1))
    xs = x.repeat(2, 1, 1)
    log_p = torch.distributions.Normal(loc[:, :, None], scale[:, :, None]).log_prob(xs[:, None])
    posterior = torch.softmax(log_p.sum(-1) + log_w[..., None], dim=1)  # (R B, K, M)
    torch.testing.assert_close(full.responsibilities.flatten(0, 1), posterior)
    with pytest.raises(TypeError, match="responsibilities: expected True or False"):
        ps.refine(gmm, x, EM(2), responsibilities=1)
