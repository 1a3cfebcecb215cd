"""Geometry and argument checking shared by every path of the bilinear convolution.

* :class:`ConvGeometry`: a convolution's canonical ``(stride, padding, dilation)`` int pairs,
  the one value every Python path takes (built once by :func:`canonical_geometry`);
* :func:`output_size` and :func:`expected_m_shape`: the output grid and the shape ``M`` must
  have for a granularity (``shared | channel | sample | location``);
* :func:`validate`: the one argument check, used by the dispatcher and the custom op (public
  within :mod:`fewshot_nsl.ops`, not exported by the package).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal, NamedTuple

import torch
from torch import Tensor

Granularity = Literal["shared", "channel", "sample", "location"]
#: Which elements share one similarity block ``M``: everything ("shared"), each input channel
#: ("channel"), each image ("sample"), each image and output location ("location").
GRANULARITIES: tuple[str, ...] = ("shared", "channel", "sample", "location")
SUPPORTED_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)

IntPair = int | Sequence[int]
Padding = int | Sequence[int] | str


class ConvGeometry(NamedTuple):
    """A convolution's canonical geometry: ``stride``, ``padding``, ``dilation`` as int pairs."""

    stride: tuple[int, int]
    padding: tuple[int, int]
    dilation: tuple[int, int]


def to_pair(value: IntPair, name: str, minimum: int) -> tuple[int, int]:
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
) -> ConvGeometry:
    """Normalise ``stride``, ``padding``, ``dilation`` to int pairs, as every path expects.

    ``padding`` may be an int, a pair, ``"valid"`` (0) or ``"same"`` (stride 1 only, and the
    total padding ``dilation * (k - 1)`` must be even so it splits symmetrically; the
    asymmetric case that ``F.conv2d`` handles would need a separate pad everywhere, so it is
    refused with a ``ValueError`` instead).
    """
    kh, kw = to_pair(kernel_size, "kernel_size", 1)
    stride_p = to_pair(stride, "stride", 1)
    dilation_p = to_pair(dilation, "dilation", 1)
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
        padding_p = to_pair(padding, "padding", 0)
    return ConvGeometry(stride_p, padding_p, dilation_p)


def output_size(
    input_size: IntPair,
    kernel_size: IntPair,
    stride: IntPair = 1,
    padding: Padding = 0,
    dilation: IntPair = 1,
) -> tuple[int, int]:
    """``(H_out, W_out)`` of a convolution, by the ``F.conv2d`` formula."""
    h, w = to_pair(input_size, "input_size", 0)
    kh, kw = to_pair(kernel_size, "kernel_size", 1)
    geometry = canonical_geometry(kernel_size, stride, padding, dilation)
    out = []
    for size, k, s, p, d in zip((h, w), (kh, kw), *geometry):
        out.append((size + 2 * p - d * (k - 1) - 1) // s + 1)
    if min(out) < 1:
        raise ValueError(
            f"input of spatial size {(h, w)} is too small for kernel_size={(kh, kw)}, "
            f"stride={geometry.stride}, padding={geometry.padding}, "
            f"dilation={geometry.dilation}"
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
    """The shape ``M`` must have for this granularity/form (see :mod:`fewshot_nsl.ops`)."""
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


def validate(
    x: Tensor,
    weight: Tensor,
    M: Tensor | None,
    bias: Tensor | None,
    geometry: ConvGeometry,
    granularity: str,
    diagonal: bool,
    granularities: tuple[str, ...] = GRANULARITIES,
    check_dtypes: bool = False,
) -> tuple[int, int]:
    """Check every argument of the op; return the output grid ``(H_out, W_out)``.

    ``granularities`` narrows the accepted forms and ``check_dtypes`` also requires a
    floating ``x`` and ``weight`` of ``x``'s dtype and device (the custom op takes
    "sample"/"location" only and one dtype). Raises ``ValueError`` with one line naming the
    argument and what was expected.
    """
    if granularity not in granularities:
        raise ValueError(f"granularity must be one of {granularities}, got {granularity!r}")
    if x.dim() != 4:
        raise ValueError(f"x must have shape (B, C, H, W), got {tuple(x.shape)}")
    if weight.dim() != 4 or weight.shape[1] != x.shape[1]:
        raise ValueError(
            f"weight must have shape (O, C, kh, kw) with C = {x.shape[1]} input channels, "
            f"got {tuple(weight.shape)}"
        )
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(
            f"bias must have shape (O,) = ({weight.shape[0]},), got {tuple(bias.shape)}"
        )
    for name, pair in zip(ConvGeometry._fields, geometry):
        if len(pair) != 2:
            raise ValueError(f"{name} must be a pair of ints, got {pair!r}")
    out_hw = output_size(x.shape[2:], weight.shape[2:], *geometry)
    if M is None:
        return out_hw
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
    if check_dtypes:
        if x.dtype not in SUPPORTED_DTYPES:
            raise ValueError(f"x must be float32, float64, float16 or bfloat16, got {x.dtype}")
        if weight.dtype != x.dtype or weight.device != x.device:
            raise ValueError(
                f"weight must have x's dtype and device ({x.dtype}, {x.device}), "
                f"got ({weight.dtype}, {weight.device})"
            )
    return out_hw
