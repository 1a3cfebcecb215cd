"""The bilinear convolution in pure PyTorch: reference path, fast paths, explicit backward.

Every function takes canonical arguments (a :class:`~fewshot_nsl.ops.geometry.ConvGeometry`,
a granularity already checked by :func:`~fewshot_nsl.ops.geometry.validate`); the math and
the shapes of ``M`` are in :mod:`fewshot_nsl.ops`.

* :func:`bilinear_conv2d_reference`: ``F.unfold`` + ``einsum`` for every granularity; slow and
  obviously correct (every fast path is tested against it in float64).
* :func:`bilinear_conv2d_torch`: the fast paths. ``shared``/``channel`` fold ``M`` into an
  effective kernel (one ``F.conv2d``); ``sample`` either folds it into one kernel per image
  (one ``F.conv2d`` grouped over the batch) or, for small output maps, mixes the unfolded taps
  per image and contracts them in one 1x1 convolution (:func:`_sample_prefers_unfold` picks
  by layer shape); ``location`` mixes the unfolded taps per output location and contracts them
  with ``W`` in one 1x1 convolution (see :func:`_location_torch` for why this order). On the
  CPU the per-location form runs a fused C++ kernel instead when it builds
  (``csrc/location_cpu.cpp``, dispatched by :func:`fewshot_nsl.ops.bilinear.backend`).
* :func:`backward_torch`: ``(grad_x, grad_weight, grad_M)`` of the ``sample``/``location``
  forms by explicit formulas, the same decomposition as the CUDA kernels (the custom op's CPU
  backward, so the CPU tests also check the kernels' algebra).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from fewshot_nsl.ops.geometry import ConvGeometry, output_size


def unfold_taps(x: Tensor, kernel_size: tuple[int, int], geometry: ConvGeometry) -> Tensor:
    """Every tap's shifted input at the output resolution: ``(B, C, HV, L)`` (``F.unfold``)."""
    batch, channels = x.shape[:2]
    stride, padding, dilation = geometry
    cols = F.unfold(x, kernel_size, dilation=dilation, padding=padding, stride=stride)
    return cols.view(batch, channels, kernel_size[0] * kernel_size[1], cols.shape[-1])


def contract_taps(
    mixed: Tensor, weight: Tensor, out_hw: tuple[int, int], bias: Tensor | None = None
) -> Tensor:
    """Contract mixed taps ``(B, C, HV, L)`` with ``W``: one 1x1 conv over ``C * HV`` channels."""
    out_ch, channels, kh, kw = weight.shape
    mixed = mixed.reshape(mixed.shape[0], channels * kh * kw, out_hw[0], out_hw[1])
    return F.conv2d(mixed, weight.reshape(out_ch, channels * kh * kw, 1, 1), bias)


def _out_hw(x: Tensor, weight: Tensor, geometry: ConvGeometry) -> tuple[int, int]:
    return output_size(x.shape[2:], weight.shape[2:], *geometry)


# --------------------------------------------------------------------------------------------
# Reference path
# --------------------------------------------------------------------------------------------
def bilinear_conv2d_reference(
    x: Tensor,
    weight: Tensor,
    M: Tensor | None,
    geometry: ConvGeometry,
    granularity: str,
    diagonal: bool,
) -> Tensor:
    """Slow, obviously-correct path: unfold the taps, apply ``M``, contract with ``W``.

    No bias. Returns ``(B, O, H_out, W_out)``.
    """
    batch, channels = x.shape[:2]
    out_ch, _, kh, kw = weight.shape
    taps = kh * kw
    h_out, w_out = _out_hw(x, weight, geometry)
    cols = unfold_taps(x, (kh, kw), geometry)  # (B, C, HV, L)
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
# Fast paths
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
    x: Tensor, weight: Tensor, M: Tensor, geometry: ConvGeometry, diagonal: bool
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
    cols = unfold_taps(x, (kh, kw), geometry)
    if diagonal:
        # (B, 1, HV, L), contiguous so the broadcast over channels vectorises along L.
        m_taps = M.reshape(batch, locations, taps).transpose(1, 2).contiguous().unsqueeze(1)
        mixed = cols * m_taps
    else:
        m_blocks = M.reshape(batch, locations, taps, taps).permute(0, 2, 3, 1)  # (B, k, k', L)
        mixed = torch.einsum("bkql,bcql->bckl", m_blocks, cols)
    return contract_taps(mixed, weight, (h_out, w_out))


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
    geometry: ConvGeometry,
    diagonal: bool,
) -> Tensor:
    """Per-sample ``M`` by the cheaper exact path for this shape; ``bias`` fused in its conv."""
    if _sample_prefers_unfold(weight.shape[0], _out_hw(x, weight, geometry)):
        return _sample_unfold_torch(x, weight, M, geometry, diagonal, bias)
    return _sample_grouped_torch(x, weight, M, geometry, diagonal, bias)


def _sample_unfold_torch(
    x: Tensor,
    weight: Tensor,
    M: Tensor,
    geometry: ConvGeometry,
    diagonal: bool,
    bias: Tensor | None = None,
) -> Tensor:
    """Per-sample ``M`` on the input side: unfold the taps, mix them with ``M_b``, contract.

    ``x~[b, c, k, l] = sum_k' M[b, k, k'] x[b, c, k', l]`` (diagonal: one broadcast multiply),
    then one 1x1 convolution over the ``C * HV`` mixed channels, shared by the whole batch.
    """
    batch = x.shape[0]
    kh, kw = weight.shape[2:]
    cols = unfold_taps(x, (kh, kw), geometry)
    if diagonal:
        mixed = cols * M.view(batch, 1, kh * kw, 1)
    else:
        mixed = torch.matmul(M.unsqueeze(1), cols)  # (B, 1, k, k') @ (B, C, k', L)
    return contract_taps(mixed, weight, _out_hw(x, weight, geometry), bias)


def _sample_grouped_torch(
    x: Tensor,
    weight: Tensor,
    M: Tensor,
    geometry: ConvGeometry,
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
        *geometry,
        groups=batch,
    )
    return out.view(batch, out_ch, *out.shape[2:])


def bilinear_conv2d_torch(
    x: Tensor,
    weight: Tensor,
    M: Tensor | None,
    bias: Tensor | None,
    geometry: ConvGeometry,
    granularity: str,
    diagonal: bool,
) -> Tensor:
    """The fast pure-PyTorch paths; ``(B, O, H_out, W_out)``.

    The bias rides in the path's convolution where there is one over ``O`` outputs (every
    form but "location", whose 1x1 contraction it is added after).
    """
    if M is None or granularity in ("shared", "channel"):
        eff = effective_weight(weight, M, granularity, diagonal)
        return F.conv2d(x, eff, bias, *geometry)
    if granularity == "sample":
        return _sample_torch(x, weight, M, bias, geometry, diagonal)
    out = _location_torch(x, weight, M, geometry, diagonal)
    return out if bias is None else out + bias.view(1, -1, 1, 1)


# --------------------------------------------------------------------------------------------
# Explicit backward (the custom op's CPU backward)
# --------------------------------------------------------------------------------------------
def backward_torch(
    grad_y: Tensor,
    x: Tensor,
    weight: Tensor,
    M: Tensor,
    geometry: ConvGeometry,
    granularity: str,
    diagonal: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """``(grad_x, grad_weight, grad_M)`` of the "sample"/"location" forms by explicit formulas,
    the same decomposition as the CUDA kernels (docs/cuda.md)."""
    batch, channels, height, width = x.shape
    out_ch, _, kh, kw = weight.shape
    taps = kh * kw
    h_out, w_out = grad_y.shape[2:]
    stride, padding, dilation = geometry
    w_flat = weight.reshape(out_ch, channels, taps)
    if granularity == "location":
        positions = h_out * w_out
        gy = grad_y.reshape(batch, out_ch, positions)
        cols = unfold_taps(x, (kh, kw), geometry)
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
