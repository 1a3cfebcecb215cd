"""The CPU kernel of the per-location op (``ops/csrc/location_cpu.cpp``): values, gradients to
second order, dispatch, determinism and fallback, against the float64 unfold/einsum reference
and the pure-torch path. (The custom-op tests in test_cuda.py run it too: on a CPU-only
machine the op's CPU implementation of the per-location form is this kernel.)"""

from __future__ import annotations

import warnings

import pytest
import torch

import fewshot_nsl.ops.bilinear as bilinear_module
from fewshot_nsl.ops import (
    BACKEND_ENV,
    ConvGeometry,
    backend,
    bilinear_conv2d,
    bilinear_conv2d_reference,
    bilinear_conv2d_torch,
)
from fewshot_nsl.ops import custom_op as custom_ops
from fewshot_nsl.ops import extension as extension_loader
from tests import test_cuda as cuda_tests

pytestmark = pytest.mark.skipif(
    not extension_loader.cpu_kernel_available(),
    reason=f"the CPU kernel did not build: {extension_loader.cpu_unavailable_reason()}",
)

# (channels, out_channels, kernel, stride, padding, dilation): the kernel's channel loops
# have 16-wide blocks and a remainder, and 3x3 kernels their own loops, so channel counts
# below, at and above 16 with 3x3 and other kernels.
SHAPES = [
    (3, 4, (3, 3), (1, 1), (1, 1), (1, 1)),
    (37, 5, (3, 3), (2, 2), (1, 1), (1, 1)),
    (16, 5, (3, 2), (2, 1), (0, 1), (1, 2)),
    (21, 6, (1, 1), (2, 2), (0, 0), (1, 1)),
    (70, 3, (5, 5), (1, 2), (2, 1), (2, 1)),
]


def make_inputs(
    channels,
    out_ch,
    kernel,
    stride,
    padding,
    dilation,
    diagonal,
    *,
    batch=3,
    size=(9, 8),
    **options,
):
    """test_cuda's random per-location inputs (float64 draws, cast to ``dtype``), with the
    ``ConvGeometry`` the ops take."""
    x, weight, M = cuda_tests.make_inputs(
        "location",
        diagonal,
        (kernel, stride, padding, dilation),
        batch=batch,
        channels=channels,
        out_ch=out_ch,
        size=size,
        **options,
    )
    return x, weight, M, ConvGeometry(stride, padding, dilation)


def kernel_call(x, weight, M, geometry, diagonal):
    return custom_ops.bilinear_conv2d_custom_op(x, weight, M, geometry, "location", diagonal)


@pytest.mark.parametrize("diagonal", [False, True])
@pytest.mark.parametrize("shape", SHAPES, ids=[f"C{s[0]}-k{s[2]}" for s in SHAPES])
def test_values_and_gradients_match_reference(shape, diagonal):
    x, weight, M, geometry = make_inputs(*shape, diagonal)
    x, weight, M = (t.requires_grad_() for t in (x, weight, M))
    y = kernel_call(x, weight, M, geometry, diagonal)
    y_ref = bilinear_conv2d_reference(x, weight, M, geometry, "location", diagonal)
    cuda_tests.assert_matches_reference(y, y_ref, (x, weight, M))


@pytest.mark.parametrize("diagonal", [False, True])
def test_gradcheck_and_gradgradcheck(diagonal):
    x, weight, M, geometry = make_inputs(
        2, 2, (2, 3), (1, 2), (1, 0), (2, 1), diagonal, batch=2, size=(5, 5)
    )
    inputs = tuple(t.requires_grad_() for t in (x, weight, M))

    def op(x, weight, M):
        return kernel_call(x, weight, M, geometry, diagonal)

    assert torch.autograd.gradcheck(op, inputs)
    if custom_ops.HAS_CUSTOM_OP:  # second order through the backward op (torch >= 2.4)
        assert torch.autograd.gradgradcheck(op, inputs)


def test_float32_matches_the_torch_path_at_a_conv4_shape():
    """32 channels, a 12x12 map, a batch of 6: float32 agrees with the float64 reference as
    closely as the torch path does."""
    x, weight, M, geometry = make_inputs(
        32, 32, (3, 3), (1, 1), (1, 1), (1, 1), True, batch=6, size=(12, 12)
    )
    expected = bilinear_conv2d_reference(x, weight, M, geometry, "location", True)
    x32, w32, m32 = (t.float() for t in (x, weight, M))
    got = kernel_call(x32, w32, m32, geometry, True)
    torch_path = bilinear_conv2d_torch(x32, w32, m32, None, geometry, "location", True)
    scale = expected.abs().max()
    assert (got.double() - expected).abs().max() / scale < 1e-5
    assert (torch_path.double() - expected).abs().max() / scale < 1e-5


def test_non_contiguous_inputs():
    x, weight, M, geometry = make_inputs(5, 4, (3, 3), (1, 1), (1, 1), (1, 1), False)
    x_cl = x.to(memory_format=torch.channels_last)
    w_t = weight.transpose(0, 1).contiguous().transpose(0, 1)
    M_t = M.transpose(-1, -2).contiguous().transpose(-1, -2)
    assert not (x_cl.is_contiguous() or w_t.is_contiguous() or M_t.is_contiguous())
    torch.testing.assert_close(
        kernel_call(x_cl, w_t, M_t, geometry, False),
        bilinear_conv2d_reference(x, weight, M, geometry, "location", False),
        rtol=1e-12,
        atol=1e-12,
    )


def test_results_do_not_depend_on_timing():
    """Images run in parallel and the weight gradient is summed per chunk of images in a fixed
    order: two runs with two threads give the same bits."""
    x, weight, M, geometry = make_inputs(
        8, 6, (3, 3), (1, 1), (1, 1), (1, 1), True, batch=7, dtype=torch.float32
    )
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        runs = []
        for _ in range(2):
            inputs = [t.clone().requires_grad_() for t in (x, weight, M)]
            y = kernel_call(*inputs, geometry, True)
            runs.append([y, *torch.autograd.grad(y.square().sum(), inputs)])
    finally:
        torch.set_num_threads(threads)
    for first, second in zip(*runs):
        assert torch.equal(first, second)


def test_dispatch_auto_uses_the_kernel_and_torch_forces_the_torch_path(monkeypatch):
    x, weight, M, geometry = make_inputs(3, 4, (3, 3), (1, 1), (1, 1), (1, 1), True)
    bias = torch.randn(4, dtype=torch.float64)
    calls = []
    real = bilinear_module.bilinear_conv2d_custom_op
    monkeypatch.setattr(
        bilinear_module,
        "bilinear_conv2d_custom_op",
        lambda *args: calls.append(args[4]) or real(*args),
    )
    expected = bilinear_conv2d_reference(x, weight, M, geometry, "location", True)
    expected = expected + bias.view(1, -1, 1, 1)
    monkeypatch.setenv(BACKEND_ENV, "auto")
    assert backend("cpu", "location") == "cpp"
    assert backend("cpu", "sample") == "torch"  # the kernel serves the per-location form only
    out = bilinear_conv2d(x, weight, M, bias, padding=1, granularity="location", diagonal=True)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    assert calls == ["location"]
    monkeypatch.setenv(BACKEND_ENV, "torch")
    out = bilinear_conv2d(x, weight, M, bias, padding=1, granularity="location", diagonal=True)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    assert calls == ["location"]  # not called again


def test_forced_cpp_for_the_per_sample_form_falls_back_once(monkeypatch):
    monkeypatch.setenv(BACKEND_ENV, "cpp")
    monkeypatch.setattr(bilinear_module, "_warned_fallbacks", set())
    assert backend("cpu", "location") == "cpp"
    with pytest.warns(RuntimeWarning, match="granularity='location'"):
        assert backend("cpu", "sample") == "torch"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert backend("cpu", "sample") == "torch"  # second time: no warning


def test_low_precision_runs_the_torch_path():
    x, weight, M, geometry = make_inputs(
        3, 4, (3, 3), (1, 1), (1, 1), (1, 1), False, dtype=torch.bfloat16
    )
    y = kernel_call(x, weight, M, geometry, False)
    assert y.dtype == torch.bfloat16
    expected = bilinear_conv2d_reference(
        *(t.double() for t in (x, weight, M)), geometry, "location", False
    )
    torch.testing.assert_close(y.double(), expected, rtol=5e-2, atol=5e-1)


def test_a_failed_build_warns_once_and_the_torch_path_serves(monkeypatch):
    def failing_build(verbose):
        raise RuntimeError("simulated compiler failure")

    state = extension_loader._cpu
    saved = (state.attempted, state.module, state.reason)
    state.reset()
    monkeypatch.setattr(state, "_jit_build", failing_build)
    monkeypatch.setenv(BACKEND_ENV, "auto")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            assert extension_loader.cpu_kernel_available() is False
            assert backend("cpu", "location") == "torch"
            x, weight, M, geometry = make_inputs(3, 4, (3, 3), (1, 1), (1, 1), (1, 1), True)
            out = bilinear_conv2d(x, weight, M, padding=1, granularity="location", diagonal=True)
        assert len(caught) == 1 and "simulated compiler failure" in str(caught[0].message)
        expected = bilinear_conv2d_reference(x, weight, M, geometry, "location", True)
        torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    finally:
        state.attempted, state.module, state.reason = saved


@pytest.mark.parametrize("diagonal", [False, True])
def test_second_order_meta_gradient_matches_the_torch_path(monkeypatch, diagonal):
    """A MAML-style step through two per-location layers (inner gradient with create_graph,
    then the outer gradient through it): the kernel and the torch path agree to 1e-10."""
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(4, 3, 8, 8, dtype=torch.float64, generator=gen)
    w1 = torch.randn(5, 3, 3, 3, dtype=torch.float64, generator=gen) * 0.3
    w2 = torch.randn(2, 5, 3, 3, dtype=torch.float64, generator=gen) * 0.3
    taps = (9,) if diagonal else (9, 9)
    m1 = 1 + 0.1 * torch.randn(4, 8, 8, *taps, dtype=torch.float64, generator=gen)
    m2 = 1 + 0.1 * torch.randn(4, 6, 6, *taps, dtype=torch.float64, generator=gen)

    def meta_gradient():
        params = [t.clone().requires_grad_() for t in (w1, w2, m1, m2)]
        a, b, ma, mb = params

        def loss(a, b):
            h = torch.tanh(
                bilinear_conv2d(x, a, ma, padding=1, granularity="location", diagonal=diagonal)
            )
            return (
                bilinear_conv2d(h, b, mb, granularity="location", diagonal=diagonal).square().mean()
            )

        grads = torch.autograd.grad(loss(a, b), (a, b), create_graph=True)
        adapted = [p - 0.5 * g for p, g in zip((a, b), grads)]
        return torch.autograd.grad(loss(*adapted), params)

    monkeypatch.setenv(BACKEND_ENV, "auto")
    with_kernel = meta_gradient()
    monkeypatch.setenv(BACKEND_ENV, "torch")
    with_torch = meta_gradient()
    for got, want in zip(with_kernel, with_torch):
        assert (got - want).abs().max() <= 1e-10 * want.abs().max()


def test_inside_vmap_the_torch_path_runs(monkeypatch):
    """Under torch.func transforms (the vectorised meta-batch) the custom op has no rules: the
    dispatcher hands those calls to the torch path, with the same values."""
    monkeypatch.setenv(BACKEND_ENV, "auto")
    x, weight, M, geometry = make_inputs(3, 4, (3, 3), (1, 1), (1, 1), (1, 1), True, batch=2)
    xs, ms = torch.stack([x, 2 * x]), torch.stack([M, M.flip(0)])

    def layer(x, M):
        return bilinear_conv2d(x, weight, M, padding=1, granularity="location", diagonal=True)

    batched = torch.func.vmap(layer)(xs, ms)
    for task in range(2):
        torch.testing.assert_close(batched[task], layer(xs[task], ms[task]), rtol=1e-12, atol=0)


DEADLOCK_SCRIPT = """
import torch
from fewshot_nsl.ops import bilinear_conv2d
torch.set_num_threads(2)
x = torch.randn(6, 8, 12, 12, requires_grad=True)
weight = torch.randn(4, 8, 3, 3, requires_grad=True)
M = torch.rand(6, 12, 12, 9, requires_grad=True)
# Python saved-tensor hooks live in the thread-local state that the calling thread holds
# the GIL for; the kernel's worker threads must not need them.
with torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t):
    y = bilinear_conv2d(x, weight, M, padding=1, granularity="location", diagonal=True)
y.square().sum().backward()
print("done")
"""


def test_two_threads_under_python_saved_tensor_hooks_do_not_deadlock():
    """Found by bench_learners (its memory meter installs such hooks): with two threads the
    kernel's worker threads once copied the caller's whole thread-local state, which needs
    the GIL the caller held, and the process hung."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    env.pop(BACKEND_ENV, None)
    done = subprocess.run(
        [sys.executable, "-c", DEADLOCK_SCRIPT],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().endswith("done")
