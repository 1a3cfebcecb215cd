"""ResNet-12 as in MetaOptNet (Lee et al. 2019): four residual stages of 64-160-320-640."""

from __future__ import annotations

import torch
from torch import nn

from fewshot_nsl.backbones.pooling import activate_and_pool
from fewshot_nsl.backbones.registry import ConvFactoryLike, register_backbone


class ResidualStage(nn.Module):
    """3 × conv3×3 (factory) with BN and LeakyReLU(0.1), a 1×1 projection shortcut, 2×2 pool.

    The 1×1 shortcut stays a plain ``nn.Conv2d``: with a 1×1 kernel (HV = 1) a similarity
    block is a single number, which the BatchNorm after it absorbs.
    """

    def __init__(self, conv_factory: ConvFactoryLike, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv1 = conv_factory(in_channels, out_channels, 3, padding=1, bias=False)
        self.norm1 = nn.BatchNorm2d(out_channels)
        self.conv2 = conv_factory(out_channels, out_channels, 3, padding=1, bias=False)
        self.norm2 = nn.BatchNorm2d(out_channels)
        self.conv3 = conv_factory(out_channels, out_channels, 3, padding=1, bias=False)
        self.norm3 = nn.BatchNorm2d(out_channels)
        self.shortcut = nn.Sequential(
            nn.Conv2d(in_channels, out_channels, 1, bias=False), nn.BatchNorm2d(out_channels)
        )
        self.relu = nn.LeakyReLU(0.1)
        self.pool = nn.MaxPool2d(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C_in, H, W)`` → ``(B, C_out, H // 2, W // 2)``."""
        out = self.relu(self.norm1(self.conv1(x)))
        out = self.relu(self.norm2(self.conv2(out)))
        out = self.norm3(self.conv3(out))
        return activate_and_pool(self.relu, self.pool, out + self.shortcut(x))


class ResNet12(nn.Module):
    """ResNet-12 (MetaOptNet widths 64-160-320-640), global average pooling, ``D = widths[-1]``.

    DropBlock is omitted (MetaOptNet applies it in the last two stages): it is a regulariser
    for long supervised-style training and interacts badly with inner-loop adaptation; no
    dropout of any kind is applied here.
    """

    def __init__(
        self,
        conv_factory: ConvFactoryLike,
        in_channels: int,
        widths: tuple[int, ...] = (64, 160, 320, 640),
    ) -> None:
        super().__init__()
        widths = tuple(widths)
        if not widths or any(not isinstance(w, int) or w < 1 for w in widths):
            raise ValueError(f"resnet12 option 'widths' must be positive ints, got {widths!r}")
        channels = (in_channels, *widths)
        self.stages = nn.Sequential(
            *(ResidualStage(conv_factory, channels[i], channels[i + 1]) for i in range(len(widths)))
        )
        self.widths = widths
        self.out_features = widths[-1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Images ``(B, C, H, W)`` → features ``(B, widths[-1])``."""
        return self.stages(x).mean(dim=(2, 3))

    def extra_repr(self) -> str:
        return f"widths={self.widths}"


@register_backbone("resnet12")
def resnet12(
    *,
    conv_factory: ConvFactoryLike,
    in_channels: int,
    widths: tuple[int, ...] = (64, 160, 320, 640),
) -> ResNet12:
    """ResNet-12 (see :class:`ResNet12`); option ``widths``."""
    return ResNet12(conv_factory, in_channels, widths=widths)
