"""The classifier trained on CIFAR: a backbone from the registry, built through the conv factory.

``model.head`` chooses where the logits come from:

* ``"backbone"``: the backbone ends with its own classifier (CNN-9's plain 4×4 conv, method doc
  §2); it receives ``num_classes`` and ``image_size`` as options.
* ``"linear"``: a plain ``nn.Linear`` on the backbone's ``(B, D)`` features (any backbone,
  e.g. ResNet-12).
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from fewshot_nsl.backbones import build_backbone, feature_dim

HEADS = ("backbone", "linear")


class SupervisedNet(nn.Module):
    """Images ``(B, C, H, W)`` (normalised) → logits ``(B, num_classes)``."""

    def __init__(self, backbone: nn.Module, head: nn.Module | None = None) -> None:
        super().__init__()
        self.backbone = backbone
        # Identity keeps the state-dict keys of "backbone" heads free of an empty head entry.
        self.head = head if head is not None else nn.Identity()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(images))


def build_model(
    model: Mapping[str, Any], *, image_shape: tuple[int, int, int], num_classes: int
) -> SupervisedNet:
    """Build the classifier of ``model = {"backbone", "backbone_options", "conv", "head"}``.

    Args:
        model: the config's ``model`` section; ``conv`` holds :class:`fewshot_nsl.nn.ConvSpec`
            fields (plain / static / dynamic NSL for the backbone's NSL-able convolutions).
        image_shape: ``(C, H, W)`` of the input images.
        num_classes: number of output logits.
    """
    head = model.get("head", "backbone")
    if head not in HEADS:
        raise ValueError(f"model.head must be one of {list(HEADS)}, got {head!r}")
    channels, height, width = image_shape
    options = dict(model.get("backbone_options") or {})
    if head == "backbone":
        if height != width:
            raise ValueError(f"model.head='backbone' needs square images, got {height}x{width}")
        options.setdefault("num_classes", num_classes)
        options.setdefault("image_size", height)
        if options["num_classes"] != num_classes:
            raise ValueError(
                f"model.backbone_options.num_classes={options['num_classes']} but the dataset "
                f"has {num_classes} classes"
            )
    backbone = build_backbone(
        model["backbone"], in_channels=channels, conv=dict(model.get("conv") or {}), **options
    )
    if head == "backbone":
        return SupervisedNet(backbone)
    return SupervisedNet(backbone, nn.Linear(feature_dim(backbone, image_shape), num_classes))


def model_from_config(config: Mapping[str, Any]) -> SupervisedNet:
    """:func:`build_model` for a resolved run config whose ``data.num_classes`` and
    ``data.image_shape`` are filled in (as the trainer records them, so checkpoints suffice)."""
    data = config["data"]
    if data.get("num_classes") is None or data.get("image_shape") is None:
        raise ValueError("config data.num_classes and data.image_shape must be filled in")
    return build_model(
        config["model"],
        image_shape=tuple(data["image_shape"]),
        num_classes=int(data["num_classes"]),
    )


def plain_twin_config(model: Mapping[str, Any]) -> dict[str, Any]:
    """The same ``model`` section with plain convolutions (the CNN an NSN is compared with)."""
    twin = copy.deepcopy(dict(model))
    twin["conv"] = {"kind": "plain"}
    return twin


def is_similarity_parameter(name: str) -> bool:
    """True for a static NSL layer's similarity matrix ``M`` (exempt from weight decay)."""
    return name == "M" or name.endswith(".M")


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """SGD groups: weight decay on every parameter except the similarity matrices ``M``.

    ``M`` is regularised by :func:`fewshot_nsl.nn.similarity_penalty` instead (method doc §1:
    the authors put 5e-4 weight decay on W and ``l2_regularizer(5e-3)``, i.e.
    ``2.5e-3 * sum(M^2)``, on the static full M).
    """
    decayed, similarity = [], []
    for name, parameter in model.named_parameters():
        if parameter.requires_grad:
            (similarity if is_similarity_parameter(name) else decayed).append(parameter)
    groups = [{"params": decayed, "weight_decay": weight_decay}]
    if similarity:
        groups.append({"params": similarity, "weight_decay": 0.0})
    return groups


def count_parameters(model: nn.Module) -> int:
    """Number of scalar parameters (learned ones; buffers such as BN statistics excluded)."""
    return sum(p.numel() for p in model.parameters())
