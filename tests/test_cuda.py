"""The CUDA extension's custom op: CPU implementation, registration, fallback, compilation.

On a CPU machine this checks everything except the kernels' execution: the custom ops' CPU
implementation (the same forward/backward decomposition as the kernels) against an independent
float64 reference, ``torch.library.opcheck`` (schema, fake impl, autograd registration),
gradcheck/gradgradcheck, ``torch.compile``, the loader's fallback and warnings, and that the
CUDA/C++ sources compile (nvcc / g++). Tests marked ``cuda`` run the kernels on a GPU.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sysconfig
import types
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from fewshot_nsl.ops import ConvGeometry
from fewshot_nsl.ops import custom_op as custom_ops
from fewshot_nsl.ops import extension as extension_loader

needs_custom_op = pytest.mark.skipif(
    not custom_ops.HAS_CUSTOM_OP, reason="torch.library.custom_op needs torch >= 2.4"
)
needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

# (kernel, stride, padding, dilation), covering non-square kernels and every geometry knob.
GEOMETRIES = [
    ((3, 3), (1, 1), (1, 1), (1, 1)),
    ((3, 2), (2, 1), (0, 1), (1, 2)),
    ((1, 1), (2, 2), (0, 0), (1, 1)),
    ((5, 5), (1, 2), (2, 1), (2, 1)),
]
FORMS = [(g, d) for g in ("sample", "location") for d in (False, True)]


def out_size(size: int, kernel: int, stride: int, padding: int, dilation: int) -> int:
    return (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1


def reference(x, weight, M, stride, padding, dilation, granularity, diagonal):
    """Independent float64 reference: unfold + one einsum over the full-form M."""
    batch, channels, height, width = x.shape
    out_ch, _, kh, kw = weight.shape
    taps = kh * kw
    h_out = out_size(height, kh, stride[0], padding[0], dilation[0])
    w_out = out_size(width, kw, stride[1], padding[1], dilation[1])
    cols = F.unfold(x, (kh, kw), dilation=dilation, padding=padding, stride=stride)
    cols = cols.view(batch, channels, taps, h_out * w_out)
    full = torch.diag_embed(M) if diagonal else M
    if granularity == "sample":
        full = full[:, None].expand(batch, h_out * w_out, taps, taps)
    full = full.reshape(batch, h_out * w_out, taps, taps)
    y = torch.einsum("ock,bpkl,bclp->bop", weight.reshape(out_ch, channels, taps), full, cols)
    return y.reshape(batch, out_ch, h_out, w_out)


def make_inputs(
    granularity,
    diagonal,
    geometry,
    dtype=torch.float64,
    device="cpu",
    seed=0,
    batch=2,
    channels=3,
    out_ch=4,
    size=(7, 6),
):
    kernel, stride, padding, dilation = geometry
    gen = torch.Generator().manual_seed(seed)
    taps = kernel[0] * kernel[1]
    h_out = out_size(size[0], kernel[0], stride[0], padding[0], dilation[0])
    w_out = out_size(size[1], kernel[1], stride[1], padding[1], dilation[1])
    lead = (batch,) if granularity == "sample" else (batch, h_out, w_out)
    m_shape = lead + ((taps,) if diagonal else (taps, taps))
    tensors = [
        torch.randn(batch, channels, *size, generator=gen, dtype=torch.float64),
        torch.randn(out_ch, channels, *kernel, generator=gen, dtype=torch.float64),
        torch.randn(m_shape, generator=gen, dtype=torch.float64),
    ]
    return [t.to(device=device, dtype=dtype) for t in tensors]


def call(x, weight, M, geometry, granularity, diagonal):
    _, stride, padding, dilation = geometry
    return custom_ops.bilinear_conv2d_custom_op(
        x, weight, M, ConvGeometry(stride, padding, dilation), granularity, diagonal
    )


# --------------------------------------------------------------------------------------------
# Values and gradients of the CPU implementation (the kernels' decomposition) in float64
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("geometry", GEOMETRIES)
@pytest.mark.parametrize("granularity,diagonal", FORMS)
def test_forward_and_grads_match_reference(granularity, diagonal, geometry):
    x, weight, M = (t.requires_grad_() for t in make_inputs(granularity, diagonal, geometry))
    y = call(x, weight, M, geometry, granularity, diagonal)
    y_ref = reference(x, weight, M, *geometry[1:], granularity, diagonal)
    assert_matches_reference(y, y_ref, (x, weight, M))


def assert_matches_reference(y, y_ref, inputs) -> None:
    """``y`` and its gradients with respect to ``inputs`` (x, weight, M) equal the float64
    reference's, for one random output gradient."""
    torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12)
    grad_y = torch.randn_like(y)
    grads = torch.autograd.grad(y, inputs, grad_y)
    grads_ref = torch.autograd.grad(y_ref, inputs, grad_y)
    for name, got, want in zip(("x", "weight", "M"), grads, grads_ref):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12, msg=f"grad of {name}")


@pytest.mark.parametrize("granularity,diagonal", FORMS)
def test_gradcheck_and_gradgradcheck(granularity, diagonal):
    geometry = ((2, 2), (2, 1), (0, 1), (1, 2))
    inputs = make_inputs(
        granularity, diagonal, geometry, batch=2, channels=2, out_ch=2, size=(4, 4)
    )
    inputs = tuple(t.requires_grad_() for t in inputs)

    def op(x, weight, M):
        return call(x, weight, M, geometry, granularity, diagonal)

    assert torch.autograd.gradcheck(op, inputs)
    # Second order needs the differentiable backward op; the double backward is the same code
    # for every form, so two forms (one per path) suffice. Fast mode (random projections of
    # the Jacobian): the full check takes minutes on a CPU.
    if custom_ops.HAS_CUSTOM_OP and (granularity == "location") != diagonal:
        assert torch.autograd.gradgradcheck(op, inputs, fast_mode=True)


@pytest.mark.parametrize("granularity,diagonal", [("location", False), ("sample", True)])
def test_autograd_function_fallback_gradcheck(granularity, diagonal):
    """The torch < 2.4 path (no custom_op) is exercised directly."""
    geometry = ((2, 2), (1, 1), (1, 0), (1, 1))
    inputs = make_inputs(
        granularity, diagonal, geometry, batch=2, channels=2, out_ch=2, size=(3, 3)
    )
    inputs = tuple(t.requires_grad_() for t in inputs)
    _, stride, padding, dilation = geometry
    args = (list(stride), list(padding), list(dilation), granularity, diagonal)

    def op(x, weight, M):
        return custom_ops.BilinearConv2dFunction.apply(x, weight, M, args)

    assert torch.autograd.gradcheck(op, inputs)
    torch.testing.assert_close(
        op(*inputs), reference(*inputs, stride, padding, dilation, granularity, diagonal)
    )


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_forward_on_cpu(dtype):
    geometry = GEOMETRIES[0]
    inputs = make_inputs("location", False, geometry, dtype=dtype)
    y = call(*inputs, geometry, "location", False)
    assert y.dtype == dtype
    y_ref = reference(*(t.double() for t in inputs), *geometry[1:], "location", False)
    rel = (y.double() - y_ref).norm() / y_ref.norm()
    assert rel < 2e-2


def test_bad_arguments_raise_value_error():
    geometry = GEOMETRIES[0]
    x, weight, M = make_inputs("location", False, geometry)
    with pytest.raises(ValueError, match="granularity"):
        call(x, weight, M, geometry, "shared", False)
    with pytest.raises(ValueError, match=r"M for granularity='location'.*\(2, 7, 6, 9, 9\)"):
        call(x, weight, M[:, :-1], geometry, "location", False)
    with pytest.raises(ValueError, match="M for granularity='sample'"):
        call(x, weight, M, geometry, "sample", False)
    with pytest.raises(ValueError, match="weight must have shape"):
        call(x, weight[:, :2], M, geometry, "location", False)
    with pytest.raises(ValueError, match="M must have x's dtype"):
        call(x, weight, M.float(), geometry, "location", False)
    with pytest.raises(ValueError, match="x must be float32"):
        call(x.int(), weight.int(), M.int(), geometry, "location", False)


# --------------------------------------------------------------------------------------------
# Custom-op registration: opcheck, torch.compile
# --------------------------------------------------------------------------------------------
@needs_custom_op
@pytest.mark.parametrize("granularity,diagonal", FORMS)
def test_opcheck(granularity, diagonal):
    geometry = GEOMETRIES[1]
    _, stride, padding, dilation = geometry
    x, weight, M = (
        t.float().requires_grad_() for t in make_inputs(granularity, diagonal, geometry)
    )
    args = (list(stride), list(padding), list(dilation), granularity, diagonal)
    forward_op = torch.ops.fewshot_nsl.bilinear_conv2d.default
    torch.library.opcheck(forward_op, (x, weight, M, *args))
    grad_y = torch.randn_like(forward_op(x, weight, M, *args)).requires_grad_()
    torch.library.opcheck(
        torch.ops.fewshot_nsl.bilinear_conv2d_backward.default, (grad_y, x, weight, M, *args)
    )


@needs_custom_op
def test_torch_compile_fullgraph_matches_eager():
    geometry = GEOMETRIES[0]
    _, stride, padding, dilation = geometry
    x, weight, M = (t.float().requires_grad_() for t in make_inputs("location", True, geometry))

    def block(x, weight, M):
        y = custom_ops.bilinear_conv2d_custom_op(
            x, weight, M, ConvGeometry(stride, padding, dilation), "location", True
        )
        return torch.relu(y).square().mean()

    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    loss = compiled(x, weight, M)
    grads = torch.autograd.grad(loss, (x, weight, M))
    loss_ref = block(x, weight, M)
    grads_ref = torch.autograd.grad(loss_ref, (x, weight, M))
    torch.testing.assert_close(loss, loss_ref)
    for got, want in zip(grads, grads_ref):
        torch.testing.assert_close(got, want)


# --------------------------------------------------------------------------------------------
# Loader: fallback and warnings
# --------------------------------------------------------------------------------------------
@pytest.fixture
def fresh_loader():
    extension_loader._reset_extension_state()
    yield
    extension_loader._reset_extension_state()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only behaviour")
def test_cpu_machine_reports_unavailable_without_warning(fresh_loader):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # any warning fails the test
        assert extension_loader.cuda_available() is False
        assert extension_loader.cuda_available() is False
    assert extension_loader.unavailable_reason() == "no CUDA device"


def test_failed_build_warns_once_and_falls_back(fresh_loader, monkeypatch):
    def failing_build(verbose):
        raise RuntimeError("simulated nvcc failure")

    monkeypatch.delenv(extension_loader.DISABLE_ENV, raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(extension_loader._cuda, "_import_prebuilt", lambda: None)
    monkeypatch.setattr(extension_loader._cuda, "_jit_build", failing_build)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert extension_loader.cuda_available() is False
        assert extension_loader.cuda_available() is False
        assert extension_loader.load_extension() is None
    assert len(caught) == 1
    message = str(caught[0].message)
    assert "simulated nvcc failure" in message and "PyTorch implementation" in message
    # The torch implementation still serves the op.
    geometry = GEOMETRIES[0]
    inputs = make_inputs("sample", False, geometry)
    torch.testing.assert_close(
        call(*inputs, geometry, "sample", False), reference(*inputs, *geometry[1:], "sample", False)
    )


@pytest.mark.skipif(torch.version.cuda is not None, reason="needs a CPU-only torch build")
def test_real_loader_explains_a_cpu_only_torch(fresh_loader, monkeypatch):
    """With a GPU faked, the real JIT loader refuses (without compiling) and says why."""
    monkeypatch.delenv(extension_loader.DISABLE_ENV, raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(extension_loader._cuda, "_import_prebuilt", lambda: None)
    with pytest.warns(RuntimeWarning, match="built without CUDA"):
        assert extension_loader.cuda_available() is False


def test_prebuilt_module_is_preferred_over_a_jit_build(fresh_loader, monkeypatch):
    prebuilt = types.ModuleType("prebuilt")
    monkeypatch.delenv(extension_loader.DISABLE_ENV, raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(extension_loader._cuda, "_import_prebuilt", lambda: prebuilt)

    def must_not_build(verbose):
        raise AssertionError("the prebuilt module must be used")

    monkeypatch.setattr(extension_loader._cuda, "_jit_build", must_not_build)
    assert extension_loader.load_extension() is prebuilt
    assert extension_loader.cuda_available() is True


def test_build_directory(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "torch_ext"))
    assert (
        extension_loader._build_directory("cuda") is None
    )  # torch then uses $TORCH_EXTENSIONS_DIR
    monkeypatch.delenv("TORCH_EXTENSIONS_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    folder = Path(extension_loader._build_directory("cuda"))
    assert folder.is_dir() and folder.parent == tmp_path / "fewshot_nsl" / "torch_extensions"
    assert torch.__version__.split("+")[0] in folder.name


def test_disable_env_skips_the_extension_silently(fresh_loader, monkeypatch):
    monkeypatch.setenv(extension_loader.DISABLE_ENV, "1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)

    def must_not_build(verbose):
        raise AssertionError("the build must not be attempted")

    monkeypatch.setattr(extension_loader._cuda, "_jit_build", must_not_build)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert extension_loader.cuda_available() is False
    assert extension_loader.DISABLE_ENV in extension_loader.unavailable_reason()


# --------------------------------------------------------------------------------------------
# The sources compile (no GPU needed; the CPU torch wheel ships the ATen/c10 CUDA headers)
# --------------------------------------------------------------------------------------------
def _cuda_include_dir() -> Path | None:
    """The toolkit's include folder (``nvcc`` may be a wrapper script, so try the usual homes)."""
    homes = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    homes.append(str(Path(shutil.which("nvcc") or "/").resolve().parent.parent))
    for home in filter(None, homes):
        if (Path(home) / "include" / "cuda_runtime.h").exists():
            return Path(home) / "include"
    return None


def _compile_commands(tmp_path: Path) -> list[list[str]]:
    from torch.utils import cpp_extension

    csrc = extension_loader.CSRC_DIR
    cuda_include = _cuda_include_dir()
    commands = [
        [
            "nvcc",
            "-c",
            str(csrc / "bilinear_conv2d_kernels.cu"),
            "-o",
            str(tmp_path / "k.o"),
            "-std=c++17",
            "-O1",
            "-arch=sm_80",
            "-Werror",
            "all-warnings",
        ]
    ]
    python_include = sysconfig.get_paths()["include"]
    cxx = shutil.which("g++") or shutil.which("c++")
    if cxx and cuda_include and (Path(python_include) / "Python.h").exists():
        includes = cpp_extension.include_paths()  # torch only; CUDA from nvcc's folder
        commands.append(
            [
                cxx,
                "-fsyntax-only",
                "-std=c++20",
                "-Wall",
                "-Werror=return-type",
                str(csrc / "bilinear_conv2d.cpp"),
                f"-DTORCH_EXTENSION_NAME={extension_loader.EXTENSION_NAME}",
                # The CPU wheel lacks the CMake-generated c10/cuda config header; it only holds
                # export macros, which this define tells c10 to skip.
                "-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE",
                *(f"-I{path}" for path in includes),
                f"-I{cuda_include}",
                f"-I{python_include}",
            ]
        )
    return commands


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not on PATH")
def test_sources_compile(tmp_path):
    """nvcc compiles the kernels (sm_80); g++ type-checks the bindings against torch's headers.

    The kernels file needs only the CUDA toolkit, so this is the real device compilation;
    the bindings can only be syntax-checked here (linking needs torch's CUDA libraries).
    """
    commands = _compile_commands(tmp_path)
    # Both at once: the machine has 2 cores and each compiler is single-threaded.
    processes = [
        subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for cmd in commands
    ]
    for cmd, process in zip(commands, processes):
        output, _ = process.communicate(timeout=120)
        assert process.returncode == 0, f"{' '.join(cmd[:3])} failed:\n{output[-4000:]}"
    assert (tmp_path / "k.o").stat().st_size > 0


# --------------------------------------------------------------------------------------------
# The kernels themselves, run on the CPU through csrc/host_emulation.h (one std::thread per
# CUDA thread, a std::barrier per __syncthreads): indexing, tiling, split-K, dtype conversions
# --------------------------------------------------------------------------------------------
EMULATION_SHIM = r"""
#include <cstdint>
#include "bilinear_conv2d.h"
using fewshot_nsl::DType;
using fewshot_nsl::Geometry;
static Geometry geometry(const int64_t* v, int diagonal) {
  return Geometry{v[0], v[1], v[2], v[3], v[4], v[5], v[6], v[7], v[8], v[9], v[10], v[11],
                  v[12], v[13], v[14], diagonal != 0};
}
extern "C" int splits(const int64_t* v, int diagonal) {
  return fewshot_nsl::weight_grad_splits(geometry(v, diagonal));
}
extern "C" int forward(int dtype, const void* x, const void* w, const void* m, void* y,
                       const int64_t* v, int diagonal) {
  return fewshot_nsl::location_forward(static_cast<DType>(dtype), x, w, m, y,
                                       geometry(v, diagonal), nullptr);
}
extern "C" int backward(int dtype, const void* gy, const void* x, const void* w, const void* m,
                        void* patches, void* partials, void* gx, void* gw, void* gm,
                        const int64_t* v, int diagonal) {
  return fewshot_nsl::location_backward(static_cast<DType>(dtype), gy, x, w, m, patches,
                                        partials, gx, gw, gm, geometry(v, diagonal), nullptr);
}
"""
EMULATION_DTYPES = {torch.float32: 0, torch.float64: 1, torch.float16: 2, torch.bfloat16: 3}


@pytest.fixture(scope="module")
def emulated_kernels(tmp_path_factory):
    """The kernels file compiled by g++ against host_emulation.h, loaded with ctypes."""
    import ctypes

    cxx = shutil.which("g++")
    cuda_include = _cuda_include_dir()
    if cxx is None or cuda_include is None:
        pytest.skip("needs g++ and the CUDA toolkit's headers")
    folder = tmp_path_factory.mktemp("emulation")
    (folder / "shim.cpp").write_text(EMULATION_SHIM)
    library = folder / "kernels.so"
    csrc = extension_loader.CSRC_DIR
    command = [
        cxx,
        "-std=c++20",
        "-O1",
        "-shared",
        "-fPIC",
        "-Wall",
        "-Wno-unknown-pragmas",
        f"-I{csrc}",
        f"-I{cuda_include}",
        "-include",
        str(csrc / "host_emulation.h"),
        "-x",
        "c++",
        str(csrc / "bilinear_conv2d_kernels.cu"),
        "-x",
        "c++",
        str(folder / "shim.cpp"),
        "-o",
        str(library),
        "-lpthread",
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    return ctypes.CDLL(str(library))


def run_emulated(lib, x, weight, M, grad_y, geometry, diagonal):
    """Forward and backward of the per-location kernels into NaN-prefilled outputs."""
    import ctypes

    _, stride, padding, dilation = geometry
    batch, channels, height, width = x.shape
    out_ch, _, kh, kw = weight.shape
    h_out, w_out = grad_y.shape[2:]
    dims = torch.tensor(
        [
            batch,
            channels,
            height,
            width,
            out_ch,
            kh,
            kw,
            h_out,
            w_out,
            *stride,
            *padding,
            *dilation,
        ],
        dtype=torch.int64,
    )
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    taps = kh * kw

    def ptr(t):
        return ctypes.c_void_p(t.data_ptr())

    nan = float("nan")
    y = torch.full((batch, out_ch, h_out, w_out), nan, dtype=x.dtype)
    splits = lib.splits(ptr(dims), int(diagonal))
    patches = torch.full((batch, channels * taps, h_out * w_out), nan, dtype=acc)
    partials = torch.full((splits, out_ch, channels * taps), nan, dtype=acc)
    grads = [torch.full_like(t, nan) for t in (x, weight, M)]
    dtype = EMULATION_DTYPES[x.dtype]
    tensors = [t.contiguous() for t in (x, weight, M, grad_y)]
    assert lib.forward(dtype, *map(ptr, tensors[:3]), ptr(y), ptr(dims), int(diagonal)) == 0
    assert (
        lib.backward(
            dtype,
            ptr(tensors[3]),
            *map(ptr, tensors[:3]),
            ptr(patches),
            ptr(partials),
            *map(ptr, grads),
            ptr(dims),
            int(diagonal),
        )
        == 0
    )
    return y, grads, splits


EMULATION_CASES = [
    # (geometry, diagonal, dtype, sizes): every geometry in float64, then 64x64 tiles in m and
    # n plus a 2-way split-K reduction of grad_weight, then the 16-bit conversions.
    *[(g, d, torch.float64, {}) for g in GEOMETRIES for d in (False, True)],
    (GEOMETRIES[0], False, torch.float32, dict(batch=4, channels=3, out_ch=70, size=(24, 24))),
    (GEOMETRIES[3], True, torch.float32, dict(batch=3, channels=9, out_ch=20, size=(21, 9))),
    (GEOMETRIES[1], False, torch.bfloat16, dict(channels=8, out_ch=8)),
    (GEOMETRIES[1], True, torch.float16, dict(channels=8, out_ch=8)),
]


@pytest.mark.parametrize("geometry,diagonal,dtype,sizes", EMULATION_CASES)
def test_emulated_location_kernels_match_reference(
    emulated_kernels, geometry, diagonal, dtype, sizes
):
    x, weight, M = (t.to(dtype) for t in make_inputs("location", diagonal, geometry, **sizes))
    ref_inputs = [t.double().requires_grad_() for t in (x, weight, M)]
    y_ref = reference(*ref_inputs, *geometry[1:], "location", diagonal)
    grad_y = torch.randn(
        y_ref.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64
    )
    grads_ref = torch.autograd.grad(y_ref, ref_inputs, grad_y)
    y, grads, splits = run_emulated(
        emulated_kernels, x, weight, M, grad_y.to(dtype), geometry, diagonal
    )
    if sizes.get("out_ch", 0) > 64:
        assert splits > 1  # the case exists to exercise the split-K path
    tolerance = {torch.float64: 1e-12, torch.float32: 1e-5}.get(dtype, 1e-2)
    for name, got, want in zip(
        ("y", "grad_x", "grad_weight", "grad_M"), (y, *grads), (y_ref, *grads_ref)
    ):
        assert not torch.isnan(got).any(), f"{name}: elements left unwritten"
        rel = ((got.double() - want).norm() / want.norm()).item()
        assert rel <= tolerance, f"{name}: relative error {rel:.2e} > {tolerance:g}"


# --------------------------------------------------------------------------------------------
# On a GPU: the kernels themselves (scripts/check_cuda.py runs the full grid)
# --------------------------------------------------------------------------------------------
@pytest.fixture
def no_tf32():
    """Exact float32: the per-sample path's cuDNN convolutions would otherwise use TF32."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


@pytest.mark.cuda
@needs_gpu
@pytest.mark.parametrize("geometry", GEOMETRIES)
@pytest.mark.parametrize("granularity,diagonal", FORMS)
def test_gpu_float32_matches_reference(no_tf32, granularity, diagonal, geometry):
    assert extension_loader.cuda_available(), extension_loader.unavailable_reason()
    inputs = make_inputs(granularity, diagonal, geometry, dtype=torch.float32, device="cuda")
    inputs = [t.requires_grad_() for t in inputs]
    y = call(*inputs, geometry, granularity, diagonal)
    ref_inputs = [t.detach().double().requires_grad_() for t in inputs]
    y_ref = reference(*ref_inputs, *geometry[1:], granularity, diagonal)
    torch.testing.assert_close(y.double(), y_ref, rtol=1e-5, atol=1e-5)
    grad_y = torch.randn_like(y)
    grads = torch.autograd.grad(y, inputs, grad_y)
    grads_ref = torch.autograd.grad(y_ref, ref_inputs, grad_y.double())
    for got, want in zip(grads, grads_ref):
        torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-4)


@pytest.mark.cuda
@needs_gpu
@pytest.mark.parametrize("granularity,diagonal", FORMS)
def test_gpu_gradcheck_float64(granularity, diagonal):
    assert extension_loader.cuda_available(), extension_loader.unavailable_reason()
    geometry = GEOMETRIES[1]
    inputs = make_inputs(
        granularity, diagonal, geometry, device="cuda", channels=2, out_ch=2, size=(5, 4)
    )
    inputs = tuple(t.requires_grad_() for t in inputs)

    def op(x, weight, M):
        return call(x, weight, M, geometry, granularity, diagonal)

    assert torch.autograd.gradcheck(op, inputs)
    assert torch.autograd.gradgradcheck(op, inputs)


@pytest.mark.cuda
@needs_gpu
@pytest.mark.parametrize("granularity,diagonal", FORMS)
def test_gpu_bfloat16(granularity, diagonal):
    assert extension_loader.cuda_available(), extension_loader.unavailable_reason()
    geometry = GEOMETRIES[0]
    inputs = make_inputs(
        granularity,
        diagonal,
        geometry,
        dtype=torch.bfloat16,
        device="cuda",
        channels=16,
        out_ch=8,
        size=(12, 12),
    )
    y = call(*inputs, geometry, granularity, diagonal)
    y_ref = reference(*(t.double() for t in inputs), *geometry[1:], granularity, diagonal)
    assert y.dtype == torch.bfloat16
    assert ((y.double() - y_ref).norm() / y_ref.norm()).item() < 1e-2


def test_binding_arguments_name_the_granularity_by_one_flag():
    """The one place where ``granularity`` meets the C++ binding's ``per_location`` bool."""
    geometry = ConvGeometry((2, 1), (0, 1), (1, 2))
    assert extension_loader.binding_arguments(geometry, "location", True) == (
        [2, 1],
        [0, 1],
        [1, 2],
        True,
        True,
    )
    assert extension_loader.binding_arguments(geometry, "sample", False)[3:] == (False, False)
    with pytest.raises(ValueError, match="granularity"):
        extension_loader.binding_arguments(geometry, "channel", False)
