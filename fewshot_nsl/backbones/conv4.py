"""Conv-4: the standard few-shot backbone of MAML and Prototypical Networks."""

from __future__ import annotations

import torch
from torch import nn

from fewshot_nsl.backbones.registry import ConvFactoryLike, register_backbone

POOLINGS = ("flatten", "avg")


class ConvBlock(nn.Module):
    """conv3×3 (from the factory) → BatchNorm → ReLU → 2×2 max-pool; halves H and W."""

    def __init__(self, conv_factory: ConvFactoryLike, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv = conv_factory(in_channels, out_channels, 3, stride=1, padding=1, bias=True)
        self.norm = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU()
        self.pool = nn.MaxPool2d(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C_in, H, W)`` → ``(B, C_out, H // 2, W // 2)``."""
        return self.pool(self.relu(self.norm(self.conv(x))))


class Conv4(nn.Module):
    """4 × [conv3×3 ``filters``, BN, ReLU, 2×2 max-pool] (Vinyals et al. 2016; Finn et al. 2017).

    ``filters=32`` is MAML's network, ``filters=64`` ProtoNet's. With ``pool="flatten"`` (the
    MAML setting) the features are the flattened last map, ``D = filters · (image_size // 16)²``
    (800 for 32 filters at 84×84), so ``image_size`` must be the side of the square input;
    ``pool="avg"`` averages over space, ``D = filters`` for any input size.
    """

    def __init__(
        self,
        conv_factory: ConvFactoryLike,
        in_channels: int,
        filters: int = 32,
        image_size: int = 84,
        pool: str = "flatten",
    ) -> None:
        super().__init__()
        if not isinstance(filters, int) or filters < 1:
            raise ValueError(f"conv4 option 'filters' must be a positive int, got {filters!r}")
        if pool not in POOLINGS:
            raise ValueError(f"conv4 option 'pool' must be one of {POOLINGS}, got {pool!r}")
        if pool == "flatten" and (not isinstance(image_size, int) or image_size < 16):
            raise ValueError(
                f"conv4 option 'image_size' must be an int >= 16 (4 halvings), got {image_size!r}"
            )
        self.filters = filters
        self.image_size = image_size
        self.pool = pool
        widths = [in_channels, filters, filters, filters, filters]
        self.blocks = nn.Sequential(
            *(ConvBlock(conv_factory, widths[i], widths[i + 1]) for i in range(4))
        )
        self.out_features = filters * (image_size // 16) ** 2 if pool == "flatten" else filters

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Images ``(B, C, H, W)`` → features ``(B, out_features)``."""
        maps = self.blocks(x)
        if self.pool == "avg":
            return maps.mean(dim=(2, 3))
        features = maps.flatten(1)
        if features.shape[1] != self.out_features:
            raise ValueError(
                f"conv4 built for image_size={self.image_size} ({self.out_features} features) got "
                f"images of size {tuple(x.shape[2:])} ({features.shape[1]} features); set "
                "backbone option 'image_size' to the input side, or pool='avg'"
            )
        return features

    def extra_repr(self) -> str:
        return f"filters={self.filters}, image_size={self.image_size}, pool={self.pool!r}"


@register_backbone("conv4")
def conv4(
    *,
    conv_factory: ConvFactoryLike,
    in_channels: int,
    filters: int = 32,
    image_size: int = 84,
    pool: str = "flatten",
) -> Conv4:
    """Conv-4 (see :class:`Conv4`); options ``filters``, ``image_size``, ``pool``."""
    return Conv4(conv_factory, in_channels, filters=filters, image_size=image_size, pool=pool)
