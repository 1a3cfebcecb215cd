"""Conv-4: the standard few-shot backbone of MAML and Prototypical Networks.

Two layouts of the same four blocks (Finn et al. 2017, cbfinn/maml ``utils.conv_block``):

* ``downsample="max_pool"`` (default; MAML's Mini-ImageNet network, ``--max_pool=True``, and
  ProtoNet's): conv3×3 stride 1 → BN → ReLU → 2×2 max-pool.
* ``downsample="stride"`` (MAML's Omniglot network, ``--max_pool=False``): conv3×3 stride 2
  with TensorFlow's ``SAME`` padding (asymmetric when the padding is odd: the extra row and
  column go after, see :class:`SamePad2d`) → BN → ReLU; with ``pool="avg"`` the features are
  the spatial mean of the last map (``tf.reduce_mean(hidden4, [1, 2])``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from fewshot_nsl.backbones.pooling import activate_and_pool
from fewshot_nsl.backbones.registry import ConvFactoryLike, register_backbone

POOLINGS = ("flatten", "avg")
DOWNSAMPLINGS = ("max_pool", "stride")
#: ``default``: PyTorch's own initialisation of the convolution (and of NSL layers);
#: ``xavier_uniform``: Glorot-uniform kernels and zero biases (cbfinn/maml's
#: ``xavier_initializer_conv2d``; fans ``k·k·C_in`` and ``k·k·C_out`` as PyTorch computes them).
INITS = ("default", "xavier_uniform")


class SamePad2d(nn.Module):
    """Zero padding of TensorFlow's ``padding='SAME'`` for a ``kernel_size``/``stride`` conv.

    Output side ``ceil(H / stride)``; total padding ``max((out − 1)·stride + k − H, 0)``, of
    which ``total // 2`` before and the rest after (TensorFlow's rule).
    """

    def __init__(self, kernel_size: int, stride: int) -> None:
        super().__init__()
        self.kernel_size = kernel_size
        self.stride = stride

    def _pads(self, size: int) -> tuple[int, int]:
        out = math.ceil(size / self.stride)
        total = max((out - 1) * self.stride + self.kernel_size - size, 0)
        return total // 2, total - total // 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C, H, W)`` → ``(B, C, H + pads, W + pads)``."""
        top, bottom = self._pads(x.shape[-2])
        left, right = self._pads(x.shape[-1])
        return F.pad(x, (left, right, top, bottom))


class ConvBlock(nn.Module):
    """conv3×3 (from the factory) → BatchNorm → ReLU → downsampling; halves H and W.

    ``downsample="max_pool"``: stride-1 conv with padding 1, then a 2×2 max-pool (floor).
    ``downsample="stride"``: stride-2 conv with TensorFlow ``SAME`` padding (ceil), no pool.
    """

    def __init__(
        self,
        conv_factory: ConvFactoryLike,
        in_channels: int,
        out_channels: int,
        downsample: str = "max_pool",
        norm_eps: float = 1e-5,
    ) -> None:
        super().__init__()
        if downsample == "max_pool":
            self.pad: nn.Module = nn.Identity()
            self.conv = conv_factory(in_channels, out_channels, 3, stride=1, padding=1, bias=True)
            self.pool: nn.Module = nn.MaxPool2d(2)
        else:
            self.pad = SamePad2d(3, 2)
            self.conv = conv_factory(in_channels, out_channels, 3, stride=2, padding=0, bias=True)
            self.pool = nn.Identity()
        self.norm = nn.BatchNorm2d(out_channels, eps=norm_eps)
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C_in, H, W)`` → ``(B, C_out, H // 2, W // 2)`` (``ceil`` with strides)."""
        return activate_and_pool(self.relu, self.pool, self.norm(self.conv(self.pad(x))))


class Conv4(nn.Module):
    """4 × [conv3×3 ``filters``, BN, ReLU, downsample] (Vinyals et al. 2016; Finn et al. 2017).

    ``filters=32`` is MAML's Mini-ImageNet network, 64 its Omniglot one and ProtoNet's. With
    ``pool="flatten"`` the features are the flattened last map, ``D = filters · s²`` with
    ``s`` the side after four halvings of ``image_size`` (``image_size // 16`` with max-pools:
    800 for 32 filters at 84×84), so ``image_size`` must be the side of the square input;
    ``pool="avg"`` averages over space, ``D = filters`` for any input size. ``downsample``,
    ``init`` and ``norm_eps`` (BatchNorm epsilon; TensorFlow's batch_norm uses 1e-3) are
    described in the module docstring.
    """

    def __init__(
        self,
        conv_factory: ConvFactoryLike,
        in_channels: int,
        filters: int = 32,
        image_size: int = 84,
        pool: str = "flatten",
        downsample: str = "max_pool",
        init: str = "default",
        norm_eps: float = 1e-5,
    ) -> None:
        super().__init__()
        if not isinstance(filters, int) or filters < 1:
            raise ValueError(f"conv4 option 'filters' must be a positive int, got {filters!r}")
        if pool not in POOLINGS:
            raise ValueError(f"conv4 option 'pool' must be one of {POOLINGS}, got {pool!r}")
        if downsample not in DOWNSAMPLINGS:
            raise ValueError(
                f"conv4 option 'downsample' must be one of {DOWNSAMPLINGS}, got {downsample!r}"
            )
        if init not in INITS:
            raise ValueError(f"conv4 option 'init' must be one of {INITS}, got {init!r}")
        if not isinstance(norm_eps, (int, float)) or norm_eps <= 0:
            raise ValueError(f"conv4 option 'norm_eps' must be a positive number, got {norm_eps!r}")
        if pool == "flatten" and (not isinstance(image_size, int) or image_size < 16):
            raise ValueError(
                f"conv4 option 'image_size' must be an int >= 16 (4 halvings), got {image_size!r}"
            )
        self.filters = filters
        self.image_size = image_size
        self.pool = pool
        self.downsample = downsample
        self.init = init
        widths = [in_channels, filters, filters, filters, filters]
        self.blocks = nn.Sequential(
            *(
                ConvBlock(conv_factory, widths[i], widths[i + 1], downsample, float(norm_eps))
                for i in range(4)
            )
        )
        if init == "xavier_uniform":
            self._xavier_uniform()
        side = image_size
        for _ in range(4):
            side = side // 2 if downsample == "max_pool" else math.ceil(side / 2)
        self.out_features = filters * side**2 if pool == "flatten" else filters

    def _xavier_uniform(self) -> None:
        """Glorot-uniform kernels and zero biases of the four block convolutions."""
        with torch.no_grad():
            for block in self.blocks:
                nn.init.xavier_uniform_(block.conv.weight)
                if getattr(block.conv, "bias", None) is not None:
                    block.conv.bias.zero_()

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
        return (
            f"filters={self.filters}, image_size={self.image_size}, pool={self.pool!r}, "
            f"downsample={self.downsample!r}, init={self.init!r}"
        )


@register_backbone("conv4")
def conv4(
    *,
    conv_factory: ConvFactoryLike,
    in_channels: int,
    filters: int = 32,
    image_size: int = 84,
    pool: str = "flatten",
    downsample: str = "max_pool",
    init: str = "default",
    norm_eps: float = 1e-5,
) -> Conv4:
    """Conv-4 (see :class:`Conv4`); options ``filters``, ``image_size``, ``pool``,
    ``downsample``, ``init``, ``norm_eps``."""
    return Conv4(
        conv_factory,
        in_channels,
        filters=filters,
        image_size=image_size,
        pool=pool,
        downsample=downsample,
        init=init,
        norm_eps=norm_eps,
    )
