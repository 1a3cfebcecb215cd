"""Backbones: Conv-4, ResNet-12, CNN-9 and user plug-ins, all built through one conv factory."""

from fewshot_nsl.backbones.cnn9 import CNN9
from fewshot_nsl.backbones.conv4 import Conv4
from fewshot_nsl.backbones.registry import (
    ConvFactoryLike,
    backbone_options,
    build_backbone,
    feature_dim,
    list_backbones,
    make_conv_factory,
    register_backbone,
)
from fewshot_nsl.backbones.resnet12 import ResNet12

__all__ = [
    "CNN9",
    "Conv4",
    "ConvFactoryLike",
    "ResNet12",
    "backbone_options",
    "build_backbone",
    "feature_dim",
    "list_backbones",
    "make_conv_factory",
    "register_backbone",
]
