#!/usr/bin/env python
"""Build the CUDA extension and check it against the float64 reference, on a GPU.

    python scripts/check_cuda.py            # full grid (a minute or two on one GPU)
    python scripts/check_cuda.py --quick    # a smaller grid

Steps: (1) build/load the extension with the compiler output shown; (2) for a grid of shapes
(C, O, kernel 1/3/5, stride 1/2, padding 0/1, dilation 1/2, B 1..4) x (sample/location) x
(full/diagonal) x (float32, bfloat16, float16), compare forward and the gradients of x, W and M
with ``bilinear_conv2d_reference`` in float64 (norm-wise relative error <= 1e-5 for float32,
<= 1e-2 for the 16-bit types), both through the extension's ``_out`` functions into
NaN-prefilled outputs (proving that every element is written) and through the registered
custom op + autograd; (3) ``gradcheck``/``gradgradcheck`` in float64 on the GPU. Prints a
PASS/FAIL table and exits 1 on any failure (2 if the extension does not load).

TF32 is switched off for the check: the per-sample path runs cuDNN convolutions, which follow
torch's ``torch.backends.cudnn.allow_tf32`` (on by default, ~1e-3 relative error).
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
import time
from dataclasses import dataclass

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from fewshot_nsl.ops import (  # noqa: E402
    ConvGeometry,
    bilinear_conv2d_reference,
    extension,  # noqa: E402
    output_size,
)
from fewshot_nsl.ops.custom_op import bilinear_conv2d_custom_op  # noqa: E402
from fewshot_nsl.ops.extension import binding_arguments  # noqa: E402

TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-2}
DEVICE = "cuda"
DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


@dataclass(frozen=True)
class Case:
    granularity: str
    diagonal: bool
    batch: int
    channels: int
    out_channels: int
    size: tuple[int, int]
    kernel: int
    stride: int
    padding: int
    dilation: int
    channels_last: bool = False

    def label(self) -> str:
        form = f"{self.granularity}/{'diag' if self.diagonal else 'full'}"
        layout = " NHWC" if self.channels_last else ""
        return (
            f"{form:<13} B{self.batch} C{self.channels} O{self.out_channels} "
            f"{self.size[0]}x{self.size[1]} k{self.kernel} s{self.stride} p{self.padding} "
            f"d{self.dilation}{layout}"
        )

    def geometry(self) -> tuple[tuple[int, int], tuple[int, int], tuple[int, int]]:
        return (self.stride,) * 2, (self.padding,) * 2, (self.dilation,) * 2


def cases(quick: bool) -> list[Case]:
    forms = [(g, d) for g in ("sample", "location") for d in (False, True)]
    channel_pairs = [(3, 5), (16, 24)] if quick else [(3, 5), (16, 24), (33, 70)]
    grid = []
    batches = itertools.cycle([1, 2, 3, 4])
    for (granularity, diagonal), (c, o), k, s, p, d in itertools.product(
        forms, channel_pairs, (1, 3, 5), (1, 2), (0, 1), (1, 2)
    ):
        if quick and (s, p, d) not in ((1, 1, 1), (2, 0, 2)):
            continue
        grid.append(Case(granularity, diagonal, next(batches), c, o, (11, 9), k, s, p, d))
    # Large enough for several 64x64 tiles and for the split-K reduction of grad_weight.
    for granularity, diagonal in forms:
        grid.append(Case(granularity, diagonal, 4, 20, 70, (33, 31), 3, 1, 1, 1))
        grid.append(Case(granularity, diagonal, 2, 8, 16, (12, 12), 3, 2, 1, 1, True))
    return grid


def make_inputs(case: Case, generator: torch.Generator) -> list[torch.Tensor]:
    stride, padding, dilation = case.geometry()
    h_out, w_out = output_size(case.size, case.kernel, stride, padding, dilation)
    taps = case.kernel**2
    lead = (case.batch,) if case.granularity == "sample" else (case.batch, h_out, w_out)
    m_shape = lead + ((taps,) if case.diagonal else (taps, taps))
    shapes = [
        (case.batch, case.channels, *case.size),
        (case.out_channels, case.channels, case.kernel, case.kernel),
        m_shape,
    ]
    return [torch.randn(s, generator=generator, dtype=torch.float64).to(DEVICE) for s in shapes]


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.double() - want).norm() / want.norm().clamp_min(1e-30)).item()


def check_case(ext, case: Case, dtype: torch.dtype, generator: torch.Generator) -> dict:
    """Errors of forward and the three gradients (max over the _out and the op paths)."""
    stride, padding, dilation = case.geometry()
    inputs = [t.to(dtype) for t in make_inputs(case, generator)]
    if case.channels_last:
        inputs[0] = inputs[0].contiguous(memory_format=torch.channels_last)
    x, weight, M = inputs
    geometry = ConvGeometry(stride, padding, dilation)
    args = binding_arguments(geometry, case.granularity, case.diagonal)

    # float64 reference on the same (rounded) values
    ref_inputs = [t.detach().double().requires_grad_() for t in inputs]
    y_ref = bilinear_conv2d_reference(*ref_inputs, geometry, case.granularity, case.diagonal)
    grad_y = torch.randn(y_ref.shape, generator=generator, dtype=torch.float64).to(DEVICE)
    grads_ref = torch.autograd.grad(y_ref, ref_inputs, grad_y)
    grad_y = grad_y.to(dtype)

    # 1) the extension's _out functions, outputs prefilled with NaN
    y_out = torch.full(y_ref.shape, float("nan"), dtype=dtype, device=x.device)
    ext.forward_out(x, weight, M, y_out, *args)
    grads_out = [torch.full_like(t, float("nan")).contiguous() for t in inputs]
    ext.backward_out(grad_y, x, weight, M, *grads_out, *args)
    unwritten = int(torch.isnan(y_out).sum()) + sum(int(torch.isnan(g).sum()) for g in grads_out)

    # 2) the registered custom op and its autograd
    op_inputs = [t.detach().clone().requires_grad_() for t in inputs]
    y_op = bilinear_conv2d_custom_op(*op_inputs, geometry, case.granularity, case.diagonal)
    grads_op = torch.autograd.grad(y_op, op_inputs, grad_y)

    errors = {"y": max(relative_error(y_out, y_ref), relative_error(y_op, y_ref))}
    for name, got_out, got_op, want in zip(("gx", "gW", "gM"), grads_out, grads_op, grads_ref):
        errors[name] = max(relative_error(got_out, want), relative_error(got_op, want))
    errors["unwritten"] = unwritten
    errors["ok"] = (
        unwritten == 0 and max(errors[k] for k in ("y", "gx", "gW", "gM")) <= TOLERANCE[dtype]
    )
    return errors


def run_gradchecks() -> list[tuple[str, bool]]:
    results = []
    generator = torch.Generator().manual_seed(1)
    for granularity, diagonal in [(g, d) for g in ("sample", "location") for d in (False, True)]:
        case = Case(granularity, diagonal, 2, 2, 3, (6, 5), 3, 2, 1, 2)
        inputs = tuple(t.requires_grad_() for t in make_inputs(case, generator))
        geometry = ConvGeometry(*case.geometry())

        def op(x, weight, M, case=case, geometry=geometry):
            return bilinear_conv2d_custom_op(
                x, weight, M, geometry, case.granularity, case.diagonal
            )

        label = f"gradcheck float64 {granularity}/{'diag' if diagonal else 'full'}"
        try:
            ok = torch.autograd.gradcheck(op, inputs) and torch.autograd.gradgradcheck(op, inputs)
        except Exception as exc:  # a failed check raises GradcheckError with the details
            print(f"  {label}: {exc}")
            ok = False
        results.append((label, ok))
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a smaller shape grid")
    parser.add_argument("--verbose", action="store_true", help="print every case")
    parser.add_argument("--seed", type=int, default=0)
    options = parser.parse_args()

    if not torch.cuda.is_available():
        print("FAIL: no CUDA device visible to torch")
        return 2
    print(f"torch {torch.__version__} (CUDA {torch.version.cuda}), {torch.cuda.get_device_name()}")
    print("building/loading the extension (compiler output follows) ...", flush=True)
    start = time.perf_counter()
    ext = extension.load_extension(verbose=True)
    if ext is None:
        print(f"FAIL: the extension did not load: {extension.unavailable_reason()}")
        return 2
    print(f"extension ready in {time.perf_counter() - start:.1f} s: {ext.__file__}")
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False

    generator = torch.Generator().manual_seed(options.seed)
    groups: dict[tuple[str, str], list[dict]] = {}
    failures = []
    for case in cases(options.quick):
        for dtype in TOLERANCE:
            result = check_case(ext, case, dtype, generator)
            form = f"{case.granularity}/{'diag' if case.diagonal else 'full'}"
            groups.setdefault((form, DTYPE_NAMES[dtype]), []).append(result)
            line = (
                f"{case.label():<58} {DTYPE_NAMES[dtype]}  y {result['y']:.1e}  "
                f"gx {result['gx']:.1e}  gW {result['gW']:.1e}  gM {result['gM']:.1e}  "
                f"unwritten {result['unwritten']}"
            )
            if not result["ok"]:
                failures.append(line)
            if options.verbose:
                print(("PASS " if result["ok"] else "FAIL ") + line)
    torch.cuda.synchronize()

    header = f"{'form':<15}{'dtype':<7}{'cases':>6}{'max rel err (y, gx, gW, gM)':>44}"
    print(f"\n{header}{'unwritten':>11}  status")
    for (form, dtype_name), results in groups.items():
        worst = [max(r[k] for r in results) for k in ("y", "gx", "gW", "gM")]
        unwritten = sum(r["unwritten"] for r in results)
        status = "PASS" if all(r["ok"] for r in results) else "FAIL"
        errors = "  ".join(f"{e:.1e}" for e in worst)
        print(f"{form:<15}{dtype_name:<7}{len(results):>6}{errors:>44}{unwritten:>11}  {status}")
    print(f"(tolerance: fp32 {TOLERANCE[torch.float32]:g}, fp16/bf16 {TOLERANCE[torch.float16]:g})")

    gradchecks = run_gradchecks()
    for label, ok in gradchecks:
        print(f"{label:<64}{'PASS' if ok else 'FAIL'}")
    failures += [label for label, ok in gradchecks if not ok]

    if failures:
        print(f"\nFAIL: {len(failures)} check(s) failed:")
        for line in failures[:50]:
            print("  " + line)
        return 1
    print("\nPASS: every check passed. Timings: python scripts/bench_ops.py --device cuda")
    return 0


if __name__ == "__main__":
    sys.exit(main())
