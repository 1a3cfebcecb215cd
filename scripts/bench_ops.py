"""Forward+backward time of each bilinear_conv2d path relative to F.conv2d (same shapes).

CPU (default): batch 32, 64->64 channels, 3x3, 21x21 and 84x84 inputs. GPU (``--device
cuda``): the Conv-4 and ResNet-12 layer shapes at batch 80 and 256, adding the CUDA kernel
(forced through ``FEWSHOT_NSL_BACKEND``) next to the torch fast path and the reference.

Timing: every round runs each row once, interleaved, so background load hits all rows alike;
the reported time is the minimum over rounds (``--stat median`` for the median). Ratios are
to the plain ``F.conv2d`` row measured in the same rounds. Each timed run is preceded by one
untimed run of the same row, so a row does not pay for the memory the previous row (e.g. the
reference) handed back to the OS. GPU rows are timed with CUDA events after a synchronize.

    python scripts/bench_ops.py               # CPU table
    python scripts/bench_ops.py --quick       # fewer rounds, 21x21 only
    python scripts/bench_ops.py --device cuda # GPU presets
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from fewshot_nsl.ops import BACKEND_ENV, ConvGeometry, backend, bilinear_conv2d, effective_weight
from fewshot_nsl.ops.torch_paths import (
    _location_tiled_torch,
    _sample_grouped_torch,
    _sample_unfold_torch,
)

# (label, in_channels, out_channels, spatial size) per GPU preset.
GPU_PRESETS: dict[str, list[tuple[str, int, int, int]]] = {
    "conv4": [
        ("conv4.1", 3, 32, 84),
        ("conv4.2", 32, 32, 42),
        ("conv4.3", 32, 32, 21),
        ("conv4.4", 32, 32, 10),
    ],
    "resnet12": [
        ("resnet12.1", 64, 64, 84),
        ("resnet12.2", 160, 160, 42),
        ("resnet12.3", 320, 320, 21),
        ("resnet12.4", 640, 640, 10),
    ],
}


@dataclass
class Row:
    name: str
    run: Callable[[], None]
    env: str = "auto"


def make_rows(
    batch: int,
    cin: int,
    cout: int,
    size: int,
    device: torch.device,
    with_cuda: bool,
    with_reference: bool,
) -> list[Row]:
    """The benchmark rows for one layer shape; each ``run`` does forward + backward."""
    gen = torch.Generator(device="cpu").manual_seed(0)

    def tensor(*shape: int, scale: float = 1.0) -> torch.Tensor:
        return (scale * torch.randn(*shape, generator=gen)).to(device).requires_grad_()

    x = tensor(batch, cin, size, size)
    weight = tensor(cout, cin, 3, 3, scale=0.1)
    grad_out = torch.randn(batch, cout, size, size, generator=gen).to(device)
    eye = torch.eye(9)

    def similarity(*lead: int, diagonal: bool) -> torch.Tensor:
        base = torch.ones(*lead, 9) if diagonal else eye.expand(*lead, 9, 9)
        noise = 0.01 * torch.randn(base.shape, generator=gen)
        return (base + noise).to(device).requires_grad_()

    m_shared = similarity(diagonal=False)
    m_sample = similarity(batch, diagonal=False)
    m_sample_diag = similarity(batch, diagonal=True)
    m_loc_diag = similarity(batch, size, size, diagonal=True)
    m_loc_full = similarity(batch, size, size, diagonal=False)
    with torch.no_grad():
        folded = effective_weight(weight, m_shared, "shared", False).detach().requires_grad_()

    def op(M: torch.Tensor | None, granularity: str, diagonal: bool) -> Callable[[], None]:
        def run() -> None:
            out = bilinear_conv2d(
                x, weight, M, None, 1, 1, granularity=granularity, diagonal=diagonal
            )
            out.backward(grad_out)

        return run

    geometry = ConvGeometry((1, 1), (1, 1), (1, 1))

    def sample_path(path: Callable[..., torch.Tensor]) -> Callable[[], None]:
        # One per-sample formulation forced, whatever the shape-based chooser would pick.
        def run() -> None:
            path(x, weight, m_sample_diag, geometry, True).backward(grad_out)

        return run

    def location_tiled(M: torch.Tensor, diagonal: bool) -> Callable[[], None]:
        # The row-band candidate of issue 14 (not dispatched): unfold/mix/contract per band.
        def run() -> None:
            _location_tiled_torch(x, weight, M, geometry, diagonal).backward(grad_out)

        return run

    def plain() -> None:
        F.conv2d(x, weight, None, 1, 1).backward(grad_out)

    def folded_conv() -> None:
        F.conv2d(x, folded, None, 1, 1).backward(grad_out)

    rows = [
        Row("plain F.conv2d", plain),
        Row("static (shared full) torch", op(m_shared, "shared", False)),
        Row("static folded (inference form)", folded_conv),
        Row("per-sample full, torch", op(m_sample, "sample", False), "torch"),
        Row("per-sample diagonal, torch", op(m_sample_diag, "sample", True), "torch"),
        Row("  forced: grouped per-image kernels", sample_path(_sample_grouped_torch), "torch"),
        Row("  forced: unfold + 1x1 conv", sample_path(_sample_unfold_torch), "torch"),
        Row("per-location diagonal, torch", op(m_loc_diag, "location", True), "torch"),
        Row("per-location full, torch", op(m_loc_full, "location", False), "torch"),
        Row("  forced: location tiled, diagonal", location_tiled(m_loc_diag, True), "torch"),
        Row("  forced: location tiled, full", location_tiled(m_loc_full, False), "torch"),
    ]
    if with_cuda:
        rows += [
            Row("per-sample full, cuda", op(m_sample, "sample", False), "cuda"),
            Row("per-location diagonal, cuda", op(m_loc_diag, "location", True), "cuda"),
            Row("per-location full, cuda", op(m_loc_full, "location", False), "cuda"),
        ]
    if with_reference:
        rows.append(
            Row("per-location full, reference", op(m_loc_full, "location", False), "reference")
        )
    return rows


def time_once(row: Row, device: torch.device, clock: str = "wall") -> float:
    os.environ[BACKEND_ENV] = row.env
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize(device)
        start.record()
        row.run()
        end.record()
        torch.cuda.synchronize(device)
        return start.elapsed_time(end) / 1000.0
    timer = time.process_time if clock == "cpu" else time.perf_counter
    begin = timer()
    row.run()
    return timer() - begin


def bench(
    rows: list[Row], device: torch.device, rounds: int, stat: str, clock: str
) -> dict[str, float]:
    for row in rows:  # warm-up (also lets the CUDA extension load/compile)
        time_once(row, device)
    samples: dict[str, list[float]] = {row.name: [] for row in rows}
    for _ in range(rounds):
        for row in rows:
            time_once(row, device)  # untimed: re-fault this row's buffers after the last row
            samples[row.name].append(time_once(row, device, clock))
    reduce = min if stat == "min" else statistics.median
    return {name: reduce(values) for name, values in samples.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, nargs="+", help="CPU: 32; GPU: 80 256")
    parser.add_argument("--channels", type=int, default=64, help="CPU in=out channels")
    parser.add_argument("--sizes", type=int, nargs="+", default=[21, 84], help="CPU sizes")
    parser.add_argument("--presets", nargs="+", default=list(GPU_PRESETS), choices=GPU_PRESETS)
    parser.add_argument("--rounds", type=int, help="timed rounds (CPU 5, GPU 20)")
    parser.add_argument("--stat", choices=["min", "median"], default="min")
    parser.add_argument("--no-reference", action="store_true", help="skip the slow reference")
    parser.add_argument(
        "--clock",
        choices=["wall", "cpu"],
        default="wall",
        help="CPU only: 'cpu' times process CPU time (use with --threads 1): on a machine "
        "shared with other jobs it ignores time-slicing, which wall time does not",
    )
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (CPU)")
    parser.add_argument("--quick", action="store_true", help="2 rounds, CPU 21x21 only")
    args = parser.parse_args()

    device = torch.device(args.device)
    on_gpu = device.type == "cuda"
    if args.threads:
        torch.set_num_threads(args.threads)
    clock = "wall" if on_gpu else args.clock
    rounds = args.rounds or (2 if args.quick else (20 if on_gpu else 5))
    if on_gpu:
        batches = args.batch or [80, 256]
        shapes = [shape for preset in args.presets for shape in GPU_PRESETS[preset]]
        name = torch.cuda.get_device_name(device)
    else:
        batches = args.batch or [32]
        sizes = [21] if args.quick else args.sizes
        shapes = [
            (f"{args.channels}->{args.channels}", args.channels, args.channels, s) for s in sizes
        ]
        name = platform.processor() or platform.machine()
    os.environ.pop(BACKEND_ENV, None)
    with_cuda = on_gpu and backend(device) == "cuda"
    print(
        f"device: {name}, torch {torch.__version__}, threads {torch.get_num_threads()}, "
        f"rounds {rounds} ({args.stat}, {clock} time), auto backend: {backend(device)}"
    )
    if on_gpu and not with_cuda:
        print("CUDA extension unavailable: CUDA rows skipped")

    for batch in batches:
        for label, cin, cout, size in shapes:
            rows = make_rows(batch, cin, cout, size, device, with_cuda, not args.no_reference)
            times = bench(rows, device, rounds, args.stat, clock)
            base = times[rows[0].name]
            print(f"\n{label}: batch {batch}, {cin}->{cout}, 3x3, {size}x{size}, forward+backward")
            print(f"| {'path':<34} | {'ms':>9} | {'x conv':>7} |")
            print(f"|{'-' * 36}|{'-' * 11}|{'-' * 9}|")
            for row in rows:
                t = times[row.name]
                print(f"| {row.name:<34} | {1000 * t:9.2f} | {t / base:7.2f} |")
    os.environ.pop(BACKEND_ENV, None)


if __name__ == "__main__":
    main()
