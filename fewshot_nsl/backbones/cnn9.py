"""CNN-9: the NSL paper's CIFAR network (method doc §2)."""

from __future__ import annotations

import torch
from torch import nn

from fewshot_nsl.backbones.registry import ConvFactoryLike, register_backbone

INITS = ("pytorch", "he_normal")


def _conv_bn_relu(conv: nn.Module, channels: int, eps: float, momentum: float) -> nn.Sequential:
    return nn.Sequential(conv, nn.BatchNorm2d(channels, eps=eps, momentum=momentum), nn.ReLU())


def _he_normal_(conv: nn.Module) -> None:
    """The authors' kernel init: normal with std ``sqrt(2 / (kh * kw * C_in))`` (He, fan-in);
    a bias (they have none) starts at zero."""
    nn.init.kaiming_normal_(conv.weight, mode="fan_in", nonlinearity="relu")
    if getattr(conv, "bias", None) is not None:
        nn.init.zeros_(conv.bias)


class CNN9(nn.Module):
    """Root conv3×3 → 3 stages × 3 conv3×3 (32, 64, 128), BN + ReLU, 2×2 max-pool per stage.

    Only the nine stage convolutions come from the conv factory (they become NSL); the root
    convolution and the classifier stay plain ``nn.Conv2d``, as in the paper's dynamic network.

    * ``num_classes=None``: features are the globally averaged last map, ``D = widths[-1]``.
    * ``num_classes=K``: ends with the paper's classifier, a plain conv whose kernel covers the
      whole last map (``image_size // 8``, i.e. 4×4 on 32×32 CIFAR), giving logits ``(B, K)``;
      ``out_features = K``.

    ``batch_norm_eps``/``batch_norm_momentum`` set every BatchNorm (PyTorch's 1e-5/0.1 by
    default; the authors' TensorFlow values are 1e-3 and decay 0.999 = momentum 1e-3).
    ``init="he_normal"`` draws every kernel (root, the nine stage convolutions' ``weight``,
    classifier) from the authors' He-normal and zeroes the biases; ``"pytorch"`` keeps each
    layer's own initialisation. A dynamic layer's predictor keeps its own (scaled) init.
    """

    def __init__(
        self,
        conv_factory: ConvFactoryLike,
        in_channels: int,
        widths: tuple[int, int, int] = (32, 64, 128),
        root_width: int = 32,
        num_classes: int | None = None,
        image_size: int = 32,
        batch_norm_eps: float = 1e-5,
        batch_norm_momentum: float = 0.1,
        init: str = "pytorch",
    ) -> None:
        super().__init__()
        if init not in INITS:
            raise ValueError(f"cnn9 option 'init' must be one of {INITS}, got {init!r}")
        for name, value in (
            ("batch_norm_eps", batch_norm_eps),
            ("batch_norm_momentum", batch_norm_momentum),
        ):
            if (
                isinstance(value, bool)
                or not isinstance(value, (int, float))
                or not (0 < value <= 1)
            ):
                raise ValueError(f"cnn9 option {name!r} must be a number in (0, 1], got {value!r}")
        bn = {"eps": float(batch_norm_eps), "momentum": float(batch_norm_momentum)}
        widths = tuple(widths)
        if len(widths) != 3 or any(not isinstance(w, int) or w < 1 for w in widths):
            raise ValueError(f"cnn9 option 'widths' must be 3 positive ints, got {widths!r}")
        if num_classes is not None and (not isinstance(num_classes, int) or num_classes < 1):
            raise ValueError(
                f"cnn9 option 'num_classes' must be a positive int or None, got {num_classes!r}"
            )
        if num_classes is not None and (not isinstance(image_size, int) or image_size < 8):
            raise ValueError(f"cnn9 option 'image_size' must be an int >= 8, got {image_size!r}")
        root = nn.Conv2d(in_channels, root_width, 3, padding=1)
        self.root = _conv_bn_relu(root, root_width, **bn)
        stages = []
        channels = root_width
        for width in widths:
            layers = []
            for _ in range(3):
                conv = conv_factory(channels, width, 3, padding=1)
                layers.append(_conv_bn_relu(conv, width, **bn))
                channels = width
            stages.append(nn.Sequential(*layers, nn.MaxPool2d(2)))
        self.stages = nn.Sequential(*stages)
        self.classifier = (
            nn.Conv2d(channels, num_classes, image_size // 8) if num_classes is not None else None
        )
        if init == "he_normal":
            convs = [self.root[0], *(layer[0] for stage in self.stages for layer in stage[:3])]
            for conv in convs + ([self.classifier] if self.classifier is not None else []):
                _he_normal_(conv)
        self.widths = widths
        self.image_size = image_size
        self.out_features = num_classes if num_classes is not None else channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Images ``(B, C, H, W)`` → features ``(B, widths[-1])`` or logits ``(B, num_classes)``."""
        maps = self.stages(self.root(x))
        if self.classifier is None:
            return maps.mean(dim=(2, 3))
        logits = self.classifier(maps)
        if logits.shape[2:] != (1, 1):
            raise ValueError(
                f"cnn9 classifier built for image_size={self.image_size} got images of size "
                f"{tuple(x.shape[2:])}; set backbone option 'image_size'"
            )
        return logits.flatten(1)

    def extra_repr(self) -> str:
        return f"widths={self.widths}, out_features={self.out_features}"


@register_backbone("cnn9")
def cnn9(
    *,
    conv_factory: ConvFactoryLike,
    in_channels: int,
    widths: tuple[int, int, int] = (32, 64, 128),
    root_width: int = 32,
    num_classes: int | None = None,
    image_size: int = 32,
    batch_norm_eps: float = 1e-5,
    batch_norm_momentum: float = 0.1,
    init: str = "pytorch",
) -> CNN9:
    """CNN-9 (see :class:`CNN9`); options ``widths``, ``root_width``, ``num_classes``,
    ``image_size``, ``batch_norm_eps``, ``batch_norm_momentum``, ``init``."""
    return CNN9(
        conv_factory,
        in_channels,
        widths=widths,
        root_width=root_width,
        num_classes=num_classes,
        image_size=image_size,
        batch_norm_eps=batch_norm_eps,
        batch_norm_momentum=batch_norm_momentum,
        init=init,
    )
