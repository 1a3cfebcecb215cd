"""Plain CNN-9 vs static NSN vs dynamic NSN on the synthetic glyphs: error, size, speed.

A short CPU training run of each variant on the same data (same seed, same batches), then
inference throughput of every model *side by side*, by the method of ``benchtools``: wall-clock
time, interleaved rounds (plain, static, static folded, static exported, dynamic, ...; the
order rotated every round), each model's time divided by the plain CNN's time in the same
round, reported as median [min-max] over rounds. The 1-minute load average is printed before
and after; a run on a machine loaded beyond its core count is refused (``--allow-loaded``
runs it, every figure flagged). The training times are one wall-clock run per variant, one
after the other (not interleaved): indicative only.

Target: the folded static NSN (and its ``torch.export`` file) within 1.05x of the CNN.

    python scripts/bench_supervised.py --threads 1     # half-width CNN-9, ~10 min on 2 cores
    python scripts/bench_supervised.py --threads 1 --iterations 1 --widths 32 64 128
                                                       # inference timing of the full CNN-9
    python scripts/bench_supervised.py --quick         # smoke run: tiny data
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from benchtools import interleaved_seconds, load_guard, load_report, median_range, paired_ratios

from fewshot_nsl.config import resolve_config
from fewshot_nsl.nn import fold_model
from fewshot_nsl.supervised import (
    SUPERVISED_DEFAULTS,
    SupervisedTrainer,
    evaluate,
    export_model,
    load_exported,
    load_synthetic,
)

VARIANTS = {
    "plain": {"kind": "plain"},
    "static_shared": {"kind": "static", "similarity": "full", "sharing": "shared"},
    "static_disjoint": {"kind": "static", "similarity": "full", "sharing": "disjoint"},
    "dynamic_diag_location": {
        "kind": "dynamic",
        "similarity": "diagonal",
        "granularity": "location",
        "hidden": 64,
    },
    "dynamic_diag_sample": {
        "kind": "dynamic",
        "similarity": "diagonal",
        "granularity": "sample",
        "hidden": 64,
    },
}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--iterations", type=int, default=150, help="training iterations each")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument(
        "--warmup",
        type=int,
        default=30,
        help="linear warm-up iterations (short runs stall at chance without)",
    )
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--train-per-class", type=int, default=100)
    parser.add_argument("--test-per-class", type=int, default=30)
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument(
        "--widths",
        type=int,
        nargs=3,
        default=[16, 32, 64],
        help="stage widths (the paper's CNN-9: 32 64 128)",
    )
    parser.add_argument("--speed-batch", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=11, help="interleaved timing rounds")
    parser.add_argument("--repeats", type=int, default=3, help="passes per model per round")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    parser.add_argument("--quick", action="store_true", help="tiny smoke run")
    parser.add_argument(
        "--allow-loaded",
        action="store_true",
        help="run even when the 1-minute load exceeds the core count (figures flagged)",
    )
    parser.add_argument("--json", type=Path, default=None, help="also write the rows as JSON")
    args = parser.parse_args()
    if args.quick:
        args.iterations, args.batch_size, args.classes, args.warmup = 5, 16, 4, 0
        args.train_per_class, args.test_per_class, args.image_size = 8, 4, 16
        args.widths, args.speed_batch, args.rounds, args.repeats = [8, 8, 16], 8, 3, 1
    return args


def config_for(conv: dict, args: argparse.Namespace) -> dict:
    return resolve_config(
        {
            "model": {
                "backbone": "cnn9",
                "conv": conv,
                "backbone_options": {"widths": args.widths, "root_width": args.widths[0]},
            },
            "train": {
                "iterations": args.iterations,
                "batch_size": args.batch_size,
                "lr": args.lr,
                "warmup_iterations": args.warmup,
                "lr_milestones": [],
                "device": "cpu",
                "eval_every": 0,
                "checkpoint_every": 0,
                "log_every": max(1, args.iterations),
            },
            "eval": {"speed_rounds": 0},
        },
        [],
        SUPERVISED_DEFAULTS,
    )


def interleaved_throughput(
    models: dict[str, torch.nn.Module],
    image_shape: tuple[int, int, int],
    args: argparse.Namespace,
) -> dict[str, dict[str, list[float]]]:
    """Per model, per interleaved round: images/s and time / time of the reference model
    (``plain`` when timed, else the first) in the same round; ``args.repeats`` forward passes
    of a random batch of ``args.speed_batch`` images per model per round."""
    images = torch.randn(args.speed_batch, *image_shape, generator=torch.Generator().manual_seed(0))

    def passes(model: torch.nn.Module):
        def run() -> None:
            for _ in range(args.repeats):
                model(images)

        return run

    with torch.inference_mode():
        seconds = interleaved_seconds(
            {name: passes(model) for name, model in models.items()}, args.rounds
        )
    reference = "plain" if "plain" in models else next(iter(models))
    return {
        name: {
            "images_per_s": [args.speed_batch * args.repeats / t for t in times],
            "time_ratio": paired_ratios(times, seconds[reference]),
        }
        for name, times in seconds.items()
    }


def main() -> int:
    args = parse_args()
    load, cores = load_guard(args.allow_loaded)
    if args.threads:
        torch.set_num_threads(args.threads)
    start = time.perf_counter()
    data = load_synthetic(
        num_classes=args.classes,
        train_per_class=args.train_per_class,
        test_per_class=args.test_per_class,
        image_size=args.image_size,
        channels=3,
        seed=0,
    )
    print(
        f"data: {data.num_classes} classes, {len(data.train_labels)} train / "
        f"{len(data.test_labels)} test images {data.image_shape} "
        f"({time.perf_counter() - start:.1f} s)",
        file=sys.stderr,
    )

    rows: dict[str, dict] = {}
    speed_models: dict[str, torch.nn.Module] = {}
    workdir = Path(tempfile.mkdtemp(prefix="bench_supervised_"))
    for name in args.variants:
        trainer = SupervisedTrainer(
            config_for(VARIANTS[name], args),
            workdir / name,
            data=data,
            quiet=not sys.stderr.isatty(),
        )
        trainer.setup()
        trainer.train()  # ends with last.pt in workdir/name
        summary = trainer.summary()
        rows[name] = {
            "test_error": summary["test_error"],
            "parameters": summary["parameters"],
            "nsl_parameters": summary["nsl_parameters"],
            "train_s_per_iter": trainer.train_time_s / args.iterations,
        }
        speed_models[name] = trainer.model.eval()
        print(
            f"{name}: error {summary['test_error']:.3f}, "
            f"{rows[name]['train_s_per_iter']:.2f} s/iter",
            file=sys.stderr,
        )
        if VARIANTS[name]["kind"] == "static":
            folded = fold_model(copy.deepcopy(trainer.model)).eval()
            folded_error = evaluate(folded, data.test_images, data.test_labels, trainer.normalize)[
                "error"
            ]
            rows[name]["folded_test_error"] = folded_error
            speed_models[f"{name} folded"] = folded
            # The exported file, as a user loads it (normalisation inside its graph).
            checkpoint = workdir / name / "last.pt"
            exported_path = export_model(checkpoint, workdir / f"{name}.pt2", fold=True)
            speed_models[f"{name} exported"] = load_exported(exported_path)[0]

    reference = "plain" if "plain" in speed_models else next(iter(speed_models))
    speeds = interleaved_throughput(speed_models, data.image_shape, args)
    plain_train = rows.get(reference, {}).get("train_s_per_iter")

    print(
        f"\nmachine: {platform.processor() or platform.machine()}, "
        f"{torch.get_num_threads()} torch threads, torch {torch.__version__}"
    )
    print(
        f"data: synthetic glyphs {data.image_shape}, {data.num_classes} classes, "
        f"{len(data.train_labels)} train / {len(data.test_labels)} test; CNN-9 widths "
        f"{args.widths}; {args.iterations} iterations of batch {args.batch_size}, lr "
        f"{args.lr}, warm-up {args.warmup}\n"
    )
    print(
        f"inference: {args.rounds} interleaved rounds of {args.repeats} passes of batch "
        f"{args.speed_batch}, wall clock; median [min-max] over rounds; train s/iter: one "
        "run each, not interleaved\n"
    )
    print(
        "| model | test error | params | NSL params | train s/iter (x plain) "
        "| inference img/s | time x plain (paired rounds) |"
    )
    print("|---|---|---|---|---|---|---|")
    for model_name, speed in speeds.items():
        variant = model_name.split(" ")[0]
        row = rows[variant]
        folded = model_name != variant
        error = row["folded_test_error"] if folded else row["test_error"]
        params = (
            rows[reference]["parameters"] if folded and reference in rows else (row["parameters"])
        )
        train = (
            ""
            if folded
            else f"{row['train_s_per_iter']:.3f}"
            + (f" ({row['train_s_per_iter'] / plain_train:.2f}x)" if plain_train else "")
        )
        nsl = 0 if folded else row["nsl_parameters"]
        print(
            f"| {model_name} | {100 * error:.1f}% | {params:,} | {nsl:,} | {train} "
            f"| {median_range(speed['images_per_s'], 0)} "
            f"| {median_range(speed['time_ratio'], 3)} |"
        )
    folded_ratios = {
        k: statistics.median(v["time_ratio"])
        for k, v in speeds.items()
        if k.endswith(("folded", "exported"))
    }
    if folded_ratios:
        worst = max(folded_ratios.values())
        verdict = "MET" if worst <= 1.05 else "MISSED"
        if args.quick:  # ~1 ms passes: Python overhead and load spikes dominate
            verdict += " (--quick: smoke run, timings not meaningful)"
        elif max(load, os.getloadavg()[0]) > cores:
            verdict += " (machine loaded: not an idle-core figure)"
        print(
            f"\nfolded/exported static NSN vs CNN (median time ratio): "
            f"{statistics.median(folded_ratios.values()):.3f}, worst {worst:.3f} -> "
            f"target <= 1.05 {verdict}"
        )
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "speeds": speeds}, indent=2))
    print(f"total {time.perf_counter() - start:.0f} s", file=sys.stderr)
    load_report(load, cores)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
