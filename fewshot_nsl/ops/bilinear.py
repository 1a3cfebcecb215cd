"""The bilinear (neural-similarity) convolution: reference path, fast torch paths, dispatch.

For an input ``x`` of shape ``(B, C, H, W)``, a kernel ``weight`` of shape ``(O, C, kh, kw)``
(``HV = kh * kw`` taps, ordered row-major as :func:`torch.nn.functional.unfold` orders them)
and a similarity ``M``, the op computes

    y[b, o, p] = sum_c sum_{k, k'} W[o, c, k] * M_{k, k'} * x[b, c, p + k'] (+ bias[o])

where ``M`` is selected by ``granularity`` (full form / ``diagonal=True`` form):

* ``"shared"``:   ``(HV, HV)`` / ``(HV,)``: one block for every channel, sample and location;
* ``"channel"``:  ``(C, HV, HV)`` / ``(C, HV)``: one block per input channel ("disjoint");
* ``"sample"``:   ``(B, HV, HV)`` / ``(B, HV)``: one block per image;
* ``"location"``: ``(B, H_out, W_out, HV, HV)`` / ``(B, H_out, W_out, HV)``: per image and
  output location (dynamic NSL).

The granularity is explicit because shapes alone are ambiguous (e.g. ``C == B``).
A diagonal ``M`` is the full form with those numbers on the diagonal. ``M=None`` is the
identity (a plain convolution).

Paths
-----
* :func:`bilinear_conv2d_reference`: ``F.unfold`` + ``einsum`` for every granularity; slow and
  obviously correct (every fast path is tested against it in float64).
* :func:`bilinear_conv2d_torch`: the fast pure-PyTorch paths. ``shared``/``channel`` fold
  ``M`` into an effective kernel (one ``F.conv2d``); ``sample`` either folds it into one
  kernel per image (one ``F.conv2d`` grouped over the batch) or, for small output maps,
  mixes the unfolded taps per image and contracts them in one 1x1 convolution
  (:func:`_sample_prefers_unfold` picks by layer shape); ``location`` mixes the unfolded
  taps per output location and contracts them with ``W`` in one 1x1 convolution (see
  :func:`_location_torch` for why this order).
* the CUDA kernel in :mod:`fewshot_nsl.ops.cuda` (``sample``/``location`` only), used when the
  input is on a GPU and the extension built.

:func:`bilinear_conv2d` validates and canonicalises the arguments once and dispatches;
:func:`backend` says which path runs the per-sample/per-location forms on a device.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

Granularity = Literal["shared", "channel", "sample", "location"]
GRANULARITIES: tuple[str, ...] = ("shared", "channel", "sample", "location")
BACKENDS: tuple[str, ...] = ("auto", "torch", "reference", "cuda")
BACKEND_ENV = "FEWSHOT_NSL_BACKEND"

IntPair = int | Sequence[int]
Padding = int | Sequence[int] | str


# --------------------------------------------------------------------------------------------
# Argument handling (shared by every path)
# --------------------------------------------------------------------------------------------
def _pair(value: IntPair, name: str, minimum: int) -> tuple[int, int]:
    """``value`` as a pair of ints >= ``minimum``; ``ValueError`` naming ``name`` otherwise."""
    if isinstance(value, bool):
        raise ValueError(f"{name} must be an int or a pair of ints, got {value!r}")
    if isinstance(value, int):
        pair = (value, value)
    else:
        try:
            pair = tuple(int(v) for v in value)
        except TypeError:
            raise ValueError(f"{name} must be an int or a pair of ints, got {value!r}") from None
        if len(pair) != 2:
            raise ValueError(f"{name} must be an int or a pair of ints, got {value!r}")
    if min(pair) < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value!r}")
    return pair  # type: ignore[return-value]


def canonical_geometry(
    kernel_size: IntPair,
    stride: IntPair = 1,
    padding: Padding = 0,
    dilation: IntPair = 1,
) -> tuple[tuple[int, int], tuple[int, int], tuple[int, int]]:
    """Normalise ``stride``, ``padding``, ``dilation`` to int pairs, as every path expects.

    ``padding`` may be an int, a pair, ``"valid"`` (0) or ``"same"`` (stride 1 only, and the
    total padding ``dilation * (k - 1)`` must be even so it splits symmetrically; the
    asymmetric case that ``F.conv2d`` handles would need a separate pad everywhere, so it is
    refused with a ``ValueError`` instead).
    """
    kh, kw = _pair(kernel_size, "kernel_size", 1)
    stride_p = _pair(stride, "stride", 1)
    dilation_p = _pair(dilation, "dilation", 1)
    if isinstance(padding, str):
        if padding == "valid":
            padding_p = (0, 0)
        elif padding == "same":
            if stride_p != (1, 1):
                raise ValueError(f"padding='same' needs stride 1, got stride={stride!r}")
            totals = (dilation_p[0] * (kh - 1), dilation_p[1] * (kw - 1))
            if totals[0] % 2 or totals[1] % 2:
                raise ValueError(
                    "padding='same' is supported when dilation * (kernel_size - 1) is even, "
                    f"got kernel_size={(kh, kw)}, dilation={dilation_p}"
                )
            padding_p = (totals[0] // 2, totals[1] // 2)
        else:
            raise ValueError(f"padding must be an int, a pair, 'same' or 'valid', got {padding!r}")
    else:
        padding_p = _pair(padding, "padding", 0)
    return stride_p, padding_p, dilation_p


def output_size(
    input_size: IntPair,
    kernel_size: IntPair,
    stride: IntPair = 1,
    padding: Padding = 0,
    dilation: IntPair = 1,
) -> tuple[int, int]:
    """``(H_out, W_out)`` of a convolution, by the ``F.conv2d`` formula."""
    h, w = _pair(input_size, "input_size", 0)
    kh, kw = _pair(kernel_size, "kernel_size", 1)
    stride_p, padding_p, dilation_p = canonical_geometry(kernel_size, stride, padding, dilation)
    out = []
    for size, k, s, p, d in zip((h, w), (kh, kw), stride_p, padding_p, dilation_p):
        out.append((size + 2 * p - d * (k - 1) - 1) // s + 1)
    if min(out) < 1:
        raise ValueError(
            f"input of spatial size {(h, w)} is too small for kernel_size={(kh, kw)}, "
            f"stride={stride_p}, padding={padding_p}, dilation={dilation_p}"
        )
    return out[0], out[1]


def expected_m_shape(
    granularity: str,
    diagonal: bool,
    batch: int,
    channels: int,
    taps: int,
    out_hw: tuple[int, int],
) -> tuple[int, ...]:
    """The shape ``M`` must have for this granularity/form (see the module docstring)."""
    lead = {
        "shared": (),
        "channel": (channels,),
        "sample": (batch,),
        "location": (batch, out_hw[0], out_hw[1]),
    }[granularity]
    return lead + ((taps,) if diagonal else (taps, taps))


_SHAPE_NAMES = {
    "shared": "",
    "channel": "C, ",
    "sample": "B, ",
    "location": "B, H_out, W_out, ",
}


def _validate(
    x: Tensor,
    weight: Tensor,
    M: Tensor | None,
    bias: Tensor | None,
    granularity: str,
    diagonal: bool,
    out_hw: tuple[int, int],
) -> None:
    if x.dim() != 4:
        raise ValueError(f"x must have shape (B, C, H, W), got {tuple(x.shape)}")
    if weight.dim() != 4:
        raise ValueError(f"weight must have shape (O, C, kh, kw), got {tuple(weight.shape)}")
    if weight.shape[1] != x.shape[1]:
        raise ValueError(
            f"weight must have shape (O, C, kh, kw) with C = {x.shape[1]} input channels, "
            f"got {tuple(weight.shape)}"
        )
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(
            f"bias must have shape (O,) = ({weight.shape[0]},), got {tuple(bias.shape)}"
        )
    if granularity not in GRANULARITIES:
        raise ValueError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}")
    if M is None:
        return
    taps = weight.shape[2] * weight.shape[3]
    expected = expected_m_shape(granularity, diagonal, x.shape[0], x.shape[1], taps, out_hw)
    if tuple(M.shape) != expected:
        names = _SHAPE_NAMES[granularity] + ("HV" if diagonal else "HV, HV")
        raise ValueError(
            f"M for granularity={granularity!r}, diagonal={diagonal} must have shape "
            f"({names}) = {expected}, got {tuple(M.shape)}"
        )
    if M.dtype != x.dtype or M.device != x.device:
        raise ValueError(
            f"M must have x's dtype and device ({x.dtype}, {x.device}), got ({M.dtype}, {M.device})"
        )


def _unfold_taps(
    x: Tensor,
    kernel_size: tuple[int, int],
    stride: tuple[int, int],
    padding: tuple[int, int],
    dilation: tuple[int, int],
    locations: int,
) -> Tensor:
    """Every tap's shifted input at the output resolution: ``(B, C, HV, L)`` (``F.unfold``)."""
    batch, channels = x.shape[:2]
    cols = F.unfold(x, kernel_size, dilation=dilation, padding=padding, stride=stride)
    return cols.view(batch, channels, kernel_size[0] * kernel_size[1], locations)


def _contract_taps(
    mixed: Tensor, weight: Tensor, out_hw: tuple[int, int], bias: Tensor | None = None
) -> Tensor:
    """Contract mixed taps ``(B, C, HV, L)`` with ``W``: one 1x1 conv over ``C * HV`` channels."""
    out_ch, channels, kh, kw = weight.shape
    mixed = mixed.reshape(mixed.shape[0], channels * kh * kw, out_hw[0], out_hw[1])
    return F.conv2d(mixed, weight.reshape(out_ch, channels * kh * kw, 1, 1), bias)


# --------------------------------------------------------------------------------------------
# Reference path
# --------------------------------------------------------------------------------------------
def bilinear_conv2d_reference(
    x: Tensor,
    weight: Tensor,
    M: Tensor | None,
    stride: tuple[int, int],
    padding: tuple[int, int],
    dilation: tuple[int, int],
    granularity: str,
    diagonal: bool,
) -> Tensor:
    """Slow, obviously-correct path: unfold the taps, apply ``M``, contract with ``W``.

    Arguments are canonical (as produced by :func:`bilinear_conv2d`); no bias. Returns
    ``(B, O, H_out, W_out)``.
    """
    batch, channels = x.shape[:2]
    out_ch, _, kh, kw = weight.shape
    taps = kh * kw
    h_out, w_out = output_size(x.shape[2:], (kh, kw), stride, padding, dilation)
    cols = _unfold_taps(x, (kh, kw), stride, padding, dilation, h_out * w_out)  # (B, C, HV, L)
    if M is not None:
        full = torch.diag_embed(M) if diagonal else M
        equation = {
            "shared": "kq,bcql->bckl",
            "channel": "ckq,bcql->bckl",
            "sample": "bkq,bcql->bckl",
            "location": "blkq,bcql->bckl",
        }[granularity]
        if granularity == "location":
            full = full.reshape(batch, h_out * w_out, taps, taps)
        cols = torch.einsum(equation, full, cols)
    out = torch.einsum("ock,bckl->bol", weight.reshape(out_ch, channels, taps), cols)
    return out.reshape(batch, out_ch, h_out, w_out)


# --------------------------------------------------------------------------------------------
# Fast torch paths
# --------------------------------------------------------------------------------------------
def effective_weight(weight: Tensor, M: Tensor | None, granularity: str, diagonal: bool) -> Tensor:
    """Fold ``M`` into the kernel: ``W_eff[..., o, c, k'] = sum_k W[o, c, k] M[..., k, k']``.

    ``granularity`` "shared"/"channel" give ``(O, C, kh, kw)``; "sample" gives
    ``(B, O, C, kh, kw)`` (one kernel per image). ``M=None`` returns ``weight``.
    """
    if M is None:
        return weight
    out_ch, channels, kh, kw = weight.shape
    flat = weight.reshape(out_ch, channels, kh * kw)
    if granularity == "shared":
        eff = flat * M if diagonal else flat @ M
    elif granularity == "channel":
        # (O, C, 1, HV) @ (C, HV, HV) broadcasts over O: one block per input channel.
        eff = flat * M if diagonal else (flat.unsqueeze(2) @ M).squeeze(2)
    elif granularity == "sample":
        if diagonal:
            # (1, O*C, HV) * (B, 1, HV): fewer broadcast dimensions vectorise better.
            eff = flat.reshape(1, out_ch * channels, kh * kw) * M.unsqueeze(1)
        else:
            eff = torch.einsum("ock,bkq->bocq", flat, M)
        return eff.reshape(M.shape[0], out_ch, channels, kh, kw)
    else:
        raise ValueError(
            f"effective_weight supports granularity 'shared', 'channel' or 'sample', "
            f"got {granularity!r}"
        )
    return eff.reshape(out_ch, channels, kh, kw)


def _location_torch(
    x: Tensor,
    weight: Tensor,
    M: Tensor,
    stride: tuple[int, int],
    padding: tuple[int, int],
    dilation: tuple[int, int],
    diagonal: bool,
) -> Tensor:
    """Per-location ``M``: mix the shifted taps per location, then contract with ``W``.

    ``F.unfold`` gathers every tap's shifted input at the output resolution once
    (``(B, C, HV, L)``; stride and dilation come for free). ``M`` is applied on the *input*
    side, ``x~[b, c, k, l] = sum_k' M[b, l, k, k'] x[b, c, k', l]``, which costs ``C * HV``
    (diagonal: one broadcast multiply) or ``C * HV^2`` (full) multiply-adds per location on
    top of the convolution's ``O * C * HV``. Mixing the per-tap *responses* instead (the
    authors' 1x1-conv layout) needs all ``HV^2`` (tap, shift) response pairs for the full form,
    and ``O * HV`` rather than ``C * HV`` for the diagonal one. The contraction with ``W`` is a
    1x1 convolution over the ``C * HV`` mixed channels, which runs on the same optimised
    kernels (oneDNN/cuDNN) as ``F.conv2d`` for both passes.
    """
    batch = x.shape[0]
    kh, kw = weight.shape[2:]
    taps = kh * kw
    h_out, w_out = M.shape[1:3]
    locations = h_out * w_out
    cols = _unfold_taps(x, (kh, kw), stride, padding, dilation, locations)
    if diagonal:
        # (B, 1, HV, L), contiguous so the broadcast over channels vectorises along L.
        m_taps = M.reshape(batch, locations, taps).transpose(1, 2).contiguous().unsqueeze(1)
        mixed = cols * m_taps
    else:
        m_blocks = M.reshape(batch, locations, taps, taps).permute(0, 2, 3, 1)  # (B, k, k', L)
        mixed = torch.einsum("bkql,bcql->bckl", m_blocks, cols)
    return _contract_taps(mixed, weight, (h_out, w_out))


def _sample_prefers_unfold(out_channels: int, out_hw: tuple[int, int]) -> bool:
    """Whether the per-sample op should take the unfold path for this layer shape.

    Both per-sample paths do the convolution's ``B * O * C * HV * L`` multiply-adds
    (``L = H_out * W_out``); they differ in the extra per-image tensor they build and
    differentiate: the grouped conv materialises ``B`` effective kernels (``B * O * C * HV``
    numbers), the unfold path ``B`` tap stacks (``B * C * HV * L``). So unfold is the lighter
    one when the output map has no more locations than the layer has filters, which is where
    a grouped conv (one small group per image) is also least efficient. Measured on a 2-core
    CPU (Conv-4-32, 5-way, second-order MAML): 4x4 maps faster by unfold, 8x8 and larger
    by the grouped conv (docs/benchmarks/ops.md).
    """
    return out_hw[0] * out_hw[1] <= out_channels


def _sample_torch(
    x: Tensor,
    weight: Tensor,
    M: Tensor,
    bias: Tensor | None,
    stride: tuple[int, int],
    padding: tuple[int, int],
    dilation: tuple[int, int],
    diagonal: bool,
) -> Tensor:
    """Per-sample ``M`` by the cheaper exact path for this shape; ``bias`` fused in its conv."""
    out_hw = output_size(x.shape[2:], weight.shape[2:], stride, padding, dilation)
    if _sample_prefers_unfold(weight.shape[0], out_hw):
        return _sample_unfold_torch(x, weight, M, stride, padding, dilation, diagonal, bias)
    return _sample_grouped_torch(x, weight, M, stride, padding, dilation, diagonal, bias)


def _sample_unfold_torch(
    x: Tensor,
    weight: Tensor,
    M: Tensor,
    stride: tuple[int, int],
    padding: tuple[int, int],
    dilation: tuple[int, int],
    diagonal: bool,
    bias: Tensor | None = None,
) -> Tensor:
    """Per-sample ``M`` on the input side: unfold the taps, mix them with ``M_b``, contract.

    ``x~[b, c, k, l] = sum_k' M[b, k, k'] x[b, c, k', l]`` (diagonal: one broadcast multiply),
    then one 1x1 convolution over the ``C * HV`` mixed channels, shared by the whole batch.
    """
    batch = x.shape[0]
    kh, kw = weight.shape[2:]
    taps = kh * kw
    h_out, w_out = output_size(x.shape[2:], (kh, kw), stride, padding, dilation)
    cols = _unfold_taps(x, (kh, kw), stride, padding, dilation, h_out * w_out)
    if diagonal:
        mixed = cols * M.view(batch, 1, taps, 1)
    else:
        mixed = torch.matmul(M.unsqueeze(1), cols)  # (B, 1, k, k') @ (B, C, k', L)
    return _contract_taps(mixed, weight, (h_out, w_out), bias)


def _sample_grouped_torch(
    x: Tensor,
    weight: Tensor,
    M: Tensor,
    stride: tuple[int, int],
    padding: tuple[int, int],
    dilation: tuple[int, int],
    diagonal: bool,
    bias: Tensor | None = None,
) -> Tensor:
    """Per-sample ``M`` folded into per-image kernels, applied by one conv grouped over ``B``."""
    batch, channels, height, width = x.shape
    eff = effective_weight(weight, M, "sample", diagonal)  # (B, O, C, kh, kw)
    out_ch = weight.shape[0]
    # One grouped conv: image b is group b, convolved with its own kernel.
    out = F.conv2d(
        x.reshape(1, batch * channels, height, width),
        eff.reshape(batch * out_ch, channels, *weight.shape[2:]),
        None if bias is None else bias.repeat(batch),
        stride,
        padding,
        dilation,
        groups=batch,
    )
    return out.view(batch, out_ch, *out.shape[2:])


def bilinear_conv2d_torch(
    x: Tensor,
    weight: Tensor,
    M: Tensor | None,
    stride: tuple[int, int],
    padding: tuple[int, int],
    dilation: tuple[int, int],
    granularity: str,
    diagonal: bool,
) -> Tensor:
    """The fast pure-PyTorch paths (canonical arguments, no bias); ``(B, O, H_out, W_out)``."""
    if M is None or granularity in ("shared", "channel"):
        eff = effective_weight(weight, M, granularity, diagonal)
        return F.conv2d(x, eff, None, stride, padding, dilation)
    if granularity == "sample":
        return _sample_torch(x, weight, M, None, stride, padding, dilation, diagonal)
    return _location_torch(x, weight, M, stride, padding, dilation, diagonal)


# --------------------------------------------------------------------------------------------
# Dispatch
# --------------------------------------------------------------------------------------------
_warned_cuda_unavailable = False


def _forced_backend() -> str:
    value = os.environ.get(BACKEND_ENV, "auto").strip().lower() or "auto"
    if value not in BACKENDS:
        raise ValueError(
            f"environment variable {BACKEND_ENV} must be one of {BACKENDS}, got {value!r}"
        )
    return value


def _cuda_module():
    """The CUDA extension module, or ``None`` when it is missing (not yet built/landed)."""
    try:
        from fewshot_nsl.ops import cuda as cuda_module
    except ImportError:
        return None
    return cuda_module


def _cuda_usable() -> bool:
    module = _cuda_module()
    return module is not None and bool(module.cuda_available())


def backend(device: torch.device | str = "cpu") -> str:
    """Which path runs the per-sample/per-location forms on ``device``.

    Returns ``"cuda"``, ``"torch"`` or ``"reference"``. The environment variable
    ``FEWSHOT_NSL_BACKEND`` (``auto`` | ``torch`` | ``reference`` | ``cuda``) forces one;
    ``auto`` picks the CUDA kernel for CUDA tensors when it is available, the torch path
    otherwise. ``cuda`` forced on a CPU device, or without a usable extension, falls back to
    ``torch`` with a single warning (never an error). The "shared"/"channel" forms always run
    the effective-kernel torch path (already a single plain convolution), except under
    ``reference``.
    """
    global _warned_cuda_unavailable
    forced = _forced_backend()
    if forced in ("torch", "reference"):
        return forced
    on_cuda = torch.device(device).type == "cuda"
    if forced == "auto":
        return "cuda" if on_cuda and _cuda_usable() else "torch"
    # forced == "cuda"
    if on_cuda and _cuda_usable():
        return "cuda"
    if not _warned_cuda_unavailable:
        _warned_cuda_unavailable = True
        reason = "the extension is unavailable" if on_cuda else "the input is not on a CUDA device"
        warnings.warn(
            f"{BACKEND_ENV}=cuda but {reason}; using the torch path instead",
            RuntimeWarning,
            stacklevel=2,
        )
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
    stride_p, padding_p, dilation_p = canonical_geometry(kernel, stride, padding, dilation)
    if x.dim() != 4:
        raise ValueError(f"x must have shape (B, C, H, W), got {tuple(x.shape)}")
    out_hw = output_size(x.shape[2:], kernel, stride_p, padding_p, dilation_p)
    _validate(x, weight, M, bias, granularity, diagonal, out_hw)

    per_image = M is not None and granularity in ("sample", "location")
    path = backend(x.device) if per_image else _forced_backend()
    if path == "reference":
        out = bilinear_conv2d_reference(
            x, weight, M, stride_p, padding_p, dilation_p, granularity, diagonal
        )
    elif path == "cuda" and per_image:
        module = _cuda_module()
        assert module is not None  # backend() returned "cuda" only if it imported
        # The custom op does not take part in autocast: give it one dtype (x's).
        out = module.bilinear_conv2d_cuda(
            x, weight.to(x.dtype), M.to(x.dtype), stride_p, padding_p, dilation_p,
            granularity, diagonal,
        )
    else:
        if M is None or granularity in ("shared", "channel"):
            # A single conv: let F.conv2d fuse the bias.
            eff = effective_weight(weight, M, granularity, diagonal)
            return F.conv2d(x, eff, bias, stride_p, padding_p, dilation_p)
        if granularity == "sample":  # the bias rides in the path's convolution
            return _sample_torch(x, weight, M, bias, stride_p, padding_p, dilation_p, diagonal)
        out = bilinear_conv2d_torch(
            x, weight, M, stride_p, padding_p, dilation_p, granularity, diagonal
        )
    if bias is not None:
        out = out + bias.view(1, -1, 1, 1)
    return out
