"""The GPU path: on CUDA every computation gives the CPU's numbers.

Skipped where CUDA is not available (CI has none). On a GPU machine: ``pytest tests/test_cuda.py``.
Library calls are compared in float64, where CPU and GPU agree to rounding; the command line
trains in float32, where the GPU's TF32 convolutions (PyTorch's default) leave ~1e-3 relative
differences, so its checks are a tolerance of that size apart.
"""

import json
import os
import socket
import subprocess
import sys

import pyro
import pyro.optim
import pytest
import torch
import torch.distributed as dist

import pyro_slots as ps
from pyro_slots.checkpoint import load_checkpoint
from pyro_slots.inner import EM, SlotAttention
from pyro_slots.models import IODINE, GaussianMixture
from tests.conftest import make_point_sets, tiny_autoencoder

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _close(a, b, tol=1e-9):
    assert a.device.type == "cuda"
    assert torch.allclose(a.cpu(), b, rtol=tol, atol=tol, equal_nan=True)


def test_refine_em_with_pruned_restarts_equals_cpu():
    x, _ = make_point_sets(16, 60, num_components=3, seed=2, spread=2.5)
    x = x.double()
    gmm = GaussianMixture(3, 2).double()
    options = dict(seed=0, num_restarts=3, keep_best_after=2, elbo_tol=1e-6)
    cpu = ps.refine(gmm, x, EM(num_steps=20), **options)
    gpu = ps.refine(gmm.cuda(), x.cuda(), EM(num_steps=20), **options)
    for name in ("slots", "elbo", "history", "responsibilities"):
        _close(getattr(gpu, name), getattr(cpu, name))
    assert torch.equal(gpu.steps.cpu(), cpu.steps)


def _svi(device):
    torch.manual_seed(0)
    model = tiny_autoencoder().double().to(device)
    rule = SlotAttention(
        2, slot_dim=model.slot_dim, input_dim=model.feature_dim, hidden_dim=model.slot_dim,
        encoder=False,
    ).double().to(device)  # fmt: skip
    optim = pyro.optim.Adam({"lr": 1e-3})
    return ps.NestedSVI(model, rule, ps.objectives.Reconstruction(), optim, seed=1)


def test_refine_without_the_history_equals_cpu():
    """record_history=False: slot attention's skipped ELBOs (NaN, on the data's device) and the
    final one; the result is the CPU's."""
    x, _ = make_point_sets(8, 40, num_components=3, seed=1)
    x = x.double()
    gmm = GaussianMixture(3, 2).double()
    torch.manual_seed(0)
    rule = SlotAttention(3, slot_dim=gmm.slot_dim, input_dim=2, hidden_dim=16).double()
    cpu = ps.refine(gmm, x, rule, seed=0, record_history=False)
    gpu = ps.refine(gmm.cuda(), x.cuda(), rule.cuda(), seed=0, record_history=False)
    assert torch.isnan(gpu.history[:-1]).all()
    _close(gpu.slots, cpu.slots)
    _close(gpu.history, cpu.history)


def test_slot_attention_training_steps_equal_cpu():
    """Two first-order NestedSVI updates of a conv autoencoder: J and every weight after."""
    images = torch.rand(4, 3, 12, 12, generator=torch.Generator().manual_seed(3)).double()
    runs = {}
    for device in ("cpu", "cuda"):
        svi = _svi(device)
        losses = [svi.step(images.to(device)).loss for _ in range(2)]
        runs[device] = losses, {n: p.detach() for n, p in svi.named_parameters()}
    assert runs["cuda"][0] == pytest.approx(runs["cpu"][0], rel=1e-9)
    assert len(runs["cuda"][1]) > 10
    for name, weight in runs["cpu"][1].items():
        _close(runs["cuda"][1][name], weight, tol=1e-7)


def test_iodine_elbo_and_its_slot_gradient_equal_cpu(monkeypatch):
    """The guide's reparameterized draws come from the CPU stream on both devices (CUDA's own
    generator draws other numbers), so the two single-sample ELBOs are the same estimate."""

    def cpu_noise(shape, dtype, device):
        return torch.randn(shape, dtype=dtype).to(device)

    monkeypatch.setattr(torch.distributions.normal, "_standard_normal", cpu_noise)
    torch.manual_seed(0)
    model = IODINE(image_size=8, num_slots=3, latent_dim=4).double()
    images = torch.rand(2, 3, 8, 8, dtype=torch.float64)
    slots = 0.3 * torch.randn(2, 3, model.slot_dim, dtype=torch.float64)
    results = {}
    for device in ("cpu", "cuda"):
        model.to(device)
        s = slots.to(device).requires_grad_()
        pyro.set_rng_seed(5)
        elbo = ps.per_datapoint_elbo(model, model.encode(images.to(device)), s)
        results[device] = elbo, torch.autograd.grad(elbo.sum(), s)[0]
    for got, want in zip(results["cuda"], results["cpu"]):
        _close(got, want.detach())


# The command line: a tiny slot-attention run trained on the GPU, then evaluated on both.
RUN = [
    "--model", "slot-autoencoder", "--dataset", "shapes", "--image-size", "16", "--steps", "4",
    "--batch-size", "4", "--eval-size", "4", "--eval-every", "2", "--checkpoint-every", "2",
    "--slot-dim", "8", "--hidden-dim", "8", "--num-slots", "3", "--inner-steps", "2",
    "--test-size", "4", "--threads", "1", "--no-progress", "--no-pictures", "--seed", "0",
]  # fmt: skip


def _cli(*args, launcher=("-m", "pyro_slots")):
    env = dict(os.environ, OMP_NUM_THREADS="1", MPLBACKEND="Agg")
    command = [sys.executable, *launcher, *map(str, args)]
    proc = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


def _training_losses(run):
    with open(run / "metrics.jsonl") as f:
        records = [json.loads(line) for line in f]
    return [r["J"] for r in records if r.get("split") == "train"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = {}
    for device in ("cpu", "cuda"):
        out[device] = tmp_path_factory.mktemp(device)
        _cli("train", *RUN, "--device", device, "--out", out[device])
    return out


def test_cli_training_on_cuda_follows_cpu(runs):
    gpu, cpu = _training_losses(runs["cuda"]), _training_losses(runs["cpu"])
    assert len(gpu) == len(cpu) == 4
    assert gpu == pytest.approx(cpu, rel=1e-2)
    with open(runs["cuda"] / "test.json") as f:
        assert json.load(f)["machine"]["gpu"] == torch.cuda.get_device_name(0)


def test_cli_evaluate_a_gpu_run_on_either_device(runs):
    """A checkpoint written on the GPU loads on the CPU (and back): the same scores."""
    scores = {}
    for device in ("cpu", "cuda"):
        proc = _cli("evaluate", runs["cuda"], "--json", "--num", 8, "--device", device)
        scores[device] = json.loads(proc.stdout)
    for key in ("J", "mse", "fg_ari", "ari"):
        assert scores["cuda"][key] == pytest.approx(scores["cpu"][key], rel=1e-2, abs=1e-3), key
    proc = _cli("diagnose", runs["cuda"] / "checkpoint.pt", "--device", "cuda", "--out",
                runs["cuda"] / "diagnostics")  # fmt: skip
    assert (runs["cuda"] / "diagnostics").is_dir(), proc.stdout


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_torchrun_with_one_rank_per_gpu_trains_as_one_process(runs, tmp_path):
    """``torchrun --nproc-per-node 1 ... --device cuda``: the rank's GPU is ``cuda:LOCAL_RANK``."""
    launcher = ["-m", "torch.distributed.run", "--nproc-per-node", "1", "--master-addr",
                "127.0.0.1", "--master-port", str(_free_port()), "-m", "pyro_slots"]  # fmt: skip
    _cli("train", *RUN, "--device", "cuda", "--out", tmp_path, launcher=launcher)
    assert load_checkpoint(tmp_path / "checkpoint.pt")["step"] == 4
    assert _training_losses(tmp_path) == pytest.approx(_training_losses(runs["cuda"]), rel=1e-5)


def test_nested_svi_in_an_nccl_group_equals_no_group(tmp_path):
    """The data-parallel path's collectives (the weights' broadcast, the gradients' all-reduce)
    over nccl, in a one-rank group (nccl takes one rank per GPU)."""
    images = torch.rand(4, 3, 12, 12, generator=torch.Generator().manual_seed(3)).double().cuda()
    svi = _svi("cuda")
    want = [svi.step(images).loss for _ in range(2)]
    dist.init_process_group("nccl", init_method=f"file://{tmp_path / 'init'}", rank=0,
                            world_size=1, device_id=torch.device("cuda", 0))  # fmt: skip
    try:
        assert dist.get_backend() == "nccl"
        svi = _svi("cuda")
        assert svi.distributed
        got = [svi.step(images).loss for _ in range(2)]
    finally:
        dist.destroy_process_group()
    assert got == pytest.approx(want, rel=1e-9)
