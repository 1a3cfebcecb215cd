"""Batched, seeded image transforms written with torch ops (torchvision is not importable here).

Every transform maps a float batch ``(N, C, H, W)`` to a float batch and takes an optional
``torch.Generator``; the sampler passes one seeded from the episode seed, so augmentation is
part of the episode's pure function and reproduces exactly. Random transforms draw one set of
parameters per image (not one per batch).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

__all__ = [
    "uint8_to_float",
    "to_float_normalized",
    "normalization_constants",
    "Transform",
    "Compose",
    "Normalize",
    "RandomCrop",
    "RandomHorizontalFlip",
    "ColorJitter",
    "Resize",
]


def _check_batch(images: torch.Tensor, who: str) -> None:
    if images.ndim != 4 or not images.is_floating_point():
        raise ValueError(
            f"{who}: expected a float batch (N, C, H, W), got {images.dtype} {tuple(images.shape)}"
        )


def _uniform(n: int, low: float, high: float, generator: torch.Generator | None) -> torch.Tensor:
    return torch.rand(n, generator=generator) * (high - low) + low


def uint8_to_float(
    pixels: torch.Tensor,
    scale: torch.Tensor | float = 1.0 / 255.0,
    bias: torch.Tensor | float = 0.0,
) -> torch.Tensor:
    """uint8 ``(N, H, W, C)`` pixels to contiguous float32 ``(N, C, H, W)`` ``pixels*scale+bias``.

    ``scale``/``bias`` are scalars or ``(1, C, 1, 1)`` tensors. One strided converting copy plus
    two in-place passes: the cheapest route found for this layout change (see
    docs/benchmarks/episodes.md).
    """
    if pixels.dtype != torch.uint8 or pixels.ndim != 4:
        raise ValueError(
            f"expected uint8 (N, H, W, C) pixels, got {pixels.dtype} {tuple(pixels.shape)}"
        )
    n, height, width, channels = pixels.shape
    images = torch.empty((n, channels, height, width), dtype=torch.float32, device=pixels.device)
    images.copy_(pixels.permute(0, 3, 1, 2))
    images.mul_(scale)
    if not (isinstance(bias, float) and bias == 0.0):
        images.add_(bias)
    return images


def normalization_constants(
    mean: Sequence[float], std: Sequence[float], device: torch.device | str | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(scale, bias)``, float32 ``(1, C, 1, 1)``, with ``pixel * scale + bias ==
    (pixel / 255 - mean) / std``: the constants of :meth:`Normalize.from_uint8` and
    :func:`to_float_normalized` (computed once, the same way, so both paths agree bit for bit).
    """
    mean_t = torch.tensor([float(m) for m in mean], dtype=torch.float32).view(1, -1, 1, 1)
    inv_std = (1.0 / torch.tensor([float(s) for s in std], dtype=torch.float64)).float()
    inv_std = inv_std.view(1, -1, 1, 1)
    return (inv_std / 255.0).to(device), (-mean_t * inv_std).to(device)


def to_float_normalized(
    pixels: torch.Tensor,
    mean: Sequence[float],
    std: Sequence[float],
    device: torch.device | str | None = None,
    non_blocking: bool = True,
) -> torch.Tensor:
    """uint8 ``(N, H, W, C)`` pixels (a sampler's ``output="uint8"`` batch) to normalised
    float32 ``(N, C, H, W)`` on ``device``: ``(pixels / 255 - mean) / std``.

    The uint8 batch crosses to the device first (4× fewer bytes than float32), then the
    layout change, conversion and normalisation run there. On CPU the result is bit-identical
    to the sampler's float path (the same constants and operations). ``mean=(0,)*C,
    std=(1,)*C`` gives plain ``pixels / 255`` scaling (``normalize="unit"``).
    """
    if pixels.dtype != torch.uint8 or pixels.ndim != 4:
        raise ValueError(
            f"expected uint8 (N, H, W, C) pixels, got {pixels.dtype} {tuple(pixels.shape)}"
        )
    if len(mean) != pixels.shape[-1] or len(std) != pixels.shape[-1]:
        raise ValueError(
            f"pixels have {pixels.shape[-1]} channels, mean/std have {len(mean)}/{len(std)}"
        )
    device = pixels.device if device is None else torch.device(device)
    pixels = pixels.to(device, non_blocking=non_blocking)
    scale, bias = normalization_constants(mean, std, device)
    return uint8_to_float(pixels, scale, bias)


class Transform:
    """Base class: ``transform(images, generator=None) -> images`` on ``(N, C, H, W)`` floats."""

    def __call__(
        self, images: torch.Tensor, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        raise NotImplementedError

    def extra_repr(self) -> str:
        return ""

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.extra_repr()})"


class Compose(Transform):
    """Apply ``transforms`` in order, all drawing from the same generator."""

    def __init__(self, transforms: Sequence[Transform]) -> None:
        self.transforms = list(transforms)

    def __call__(
        self, images: torch.Tensor, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        for transform in self.transforms:
            images = transform(images, generator)
        return images

    def extra_repr(self) -> str:
        return ", ".join(repr(t) for t in self.transforms)


class Normalize(Transform):
    """``(x - mean[c]) / std[c]`` per channel; deterministic (ignores the generator). A
    negative ``std`` flips the sign (mean 1, std -1: ``1 - x``)."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        if len(mean) != len(std) or len(mean) == 0:
            raise ValueError(
                f"Normalize: mean and std need the same, non-zero length: {mean}, {std}"
            )
        if any(s == 0 for s in std):  # a negative std flips the sign: "unit_inverted"
            raise ValueError(f"Normalize: std must be non-zero, got {tuple(std)}")
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        self._mean = torch.tensor(self.mean, dtype=torch.float32).view(1, -1, 1, 1)
        self._inv_std = (
            (1.0 / torch.tensor(self.std, dtype=torch.float64)).float().view(1, -1, 1, 1)
        )
        self._scale, self._bias = normalization_constants(self.mean, self.std)

    def __call__(
        self, images: torch.Tensor, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        _check_batch(images, "Normalize")
        if images.shape[1] != len(self.mean):
            raise ValueError(
                f"Normalize: images have {images.shape[1]} channels, mean/std have {len(self.mean)}"
            )
        return (images - self._mean.to(images)) * self._inv_std.to(images)

    def from_uint8(self, pixels: torch.Tensor) -> torch.Tensor:
        """``self(pixels / 255)`` for uint8 ``(N, H, W, C)`` pixels, fused into one conversion
        (equal up to float rounding); the sampler's fast path for the default transform."""
        if pixels.shape[-1] != len(self.mean):
            raise ValueError(
                f"Normalize: pixels have {pixels.shape[-1]} channels, "
                f"mean/std have {len(self.mean)}"
            )
        return uint8_to_float(pixels, self._scale, self._bias)

    def extra_repr(self) -> str:
        return f"mean={self.mean}, std={self.std}"


class RandomCrop(Transform):
    """Zero-pad by ``padding`` on each side, then crop a random ``size`` window per image."""

    def __init__(self, size: int | tuple[int, int], padding: int = 0) -> None:
        self.size = (size, size) if isinstance(size, int) else tuple(size)
        if padding < 0 or min(self.size) <= 0:
            raise ValueError(f"RandomCrop: need size > 0 and padding >= 0, got {size}, {padding}")
        self.padding = padding

    def __call__(
        self, images: torch.Tensor, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        _check_batch(images, "RandomCrop")
        padded = F.pad(images, [self.padding] * 4) if self.padding else images
        n, _, height, width = padded.shape
        crop_h, crop_w = self.size
        if crop_h > height or crop_w > width:
            raise ValueError(
                f"RandomCrop: crop {self.size} larger than the padded image {(height, width)}"
            )
        top = torch.randint(0, height - crop_h + 1, (n,), generator=generator)
        left = torch.randint(0, width - crop_w + 1, (n,), generator=generator)
        rows = (top[:, None] + torch.arange(crop_h))[:, :, None]  # (N, h, 1)
        cols = (left[:, None] + torch.arange(crop_w))[:, None, :]  # (N, 1, w)
        batch = torch.arange(n)[:, None, None]
        # Advanced indexing on dims 0, 2, 3 puts the channel dim last: (N, h, w, C).
        return padded.permute(0, 2, 3, 1)[batch, rows, cols].permute(0, 3, 1, 2).contiguous()

    def extra_repr(self) -> str:
        return f"size={self.size}, padding={self.padding}"


class RandomHorizontalFlip(Transform):
    """Mirror each image left-right with probability ``p``."""

    def __init__(self, p: float = 0.5) -> None:
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"RandomHorizontalFlip: p must lie in [0, 1], got {p}")
        self.p = p

    def __call__(
        self, images: torch.Tensor, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        _check_batch(images, "RandomHorizontalFlip")
        flip = torch.rand(len(images), generator=generator) < self.p
        return torch.where(flip[:, None, None, None], images.flip(-1), images)

    def extra_repr(self) -> str:
        return f"p={self.p}"


class ColorJitter(Transform):
    """Random brightness, contrast and saturation per image, for images in [0, 1].

    Each factor is drawn uniformly from ``[max(0, 1 - a), 1 + a]`` and the three are applied in
    that fixed order, clamping to [0, 1] after each (apply before :class:`Normalize`).
    Saturation needs 3 channels and is skipped for grayscale batches.
    """

    _LUMA = (0.299, 0.587, 0.114)  # ITU-R 601 weights for the grayscale image

    def __init__(self, brightness: float = 0.0, contrast: float = 0.0, saturation: float = 0.0):
        for name, amount in (
            ("brightness", brightness),
            ("contrast", contrast),
            ("saturation", saturation),
        ):
            if amount < 0:
                raise ValueError(f"ColorJitter: {name} must be >= 0, got {amount}")
        self.brightness, self.contrast, self.saturation = brightness, contrast, saturation

    def _gray(self, images: torch.Tensor) -> torch.Tensor:
        if images.shape[1] == 1:
            return images
        weights = torch.tensor(self._LUMA, dtype=images.dtype).view(1, 3, 1, 1)
        return (images * weights).sum(dim=1, keepdim=True)

    def __call__(
        self, images: torch.Tensor, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        _check_batch(images, "ColorJitter")
        n = len(images)
        if self.brightness:
            factor = _uniform(n, max(0.0, 1 - self.brightness), 1 + self.brightness, generator)
            images = (images * factor.view(n, 1, 1, 1)).clamp(0.0, 1.0)
        if self.contrast:
            factor = _uniform(n, max(0.0, 1 - self.contrast), 1 + self.contrast, generator)
            mean = self._gray(images).mean(dim=(1, 2, 3), keepdim=True)
            images = ((images - mean) * factor.view(n, 1, 1, 1) + mean).clamp(0.0, 1.0)
        if self.saturation and images.shape[1] == 3:
            factor = _uniform(n, max(0.0, 1 - self.saturation), 1 + self.saturation, generator)
            gray = self._gray(images)
            images = ((images - gray) * factor.view(n, 1, 1, 1) + gray).clamp(0.0, 1.0)
        return images

    def extra_repr(self) -> str:
        return (
            f"brightness={self.brightness}, contrast={self.contrast}, saturation={self.saturation}"
        )


class Resize(Transform):
    """Resize every image to ``size`` (bilinear, antialiased when shrinking); deterministic."""

    def __init__(self, size: int | tuple[int, int]) -> None:
        self.size = (size, size) if isinstance(size, int) else tuple(size)
        if min(self.size) <= 0:
            raise ValueError(f"Resize: size must be positive, got {size}")

    def __call__(
        self, images: torch.Tensor, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        _check_batch(images, "Resize")
        if tuple(images.shape[-2:]) == self.size:
            return images
        return F.interpolate(
            images, size=self.size, mode="bilinear", align_corners=False, antialias=True
        )

    def extra_repr(self) -> str:
        return f"size={self.size}"
