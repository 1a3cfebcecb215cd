"""Small functional helpers shared by the NSL layers."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

PATCH_NORM_EPS = 1e-4


def patch_norm(
    x: Tensor,
    kernel_size: tuple[int, int],
    stride: tuple[int, int] | int = 1,
    padding: tuple[int, int] | int | str = 0,
    dilation: tuple[int, int] | int = 1,
    eps: float = PATCH_NORM_EPS,
) -> Tensor:
    """Per-patch input norm ``sqrt(sum over channels and the kh x kw patch of x^2 + eps)``.

    ``x``: ``(B, C, H, W)``; returns ``(B, 1, H_out, W_out)`` at the geometry of a convolution
    with these arguments (SphereNet's input norm, computed per patch as in method doc §1).
    """
    ones = torch.ones(1, 1, *kernel_size, dtype=x.dtype, device=x.device)
    squares = x.pow(2).sum(dim=1, keepdim=True)
    if padding == "same" and any(k % 2 == 0 for k in kernel_size):
        # Asymmetric "same" padding, done here as conv2d would do it (the extra zero row and
        # column after the image), without conv2d's warning about even kernels.
        squares, padding = F.pad(squares, _same_padding(kernel_size, dilation)), 0
    sq = F.conv2d(squares, ones, None, stride, padding, dilation)
    return (sq + eps).sqrt()


def _same_padding(
    kernel_size: tuple[int, int], dilation: tuple[int, int] | int
) -> tuple[int, int, int, int]:
    """``F.pad`` widths (left, right, top, bottom) keeping a stride-1 convolution's output at
    the input size: ``dilation * (k - 1)`` zeros per axis, the odd one after the image."""
    dilations = (dilation, dilation) if isinstance(dilation, int) else dilation
    (top, bottom), (left, right) = (
        (total // 2, total - total // 2)
        for total in (d * (k - 1) for d, k in zip(dilations, kernel_size))
    )
    return left, right, top, bottom
