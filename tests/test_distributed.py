"""Data-parallel NestedSVI on torch.distributed (gloo, 2 CPU processes)."""

import os
import socket
from datetime import timedelta

import pyro.optim
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import pyro_slots as ps
from pyro_slots.inner import GradientAscent, SoftKMeans
from pyro_slots.models import GaussianMixture
from tests.conftest import gloo_group, tiny_autoencoder

GLOBAL_BATCH, STEPS = 8, 4


def _data(step):
    g = torch.Generator().manual_seed(100 + step)
    centers = 3 * torch.randn(GLOBAL_BATCH, 3, 2, generator=g, dtype=torch.float64)
    labels = torch.randint(3, (GLOBAL_BATCH, 24), generator=g)
    x = torch.gather(centers, 1, labels.unsqueeze(-1).expand(-1, -1, 2))
    return x + 0.5 * torch.randn(GLOBAL_BATCH, 24, 2, generator=g, dtype=torch.float64)


def _svi(init="gaussian"):
    torch.manual_seed(0)
    model = GaussianMixture(3, 2, encoder=nn.Linear(2, 2).double())
    # "kmeans++": the model's own data-dependent initialization (init=None)
    init = ps.GaussianInit(model.slot_dim, scale=1.0).double() if init == "gaussian" else None
    return ps.NestedSVI(
        model,
        GradientAscent(4, 0.2),
        ps.objectives.Reconstruction(),
        pyro.optim.Adam({"lr": 0.05}),
        init=init,
        seed=3,
    )


def _train(rank, world_size, init="gaussian"):
    svi = _svi(init)
    shard = GLOBAL_BATCH // world_size
    losses = []
    for step in range(STEPS):
        x = _data(step)[rank * shard : (rank + 1) * shard]
        losses.append(svi.step(x).loss)
    return {n: p.detach().clone() for n, p in svi.named_parameters()}, losses


def _worker(rank, world_size, init_file, out_dir, init):
    with gloo_group(rank, world_size, init_file):
        weights, losses = _train(rank, world_size, init)
        torch.save({"weights": weights, "losses": losses}, os.path.join(out_dir, f"{rank}.pt"))


@pytest.mark.parametrize("init", ["gaussian", "kmeans++"])
def test_two_processes_match_one_process_with_the_same_global_batch(tmp_path, init):
    """Also with k-means++: every rank draws the global batch's random numbers from the one
    stream and seeds its own rows, so the slots, J and weights are the single process's."""
    mp.spawn(_worker, args=(2, str(tmp_path / "init"), str(tmp_path), init), nprocs=2, join=True)
    single_weights, single_losses = _train(0, 1, init)
    for rank in range(2):
        got = torch.load(tmp_path / f"{rank}.pt", weights_only=True)
        for name, value in single_weights.items():
            assert torch.allclose(got["weights"][name], value, atol=1e-5), name
        assert got["losses"] == pytest.approx(single_losses, abs=1e-8)


def _drawing_svi(kind):
    """A NestedSVI whose training draws per datapoint: AdaSlot's SlotSelector (Gumbel noise), or
    Reinitialize (replacement slots; with a dead threshold of 0.5 at least K - 1 of the K
    slots are redrawn at every step, since their mean responsibilities sum to 1, so the loss
    depends on every replacement drawn)."""
    from pyro_slots.inner import Reinitialize

    torch.manual_seed(0)
    model = tiny_autoencoder(active_slots=kind == "adaslot").double()
    rule = SoftKMeans(num_steps=2 if kind == "adaslot" else 3, temperature=model.variance)
    options = {"slot_sparsity": 0.1} if kind == "adaslot" else {}
    if kind == "reinitialize":
        init = ps.GaussianInit(model.slot_dim)
        rule = Reinitialize(rule, init=init, dead_threshold=0.5, seed=5)
    return ps.NestedSVI(model, rule, ps.objectives.Reconstruction(),
                        pyro.optim.Adam({"lr": 0.01}), seed=3, **options)  # fmt: skip


def _sharded_losses(kind, rank, world_size):
    """J of every update, each rank stepping on its share of the same global batches."""
    svi = _drawing_svi(kind)
    shard = GLOBAL_BATCH // world_size
    losses = []
    for step in range(STEPS):
        g = torch.Generator().manual_seed(200 + step)
        images = torch.rand(GLOBAL_BATCH, 3, 12, 12, generator=g, dtype=torch.float64)
        losses.append(svi.step(images[rank * shard : (rank + 1) * shard]).loss)
    return losses


def _losses_worker(rank, world_size, kind, init_file, out_dir):
    with gloo_group(rank, world_size, init_file):
        torch.save(_sharded_losses(kind, rank, world_size), os.path.join(out_dir, f"{rank}.pt"))


def _assert_two_ranks_train_as_one(tmp_path, kind):
    mp.spawn(_losses_worker, args=(2, kind, str(tmp_path / "init"), str(tmp_path)), nprocs=2,
             join=True)  # fmt: skip
    single = _sharded_losses(kind, 0, 1)
    for rank in range(2):
        losses = torch.load(tmp_path / f"{rank}.pt", weights_only=True)
        assert losses == pytest.approx(single, abs=1e-10)


def test_slot_selector_noise_is_the_single_process_noise_on_two_processes(tmp_path):
    """AdaSlot's Gumbel noise: under NestedSVI on 2 ranks each rank keeps its rows of the
    global batch's draw (SlotSelector.shard_draws), so J is the single process's."""
    _assert_two_ranks_train_as_one(tmp_path, "adaslot")


def test_reinitialized_slots_are_the_single_process_draws_on_two_processes(tmp_path):
    """Reinitialize under NestedSVI on 2 ranks: each rank keeps its rows of the global batch's
    replacement draw (Reinitialize.shard_draws), so J is the single process's; without the
    sharding each rank drew the first rows for its own images."""
    _assert_two_ranks_train_as_one(tmp_path, "reinitialize")


def _hanging_worker(rank, world_size, port, out_dir):
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world_size,
        timeout=timedelta(seconds=5),
    )
    svi = _svi()
    x = _data(0)[rank * 4 : (rank + 1) * 4]
    svi.step(x)
    if rank == 1:
        os._exit(1)  # this rank dies without a word
    try:
        svi.step(x)
    except RuntimeError as e:
        with open(os.path.join(out_dir, "rank0_error.txt"), "w") as f:
            f.write(str(e))
        os._exit(3)
    os._exit(0)


def test_a_dead_rank_makes_the_others_fail_instead_of_hanging(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    procs = [
        ctx.Process(target=_hanging_worker, args=(r, 2, port, str(tmp_path))) for r in range(2)
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    assert not any(p.is_alive() for p in procs)
    assert procs[0].exitcode == 3
    assert (tmp_path / "rank0_error.txt").read_text()


def _hardening_worker(rank, world_size, init_file, out_dir):
    """Three cases on two ranks: (a) a rank's update fails, (b) the ranks' batches differ in
    size, (c) the ranks build their modules from different seeds."""
    out = {}
    with gloo_group(rank, world_size, init_file):
        # (a) rank 1's batch makes its objective fail at update 1: both ranks raise there,
        # neither changes its weights, and the next update is again the single process's.
        svi, shard, log = _svi(), GLOBAL_BATCH // world_size, []
        for step in range(3):
            x = _data(step)[rank * shard : (rank + 1) * shard]
            if step == 1 and rank == 1:
                x = x.clone()
                x[0, 0, 0] = float("nan")
            before = [p.detach().clone() for p in svi.parameters()]
            try:
                log.append(svi.step(x).loss)
            except (ValueError, FloatingPointError, ps.RankFailedError) as e:
                log.append(type(e).__name__)
                assert all(torch.equal(a, p) for a, p in zip(before, svi.parameters()))
        out["a"] = log
        # (b) 5 and 3 datapoints: refused on both ranks (the mean of the ranks' means is not
        # the global batch's)
        x = _data(0)[:5] if rank == 0 else _data(0)[5:]
        try:
            _svi().step(x)
            out["b"] = "no error"
        except ValueError as e:
            out["b"] = str(e)
        # (c) each rank seeds its modules differently (a frozen encoder, the initializer's
        # weights): every parameter and buffer is rank 0's after construction
        torch.manual_seed(rank)
        model = GaussianMixture(3, 2, encoder=nn.Linear(2, 2).double().requires_grad_(False))
        model.register_buffer("offset", torch.randn(2, dtype=torch.float64))
        ps.NestedSVI(model, GradientAscent(2, 0.2), ps.objectives.Reconstruction(),
                     pyro.optim.Adam({"lr": 0.05}), seed=3)  # fmt: skip
        out["c"] = {k: v.clone() for k, v in model.state_dict().items()}
    torch.save(out, os.path.join(out_dir, f"{rank}.pt"))


def test_ranks_fail_together_refuse_unequal_batches_and_start_from_rank_0(tmp_path):
    """(a) A failure on one rank was raised on that rank only: the others paired this
    update's gradients with its next one's, then waited in a collective. (b) Batches of 5
    and 3 were averaged as two means of equal weight. (c) Frozen parameters and buffers kept
    each rank's own values (the trainable weights alone were broadcast)."""
    mp.spawn(_hardening_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2,
             join=True)  # fmt: skip
    got = [torch.load(tmp_path / f"{r}.pt", weights_only=True) for r in (0, 1)]
    # (a): one process on the whole batches, its update 1 failing as the ranks' did (the
    # slots of a failed update are drawn all the same)
    svi = _svi()
    want = [svi.step(_data(0)).loss, None]
    bad = _data(1).clone()
    bad[GLOBAL_BATCH // 2, 0, 0] = float("nan")
    with pytest.raises((ValueError, FloatingPointError)):
        svi.step(bad)
    want.append(svi.step(_data(2)).loss)
    assert got[0]["a"][1] == "RankFailedError"
    assert got[1]["a"][1] in ("ValueError", "FloatingPointError", "NonFiniteError")
    for rank in (0, 1):
        for step in (0, 2):
            assert got[rank]["a"][step] == pytest.approx(want[step], rel=1e-9)
    # (b)
    for rank, mine in ((0, 5), (1, 3)):
        assert f"this rank has {mine} of 8" in got[rank]["b"]
    # (c)
    for name, value in got[0]["c"].items():
        torch.testing.assert_close(got[1]["c"][name], value, rtol=0, atol=0)
