"""The per-sample/per-location bilinear convolution as a torch custom op.

Registers ``fewshot_nsl::bilinear_conv2d`` and ``fewshot_nsl::bilinear_conv2d_backward``
(torch >= 2.4) with a fake (meta) implementation for ``torch.compile``, autograd through
``register_autograd`` (the backward is itself differentiable, so MAML's second-order inner
loops work), the CUDA extension (:mod:`fewshot_nsl.ops.extension`) as the CUDA
implementation and, for the per-location form in float32/float64, the CPU kernel
(``csrc/location_cpu.cpp``) as the CPU one; every other case, and a device whose compiled
kernel did not build, runs the pure-torch paths (:mod:`fewshot_nsl.ops.torch_paths`).
Older torch gets a first-order :class:`BilinearConv2dFunction`.

The ops' schema is ``(x, weight, M, stride, padding, dilation, granularity, diagonal)`` with
``granularity`` "sample" or "location"; :func:`bilinear_conv2d_custom_op` is the entry point
(called by :func:`fewshot_nsl.ops.bilinear_conv2d` when the "cuda" or "cpp" backend serves a call).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from fewshot_nsl.ops.extension import binding_arguments, load_cpu_extension, load_extension
from fewshot_nsl.ops.geometry import ConvGeometry, validate
from fewshot_nsl.ops.torch_paths import backward_torch, bilinear_conv2d_torch

__all__ = ["HAS_CUSTOM_OP", "CUSTOM_OP_GRANULARITIES", "bilinear_conv2d_custom_op"]

CUSTOM_OP_GRANULARITIES = ("sample", "location")
#: The op's trailing non-tensor arguments: stride, padding, dilation, granularity, diagonal.
OpArguments = tuple[Sequence[int], Sequence[int], Sequence[int], str, bool]


def _geometry(stride: Sequence[int], padding: Sequence[int], dilation: Sequence[int]):
    return ConvGeometry(tuple(stride), tuple(padding), tuple(dilation))


# --------------------------------------------------------------------------------------------
# Implementations per device
# --------------------------------------------------------------------------------------------
def _forward_torch(
    x: Tensor, weight: Tensor, M: Tensor, stride, padding, dilation, granularity, diagonal
) -> Tensor:
    geometry = _geometry(stride, padding, dilation)
    return bilinear_conv2d_torch(x, weight, M, None, geometry, granularity, diagonal).contiguous()


def _backward_torch(
    grad_y: Tensor,
    x: Tensor,
    weight: Tensor,
    M: Tensor,
    stride,
    padding,
    dilation,
    granularity,
    diagonal,
) -> tuple[Tensor, Tensor, Tensor]:
    geometry = _geometry(stride, padding, dilation)
    return backward_torch(grad_y, x, weight, M, geometry, granularity, diagonal)


#: dtypes the CPU kernel (``csrc/location_cpu.cpp``) is compiled for; others run the torch path.
CPU_KERNEL_DTYPES = (torch.float32, torch.float64)


def _compiled_kernel(x: Tensor, granularity: str):
    """The compiled extension that serves this call, or ``None`` (the torch path runs): the
    CUDA extension for CUDA tensors; on the CPU the per-location kernel in float32/float64."""
    if x.is_cuda:
        return load_extension()
    if granularity == "location" and x.dtype in CPU_KERNEL_DTYPES:
        return load_cpu_extension()
    return None


def _forward_impl(
    x: Tensor, weight: Tensor, M: Tensor, stride, padding, dilation, granularity, diagonal
) -> Tensor:
    ext = _compiled_kernel(x, granularity)
    if ext is None:
        return _forward_torch(x, weight, M, stride, padding, dilation, granularity, diagonal)
    geometry = _geometry(stride, padding, dilation)
    if x.is_cuda:
        return ext.forward(x, weight, M, *binding_arguments(geometry, granularity, diagonal))
    return ext.location_forward(x, weight, M, *map(list, geometry), diagonal)


def _backward_impl(
    grad_y: Tensor,
    x: Tensor,
    weight: Tensor,
    M: Tensor,
    stride,
    padding,
    dilation,
    granularity,
    diagonal,
) -> tuple[Tensor, Tensor, Tensor]:
    ext = _compiled_kernel(x, granularity)
    if ext is None:
        return _backward_torch(
            grad_y, x, weight, M, stride, padding, dilation, granularity, diagonal
        )
    geometry = _geometry(stride, padding, dilation)
    if x.is_cuda:
        args = binding_arguments(geometry, granularity, diagonal)
        return tuple(ext.backward(grad_y, x, weight, M, *args))
    return tuple(ext.location_backward(grad_y, x, weight, M, *map(list, geometry), diagonal))


# --------------------------------------------------------------------------------------------
# Custom ops (torch >= 2.4) and the autograd.Function fallback (older torch)
# --------------------------------------------------------------------------------------------
def _add(total: Tensor | None, term: Tensor) -> Tensor:
    return term if total is None else total + term


def _double_backward(forward, backward, saved, arguments, gg_x, gg_weight, gg_M):
    """Gradient of ``backward`` (the VJP of the trilinear op) w.r.t. ``(grad_y, x, W, M)``.

    ``y = f(x, W, M)`` is linear in each argument, so for cotangents ``(gg_x, gg_W, gg_M)`` of
    ``(grad_x, grad_W, grad_M)``: ``d grad_y = f(gg_x, W, M) + f(x, gg_W, M) + f(x, W, gg_M)``,
    and e.g. ``<gg_W, grad_W> = <grad_y, f(x, gg_W, M)>`` gives ``d x`` as the ``grad_x`` of
    ``backward(grad_y, x, gg_W, M)``. Three forwards and three backwards, all differentiable.
    """
    grad_y, x, weight, M = saved
    d_grad_y = d_x = d_weight = d_M = None
    if gg_x is not None:
        d_grad_y = _add(d_grad_y, forward(gg_x, weight, M, *arguments))
        _, term_weight, term_M = backward(grad_y, gg_x, weight, M, *arguments)
        d_weight, d_M = _add(d_weight, term_weight), _add(d_M, term_M)
    if gg_weight is not None:
        d_grad_y = _add(d_grad_y, forward(x, gg_weight, M, *arguments))
        term_x, _, term_M = backward(grad_y, x, gg_weight, M, *arguments)
        d_x, d_M = _add(d_x, term_x), _add(d_M, term_M)
    if gg_M is not None:
        d_grad_y = _add(d_grad_y, forward(x, weight, gg_M, *arguments))
        term_x, term_weight, _ = backward(grad_y, x, weight, gg_M, *arguments)
        d_x, d_weight = _add(d_x, term_x), _add(d_weight, term_weight)
    return d_grad_y, d_x, d_weight, d_M


class BilinearConv2dFunction(torch.autograd.Function):
    """Fallback for torch < 2.4 (no ``torch.library.custom_op``): first-order autograd only.

    ``arguments``: the op's trailing :data:`OpArguments`.
    """

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, M: Tensor, arguments: OpArguments) -> Tensor:
        ctx.save_for_backward(x, weight, M)
        ctx.arguments = arguments
        return _forward_impl(x, weight, M, *arguments)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_y: Tensor):
        x, weight, M = ctx.saved_tensors
        grad_x, grad_weight, grad_M = _backward_impl(grad_y, x, weight, M, *ctx.arguments)
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
        granularity: str,
        diagonal: bool,
    ) -> Tensor:
        return _forward_impl(x, weight, M, stride, padding, dilation, granularity, diagonal)

    @torch.library.custom_op("fewshot_nsl::bilinear_conv2d_backward", mutates_args=())
    def _bilinear_conv2d_backward_op(
        grad_y: Tensor,
        x: Tensor,
        weight: Tensor,
        M: Tensor,
        stride: Sequence[int],
        padding: Sequence[int],
        dilation: Sequence[int],
        granularity: str,
        diagonal: bool,
    ) -> tuple[Tensor, Tensor, Tensor]:
        return _backward_impl(
            grad_y, x, weight, M, stride, padding, dilation, granularity, diagonal
        )

    @_bilinear_conv2d_op.register_fake
    def _(x, weight, M, stride, padding, dilation, granularity, diagonal):
        h_out, w_out = (
            (size + 2 * pad - dil * (k - 1) - 1) // step + 1
            for size, k, step, pad, dil in zip(
                x.shape[2:], weight.shape[2:], stride, padding, dilation
            )
        )
        return x.new_empty((x.shape[0], weight.shape[0], h_out, w_out))

    @_bilinear_conv2d_backward_op.register_fake
    def _(grad_y, x, weight, M, stride, padding, dilation, granularity, diagonal):
        contiguous = torch.contiguous_format
        return (
            torch.empty_like(x, memory_format=contiguous),
            torch.empty_like(weight, memory_format=contiguous),
            torch.empty_like(M, memory_format=contiguous),
        )

    def _setup_forward(ctx, inputs, output) -> None:
        x, weight, M, *arguments = inputs
        ctx.save_for_backward(x, weight, M)
        ctx.arguments = tuple(arguments)

    def _grad_forward(ctx, grad_y: Tensor):
        x, weight, M = ctx.saved_tensors
        grad_x, grad_weight, grad_M = _bilinear_conv2d_backward_op(
            grad_y, x, weight, M, *ctx.arguments
        )
        return (grad_x, grad_weight, grad_M) + (None,) * len(ctx.arguments)

    def _setup_backward(ctx, inputs, output) -> None:
        grad_y, x, weight, M, *arguments = inputs
        ctx.save_for_backward(grad_y, x, weight, M)
        ctx.arguments = tuple(arguments)

    def _grad_backward(ctx, gg_x, gg_weight, gg_M):
        grads = _double_backward(
            _bilinear_conv2d_op,
            _bilinear_conv2d_backward_op,
            ctx.saved_tensors,
            ctx.arguments,
            gg_x,
            gg_weight,
            gg_M,
        )
        return grads + (None,) * len(ctx.arguments)

    _bilinear_conv2d_op.register_autograd(_grad_forward, setup_context=_setup_forward)
    _bilinear_conv2d_backward_op.register_autograd(_grad_backward, setup_context=_setup_backward)


# --------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------
def bilinear_conv2d_custom_op(
    x: Tensor,
    weight: Tensor,
    M: Tensor,
    geometry: ConvGeometry,
    granularity: str,
    diagonal: bool,
) -> Tensor:
    """Bilinear convolution with a per-sample or per-location ``M`` through the custom op.

    Args:
        x: ``(B, C, H, W)``; float32, float64, float16 or bfloat16 (the kernels accumulate
            in float32, float64 for float64).
        weight: ``(O, C, kh, kw)``, same dtype/device as ``x``.
        M: ``granularity="sample"``: ``(B, HV, HV)``, diagonal ``(B, HV)``;
            ``"location"``: ``(B, H_out, W_out, HV, HV)``, diagonal ``(B, H_out, W_out, HV)``.
        geometry: canonical stride, padding, dilation (see
            :func:`~fewshot_nsl.ops.geometry.canonical_geometry`).
        granularity: ``"sample"`` or ``"location"``.
        diagonal: ``M`` holds only the diagonal of each ``HV x HV`` block.

    Returns:
        ``(B, O, H_out, W_out)``, no bias. Differentiable w.r.t. ``x``, ``weight`` and ``M``
        (to any order with torch >= 2.4). On a CUDA tensor the extension runs when it loaded
        (else the torch implementation); on CPU the C++ kernel runs the per-location form in
        float32/float64 when it built, the torch implementation everything else.

    Raises:
        ValueError: a bad granularity, shape, geometry, dtype or device (the message names
            the argument and what was expected).
    """
    validate(
        x,
        weight,
        M,
        None,
        geometry,
        granularity,
        diagonal,
        granularities=CUSTOM_OP_GRANULARITIES,
        check_dtypes=True,
    )
    stride, padding, dilation = ([int(v) for v in pair] for pair in geometry)
    arguments = (stride, padding, dilation, granularity, bool(diagonal))
    if HAS_CUSTOM_OP:
        return _bilinear_conv2d_op(x, weight, M, *arguments)
    return BilinearConv2dFunction.apply(x, weight, M, arguments)
