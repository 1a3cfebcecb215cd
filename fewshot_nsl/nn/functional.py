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
    sq = F.conv2d(x.pow(2).sum(dim=1, keepdim=True), ones, None, stride, padding, dilation)
    return (sq + eps).sqrt()
