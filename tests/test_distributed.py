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
