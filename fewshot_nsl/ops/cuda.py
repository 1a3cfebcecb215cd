"""CUDA extension for the batched per-sample bilinear convolution, behind a torch custom op.

The op is ``y = bilinear_conv2d(x, W, M)`` for a per-sample (``granularity="sample"``) or
per-location (``"location"``) similarity ``M`` (see :mod:`fewshot_nsl.ops.bilinear` for the
math and the shapes). This module

* builds/loads the C++/CUDA extension in ``ops/csrc/`` (prebuilt by
  ``FEWSHOT_NSL_BUILD_CUDA=1 pip install --no-build-isolation -e .``, else compiled just in time
  with ninja and cached under ``~/.cache/fewshot_nsl`` or ``$TORCH_EXTENSIONS_DIR``);
* registers two custom ops, ``fewshot_nsl::bilinear_conv2d`` and
  ``fewshot_nsl::bilinear_conv2d_backward``, with a fake (meta) implementation for
  ``torch.compile``, autograd through ``register_autograd`` (the backward is itself
  differentiable, so MAML's second-order inner loops work), a CPU implementation in pure torch
  and the extension as the CUDA implementation;
* falls back to the pure-torch implementation, with one warning per process, when a GPU is
  present but the extension cannot be built or loaded. Set ``FEWSHOT_NSL_DISABLE_CUDA_EXT=1``
  to skip the extension on purpose (no warning).

See docs/cuda.md for the kernel design and how to check it on a GPU.
"""

from __future__ import annotations

import importlib
import os
import sys
import threading
import warnings
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from fewshot_nsl.ops.bilinear import (
    _unfold_taps,
    bilinear_conv2d_torch,
    effective_weight,
    expected_m_shape,
    output_size,
)

__all__ = ["bilinear_conv2d_cuda", "cuda_available", "load_extension"]

DISABLE_ENV = "FEWSHOT_NSL_DISABLE_CUDA_EXT"
VERBOSE_ENV = "FEWSHOT_NSL_CUDA_VERBOSE"
EXTENSION_NAME = "fewshot_nsl_bilinear_cuda"
PREBUILT_MODULE = "fewshot_nsl.ops._bilinear_cuda_C"
CSRC_DIR = Path(__file__).resolve().with_name("csrc")
SOURCES = ("bilinear_conv2d.cpp", "bilinear_conv2d_kernels.cu")
GRANULARITIES = ("sample", "location")
SUPPORTED_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)

Geometry = tuple[Sequence[int], Sequence[int], Sequence[int], bool, bool]


# --------------------------------------------------------------------------------------------
# Loading the extension (once per process)
# --------------------------------------------------------------------------------------------
class _LoadState:
    def __init__(self) -> None:
        self.attempted = False
        self.module: ModuleType | None = None
        self.reason: str | None = None


_state = _LoadState()
_lock = threading.Lock()


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() not in ("", "0", "false", "no")


def _build_directory() -> str | None:
    """Cache folder for the JIT build; ``None`` lets torch use ``$TORCH_EXTENSIONS_DIR``."""
    if os.environ.get("TORCH_EXTENSIONS_DIR"):
        return None
    # One folder per python/torch/CUDA combination: a build is only valid for that ABI.
    tag = "py{}{}_torch{}_cu{}".format(
        sys.version_info.major,
        sys.version_info.minor,
        torch.__version__.split("+")[0],
        (torch.version.cuda or "none").replace(".", ""),
    )
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    path = cache / "fewshot_nsl" / "torch_extensions" / tag
    path.mkdir(parents=True, exist_ok=True)
    return str(path)


def _import_prebuilt() -> ModuleType | None:
    """The module built ahead of time by setup.py, or ``None`` if it was not built."""
    try:
        return importlib.import_module(PREBUILT_MODULE)
    except ImportError:
        return None


def _jit_build(verbose: bool) -> ModuleType:
    """Compile the extension with ninja (cached; a rebuild happens only when sources change)."""
    from torch.utils import cpp_extension

    if torch.version.cuda is None:
        raise RuntimeError(f"this torch ({torch.__version__}) was built without CUDA")
    if cpp_extension.CUDA_HOME is None:
        raise RuntimeError("the CUDA toolkit (nvcc) was not found; set CUDA_HOME")
    if not cpp_extension.is_ninja_available():
        raise RuntimeError("ninja was not found; `pip install ninja`")
    return cpp_extension.load(
        name=EXTENSION_NAME,
        sources=[str(CSRC_DIR / name) for name in SOURCES],
        extra_cflags=["-O3"],
        extra_cuda_cflags=["-O3"],
        build_directory=_build_directory(),
        verbose=verbose,
    )


def load_extension(verbose: bool | None = None) -> ModuleType | None:
    """The compiled extension module, or ``None`` (then the torch implementation is used).

    Tried once per process. ``None`` without a warning when there is no CUDA device or
    ``FEWSHOT_NSL_DISABLE_CUDA_EXT`` is set; otherwise a failed import/build warns once (the
    message says why) and never raises. ``verbose`` (default: ``$FEWSHOT_NSL_CUDA_VERBOSE``)
    prints the compiler's output.
    """
    with _lock:
        if _state.attempted:
            return _state.module
        _state.attempted = True
        if _env_flag(DISABLE_ENV):
            _state.reason = f"disabled by {DISABLE_ENV}"
            return None
        if not torch.cuda.is_available():
            _state.reason = "no CUDA device"
            return None
        try:
            module = _import_prebuilt()
            if module is None:
                module = _jit_build(_env_flag(VERBOSE_ENV) if verbose is None else verbose)
        except Exception as exc:  # a compiler error, a missing toolkit, a bad ABI ...
            # A compiler error carries the whole build log: keep its end, where the error is.
            message = str(exc).strip()
            message = message if len(message) <= 800 else "..." + message[-800:]
            _state.reason = f"{type(exc).__name__}: {message}"
            warnings.warn(
                f"fewshot_nsl: the CUDA extension for bilinear_conv2d could not be built or "
                f"loaded ({_state.reason}); using the PyTorch implementation instead. "
                f"Set {VERBOSE_ENV}=1 to see the compiler output, {DISABLE_ENV}=1 to silence.",
                RuntimeWarning,
                stacklevel=2,
            )
            return None
        _state.module = module
        return module


def unavailable_reason() -> str | None:
    """Why the extension is not in use (``None`` if it loaded or was never tried)."""
    return _state.reason


def _reset_extension_state() -> None:
    """Forget the load attempt (tests only: the next call tries, and may warn, again)."""
    with _lock:
        _state.__init__()


def cuda_available() -> bool:
    """True iff a CUDA device is present and the compiled extension loads (see
    :func:`load_extension`; never raises, warns at most once per process)."""
    return load_extension() is not None


# --------------------------------------------------------------------------------------------
# Pure-torch implementation (the custom ops' CPU kernels, and the fallback on CUDA)
# --------------------------------------------------------------------------------------------
def _forward_torch(
    x: Tensor, weight: Tensor, M: Tensor, stride, padding, dilation, per_location, diagonal
) -> Tensor:
    granularity = "location" if per_location else "sample"
    out = bilinear_conv2d_torch(
        x, weight, M, tuple(stride), tuple(padding), tuple(dilation), granularity, diagonal
    )
    return out.contiguous()


def _backward_torch(
    grad_y: Tensor,
    x: Tensor,
    weight: Tensor,
    M: Tensor,
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    per_location: bool,
    diagonal: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """``(grad_x, grad_weight, grad_M)`` by explicit formulas, the same decomposition as the
    CUDA kernels (docs/cuda.md), so the CPU tests also check the kernels' algebra."""
    batch, channels, height, width = x.shape
    out_ch, _, kh, kw = weight.shape
    taps = kh * kw
    h_out, w_out = grad_y.shape[2:]
    stride, padding, dilation = tuple(stride), tuple(padding), tuple(dilation)
    w_flat = weight.reshape(out_ch, channels, taps)
    if per_location:
        positions = h_out * w_out
        gy = grad_y.reshape(batch, out_ch, positions)
        cols = _unfold_taps(x, (kh, kw), stride, padding, dilation, positions)
        # G~[b, c, k, p] = sum_o W[o, c, k] gy[b, o, p]
        grad_patches = torch.einsum("ock,bop->bckp", w_flat, gy)
        if diagonal:
            m = M.reshape(batch, positions, taps).transpose(1, 2).unsqueeze(1)  # (B, 1, HV, P)
            mixed = cols * m
            grad_M = (grad_patches * cols).sum(1).transpose(1, 2)
            grad_cols = grad_patches * m
        else:
            m = M.reshape(batch, positions, taps, taps)
            mixed = torch.einsum("bpkl,bclp->bckp", m, cols)
            grad_M = torch.einsum("bckp,bclp->bpkl", grad_patches, cols)
            grad_cols = torch.einsum("bpkl,bckp->bclp", m, grad_patches)
        grad_weight = torch.einsum("bop,bckp->ock", gy, mixed)
        grad_x = F.fold(
            grad_cols.reshape(batch, channels * taps, positions),
            (height, width),
            (kh, kw),
            dilation=dilation,
            padding=padding,
            stride=stride,
        )
    else:
        eff = effective_weight(weight, M, "sample", diagonal)  # (B, O, C, kh, kw)
        grad_x, grad_eff, _ = torch.ops.aten.convolution_backward(
            grad_y.reshape(1, batch * out_ch, h_out, w_out),
            x.reshape(1, batch * channels, height, width),
            eff.reshape(batch * out_ch, channels, kh, kw),
            None,
            list(stride),
            list(padding),
            list(dilation),
            False,
            [0, 0],
            batch,
            [True, True, False],
        )
        grad_eff = grad_eff.reshape(batch, out_ch, channels, taps)
        if diagonal:  # W_eff[b, o, c, k] = W[o, c, k] m[b, k]
            grad_weight = (grad_eff * M[:, None, None, :]).sum(0)
            grad_M = torch.einsum("bock,ock->bk", grad_eff, w_flat)
        else:  # W_eff[b, o, c, k'] = sum_k W[o, c, k] M[b, k, k']
            grad_weight = torch.einsum("bocq,bkq->ock", grad_eff, M)
            grad_M = torch.einsum("ock,bocq->bkq", w_flat, grad_eff)
    return (
        grad_x.reshape(x.shape).contiguous(),
        grad_weight.reshape(weight.shape).contiguous(),
        grad_M.reshape(M.shape).contiguous(),
    )


def _forward_cuda(
    x: Tensor,
    weight: Tensor,
    M: Tensor,
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    per_location: bool,
    diagonal: bool,
) -> Tensor:
    geometry = (list(stride), list(padding), list(dilation), per_location, diagonal)
    ext = load_extension()
    if ext is None:
        return _forward_torch(x, weight, M, *geometry)
    return ext.forward(x, weight, M, *geometry)


def _backward_cuda(
    grad_y: Tensor,
    x: Tensor,
    weight: Tensor,
    M: Tensor,
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    per_location: bool,
    diagonal: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    geometry = (list(stride), list(padding), list(dilation), per_location, diagonal)
    ext = load_extension()
    if ext is None:
        return _backward_torch(grad_y, x, weight, M, *geometry)
    return tuple(ext.backward(grad_y, x, weight, M, *geometry))


def _forward_impl(x: Tensor, weight: Tensor, M: Tensor, *geometry) -> Tensor:
    impl = _forward_cuda if x.is_cuda else _forward_torch
    return impl(x, weight, M, *geometry)


def _backward_impl(
    grad_y: Tensor, x: Tensor, weight: Tensor, M: Tensor, *geometry
) -> tuple[Tensor, Tensor, Tensor]:
    impl = _backward_cuda if x.is_cuda else _backward_torch
    return impl(grad_y, x, weight, M, *geometry)


# --------------------------------------------------------------------------------------------
# Custom ops (torch >= 2.4) and the autograd.Function fallback (older torch)
# --------------------------------------------------------------------------------------------
def _add(total: Tensor | None, term: Tensor) -> Tensor:
    return term if total is None else total + term


def _double_backward(forward, backward, saved, geometry, gg_x, gg_weight, gg_M):
    """Gradient of ``backward`` (the VJP of the trilinear op) w.r.t. ``(grad_y, x, W, M)``.

    ``y = f(x, W, M)`` is linear in each argument, so for cotangents ``(gg_x, gg_W, gg_M)`` of
    ``(grad_x, grad_W, grad_M)``: ``d grad_y = f(gg_x, W, M) + f(x, gg_W, M) + f(x, W, gg_M)``,
    and e.g. ``<gg_W, grad_W> = <grad_y, f(x, gg_W, M)>`` gives ``d x`` as the ``grad_x`` of
    ``backward(grad_y, x, gg_W, M)``. Three forwards and three backwards, all differentiable.
    """
    grad_y, x, weight, M = saved
    d_grad_y = d_x = d_weight = d_M = None
    if gg_x is not None:
        d_grad_y = _add(d_grad_y, forward(gg_x, weight, M, *geometry))
        _, term_weight, term_M = backward(grad_y, gg_x, weight, M, *geometry)
        d_weight, d_M = _add(d_weight, term_weight), _add(d_M, term_M)
    if gg_weight is not None:
        d_grad_y = _add(d_grad_y, forward(x, gg_weight, M, *geometry))
        term_x, _, term_M = backward(grad_y, x, gg_weight, M, *geometry)
        d_x, d_M = _add(d_x, term_x), _add(d_M, term_M)
    if gg_M is not None:
        d_grad_y = _add(d_grad_y, forward(x, weight, gg_M, *geometry))
        term_x, term_weight, _ = backward(grad_y, x, weight, gg_M, *geometry)
        d_x, d_weight = _add(d_x, term_x), _add(d_weight, term_weight)
    return d_grad_y, d_x, d_weight, d_M


class BilinearConv2dFunction(torch.autograd.Function):
    """Fallback for torch < 2.4 (no ``torch.library.custom_op``): first-order autograd only."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, M: Tensor, geometry: Geometry) -> Tensor:
        ctx.save_for_backward(x, weight, M)
        ctx.geometry = geometry
        return _forward_impl(x, weight, M, *geometry)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_y: Tensor):
        x, weight, M = ctx.saved_tensors
        grad_x, grad_weight, grad_M = _backward_impl(grad_y, x, weight, M, *ctx.geometry)
        return grad_x, grad_weight, grad_M, None


HAS_CUSTOM_OP = hasattr(torch.library, "custom_op") and hasattr(torch.library, "register_fake")

if HAS_CUSTOM_OP:

    @torch.library.custom_op("fewshot_nsl::bilinear_conv2d", mutates_args=())
    def _bilinear_conv2d_op(
        x: Tensor,
        weight: Tensor,
        M: Tensor,
        stride: Sequence[int],
        padding: Sequence[int],
        dilation: Sequence[int],
        per_location: bool,
        diagonal: bool,
    ) -> Tensor:
        return _forward_torch(x, weight, M, stride, padding, dilation, per_location, diagonal)

    @torch.library.custom_op("fewshot_nsl::bilinear_conv2d_backward", mutates_args=())
    def _bilinear_conv2d_backward_op(
        grad_y: Tensor,
        x: Tensor,
        weight: Tensor,
        M: Tensor,
        stride: Sequence[int],
        padding: Sequence[int],
        dilation: Sequence[int],
        per_location: bool,
        diagonal: bool,
    ) -> tuple[Tensor, Tensor, Tensor]:
        return _backward_torch(
            grad_y, x, weight, M, stride, padding, dilation, per_location, diagonal
        )

    _bilinear_conv2d_op.register_kernel("cuda")(_forward_cuda)
    _bilinear_conv2d_backward_op.register_kernel("cuda")(_backward_cuda)

    @_bilinear_conv2d_op.register_fake
    def _(x, weight, M, stride, padding, dilation, per_location, diagonal):
        h_out, w_out = (
            (size + 2 * pad - dil * (k - 1) - 1) // step + 1
            for size, k, step, pad, dil in zip(
                x.shape[2:], weight.shape[2:], stride, padding, dilation
            )
        )
        return x.new_empty((x.shape[0], weight.shape[0], h_out, w_out))

    @_bilinear_conv2d_backward_op.register_fake
    def _(grad_y, x, weight, M, stride, padding, dilation, per_location, diagonal):
        contiguous = torch.contiguous_format
        return (
            torch.empty_like(x, memory_format=contiguous),
            torch.empty_like(weight, memory_format=contiguous),
            torch.empty_like(M, memory_format=contiguous),
        )

    def _setup_forward(ctx, inputs, output) -> None:
        x, weight, M, *geometry = inputs
        ctx.save_for_backward(x, weight, M)
        ctx.geometry = tuple(geometry)

    def _grad_forward(ctx, grad_y: Tensor):
        x, weight, M = ctx.saved_tensors
        grad_x, grad_weight, grad_M = _bilinear_conv2d_backward_op(
            grad_y, x, weight, M, *ctx.geometry
        )
        return (grad_x, grad_weight, grad_M) + (None,) * len(ctx.geometry)

    def _setup_backward(ctx, inputs, output) -> None:
        grad_y, x, weight, M, *geometry = inputs
        ctx.save_for_backward(grad_y, x, weight, M)
        ctx.geometry = tuple(geometry)

    def _grad_backward(ctx, gg_x, gg_weight, gg_M):
        grads = _double_backward(
            _bilinear_conv2d_op,
            _bilinear_conv2d_backward_op,
            ctx.saved_tensors,
            ctx.geometry,
            gg_x,
            gg_weight,
            gg_M,
        )
        return grads + (None,) * len(ctx.geometry)

    _bilinear_conv2d_op.register_autograd(_grad_forward, setup_context=_setup_forward)
    _bilinear_conv2d_backward_op.register_autograd(_grad_backward, setup_context=_setup_backward)


# --------------------------------------------------------------------------------------------
# Public entry point (called by fewshot_nsl.ops.bilinear's dispatcher)
# --------------------------------------------------------------------------------------------
def _check_arguments(
    x: Tensor, weight: Tensor, M: Tensor, stride, padding, dilation, granularity: str, diagonal
) -> None:
    if granularity not in GRANULARITIES:
        raise ValueError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}")
    if x.dim() != 4:
        raise ValueError(f"x must have shape (B, C, H, W), got {tuple(x.shape)}")
    if weight.dim() != 4 or weight.shape[1] != x.shape[1]:
        raise ValueError(
            f"weight must have shape (O, C, kh, kw) with C = {x.shape[1]}, "
            f"got {tuple(weight.shape)}"
        )
    for name, pair in (("stride", stride), ("padding", padding), ("dilation", dilation)):
        if len(pair) != 2:
            raise ValueError(f"{name} must be a pair of ints, got {pair!r}")
    taps = weight.shape[2] * weight.shape[3]
    h_out, w_out = output_size(x.shape[2:], weight.shape[2:], stride, padding, dilation)
    expected = expected_m_shape(
        granularity, diagonal, x.shape[0], x.shape[1], taps, (h_out, w_out)
    )
    if tuple(M.shape) != expected:
        raise ValueError(
            f"M for granularity={granularity!r}, diagonal={diagonal} must have shape "
            f"{expected}, got {tuple(M.shape)}"
        )
    if x.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"x must be float32, float64, float16 or bfloat16, got {x.dtype}")
    for name, tensor in (("weight", weight), ("M", M)):
        if tensor.dtype != x.dtype or tensor.device != x.device:
            raise ValueError(
                f"{name} must have x's dtype and device ({x.dtype}, {x.device}), "
                f"got ({tensor.dtype}, {tensor.device})"
            )


def bilinear_conv2d_cuda(
    x: Tensor,
    weight: Tensor,
    M: Tensor,
    stride: tuple[int, int],
    padding: tuple[int, int],
    dilation: tuple[int, int],
    granularity: str,
    diagonal: bool,
) -> Tensor:
    """Bilinear convolution with a per-sample or per-location ``M`` through the custom op.

    Args:
        x: ``(B, C, H, W)``; float32, float64, float16 or bfloat16 (accumulation in float32,
            float64 for float64).
        weight: ``(O, C, kh, kw)``, same dtype/device as ``x``.
        M: ``granularity="sample"``: ``(B, HV, HV)``, diagonal ``(B, HV)``;
            ``"location"``: ``(B, H_out, W_out, HV, HV)``, diagonal ``(B, H_out, W_out, HV)``.
        stride, padding, dilation: int pairs (canonical, as the dispatcher passes them).
        granularity: ``"sample"`` or ``"location"``.
        diagonal: ``M`` holds only the diagonal of each ``HV x HV`` block.

    Returns:
        ``(B, O, H_out, W_out)``, no bias. Differentiable w.r.t. ``x``, ``weight`` and ``M``
        (to any order with torch >= 2.4). On a CUDA tensor the extension runs when it loaded
        (else the torch implementation); on CPU the op's torch implementation runs.

    Raises:
        ValueError: a bad granularity, shape, geometry, dtype or device (the message names
            the argument and what was expected).
    """
    _check_arguments(x, weight, M, stride, padding, dilation, granularity, diagonal)
    geometry = (
        [int(v) for v in stride],
        [int(v) for v in padding],
        [int(v) for v in dilation],
        granularity == "location",
        bool(diagonal),
    )
    if HAS_CUSTOM_OP:
        return _bilinear_conv2d_op(x, weight, M, *geometry)
    return BilinearConv2dFunction.apply(x, weight, M, geometry)
