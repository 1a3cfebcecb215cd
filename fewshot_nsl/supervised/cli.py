"""``fewshot-nsl train-supervised`` and ``fewshot-nsl export`` (registered by ``fewshot_nsl.cli``).

Each subcommand's parser gets ``handler(args) -> int`` as its default; bad input raises
``ValueError``/``FileNotFoundError`` with a one-line message for the main CLI to print.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def _train_supervised(args: argparse.Namespace) -> int:
    from fewshot_nsl.config import ConfigError
    from fewshot_nsl.engine import TrainingInterrupted
    from fewshot_nsl.supervised.config import load_supervised_config
    from fewshot_nsl.supervised.run import format_results, run_dir_for, run_supervised

    if args.overwrite and args.resume:
        raise ConfigError("--overwrite starts a fresh run; it cannot be used with --resume")
    config = load_supervised_config(args.config, args.overrides)
    out_dir = Path(args.resume or args.out or run_dir_for(config))
    try:
        results = run_supervised(
            config,
            out_dir=out_dir,
            resume=args.resume is not None,
            overwrite=args.overwrite,
            progress=not args.quiet,
        )
    except TrainingInterrupted as stop:
        where = out_dir.resolve()
        stop.resume_command = (
            f"fewshot-nsl train-supervised --config {where / 'config.yaml'} --resume {where}"
        )
        raise
    print(format_results(results))
    return 0


def _export(args: argparse.Namespace) -> int:
    from fewshot_nsl.cli import checkpoint_argument
    from fewshot_nsl.supervised.export import export_model

    checkpoint = checkpoint_argument(args.checkpoint)
    path = export_model(checkpoint, args.out, fold=args.fold, overwrite=args.overwrite)
    print(json.dumps({"exported": str(path), "folded": args.fold}))
    return 0


def register_cli(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``train-supervised`` and ``export`` subcommands to the ``fewshot-nsl`` parser."""
    train = subparsers.add_parser(
        "train-supervised",
        help="train a CNN / static / dynamic NSN classifier (CIFAR-10/100 or synthetic)",
        description="Supervised image classification with NSL (docs/supervised.md). "
        "Writes a run directory with config.yaml, metrics.jsonl, last.pt and results.json.",
    )
    train.add_argument(
        "--config", required=True, help="YAML config, e.g. configs/cifar100_cnn9_static_shared.yaml"
    )
    train.add_argument(
        "overrides",
        nargs="*",
        metavar="KEY=VALUE",
        help="dotted config overrides, e.g. train.iterations=1000",
    )
    where = train.add_mutually_exclusive_group()
    where.add_argument(
        "--out", help="run directory (default: train.out_dir or runs/supervised/NAME)"
    )
    where.add_argument("--resume", metavar="DIR", help="continue the run in DIR from its last.pt")
    train.add_argument(
        "--quiet", action="store_true", help="print only errors, one line per run and the results"
    )
    train.add_argument(
        "--overwrite",
        action="store_true",
        help="remove the run already in the run directory (whole) and start a fresh one",
    )
    train.set_defaults(handler=_train_supervised)

    export = subparsers.add_parser(
        "export",
        help="export a train-supervised checkpoint with torch.export (static NSN folded to a CNN)",
        description="Write a self-contained torch.export program (.pt2; load it with "
        "torch.export.load(FILE).module(), no fewshot_nsl needed) taking float images in "
        "[0, 1] and returning logits.",
    )
    export.add_argument(
        "--checkpoint",
        required=True,
        help="last.pt of a train-supervised run, or its run directory",
    )
    export.add_argument("--out", required=True, help="file to write, e.g. model.pt2")
    export.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    export.add_argument(
        "--fold",
        action="store_true",
        help="fold static NSL layers into plain nn.Conv2d (same predictions, CNN speed)",
    )
    export.set_defaults(handler=_export)
