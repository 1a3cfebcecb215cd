"""Dispatch of the bilinear (neural-similarity) convolution to its paths.

For an input ``x`` of shape ``(B, C, H, W)``, a kernel ``weight`` of shape ``(O, C, kh, kw)``
(``HV = kh * kw`` taps, ordered row-major as :func:`torch.nn.functional.unfold` orders them)
and a similarity ``M``, the op computes

    y[b, o, p] = sum_c sum_{k, k'} W[o, c, k] * M_{k, k'} * x[b, c, p + k'] (+ bias[o])

where ``M`` is selected by ``granularity`` (full form / ``diagonal=True`` form):

* ``"shared"``:   ``(HV, HV)`` / ``(HV,)``: one block for every channel, sample and location;
* ``"channel"``:  ``(C, HV, HV)`` / ``(C, HV)``: one block per input channel (the paper's
  "disjoint" static M);
* ``"sample"``:   ``(B, HV, HV)`` / ``(B, HV)``: one block per image;
* ``"location"``: ``(B, H_out, W_out, HV, HV)`` / ``(B, H_out, W_out, HV)``: per image and
  output location (dynamic NSL).

The granularity is explicit because shapes alone are ambiguous (e.g. ``C == B``).
A diagonal ``M`` is the full form with those numbers on the diagonal. ``M=None`` is the
identity (a plain convolution).

Paths: the reference and fast torch paths (:mod:`fewshot_nsl.ops.torch_paths`) and the
custom op (:mod:`fewshot_nsl.ops.custom_op`, :mod:`fewshot_nsl.ops.extension`), backed by the
CUDA extension for "sample"/"location" inputs on a GPU and by the CPU kernel for "location"
inputs on the CPU.
:func:`bilinear_conv2d` validates and canonicalises the arguments once and dispatches;
:func:`backend` says which path runs the per-sample/per-location forms on a device.
"""

from __future__ import annotations

import os
import warnings

import torch
from torch import Tensor

from fewshot_nsl.ops import extension
from fewshot_nsl.ops.custom_op import bilinear_conv2d_custom_op
from fewshot_nsl.ops.geometry import IntPair, Padding, canonical_geometry, validate
from fewshot_nsl.ops.torch_paths import bilinear_conv2d_reference, bilinear_conv2d_torch

BACKENDS: tuple[str, ...] = ("auto", "torch", "reference", "cuda", "cpp")
BACKEND_ENV = "FEWSHOT_NSL_BACKEND"

#: Forced backends ("cuda", "cpp") whose fallback to the torch path has been warned about.
_warned_fallbacks: set[str] = set()


def _forced_backend() -> str:
    value = os.environ.get(BACKEND_ENV, "auto").strip().lower() or "auto"
    if value not in BACKENDS:
        raise ValueError(
            f"environment variable {BACKEND_ENV} must be one of {BACKENDS}, got {value!r}"
        )
    return value


def _cuda_usable() -> bool:
    return extension.cuda_available()


def _cpp_usable() -> bool:
    return extension.cpu_kernel_available()


def _under_func_transform() -> bool:
    """Whether this call runs inside a ``torch.func`` transform (``vmap``/``grad``, e.g. the
    vectorised meta-batch): the custom op has no functorch rules there, so the compiled
    kernels stand aside and the torch path (plain differentiable operations) runs."""
    stack = getattr(torch._C._functorch, "peek_interpreter_stack", None)
    return stack is not None and stack() is not None


def _warn_fallback_once(kind: str, reason: str) -> None:
    if kind in _warned_fallbacks:
        return
    _warned_fallbacks.add(kind)
    warnings.warn(
        f"{BACKEND_ENV}={kind} but {reason}; using the torch path instead",
        RuntimeWarning,
        stacklevel=3,
    )


def backend(device: torch.device | str = "cpu", granularity: str = "sample") -> str:
    """Which path runs the per-sample/per-location forms on ``device``.

    Returns ``"cuda"``, ``"cpp"``, ``"torch"`` or ``"reference"``. The environment variable
    ``FEWSHOT_NSL_BACKEND`` (``auto`` | ``torch`` | ``reference`` | ``cuda`` | ``cpp``) forces
    one; ``auto`` picks the CUDA kernel for CUDA tensors when it is available, the CPU kernel
    (``cpp``, compiled on first use) for the per-location form of CPU tensors when it builds,
    the torch path otherwise. ``cuda``/``cpp`` forced where that kernel cannot serve (another
    device, the per-sample form for ``cpp``, no usable build) falls back to ``torch`` with a
    single warning (never an error). The "shared"/"channel" forms always run the
    effective-kernel torch path (already a single plain convolution), except under
    ``reference``.
    """
    forced = _forced_backend()
    if forced in ("torch", "reference"):
        return forced
    on_cuda = torch.device(device).type == "cuda"
    cpp_serves = not on_cuda and granularity == "location"
    if forced == "auto":
        if on_cuda:
            return "cuda" if _cuda_usable() else "torch"
        return "cpp" if cpp_serves and _cpp_usable() else "torch"
    if forced == "cuda":
        if on_cuda and _cuda_usable():
            return "cuda"
        reason = "the extension is unavailable" if on_cuda else "the input is not on a CUDA device"
        _warn_fallback_once("cuda", reason)
        return "torch"
    # forced == "cpp"
    if cpp_serves and _cpp_usable():
        return "cpp"
    if on_cuda:
        reason = "the input is on a CUDA device"
    elif not cpp_serves:
        reason = "the CPU kernel serves only granularity='location'"
    else:
        reason = "the CPU kernel is unavailable"
    _warn_fallback_once("cpp", reason)
    return "torch"


def bilinear_conv2d(
    x: Tensor,
    weight: Tensor,
    M: Tensor | None,
    bias: Tensor | None = None,
    stride: IntPair = 1,
    padding: Padding = 0,
    dilation: IntPair = 1,
    *,
    granularity: str = "shared",
    diagonal: bool = False,
) -> Tensor:
    """Bilinear convolution ``y = W^T M x (+ bias)`` at every output location.

    Args:
        x: ``(B, C, H, W)``.
        weight: ``(O, C, kh, kw)``; taps ordered row-major (``HV = kh * kw``).
        M: the similarity, shaped by ``granularity``/``diagonal`` (module docstring); ``None`` is
            the identity (a plain convolution).
        bias: ``(O,)`` or ``None``.
        stride, padding, dilation: as :func:`torch.nn.functional.conv2d` (int or pair;
            ``padding`` also ``"valid"``/``"same"``, see :func:`canonical_geometry`).
        granularity: ``"shared"`` | ``"channel"`` | ``"sample"`` | ``"location"``.
        diagonal: ``M`` holds only the diagonal of each ``HV x HV`` block.

    Returns:
        ``(B, O, H_out, W_out)``.

    Raises:
        ValueError: a bad shape (the message names the expected shape), granularity,
            geometry or backend.
    """
    kernel = (weight.shape[-2], weight.shape[-1]) if weight.dim() == 4 else (1, 1)
    geometry = canonical_geometry(kernel, stride, padding, dilation)
    validate(x, weight, M, bias, geometry, granularity, diagonal)

    per_image = M is not None and granularity in ("sample", "location")
    path = backend(x.device, granularity) if per_image else _forced_backend()
    if path in ("cuda", "cpp") and _under_func_transform():
        path = "torch"
    if path == "reference":
        out = bilinear_conv2d_reference(x, weight, M, geometry, granularity, diagonal)
    elif path in ("cuda", "cpp") and per_image:
        # The custom op does not take part in autocast: give it one dtype (x's).
        out = bilinear_conv2d_custom_op(
            x, weight.to(x.dtype), M.to(x.dtype), geometry, granularity, diagonal
        )
    else:  # the torch paths fuse the bias where they can
        return bilinear_conv2d_torch(x, weight, M, bias, geometry, granularity, diagonal)
    if bias is not None:
        out = out + bias.view(1, -1, 1, 1)
    return out
