"""Meta-steps per second of MAML and the NSN learners, side by side on the same episodes.

Each configuration is a learner built through ``build_learner`` (Conv-4-32, 5-way 1-shot,
15 queries per class, 5 inner steps, 84×84×3 images unless ``--quick``). A meta-step is
``meta_loss`` + ``backward`` + an Adam step on one episode. The configurations are timed in
interleaved rounds (round r times every configuration once), so that a load change on a
shared machine hits all of them alike. The table reports, per configuration, the best (min)
and median time per meta-step, and the ratio to plain MAML of the same order as the median
over rounds of the *paired* ratio (time in round r / MAML's time in round r): a pair runs
seconds apart, under nearly the same load, which makes it far steadier than a ratio of two
separately summarised timings on a machine shared with other jobs. ``--threads`` (default
1) fixes the intra-op threads: on an oversubscribed machine two OpenMP threads per process
mostly wait on each other. A separate, untimed pass reports the memory the autograd graph
holds after the inner loop (``SavedTensorMeter``; CUDA peak when on a GPU).

    python scripts/bench_learners.py            # 84×84, 5 rounds
    python scripts/bench_learners.py --quick    # 32×32, 3 rounds
    python scripts/bench_learners.py --profile static_nsn   # top ops of one meta-step
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from typing import Any

import torch

from episodes import Episode
from fewshot_nsl.learners import MAML, build_learner

# name, learner config, conv spec (None: plain), targets relative to plain MAML
CONFIGS: list[tuple[str, dict[str, Any], dict[str, Any] | None]] = [
    ("maml", {"name": "maml"}, None),
    ("maml+checkpoint", {"name": "maml", "checkpoint_inner": True}, None),
    ("static_nsn", {"name": "static_nsn"}, {"kind": "static"}),
    ("dynamic_nsn/sample", {"name": "dynamic_nsn"}, {"kind": "dynamic", "granularity": "sample"}),
    (
        "dynamic_nsn/location",
        {"name": "dynamic_nsn"},
        {"kind": "dynamic", "granularity": "location"},
    ),
]
TARGETS = {"static_nsn": 1.15, "dynamic_nsn/sample": 1.5}


def make_episodes(
    count: int, way: int, shot: int, query: int, size: int, device: torch.device
) -> list[Episode]:
    generator = torch.Generator().manual_seed(0)
    labels = torch.arange(way)
    episodes = []
    for _ in range(count):
        episodes.append(
            Episode(
                support_x=torch.randn(way * shot, 3, size, size, generator=generator),
                support_y=labels.repeat_interleave(shot),
                query_x=torch.randn(way * query, 3, size, size, generator=generator),
                query_y=labels.repeat_interleave(query),
                classes=labels,
                support_indices=torch.arange(way * shot),
                query_indices=torch.arange(way * query),
                way=way,
                shot=shot,
                query=query,
            ).to(device)
        )
    return episodes


def build(
    config: dict[str, Any],
    conv: dict[str, Any] | None,
    first_order: bool,
    size: int,
    inner_steps: int,
    way: int,
    device: torch.device,
) -> MAML:
    torch.manual_seed(0)
    model = {"backbone": "conv4", "backbone_options": {"filters": 32, "image_size": size}}
    if conv is not None:
        model["conv"] = conv
    learner = build_learner(
        {**config, "first_order": first_order, "inner_steps": inner_steps},
        model,
        in_channels=3,
        way=way,
    )
    return learner.to(device)


def meta_step(learner: MAML, optimizer: torch.optim.Optimizer, episode: Episode) -> None:
    loss, _ = learner.meta_loss(episode)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()


def profile(
    name: str, size: int, inner_steps: int, way: int, episodes: list[Episode], device: torch.device
) -> None:
    """Print the 15 ops with the most self time in one second-order meta-step of ``name``."""
    matches = [(config, conv) for n, config, conv in CONFIGS if n == name]
    if not matches:
        raise SystemExit(
            f"--profile: unknown configuration {name!r}; choose from {[n for n, _, _ in CONFIGS]}"
        )
    config, conv = matches[0]
    learner = build(config, conv, False, size, inner_steps, way, device)
    optimizer = torch.optim.Adam(learner.parameters(), lr=1e-3)
    meta_step(learner, optimizer, episodes[0])  # warm-up
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as profiler:
        meta_step(learner, optimizer, episodes[1])
    sort_by = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    print(profiler.key_averages().table(sort_by=sort_by, row_limit=15))


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="32×32 images, 3 rounds")
    parser.add_argument("--size", type=int, default=None, help="image side (default 84)")
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--inner-steps", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--only", nargs="*", default=None, help="configuration names to run")
    parser.add_argument(
        "--profile",
        metavar="NAME",
        default=None,
        help="instead of timing, profile one meta-step of configuration NAME "
        "(torch.profiler) and print the ops that dominate it",
    )
    args = parser.parse_args()
    size = args.size or (32 if args.quick else 84)
    rounds = args.rounds or (3 if args.quick else 5)
    device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    way, shot, query = 5, 1, 15
    configs = [c for c in CONFIGS if args.only is None or c[0] in args.only]
    episodes = make_episodes(rounds + 1, way, shot, query, size, device)
    if args.profile is not None:
        profile(args.profile, size, args.inner_steps, way, episodes, device)
        return

    print(
        f"# {platform.processor() or platform.machine()}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, device {device}; {way}-way {shot}-shot, "
        f"{query} queries/class, {args.inner_steps} inner steps, {size}x{size}x3, "
        f"Conv-4-32, {rounds} interleaved rounds (+1 warm-up)"
    )
    results = {}
    for first_order in (False, True):
        runs = {}
        for name, config, conv in configs:
            learner = build(config, conv, first_order, size, args.inner_steps, way, device)
            runs[name] = (learner, torch.optim.Adam(learner.parameters(), lr=1e-3), [])
        for round_index, episode in enumerate(episodes):
            for learner, optimizer, times in runs.values():
                synchronize(device)
                start = time.perf_counter()
                meta_step(learner, optimizer, episode)
                synchronize(device)
                if round_index > 0:  # the first round warms up allocators and caches
                    times.append(time.perf_counter() - start)
        for name, (learner, _, times) in runs.items():
            learner.profile_memory = True
            learner.meta_loss(episodes[0])
            learner.profile_memory = False
            results[(name, first_order)] = (times, learner.memory_profile[-1])

    print(
        "\n| learner | order | ms / meta-step (min / median) | meta-steps / s (median) "
        "| × MAML: median paired ratio [min–max] | target | graph memory after inner loop |"
    )
    print("|---|---|---:|---:|---:|---|---:|")
    for first_order in (False, True):
        base = results.get(("maml", first_order))
        for name, _, _ in configs:
            times, memory = results[(name, first_order)]
            best, median = min(times), statistics.median(times)
            ratio, verdict = "-", "-"
            if base is not None:
                paired = [t / b for t, b in zip(times, base[0])]
                central = statistics.median(paired)
                ratio = f"{central:.2f} [{min(paired):.2f}–{max(paired):.2f}]"
                target = TARGETS.get(name)
                if target is not None:
                    verdict = f"≤ {target} {'met' if central <= target else 'MISSED'}"
            held = f"{memory.saved_bytes / 2**20:.1f} MiB"
            if memory.cuda_peak_bytes is not None:
                held += f" (CUDA peak {memory.cuda_peak_bytes / 2**20:.1f} MiB)"
            print(
                f"| {name} | {'first' if first_order else 'second'} | "
                f"{best * 1e3:.0f} / {median * 1e3:.0f} | {1 / median:.2f} | {ratio} | "
                f"{verdict} | {held} |"
            )


if __name__ == "__main__":
    main()
