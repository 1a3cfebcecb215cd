"""The command line's allocator policy (``FEWSHOT_NSL_MALLOC``, fewshot_nsl/allocator.py):
MAML meta-steps with freed memory kept (``keep``, the default) against glibc's own policy
(``system``), and the peak resident set of each; and both against the peers' computation
(ReLU before max-pool, as learn2learn, ``higher`` and cbfinn/maml compute it:
``bench_learners.py --table peers``) under glibc's policy, which is what a peer's run gets.

The policy is process-wide and the heap keeps its state, so the two cannot alternate inside
one process: each round runs one fresh process per policy (order rotated every round); a
process applies the policy as ``fewshot-nsl`` does, builds the same learner (Conv-4-32,
5-way 1-shot, 15 queries per class, 5 inner steps, second order unless ``--first-order``),
runs ``--warmup`` meta-steps, then times ``--steps`` and prints their median and its peak
resident set (``VmHWM``). Speed-ups are paired per round: system / keep, and peers (system)
/ toolkit (keep).

    python scripts/bench_malloc.py                    # 84×84, 1 and 2 threads
    python scripts/bench_malloc.py --sizes 28 --rounds 3
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import time

from benchtools import load_guard, load_report, median_range, paired_ratios

#: (block order, allocator policy) of each process of a round
VARIANTS = (("peers", "system"), ("toolkit", "system"), ("toolkit", "keep"))


def child(size: int, steps: int, warmup: int, threads: int, first_order: bool, peers: bool) -> None:
    """One process: the policy, then ``warmup`` + ``steps`` meta-steps (in the peers' block
    order if ``peers``); prints whether the policy applied, the median seconds of the timed
    steps and the peak resident set in bytes."""
    from fewshot_nsl.allocator import apply_allocator_policy

    applied = apply_allocator_policy()  # first, as the command line does
    import torch
    from bench_learners import WAY, build, make_episodes, ordered_step, status_bytes

    torch.set_num_threads(threads)
    learner = build({"name": "maml"}, None, first_order, size, 5, WAY, torch.device("cpu"))
    episodes = make_episodes(4, WAY, 1, 15, size, torch.device("cpu"))
    optimizer = torch.optim.Adam(learner.parameters(), lr=1e-3)
    seconds = []
    for index in range(warmup + steps):
        start = time.perf_counter()
        ordered_step(peers, learner, optimizer, episodes[index % len(episodes)])
        seconds.append(time.perf_counter() - start)
    print(applied, statistics.median(seconds[warmup:]), status_bytes("VmHWM"))


def run_child(
    variant: tuple[str, str], args: argparse.Namespace, size: int, threads: int
) -> tuple[float, int]:
    order, policy = variant
    command = [sys.executable, __file__, "--child", str(size), str(args.steps), str(args.warmup)]
    command += [str(threads), str(int(args.first_order)), str(int(order == "peers"))]
    env = {**os.environ, "FEWSHOT_NSL_MALLOC": policy}
    output = subprocess.run(command, env=env, capture_output=True, text=True, check=True).stdout
    applied, seconds, peak = output.split()
    if (applied == "True") != (policy == "keep"):
        raise SystemExit(f"policy {policy!r} was {'' if applied == 'True' else 'not '}applied")
    return float(seconds), int(peak)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[84])
    parser.add_argument("--thread-counts", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=8, help="timed meta-steps per process")
    parser.add_argument("--warmup", type=int, default=4, help="untimed meta-steps first")
    parser.add_argument("--first-order", action="store_true")
    parser.add_argument("--allow-loaded", action="store_true")
    parser.add_argument("--child", nargs=6, type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        size, steps, warmup, threads, first_order, peers = args.child
        child(size, steps, warmup, threads, bool(first_order), bool(peers))
        return
    load, cores = load_guard(args.allow_loaded)
    print(f"# {platform.processor() or platform.machine()}, wall-clock time, fresh processes")
    order = "first" if args.first_order else "second"
    print(
        f"\n## MAML meta-step ({order} order, Conv-4-32, 5-way 1-shot, 15 queries/class, 5 "
        f"inner steps): FEWSHOT_NSL_MALLOC=system vs keep, and the peers' block order, "
        f"{args.rounds} rounds of one process per variant, {args.warmup} + {args.steps} steps "
        "each"
    )
    print(
        "\n| size | threads | peers' order, system ms | toolkit, system ms | toolkit, keep ms "
        "| keep over system | toolkit (keep) over peers | peak RSS system / keep |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    start = time.perf_counter()
    for size in args.sizes:
        for threads in args.thread_counts:
            seconds: dict[tuple[str, str], list[float]] = {v: [] for v in VARIANTS}
            peaks: dict[tuple[str, str], list[int]] = {v: [] for v in VARIANTS}
            for round_index in range(args.rounds):
                shift = round_index % len(VARIANTS)
                for variant in VARIANTS[shift:] + VARIANTS[:shift]:
                    step_seconds, peak = run_child(variant, args, size, threads)
                    seconds[variant].append(step_seconds)
                    peaks[variant].append(peak)
            peers, system, keep = (seconds[v] for v in VARIANTS)
            milliseconds = [median_range([1e3 * s for s in seconds[v]], 0) for v in VARIANTS]
            print(
                f"| {size}x{size} | {threads} | {' | '.join(milliseconds)} "
                f"| {median_range(paired_ratios(system, keep))} "
                f"| {median_range(paired_ratios(peers, keep))} "
                f"| {max(peaks[VARIANTS[1]]) / 2**20:.0f} / "
                f"{max(peaks[VARIANTS[2]]) / 2**20:.0f} MiB |",
                flush=True,
            )
    print(f"\nwall-clock time of the measurements: {time.perf_counter() - start:.1f} s")
    load_report(load, cores)


if __name__ == "__main__":
    main()
