"""Meta-steps per second: MAML and the NSN learners side by side, and the sequential vs the
vectorised meta-batch (``train.meta_batch``).

Table 1 (learners): each configuration is a learner built through ``build_learner``
(Conv-4-32, 5-way 1-shot, 15 queries per class, 5 inner steps, 84×84×3 images unless
``--quick``); a meta-step is ``meta_loss`` + ``backward`` + an Adam step on one episode. The
ratio to plain MAML of the same order is the median [min-max] of per-round paired ratios. A
separate, untimed pass reports the memory the autograd graph holds after the inner loop
(``SavedTensorMeter``; CUDA peak when on a GPU).

Table 2 (meta-batch): second-order MAML, a meta-step = a meta-batch of T tasks + one Adam
step, run as the training loop runs it with ``train.meta_batch: sequential`` (one
``meta_loss`` + ``backward`` per task) and ``vectorised`` (``meta_loss_batch``: all tasks in
one ``torch.func.vmap``), at 28×28 and 84×84, T = 2, 4, 8, 32, with 1 and 2 intra-op
threads. ``--shape`` chooses the network and task: ``conv4-32`` (default: the learners
table's Conv-4-32, 3 channels, 15 queries per class, 5 inner steps) or ``omniglot`` (the
Omniglot MAML reference, configs/maml_conv4_omniglot_1shot_reference.yaml: its learner and
model sections and its 5-way 1-shot tasks with 1 query per class on 1×28×28 images,
Conv-4-64 with strided convolutions, 1 inner step, meta-batch 32). Speed-up = sequential
time / vectorised time, paired per round. Peak memory of one untimed meta-step (the first
of a fresh process) beyond what was allocated before it: on a GPU
``torch.cuda.max_memory_allocated``; on a CPU the peak resident set (``VmHWM``) over the
resident set before the step.

Table 4 (``--table peers``): the toolkit's MAML meta-step against the same computation in
the order the peers compute it (learn2learn's and ``higher``'s Conv-4, cbfinn/maml: ReLU,
then max-pool; the toolkit pools first where the two commute, ``backbones/pooling.py``), at
28×28 and 84×84, first and second order, 1 and 2 threads; one untimed step from the same
weights first checks that the meta-gradients are equal bit for bit.

Method (``benchtools``): wall-clock time; the variants of a row run in interleaved rounds,
the order rotated every round; median [min-max] over rounds; the 1-minute load average is
printed before and after, and a run on a machine loaded beyond its core count is refused
(``--allow-loaded`` runs it, every figure flagged).

    python scripts/bench_learners.py             # both tables, full sizes
    python scripts/bench_learners.py --quick     # 28×28, 2 inner steps, T = 2, 4, 1 thread
    python scripts/bench_learners.py --table meta-batch
    python scripts/bench_learners.py --table meta-batch --shape omniglot --tasks 8 16 32
    python scripts/bench_learners.py --table peers
    python scripts/bench_learners.py --profile static_nsn   # top ops of one meta-step
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import torch
from benchtools import interleaved_seconds, load_guard, load_report, median_range, paired_ratios

from episodes import Episode
from fewshot_nsl.backbones import conv4
from fewshot_nsl.fewshot_config import load_fewshot_config
from fewshot_nsl.learners import MAML, build_learner

# name, learner config, conv spec (None: plain)
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
    # The per-location predictor's first conv has `hidden` (64) outputs at the layer's full
    # resolution, twice a Conv-4-32 layer's multiply-adds: this row shows its share.
    (
        "dynamic_nsn/location/hidden16",
        {"name": "dynamic_nsn"},
        {"kind": "dynamic", "granularity": "location", "hidden": 16},
    ),
]
#: Targets relative to plain MAML (issue 14: dynamic NSN per location ≤ 2.5×).
TARGETS = {"static_nsn": 1.15, "dynamic_nsn/sample": 1.5, "dynamic_nsn/location": 2.5}
#: Targets of the vectorised meta-batch (speed-up over sequential) per (shape, size,
#: meta-batch): issue 14's 84×84 meta-batch 4, and 28×28 meta-batch 32 at Omniglot shapes.
VECTORISED_TARGETS = {("conv4-32", 84, 4): 1.5, ("omniglot", 28, 32): 2.0}
WAY, SHOT, QUERY = 5, 1, 15
OMNIGLOT_REFERENCE = (
    Path(__file__).parent.parent / "configs/maml_conv4_omniglot_1shot_reference.yaml"
)


@dataclasses.dataclass(frozen=True)
class TaskShape:
    """The network and tasks of a meta-batch row: learner and model config sections (the
    model's ``image_size`` is set per row), image channels, way, shot, queries per class and
    the inner steps when ``--inner-steps`` does not set them."""

    name: str
    learner: dict[str, Any]
    model: dict[str, Any]
    channels: int
    way: int
    shot: int
    query: int
    inner_steps: int

    def model_for(self, size: int) -> dict[str, Any]:
        options = {**self.model.get("backbone_options", {}), "image_size": size}
        return {**self.model, "backbone_options": options}


def task_shape(name: str) -> TaskShape:
    """``conv4-32``: the learners table's network and tasks; ``omniglot``: the Omniglot MAML
    reference config's (grey images: 1 channel)."""
    if name == "conv4-32":
        model = {"backbone": "conv4", "backbone_options": {"filters": 32}}
        return TaskShape(name, {"name": "maml"}, model, 3, WAY, SHOT, QUERY, 5)
    config = load_fewshot_config(OMNIGLOT_REFERENCE)
    # the table sets the order and (with --inner-steps) the inner steps itself
    learner = {
        k: v for k, v in config["learner"].items() if k not in ("inner_steps", "first_order")
    }
    episodes = config["episodes"]
    return TaskShape(
        name,
        learner,
        config["model"],
        1,
        episodes["way"],
        episodes["shot"],
        episodes["query"],
        config["learner"]["inner_steps"],
    )


SHAPES = ("conv4-32", "omniglot")


def make_episodes(
    count: int,
    way: int,
    shot: int,
    query: int,
    size: int,
    device: torch.device,
    channels: int = 3,
) -> list[Episode]:
    generator = torch.Generator().manual_seed(0)
    labels = torch.arange(way)
    episodes = []
    for _ in range(count):
        episodes.append(
            Episode(
                support_x=torch.randn(way * shot, channels, size, size, generator=generator),
                support_y=labels.repeat_interleave(shot),
                query_x=torch.randn(way * query, channels, size, size, generator=generator),
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


def meta_step(
    learner: MAML,
    optimizer: torch.optim.Optimizer,
    episode: Episode,
    meta_loss: Callable[[Episode], tuple[torch.Tensor, Any]] | None = None,
) -> None:
    loss, _ = (meta_loss or learner.meta_loss)(episode)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()


def batch_step(
    learner: MAML, optimizer: torch.optim.Optimizer, episodes: list[Episode], vectorised: bool
) -> None:
    """One outer step on a meta-batch, as ``MetaTrainer.gradient_step`` runs it."""
    optimizer.zero_grad(set_to_none=True)
    together = learner.meta_loss_batch(episodes) if vectorised else None
    if vectorised and together is None:
        raise SystemExit("the vectorised meta-batch fell back to the sequential loop")
    if together is not None:
        together[0].backward()
    else:
        for episode in episodes:
            loss, _ = learner.meta_loss(episode)
            (loss / len(episodes)).backward()
    optimizer.step()


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_memory_bytes(
    shape: TaskShape,
    size: int,
    tasks: int,
    inner_steps: int,
    vectorised: bool,
    threads: int,
    device: torch.device,
) -> int:
    """Peak memory of one meta-batch step beyond what was allocated before it, measured in a
    fresh process (``--memory-probe``) so no earlier step's heap hides it."""
    if device.type == "cuda":
        return memory_probe(shape, size, tasks, inner_steps, vectorised, threads, device)
    command = [sys.executable, __file__, "--shape", shape.name, "--memory-probe", str(size)]
    command += [str(tasks), str(inner_steps), str(int(vectorised)), str(threads)]
    output = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    return int(output.split()[-1])


def build_for_shape(shape: TaskShape, size: int, inner_steps: int, device: torch.device) -> MAML:
    """Second-order learner of ``shape`` for ``size``×``size`` images, seeded."""
    torch.manual_seed(0)
    learner = build_learner(
        {**shape.learner, "first_order": False, "inner_steps": inner_steps},
        shape.model_for(size),
        in_channels=shape.channels,
        way=shape.way,
    )
    return learner.to(device)


def shape_episodes(shape: TaskShape, tasks: int, size: int, device: torch.device) -> list[Episode]:
    return make_episodes(tasks, shape.way, shape.shot, shape.query, size, device, shape.channels)


def memory_probe(
    shape: TaskShape,
    size: int,
    tasks: int,
    inner_steps: int,
    vectorised: bool,
    threads: int,
    device: torch.device,
) -> int:
    """On a GPU, ``torch.cuda.max_memory_allocated`` growth over one step; on a CPU the
    process's peak resident set (``VmHWM``) over its resident set before the step."""
    torch.set_num_threads(threads)
    episodes = shape_episodes(shape, tasks, size, device)
    learner = build_for_shape(shape, size, inner_steps, device)
    optimizer = torch.optim.Adam(learner.parameters(), lr=1e-3)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        batch_step(learner, optimizer, episodes, vectorised)
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - base
    base = status_bytes("VmRSS")
    batch_step(learner, optimizer, episodes, vectorised)
    return status_bytes("VmHWM") - base


def status_bytes(field: str) -> int:
    """A memory field of ``/proc/self/status`` in bytes. ``VmHWM`` (peak resident set) starts
    afresh with the process image, unlike ``ru_maxrss``, which keeps the peak of the process
    that forked it."""
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def profile(
    name: str, size: int, inner_steps: int, episodes: list[Episode], device: torch.device
) -> None:
    """Print the 15 ops with the most self time in one second-order meta-step of ``name``."""
    matches = [(config, conv) for n, config, conv in CONFIGS if n == name]
    if not matches:
        raise SystemExit(
            f"--profile: unknown configuration {name!r}; choose from {[n for n, _, _ in CONFIGS]}"
        )
    config, conv = matches[0]
    learner = build(config, conv, False, size, inner_steps, WAY, device)
    optimizer = torch.optim.Adam(learner.parameters(), lr=1e-3)
    meta_step(learner, optimizer, episodes[0])  # warm-up
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as profiler:
        meta_step(learner, optimizer, episodes[1])
    sort_by = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    print(profiler.key_averages().table(sort_by=sort_by, row_limit=15))


def learners_table(
    configs: list, size: int, inner_steps: int, rounds: int, device: torch.device
) -> None:
    """Table 1: every configuration's meta-step, and its paired ratio to plain MAML."""
    episode = make_episodes(1, WAY, SHOT, QUERY, size, device)[0]
    print(
        f"\n## Learners: {WAY}-way {SHOT}-shot, {QUERY} queries/class, {inner_steps} inner "
        f"steps, {size}x{size}x3, Conv-4-32, {torch.get_num_threads()} threads, "
        f"{rounds} interleaved rounds (+1 warm-up)"
    )
    print(
        "\n| learner | order | ms / meta-step, median [min-max] | meta-steps / s (median) "
        "| × MAML: paired ratio, median [min-max] | target | graph memory after inner loop |"
    )
    print("|---|---|---:|---:|---:|---|---:|")
    for first_order in (False, True):
        learners = {
            name: build(config, conv, first_order, size, inner_steps, WAY, device)
            for name, config, conv in configs
        }
        steps = {
            name: partial(
                meta_step, learner, torch.optim.Adam(learner.parameters(), lr=1e-3), episode
            )
            for name, learner in learners.items()
        }
        seconds = interleaved_seconds(steps, rounds, sync=lambda: synchronize(device))
        for name, learner in learners.items():
            learner.profile_memory = True
            learner.meta_loss(episode)
            learner.profile_memory = False
            memory = learner.memory_profile[-1]
            ratio, verdict = "-", "-"
            if "maml" in seconds and name != "maml":
                paired = paired_ratios(seconds[name], seconds["maml"])
                ratio = median_range(paired)
                target = TARGETS.get(name)
                if target is not None:
                    met = statistics.median(paired) <= target
                    verdict = f"≤ {target} {'met' if met else 'MISSED'}"
            held = f"{memory.saved_bytes / 2**20:.1f} MiB"
            if memory.cuda_peak_bytes is not None:
                held += f" (CUDA peak {memory.cuda_peak_bytes / 2**20:.1f} MiB)"
            milliseconds = [1e3 * s for s in seconds[name]]
            print(
                f"| {name} | {'first' if first_order else 'second'} | "
                f"{median_range(milliseconds, 0)} | {1 / statistics.median(seconds[name]):.2f} "
                f"| {ratio} | {verdict} | {held} |"
            )


def compile_table(size: int, inner_steps: int, rounds: int, device: torch.device) -> None:
    """Table 3 (``train.compile``): first-order MAML's meta-step eagerly and through
    ``torch.compile(learner.meta_loss)``, two learners with the same initial weights. The
    first compiled call (forward and backward) is timed alone: that is the compile time a
    run pays once. Then interleaved rounds; speed-up = eager time / compiled time, paired.
    (Second order cannot compile in torch 2.13: no double backward in aot_autograd.)"""
    episode = make_episodes(1, WAY, SHOT, QUERY, size, device)[0]
    eager = build({"name": "maml"}, None, True, size, inner_steps, WAY, device)
    traced = build({"name": "maml"}, None, True, size, inner_steps, WAY, device)
    compiled = torch.compile(traced.meta_loss)
    start = time.perf_counter()
    loss, _ = compiled(episode)
    loss.backward()
    synchronize(device)
    compile_seconds = time.perf_counter() - start
    eager_loss, _ = eager.meta_loss(episode)
    steps = {
        "eager": partial(meta_step, eager, torch.optim.Adam(eager.parameters(), lr=1e-3), episode),
        "compiled": partial(
            meta_step, traced, torch.optim.Adam(traced.parameters(), lr=1e-3), episode, compiled
        ),
    }
    seconds = interleaved_seconds(steps, rounds, sync=lambda: synchronize(device))
    print(
        f"\n## torch.compile: first-order MAML, {WAY}-way {SHOT}-shot, {QUERY} queries/class, "
        f"{inner_steps} inner steps, {size}x{size}x3, Conv-4-32, {torch.get_num_threads()} "
        f"threads, {rounds} interleaved rounds (+1 warm-up)"
    )
    print(
        f"\nfirst compiled call (compilation included): {compile_seconds:.1f} s; first loss "
        f"compiled {loss.item():.6f} vs eager {eager_loss.item():.6f}"
    )
    print("\n| variant | ms / meta-step, median [min-max] | speed-up over eager (paired) |")
    print("|---|---:|---:|")
    for name in steps:
        speed_up = median_range(paired_ratios(seconds["eager"], seconds[name]))
        milliseconds = [1e3 * s for s in seconds[name]]
        print(f"| {name} | {median_range(milliseconds, 0)} | {speed_up} |")


@contextlib.contextmanager
def block_order(peers: bool):
    """Conv-4 blocks computed as the peers compute them (ReLU, then the max-pool) if
    ``peers``, else as the toolkit does."""
    saved = conv4.activate_and_pool
    if peers:
        conv4.activate_and_pool = lambda activation, pool, h: pool(activation(h))
    try:
        yield
    finally:
        conv4.activate_and_pool = saved


def ordered_step(
    peers: bool, learner: MAML, optimizer: torch.optim.Optimizer, episode: Episode
) -> None:
    """:func:`meta_step`, in the peers' block order if ``peers``."""
    with block_order(peers):
        meta_step(learner, optimizer, episode)


def peers_table(
    sizes: list[int], threads: list[int], inner_steps: int, rounds: int, device: torch.device
) -> None:
    """Table 4: the toolkit's MAML meta-step against the peers' block order (module docstring)."""
    print(
        f"\n## MAML against the peers' computation: {WAY}-way {SHOT}-shot, {QUERY} "
        f"queries/class, {inner_steps} inner steps, Conv-4-32, {rounds} interleaved rounds "
        "(+1 warm-up); speed-up = peers' time / toolkit's time, paired"
    )
    print(
        "\n| size | order | threads | peers' order ms | toolkit ms | speed-up, median [min-max] "
        "| meta-gradients |"
    )
    print("|---|---|---:|---:|---:|---:|---|")
    for size in sizes:
        episode = make_episodes(1, WAY, SHOT, QUERY, size, device)[0]
        for first_order in (False, True):
            learners = {
                name: build({"name": "maml"}, None, first_order, size, inner_steps, WAY, device)
                for name in ("peers", "toolkit")
            }
            gradients = {}
            for name, learner in learners.items():
                with block_order(name == "peers"):
                    learner.meta_loss(episode)[0].backward()
                gradients[name] = [p.grad.clone() for p in learner.parameters()]
            equal = all(map(torch.equal, gradients["peers"], gradients["toolkit"]))

            steps = {  # lr 0: the weights stay equal over the rounds
                name: partial(
                    ordered_step,
                    name == "peers",
                    learner,
                    torch.optim.SGD(learner.parameters(), lr=0.0),
                    episode,
                )
                for name, learner in learners.items()
            }
            for thread_count in threads:
                torch.set_num_threads(thread_count)
                seconds = interleaved_seconds(steps, rounds, sync=lambda: synchronize(device))
                milliseconds = {n: [1e3 * t for t in s] for n, s in seconds.items()}
                print(
                    f"| {size}x{size} | {'first' if first_order else 'second'} | {thread_count} "
                    f"| {median_range(milliseconds['peers'], 0)} "
                    f"| {median_range(milliseconds['toolkit'], 0)} "
                    f"| {median_range(paired_ratios(seconds['peers'], seconds['toolkit']))} "
                    f"| {'equal bit for bit' if equal else 'DIFFERENT'} |",
                    flush=True,
                )


def meta_batch_table(
    shape: TaskShape,
    sizes: list[int],
    meta_batches: list[int],
    threads: list[int],
    inner_steps: int,
    rounds: int,
    device: torch.device,
) -> None:
    """Table 2: sequential vs vectorised meta-batch of second-order MAML on ``shape``."""
    print(
        f"\n## Meta-batch ({shape.name}): second-order MAML, {shape.way}-way {shape.shot}-shot, "
        f"{shape.query} queries/class, {inner_steps} inner steps, {shape.channels} channels, "
        f"model {shape.model}, learner {shape.learner}, {rounds} interleaved rounds "
        "(+1 warm-up)"
    )
    print(
        "\n| size | tasks | threads | sequential meta-steps/s | vectorised meta-steps/s "
        "| speed-up (paired), median [min-max] | target | peak memory seq / vec |"
    )
    print("|---|---:|---:|---:|---:|---:|---|---:|")
    for size in sizes:
        for tasks in meta_batches:
            episodes = shape_episodes(shape, tasks, size, device)
            for thread_count in threads:
                torch.set_num_threads(thread_count)
                steps = {}
                for mode in ("sequential", "vectorised"):
                    learner = build_for_shape(shape, size, inner_steps, device)
                    optimizer = torch.optim.Adam(learner.parameters(), lr=1e-3)
                    steps[mode] = partial(
                        batch_step, learner, optimizer, episodes, mode == "vectorised"
                    )
                seconds = interleaved_seconds(steps, rounds, sync=lambda: synchronize(device))
                peaks = {
                    mode: peak_memory_bytes(
                        shape, size, tasks, inner_steps, mode == "vectorised", thread_count, device
                    )
                    for mode in steps
                }
                speedup = paired_ratios(seconds["sequential"], seconds["vectorised"])
                target = VECTORISED_TARGETS.get((shape.name, size, tasks))
                verdict = "-"
                if target is not None:
                    met = statistics.median(speedup) >= target
                    verdict = f"≥ {target} {'met' if met else 'MISSED'}"
                rates = {mode: 1 / statistics.median(s) for mode, s in seconds.items()}
                print(
                    f"| {size}x{size} | {tasks} | {thread_count} | {rates['sequential']:.3f} "
                    f"| {rates['vectorised']:.3f} | {median_range(speedup)} | {verdict} "
                    f"| {peaks['sequential'] / 2**20:.0f} / "
                    f"{peaks['vectorised'] / 2**20:.0f} MiB |",
                    flush=True,
                )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick",
        action="store_true",
        help="28×28, 2 inner steps, 2 rounds; meta-batch table: T = 2, 4 at 1 thread",
    )
    parser.add_argument(
        "--table", choices=["learners", "meta-batch", "both", "compile", "peers"], default="both"
    )
    parser.add_argument("--size", type=int, default=None, help="learners table: image side")
    parser.add_argument("--rounds", type=int, default=None, help="default 5 (--quick: 2)")
    parser.add_argument("--inner-steps", type=int, default=None, help="default 5 (--quick: 2)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1, help="learners table: threads")
    parser.add_argument("--only", nargs="*", default=None, help="configuration names to run")
    parser.add_argument(
        "--shape",
        choices=SHAPES,
        default="conv4-32",
        help="meta-batch table: network and tasks (module docstring); omniglot: the Omniglot "
        "reference config's, 28x28, 1 inner step unless --inner-steps",
    )
    parser.add_argument(
        "--sizes", type=int, nargs="+", help="meta-batch table: image sides (default 28 84)"
    )
    parser.add_argument(
        "--tasks", type=int, nargs="+", help="meta-batch table: meta-batch sizes (2 4 8 32)"
    )
    parser.add_argument(
        "--thread-counts", type=int, nargs="+", help="meta-batch table: thread counts (1 2)"
    )
    parser.add_argument(
        "--allow-loaded",
        action="store_true",
        help="run even when the 1-minute load exceeds the core count (figures flagged)",
    )
    parser.add_argument(
        "--profile",
        metavar="NAME",
        default=None,
        help="instead of timing, profile one meta-step of configuration NAME "
        "(torch.profiler) and print the ops that dominate it",
    )
    parser.add_argument("--memory-probe", nargs=5, type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_probe is not None:  # SIZE TASKS INNER_STEPS VECTORISED THREADS
        size, tasks, inner_steps, vectorised, threads = args.memory_probe
        device = torch.device(args.device)
        shape = task_shape(args.shape)
        print(memory_probe(shape, size, tasks, inner_steps, bool(vectorised), threads, device))
        return
    size = args.size or (28 if args.quick else 84)
    rounds = args.rounds or (2 if args.quick else 5)
    inner_steps = args.inner_steps or (2 if args.quick else 5)
    shape = task_shape(args.shape)
    device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    if args.profile is not None:
        profile(
            args.profile,
            size,
            inner_steps,
            make_episodes(2, WAY, SHOT, QUERY, size, device),
            device,
        )
        return

    load, cores = load_guard(args.allow_loaded)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    print(
        f"# {name or platform.processor() or platform.machine()}, torch {torch.__version__}, "
        f"device {device}, wall-clock time"
    )
    start = time.perf_counter()
    if args.table in ("learners", "both"):
        configs = [c for c in CONFIGS if args.only is None or c[0] in args.only]
        learners_table(configs, size, inner_steps, rounds, device)
    if args.table == "compile":
        compile_table(size, inner_steps, rounds, device)
    if args.table == "peers":
        sizes = args.sizes or ([28] if args.quick else [28, 84])
        threads = args.thread_counts or ([1] if args.quick else [1, 2])
        peers_table(sizes, threads, inner_steps, rounds, device)
    if args.table in ("meta-batch", "both"):
        omniglot = shape.name == "omniglot"
        meta_batch_table(
            shape,
            args.sizes or ([28] if args.quick or omniglot else [28, 84]),
            args.tasks or ([2, 4] if args.quick else [2, 4, 8, 32]),
            args.thread_counts or ([1] if args.quick else [1, 2]),
            args.inner_steps or (shape.inner_steps if omniglot else inner_steps),
            rounds,
            device,
        )
    print(f"\nwall-clock time of the measurements: {time.perf_counter() - start:.1f} s")
    load_report(load, cores)


if __name__ == "__main__":
    main()
