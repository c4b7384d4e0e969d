"""``pyro-slots demo``: train a small model, evaluate it on held-out data, write pictures.

Two demos:

- ``slot-autoencoder``: a small Slot Attention autoencoder on ``tetrominoes`` (the README's
  main job); prints the held-out FG-ARI.
- ``gmm``: a Gaussian mixture per point set, fitted by a few EM steps from a learned slot
  initialization; prints the held-out log-likelihood per point next to that of the data's true
  mixtures and of a 100-step EM reference fit.

``auto`` (the default) runs the first when its modules are installed, else the second.
"""

from __future__ import annotations

import importlib
import os
import time

from .config import ConfigError, TrainConfig
from .evaluate import evaluate_run, format_table, write_pictures
from .runs import count_option
from .train import train

__all__ = ["DEMOS", "demo", "demo_config"]

DEMOS = ("auto", "gmm", "slot-autoencoder")
#: Training steps and wall-clock limit of the image demo when ``--steps`` is not given: the
#: demo stops at whichever comes first, so that it ends in well under 15 minutes on 2 cores.
IMAGE_DEMO_STEPS = 2000
IMAGE_DEMO_SECONDS = 9 * 60
#: Inner steps of the image demo's held-out evaluation (trained with T = 5, tested with 10).
IMAGE_DEMO_TEST_STEPS = 10


def _image_demo_available() -> bool:
    for module in ("pyro_slots.models.slot_autoencoder", "pyro_slots.inner.slot_attention"):
        try:
            importlib.import_module(module)
        except ImportError:
            return False
    return True


def demo_config(model: str, steps: int | None, out: str, seed: int) -> TrainConfig:
    """The configuration a demo trains with.

    :param int steps: outer updates, >= 1, or ``None`` for the demo's default.
    :raises ConfigError: for ``steps`` < 1 (never replaced by the default).
    """
    steps = count_option(steps, "steps")
    if model == "gmm":
        return TrainConfig(
            model="gmm",
            inner="em",
            dataset="points",
            steps=300 if steps is None else steps,
            out=out,
            seed=seed,
            eval_every=50,
            checkpoint_every=100,
        )
    # The CPU-sized SlotAutoencoder (64-dimensional features and slots, stride-2 encoder,
    # quarter-resolution decoder) with the headline's recipe (pyro_slots/configs/
    # tetrominoes-slot-attention.yaml) cut to the demo's budget: first-order gradients through
    # T = 5 slot-attention steps (an update costs what an unrolled T = 3 one did), the paper's
    # learning rate with a 500-step warm-up, cosine-annealed over the 9 minutes (or over --steps
    # when given), and T = 10 at test. The slot initializer stays fixed (init: fixed).
    return TrainConfig(
        model="slot-autoencoder",
        inner="slot-attention",
        dataset="tetrominoes",
        steps=IMAGE_DEMO_STEPS if steps is None else steps,
        batch_size=32,
        lr=4e-4,
        warmup_steps=500,
        lr_schedule="cosine",
        max_minutes=IMAGE_DEMO_SECONDS / 60 if steps is None else None,
        gradient="first_order",
        out=out,
        seed=seed,
        num_slots=4,
        inner_steps=5,
        eval_inner_steps=IMAGE_DEMO_TEST_STEPS,
        slot_dim=64,
        eval_every=250,
        eval_size=64,
        checkpoint_every=250,
    )


def demo(
    model: str = "auto",
    steps: int | None = None,
    out: str = "runs/demo",
    seed: int = 0,
    progress: bool = True,
    echo=print,
) -> int:
    """Run a demo (see the module docstring); returns the exit status."""
    if model not in DEMOS:
        raise ConfigError(f"model: unknown demo {model!r}; valid choices are {list(DEMOS)}")
    if model == "auto":
        model = "slot-autoencoder" if _image_demo_available() else "gmm"
        if model == "gmm":
            echo(
                "demo: the Slot Attention autoencoder is not installed; running the Gaussian "
                "mixture demo (--model gmm)"
            )
    config = demo_config(model, steps, out, seed)
    echo(
        f"demo: training {config.model} with {config.inner} on {config.dataset} for "
        f"{config.steps} steps -> {out}"
    )
    start = time.perf_counter()
    if config.max_minutes is not None:
        echo(f"demo: training stops after {config.max_minutes:g} minutes if not done by then")
    run = train(config, overwrite=True, progress=progress, pictures=False, echo=echo)
    trained = time.perf_counter() - start
    metrics = evaluate_run(run, num=128, inner_steps=config.eval_inner_steps)
    pictures = write_pictures(run, os.path.join(out, "pictures"))
    echo(f"\nheld-out metrics after {run.step} steps ({trained:.0f} s of training):")
    echo(format_table(metrics))
    if config.model == "gmm":
        echo(
            f"\nlog-likelihood per point on held-out point sets: "
            f"fit {metrics['loglik_per_point']:.3f}, true mixtures "
            f"{metrics['true_loglik_per_point']:.3f}, EM reference "
            f"{metrics['reference_em_loglik_per_point']:.3f} "
            f"({run.config.inner_steps} EM steps from the learned initialization vs "
            "k-means++ and 100 EM steps)"
        )
    else:
        echo(
            f"\nFG-ARI on {metrics['num_datapoints']} held-out tetrominoes "
            f"(T = {metrics['inner_steps']} inner steps): "
            f"{metrics['fg_ari']:.3f} (ARI with background {metrics['ari']:.3f}, "
            f"reconstruction MSE {metrics['mse']:.4f})"
        )
    echo("pictures:")
    for path in pictures:
        echo(f"  {path}")
    return 0
