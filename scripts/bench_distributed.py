"""Meta-steps per second of distributed meta-training with 1 and N CPU processes (gloo).

Usage (from the repository root)::

    python scripts/bench_distributed.py            # 1 proc × 1 thread, 1 × 2, 2 × 1; 3 rounds
    python scripts/bench_distributed.py --configs 1x1 2x1 4x1 --steps 20 --tasks-per-batch 8

A configuration ``PxT`` is P processes with T intra-op threads each. Each runs in fresh
processes (``python -m torch.distributed.run`` for P > 1, a plain subprocess for P = 1, which
creates no process group). ``1x2`` is the honest alternative to ``2x1`` on two cores: one
process using both cores through intra-op threading. Method of ``benchtools``: wall-clock
time; the configurations are interleaved in rounds (order rotated every round); printed per
configuration as median [min-max] over rounds: meta-steps/s, the paired per-round ratio to
the first configuration, and the share of a step spent in the gradient and buffer
all-reduce (``reduce_gradients``; the small metric all-reduce is not included). The 1-minute
load average is printed before and after; a run on a machine loaded beyond its core count
is refused (``--allow-loaded`` runs it, every figure flagged). More processes x threads than
cores measures oversubscription, not scaling.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchtools import load_guard, load_report, median_range, paired_ratios

REPO_ROOT = Path(__file__).resolve().parents[1]


def bench_config(args: argparse.Namespace) -> dict[str, Any]:
    """5-way 1-shot synthetic glyphs, Conv-4 MAML with a second-order inner loop."""
    from fewshot_nsl.fewshot_config import resolve_fewshot_config

    size = args.image_size
    return resolve_fewshot_config(
        {
            "name": "bench-distributed",
            "data": {
                "dataset": "synthetic",
                "options": {"num_classes": 20, "images_per_class": 12, "image_size": size},
            },
            "episodes": {
                "way": 5,
                "shot": 1,
                "query": args.query,
                "tasks_per_batch": args.tasks_per_batch,
                "val_episodes": 0,
            },
            "model": {
                "backbone": "conv4",
                "backbone_options": {"filters": args.filters, "image_size": size},
            },
            "learner": {"name": "maml", "inner_steps": args.inner_steps, "bn": "running"},
            "train": {"steps": args.steps, "val_every": 0, "checkpoint_every": 0, "device": "cpu"},
        }  # fmt: skip
    )


def worker(args: argparse.Namespace) -> None:
    """Time ``args.steps`` meta-steps after ``args.warmup``; rank 0 prints one JSON line."""
    import torch
    import torch.distributed as dist

    from fewshot_nsl.distributed import build_trainer, init_distributed, shutdown

    torch.set_num_threads(args.threads)
    context = init_distributed("cpu")
    with tempfile.TemporaryDirectory() as out_dir:
        trainer = build_trainer(bench_config(args), out_dir, context, quiet=True)
        trainer.setup()
        reduce_seconds = [0.0]
        original_reduce = trainer.reduce_gradients

        def timed_reduce() -> None:
            started = time.perf_counter()
            original_reduce()
            reduce_seconds[0] += time.perf_counter() - started

        trainer.reduce_gradients = timed_reduce  # type: ignore[method-assign]
        for step in range(args.warmup):
            trainer.meta_step(step)
        if context.is_distributed:
            dist.barrier()
        reduce_seconds[0] = 0.0
        started = time.perf_counter()
        for step in range(args.warmup, args.warmup + args.steps):
            trainer.meta_step(step)
        if context.is_distributed:
            dist.barrier()
        elapsed = time.perf_counter() - started
    if context.is_main:
        print(json.dumps({"world_size": context.world_size, "seconds": elapsed,
                          "steps_per_s": args.steps / elapsed,
                          "reduce_share": reduce_seconds[0] / elapsed}))  # fmt: skip
    shutdown(context)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def launch(procs: int, threads: int, args: argparse.Namespace) -> dict[str, Any]:
    """One timed run with ``procs`` processes of ``threads`` threads; rank 0's JSON record."""
    forwarded = [
        "--threads", str(threads),
        "--worker", "--steps", str(args.steps), "--warmup", str(args.warmup),
        "--tasks-per-batch", str(args.tasks_per_batch), "--filters", str(args.filters),
        "--image-size", str(args.image_size), "--query", str(args.query),
        "--inner-steps", str(args.inner_steps),
    ]  # fmt: skip
    environ = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    environ["OMP_NUM_THREADS"] = str(threads)
    script = str(Path(__file__).resolve())
    if procs == 1:
        command = [sys.executable, script, *forwarded]
    else:
        command = [
            sys.executable, "-m", "torch.distributed.run", "--nnodes", "1",
            "--nproc_per_node", str(procs), "--master_addr", "127.0.0.1",
            "--master_port", str(_free_port()), script, *forwarded,
        ]  # fmt: skip
    done = subprocess.run(command, cwd=REPO_ROOT, env=environ, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{procs} process(es) failed:\n{done.stdout}\n{done.stderr[-4000:]}")
    records = [line for line in done.stdout.splitlines() if line.startswith("{")]
    return json.loads(records[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--configs",
        nargs="+",
        default=["1x1", "1x2", "2x1"],
        help="PROCESSESxTHREADS to compare (the first is the baseline)",
    )
    parser.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (median)")
    parser.add_argument(
        "--allow-loaded",
        action="store_true",
        help="run even when the 1-minute load exceeds the core count (figures flagged)",
    )
    parser.add_argument("--steps", type=int, default=10, help="timed meta-steps per run")
    parser.add_argument("--warmup", type=int, default=2, help="untimed meta-steps first")
    parser.add_argument("--tasks-per-batch", type=int, default=4, help="global meta-batch")
    parser.add_argument("--filters", type=int, default=32, help="Conv-4 width")
    parser.add_argument("--image-size", type=int, default=28, help="square image side")
    parser.add_argument("--query", type=int, default=5, help="query images per class")
    parser.add_argument("--inner-steps", type=int, default=2, help="MAML inner steps")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    configs = []
    for text in args.configs:
        procs, _, threads = text.partition("x")
        if not (procs.isdigit() and threads.isdigit() and int(procs) >= 1 and int(threads) >= 1):
            parser.error(f"--configs: {text!r} is not PROCESSESxTHREADS (e.g. 2x1)")
        configs.append((int(procs), int(threads)))
    load, cores = load_guard(args.allow_loaded)
    for procs, threads in configs:
        if procs * threads > cores:
            print(f"!!! {procs}x{threads} uses more threads than the {cores} cores: oversubscribed")

    print(f"# meta-batch {args.tasks_per_batch}, 5-way 1-shot {args.query}-query, "
          f"{args.image_size}x{args.image_size}, Conv-4 x{args.filters}, MAML "
          f"{args.inner_steps} inner steps (2nd order), bn=running; {args.steps} timed steps, "
          f"{os.cpu_count()} CPU cores visible")  # fmt: skip
    speeds: dict[tuple[int, int], list[float]] = {config: [] for config in configs}
    shares: dict[tuple[int, int], list[float]] = {config: [] for config in configs}
    for round_index in range(args.rounds):
        shift = round_index % len(configs)  # rotated: no configuration always runs first
        for procs, threads in configs[shift:] + configs[:shift]:
            record = launch(procs, threads, args)
            speeds[procs, threads].append(record["steps_per_s"])
            shares[procs, threads].append(record["reduce_share"])
            print(f"round {round_index + 1}: {procs} process(es) x {threads} thread(s): "
                  f"{record['steps_per_s']:.2f} meta-steps/s", flush=True)  # fmt: skip
    print(f"\nwall clock, {args.rounds} interleaved rounds: median [min-max] over rounds")
    print("| processes x threads | meta-steps/s | vs first (paired rounds) | all-reduce share % |")
    print("|---|---|---|---|")
    for config in configs:
        ratios = paired_ratios(speeds[config], speeds[configs[0]])
        share = [100 * value for value in shares[config]]
        print(
            f"| {config[0]} x {config[1]} | {median_range(speeds[config])} "
            f"| {median_range(ratios)} | {median_range(share, 1)} |"
        )
    load_report(load, cores)


if __name__ == "__main__":
    main()
