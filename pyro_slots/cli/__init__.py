"""The ``pyro-slots`` command line (also ``python -m pyro_slots``).

Subcommands::

    pyro-slots train [--model gmm] [--inner em] [--dataset points] [--config NAME|FILE] ...
    pyro-slots train --list-configs
    pyro-slots train --resume DIR [--steps N]
    pyro-slots evaluate CHECKPOINT [--dataset hdf5:TEST.h5] [--restarts R] [--per-image F.csv]
    pyro-slots diagnose CHECKPOINT [--out DIR]
    pyro-slots demo [--model auto|gmm|slot-autoencoder] [--steps N]

User errors (unknown names, incompatible options, unreadable or corrupted checkpoints, config
files, run folders that are in use or cannot be written) print one line ``pyro-slots: error: ...``
and exit with status 2, as :mod:`argparse` does; a training run that diverges (non-finite J,
ELBO, slots or gradient) prints one line and exits with status 1.

:func:`main` runs a command in the calling process and changes nothing process-wide but
torch's thread count (``--threads``); :func:`console_main`, the ``pyro-slots`` console script
and ``python -m pyro_slots``, also tunes glibc's allocator for the training commands.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys

import torch
import torch.distributed as dist

from pyro_slots._allocator import tune_allocator
from pyro_slots.checkpoint import CheckpointError
from pyro_slots.nested import GRADIENT_MODES

from .config import (
    ConfigError,
    TrainConfig,
    config_path,
    list_configs,
    load_config_file,
    merge_config,
)
from .demo import demo
from .diagnose import diagnose
from .evaluate import (
    evaluate_run,
    evaluation_data,
    final_test_options,
    format_table,
    write_pictures,
)
from .registry import (
    DATASETS,
    INIT_KINDS,
    INNER_RULES,
    LR_SCHEDULES,
    MODELS,
    OBJECTIVES,
    REINITIALIZE_MASKS,
    RESTART_CRITERIA,
    int_list,
)
from .runs import (
    CHECKPOINT_WEIGHTS,
    TrainingError,
    load_run,
    resolve_device,
    weights_path,
    writable_folder,
)
from .train import train

__all__ = ["build_parser", "console_main", "main"]

#: Options that may change when a run is resumed (everything else would change the result):
#: the length, the logging and the final test (which reads the weights only). Not where they
#: define the run's data or its selection: an HDF5 run's held-out split (the larger of
#: eval_size and test_size), the validation of a run with validate_as_tested
#: (:func:`~pyro_slots.cli.runs.load_run` refuses those).
RESUMABLE = (
    "steps",
    "eval_every",
    "eval_size",
    "checkpoint_every",
    "tensorboard",
    "test_size",
    "eval_inner_steps",
    "eval_restarts",
    "restart_criterion",
    "test_sweep",
    "eval_reinitialize",
)


def _choices_help() -> dict[str, str]:
    return {
        "model": ", ".join(MODELS),
        "inner": ", ".join(INNER_RULES),
        "gradient": ", ".join(GRADIENT_MODES),
        "dataset": ", ".join(DATASETS),
        "objective": ", ".join(OBJECTIVES),
        "init": ", ".join(INIT_KINDS),
        "lr_schedule": ", ".join(LR_SCHEDULES),
        "restart_criterion": ", ".join(RESTART_CRITERIA),
    }


def _add_config_options(parser: argparse.ArgumentParser) -> None:
    """One flag per :class:`TrainConfig` field, absent from the namespace unless given."""
    choices = _choices_help()
    group = parser.add_argument_group(
        "training options (also keys of --config; flags override the file)"
    )
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        help_text = f.metadata["help"]
        if f.name in choices:
            help_text += f"; one of: {choices[f.name]}"
        if f.default is not None and not isinstance(f.default, bool):
            help_text += f" (default: {f.default})"
        text = str(f.type)
        if text == "bool":
            # --flag / --no-flag: a recipe's true can be turned off on the command line
            group.add_argument(
                flag,
                action=argparse.BooleanOptionalAction,
                default=argparse.SUPPRESS,
                help=help_text,
            )
            continue
        kind = {"int": int, "float": float, "str": str}[text.removesuffix(" | None")]
        aliases = ("--latent-dim",) if f.name == "slot_dim" else ()
        group.add_argument(
            flag,
            *aliases,
            type=kind,
            default=argparse.SUPPRESS,
            metavar=f.metadata.get("metavar", kind.__name__.upper()),
            help=help_text,
        )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pyro-slots",
        description="Object-centric and mixture-model inference as nested optimization, in Pyro.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--threads",
        type=int,
        default=None,
        metavar="N",
        help="CPU threads of torch (default: 1 for demo, torch's choice otherwise; 1 is fastest "
        "on a busy machine; a bit-identical resume needs the same number as the first run)",
    )
    on_device = argparse.ArgumentParser(add_help=False)
    on_device.add_argument(
        "--device",
        default="cpu",
        metavar="DEVICE",
        help="cpu (default) or cuda: where the weights and data live (under torchrun, cuda is "
        "each rank's GPU and the ranks talk over nccl, else gloo)",
    )

    trained = argparse.ArgumentParser(add_help=False)  # evaluate and diagnose a run's weights
    trained.add_argument(
        "checkpoint", metavar="CHECKPOINT", help="a checkpoint file or a run folder"
    )
    trained.add_argument(
        "--weights",
        default=None,
        choices=CHECKPOINT_WEIGHTS,
        help="of a run folder: best (best.pt, the weights its final test used with "
        "select_best) or last (checkpoint.pt, where training ended) (default: best where the "
        "folder has best.pt, else last)",
    )

    train = sub.add_parser(
        "train",
        parents=[common, on_device],
        help="train a model with NestedSVI",
        description="Train a slot model: the inner rule refines every datapoint's slots, the "
        "outer loop fits the shared weights on the task objective. Without options: gmm on "
        "generated point sets with EM and a learned slot initialization (about 15 s).",
    )
    train.add_argument(
        "--config",
        metavar="NAME|FILE",
        help="a shipped recipe by name (see --list-configs) or a YAML or TOML file of training "
        "options",
    )
    train.add_argument(
        "--list-configs", action="store_true", help="list the shipped recipes and exit"
    )
    train.add_argument("--resume", metavar="DIR", help="continue the run saved in DIR exactly")
    train.add_argument(
        "--tf32",
        choices=("on", "off"),
        default=None,
        help="on a GPU: TensorFloat-32 in matrix products and convolutions (on), or in neither "
        "(off: float32 as on the CPU up to rounding); default torch's settings (convolutions "
        "only)",
    )
    train.add_argument("--overwrite", action="store_true", help="replace a run already in --out")
    train.add_argument("--no-progress", action="store_true", help="no progress bar")
    train.add_argument("--no-pictures", action="store_true", help="do not draw the pictures")
    train.add_argument(
        "--dist-timeout",
        type=float,
        default=None,
        metavar="SECONDS",
        help="under torchrun: seconds a rank waits for the others in a collective before it "
        "fails (default: torch's, 30 minutes with gloo); a rank that dies fails the others at "
        "once, one that stalls only after this time",
    )
    _add_config_options(train)

    evaluate = sub.add_parser(
        "evaluate",
        parents=[common, on_device, trained],
        help="metrics of a checkpoint on held-out data or an HDF5 file",
        description="Metrics of a trained run: FG-ARI, ARI, mean IoU, MSE, ELBO, objects split "
        "and merged, and for gmm the log-likelihood per point against the data's true mixtures; "
        "on the run's held-out data, or on any benchmark file with --dataset hdf5:PATH.",
    )
    evaluate.add_argument("--json", action="store_true", help="print the metrics as JSON")
    evaluate.add_argument(
        "--dataset",
        default=None,
        metavar="NAME",
        help="hdf5:PATH (a file in the layout of pyro_slots.data.hdf5), a generator of the "
        "run's kind of data, or validation (the run's validation scenes: choose test-time "
        "options there, not on the test scenes) (default: the run's own held-out split)",
    )
    evaluate.add_argument(
        "--num",
        type=int,
        default=None,
        metavar="N",
        help="datapoints (default: on the run's own held-out data its --test-size, the data "
        "of test.json, else 128 from a generator; every image of an HDF5 file)",
    )
    evaluate.add_argument(
        "--inner-steps",
        default=None,
        metavar="T[,T...]",
        help="inner steps (default: the run's final test's, eval_inner_steps, else the "
        "training T; the defaults of --inner-steps, --restarts, --restart-criterion and "
        "--reinitialize repeat the run's test.json); several, e.g. 1,3,5,10,20, evaluate the "
        "same data from the same initial slots at each T and print FG-ARI etc. against T",
    )
    evaluate.add_argument(
        "--restarts",
        type=int,
        default=None,
        metavar="R",
        help="restarts per datapoint, run side by side; one is kept (--restart-criterion) "
        "(default: the run's eval_restarts, 1 unless set)",
    )
    evaluate.add_argument(
        "--restart-criterion",
        default=None,
        choices=("elbo", "mse"),
        help="the restart a datapoint keeps: the highest inner ELBO or the lowest reconstruction "
        "error (default: the run's restart_criterion, elbo unless set)",
    )
    reinit = evaluate.add_mutually_exclusive_group()
    reinit.add_argument(
        "--reinitialize",
        nargs="?",
        const=True,
        default=None,
        choices=REINITIALIZE_MASKS,
        metavar="MASKS",
        help="redraw dead and duplicate slots before every inner step at test time "
        "(pyro_slots.inner.Reinitialize around the trained rule, from the run's slot "
        "initializer), for a run trained without --reinitialize; MASKS judges them: decoder, "
        "posterior or attention (default: the run's --reinitialize-masks, else decoder for "
        "image models). Default: as the run's test (eval_reinitialize)",
    )
    reinit.add_argument(
        "--no-reinitialize",
        dest="reinitialize",
        action="store_const",
        const=False,
        help="no test-time re-initialization added, also for a run whose test adds it "
        "(eval_reinitialize); a run trained with --reinitialize keeps its own rule",
    )
    evaluate.add_argument(
        "--no-carry",
        action="store_true",
        help="clips: start every frame's inner loop afresh instead of from the slots of the "
        "frame before (the per-frame baseline of the same weights)",
    )
    evaluate.add_argument(
        "--per-image",
        metavar="FILE.csv",
        default=None,
        help="also write one CSV row of metrics per datapoint",
    )
    evaluate.add_argument(
        "--pictures", metavar="DIR", default=None, help="also draw the pictures into DIR"
    )

    diagnose = sub.add_parser(
        "diagnose",
        parents=[common, on_device, trained],
        help="posterior diagnostics report of a checkpoint",
        description="Write the posterior diagnostics report of a trained run into a folder.",
    )
    diagnose.add_argument(
        "--out", metavar="DIR", default=None, help="report folder (default: RUN/diagnostics)"
    )
    diagnose.add_argument(
        "--num",
        type=int,
        default=None,
        metavar="N",
        help="held-out datapoints (default: 64, or every held-out image of an HDF5 run that "
        "holds out fewer)",
    )
    diagnose.add_argument(
        "--inner-steps",
        type=int,
        default=None,
        metavar="T",
        help="inner steps (default: as in the run's final test, eval_inner_steps, else as in "
        "training)",
    )
    diagnose.add_argument(
        "--restarts", type=int, default=4, metavar="R", help="restarts per datapoint (default: 4)"
    )
    diagnose.add_argument(
        "--draws",
        default="auto",
        metavar="KIND",
        help="posterior draws: auto, point, laplace or guide (default: auto, which keeps point "
        "estimates only for slots with more than 128 coordinates per datapoint)",
    )

    summarize = sub.add_parser(
        "summarize",
        help="test metrics of several runs and their spread, as markdown",
        description="One row per run folder with its final test metrics (test.json), the mean "
        "± sample std across runs (e.g. over seeds), and every run's validation curve with its "
        "training seconds.",
    )
    summarize.add_argument("runs", nargs="+", metavar="RUN", help="run folders")
    summarize.add_argument(
        "--metric",
        default=None,
        metavar="NAME",
        help="validation metric of the curve (default: the runs' selection score, fg_ari for "
        "images, loglik_per_point for point sets)",
    )
    summarize.add_argument(
        "--weights",
        default="tested",
        metavar="KIND",
        help="tested (those of test.json, the best ones with --select-best; default) or final",
    )
    summarize.add_argument(
        "--reach",
        type=float,
        action="append",
        default=[],
        metavar="SCORE",
        help="also print the update and training minutes at which each run's validation "
        "--metric first reached SCORE (repeatable)",
    )

    demo = sub.add_parser(
        "demo",
        parents=[common],
        help="train, evaluate and draw pictures in a few minutes on the CPU",
        description="The main job in one command: train a small model, evaluate it on held-out "
        "data and write pictures. --model auto picks the Slot Attention autoencoder on "
        "tetrominoes when it is installed, else the Gaussian mixture on point sets.",
    )
    demo.add_argument(
        "--model",
        default="auto",
        metavar="NAME",
        help="auto, gmm or slot-autoencoder (default: auto)",
    )
    demo.add_argument(
        "--steps",
        type=int,
        default=None,
        metavar="N",
        help="outer updates (default: 300 for gmm; for slot-autoencoder 2000 or 9 minutes of "
        "training, whichever comes first)",
    )
    demo.add_argument(
        "--out", default="runs/demo", metavar="DIR", help="output folder (default: runs/demo)"
    )
    demo.add_argument("--seed", type=int, default=0, help="seed (default: 0)")
    demo.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def _train(args: argparse.Namespace) -> int:
    if args.list_configs:
        recipes = list_configs()
        width = max(len(name) for name, _ in recipes)
        for name, description in recipes:
            print(f"{name:<{width}}  {description}")
        return 0
    fields = TrainConfig.field_names()
    flags = {name: getattr(args, name) for name in fields if hasattr(args, name)}
    options = dict(
        progress=not args.no_progress,
        pictures=not args.no_pictures,
        dist_timeout=args.dist_timeout,
        device=args.device,
        tf32=None if args.tf32 is None else args.tf32 == "on",
    )
    if args.resume is not None:
        if args.config is not None:
            raise ConfigError("--config: a resumed run keeps its saved configuration")
        if args.overwrite:
            raise ConfigError("--overwrite: a resumed run continues its folder; drop --overwrite")
        fixed = sorted(set(flags) - set(RESUMABLE))
        if fixed:
            raise ConfigError(
                f"--resume: cannot change {', '.join('--' + n.replace('_', '-') for n in fixed)}"
                f" of a saved run; only {', '.join('--' + n.replace('_', '-') for n in RESUMABLE)}"
                " may change"
            )
        run = train(resume=args.resume, overrides=flags, **options)
    else:
        file_values = load_config_file(config_path(args.config)) if args.config else {}
        config = merge_config(file_values, flags)
        run = train(config, overwrite=args.overwrite, **options)
    if dist.is_available() and dist.is_initialized():
        rank = dist.get_rank()
        dist.destroy_process_group()
        if rank != 0:
            return 0
    written = "checkpoint.pt, metrics.jsonl, config.yaml" + (
        "" if args.no_pictures else " and pictures"
    )
    print(f"trained {run.step} steps; {written} in {run.config.out}")
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    from .summarize import steps_table

    steps = int_list(args.inner_steps, "--inner-steps", "10 or 1,3,5,10,20") or (None,)
    if len(steps) > 1:
        for flag in ("per_image", "pictures"):
            if getattr(args, flag):
                raise ConfigError(
                    f"--{flag.replace('_', '-')}: needs a single --inner-steps T, got "
                    f"{args.inner_steps}"
                )
    path = weights_path(args.checkpoint, args.weights)
    run = load_run(path, {"tensorboard": False}, resolve_device(args.device))
    data = evaluation_data(run, args.dataset, args.num)  # checked before any work
    # Unset options are the run's final test's: evaluate RUN repeats test.json.
    options = final_test_options(
        run.config,
        restarts=args.restarts,
        criterion=args.restart_criterion,
        reinitialize=args.reinitialize,
    )
    if args.pictures:
        writable_folder(args.pictures, "--pictures")
    sweep = [
        evaluate_run(
            run,
            dataset=data,
            inner_steps=t,
            restarts=options["restarts"],
            per_image=args.per_image,
            criterion=options["criterion"],
            carry=not args.no_carry,
            reinitialize=options["reinitialize"],
        )
        for t in steps
    ]
    if args.json:
        print(json.dumps(sweep[0] if len(sweep) == 1 else sweep, indent=2))
    elif len(sweep) == 1:
        print(format_table(sweep[0]))
    else:
        print(steps_table({str(t): m for t, m in zip(steps, sweep)}))
    note = sys.stderr if args.json else sys.stdout
    print(f"weights: {path} (update {run.step})", file=note)
    if args.per_image:
        print(f"wrote {args.per_image}", file=note)
    if args.pictures:
        pictures = write_pictures(
            run,
            args.pictures,
            data=data,
            inner_steps=steps[0] or options["inner_steps"],
            restarts=options["restarts"],
            reinitialize=options["reinitialize"],
        )
        for path in pictures:
            print(f"wrote {path}", file=note)
    return 0


def _diagnose(args: argparse.Namespace) -> int:
    folder = diagnose(
        args.checkpoint,
        out=args.out,
        num=args.num,
        inner_steps=args.inner_steps,
        restarts=args.restarts,
        draws=args.draws,
        device=args.device,
        weights=args.weights,
    )
    print(f"diagnostics written to {folder}")
    return 0


def _demo(args: argparse.Namespace) -> int:
    return demo(
        model=args.model,
        steps=args.steps,
        out=args.out,
        seed=args.seed,
        progress=not args.no_progress,
    )


def _summarize(args: argparse.Namespace) -> int:
    from .summarize import summary

    print(summary(args.runs, args.metric, args.weights, args.reach))
    return 0


COMMANDS = {
    "train": _train,
    "evaluate": _evaluate,
    "diagnose": _diagnose,
    "summarize": _summarize,
    "demo": _demo,
}


def main(argv: list[str] | None = None) -> int:
    """Run ``pyro-slots`` with ``argv`` (default: ``sys.argv[1:]``); returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    threads = getattr(args, "threads", None)
    if threads is None and args.command == "demo":
        # One thread per process: on a busy machine two intra-op threads spin against each
        # other and run several times slower than one; on an idle one the loss is modest.
        threads = 1
    if threads is not None:
        if threads < 1:
            parser.error(f"--threads: expected an integer >= 1, got {threads}")
        torch.set_num_threads(threads)
    try:
        return COMMANDS[args.command](args)
    except (ConfigError, CheckpointError) as error:
        print(f"pyro-slots: error: {error}", file=sys.stderr)
        return 2
    except TrainingError as error:
        print(f"pyro-slots: training failed: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("pyro-slots: interrupted", file=sys.stderr)
        return 130


#: Commands whose processes benefit from :func:`~pyro_slots._allocator.tune_allocator`.
TUNED_COMMANDS = ("train", "demo")


def console_main(argv: list[str] | None = None) -> int:
    """The ``pyro-slots`` console script (and ``python -m pyro_slots``): :func:`main`, with
    glibc's allocator tuned first for the training commands.

    Training allocates the same large activations every step; raising glibc's mmap and trim
    thresholds keeps them in the heap (benchmarks/results/slot_attention.md measures the effect).
    The setting is process-wide, so it is made here, in a process this command owns, and never
    by :func:`main` or another library call. The same effect without this code:
    ``GLIBC_TUNABLES=glibc.malloc.mmap_threshold=1073741824:glibc.malloc.trim_threshold=1073741824``.
    """
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in TUNED_COMMANDS:
        tune_allocator()
    try:
        return main(argv)
    except BrokenPipeError:
        # The reader went away (``pyro-slots summarize ... | head``): no traceback, and no
        # second error when Python flushes stdout at exit (the recipe of Python's signal docs).
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
