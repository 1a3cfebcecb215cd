"""Forward+backward time of each bilinear_conv2d path relative to F.conv2d (same shapes).

CPU (default): batch 32, 64->64 channels, 3x3, 21x21 and 84x84 inputs, plus the per-location
rows at the Conv-4 shapes of an 84x84 5-way episode (``--location-shapes``). GPU (``--device
cuda``): the Conv-4 and ResNet-12 layer shapes at batch 80 and 256, adding the CUDA kernel
(forced through ``FEWSHOT_NSL_BACKEND``) next to the torch fast path and the reference.

Per-location rows: the pure-torch path (``FEWSHOT_NSL_BACKEND=torch``: the whole tap stack
unfolded, mixed, contracted by a 1x1 convolution) and, on the CPU, the fused C++ kernel
(``cpp``, ``ops/csrc/location_cpu.cpp``; compiled on first use, skipped if it does not build).

Method (``benchtools``): wall-clock time; every round runs each row once, interleaved with
the order rotated, after one warm-up call per row; the table gives the median [min-max] time
over rounds and the median [min-max] of the per-round paired ratio to the plain ``F.conv2d``
row. The 1-minute load average is printed before and after; a run on a machine loaded beyond
its core count is refused (``--allow-loaded`` runs it, every figure flagged). GPU rows are
synchronised before and after each call.

    python scripts/bench_ops.py               # CPU table
    python scripts/bench_ops.py --quick       # 2 rounds, 21x21 and the 42x42 location shape
    python scripts/bench_ops.py --device cuda # GPU presets
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from benchtools import interleaved_seconds, load_guard, load_report, median_range, paired_ratios

from fewshot_nsl.ops import BACKEND_ENV, ConvGeometry, backend, bilinear_conv2d, effective_weight
from fewshot_nsl.ops.extension import cpu_kernel_available
from fewshot_nsl.ops.torch_paths import _sample_grouped_torch, _sample_unfold_torch

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
#: CPU per-location shapes (label, batch, in, out, size): the Conv-4-32 layers of an 84x84
#: 5-way 1-shot episode with 15 queries (80 images) whose tap stack is largest.
LOCATION_SHAPES: list[tuple[str, int, int, int, int]] = [
    ("conv4.1 (84x84 episode)", 80, 3, 32, 84),
    ("conv4.2 (84x84 episode)", 80, 32, 32, 42),
    ("conv4.3 (84x84 episode)", 80, 32, 32, 21),
]


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
    location_only: bool = False,
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
    ]
    if device.type == "cpu" and cpu_kernel_available():
        rows += [
            Row("per-location diagonal, cpp", op(m_loc_diag, "location", True), "cpp"),
            Row("per-location full, cpp", op(m_loc_full, "location", False), "cpp"),
        ]
    if location_only:
        rows = [row for row in rows if row.name.startswith(("plain", "per-location"))]
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


def bench(rows: list[Row], device: torch.device, rounds: int) -> dict[str, list[float]]:
    """Wall seconds per round of every row (``benchtools.interleaved_seconds``)."""

    def with_backend(row: Row) -> Callable[[], None]:
        def run() -> None:
            os.environ[BACKEND_ENV] = row.env
            row.run()

        return run

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    return interleaved_seconds({row.name: with_backend(row) for row in rows}, rounds, sync=sync)


def print_table(title: str, rows: list[Row], seconds: dict[str, list[float]]) -> None:
    base = seconds[rows[0].name]
    print(f"\n{title}")
    print(
        f"| {'path':<34} | {'ms, median [min-max]':>24} "
        f"| {'x conv (paired), median [min-max]':>34} |"
    )
    print(f"|{'-' * 36}|{'-' * 26}:|{'-' * 35}:|")
    for row in rows:
        milliseconds = [1000 * t for t in seconds[row.name]]
        ratio = median_range(paired_ratios(seconds[row.name], base))
        print(f"| {row.name:<34} | {median_range(milliseconds):>24} | {ratio:>34} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, nargs="+", help="CPU: 32; GPU: 80 256")
    parser.add_argument("--channels", type=int, default=64, help="CPU in=out channels")
    parser.add_argument("--sizes", type=int, nargs="+", default=[21, 84], help="CPU sizes")
    parser.add_argument("--presets", nargs="+", default=list(GPU_PRESETS), choices=GPU_PRESETS)
    parser.add_argument("--rounds", type=int, help="timed rounds (CPU 5, GPU 20)")
    parser.add_argument("--no-reference", action="store_true", help="skip the slow reference")
    parser.add_argument(
        "--no-location-shapes",
        action="store_true",
        help="CPU: skip the per-location rows at the Conv-4 episode shapes",
    )
    parser.add_argument(
        "--allow-loaded",
        action="store_true",
        help="run even when the 1-minute load exceeds the core count (figures flagged)",
    )
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (CPU)")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="2 rounds, CPU 21x21 and the 42x42 per-location episode shape only, no reference",
    )
    args = parser.parse_args()

    device = torch.device(args.device)
    on_gpu = device.type == "cuda"
    if args.threads:
        torch.set_num_threads(args.threads)
    load, cores = load_guard(args.allow_loaded)
    start = time.perf_counter()
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
        f"{rounds} interleaved rounds (+1 warm-up), wall-clock time, auto backend: "
        f"{backend(device)} (per sample), {backend(device, 'location')} (per location)"
    )
    if on_gpu and not with_cuda:
        print("CUDA extension unavailable: CUDA rows skipped")

    with_reference = not (args.no_reference or args.quick)
    for batch in batches:
        for label, cin, cout, size in shapes:
            rows = make_rows(batch, cin, cout, size, device, with_cuda, with_reference)
            seconds = bench(rows, device, rounds)
            title = f"{label}: batch {batch}, {cin}->{cout}, 3x3, {size}x{size}, forward+backward"
            print_table(title, rows, seconds)
    if not on_gpu and not args.no_location_shapes:
        location_shapes = LOCATION_SHAPES[1:2] if args.quick else LOCATION_SHAPES
        for label, batch, cin, cout, size in location_shapes:
            rows = make_rows(batch, cin, cout, size, device, False, False, location_only=True)
            seconds = bench(rows, device, rounds)
            title = f"{label}: batch {batch}, {cin}->{cout}, 3x3, {size}x{size}, forward+backward"
            print_table(title, rows, seconds)
    print(f"\nwall-clock time of the measurements: {time.perf_counter() - start:.1f} s")
    load_report(load, cores)
    os.environ.pop(BACKEND_ENV, None)


if __name__ == "__main__":
    main()
