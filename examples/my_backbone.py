"""A custom backbone plugged into fewshot-nsl by import path (see docs/learners.md).

A plug-in is any callable ``build(*, conv_factory, in_channels, **options) -> nn.Module``
whose module maps images ``(B, C, H, W)`` to features ``(B, D)`` and has ``out_features = D``.
Building every convolution with ``conv_factory`` (instead of ``nn.Conv2d``) is what lets the
config's ``model.conv`` turn them into static or dynamic NSL layers.

Run it (from the repository root)::

    PYTHONPATH=examples python examples/my_backbone.py

which meta-trains a static NSN on this backbone for a few steps on random 5-way 1-shot tasks.
In a config the same backbone is ``model: {backbone: "my_backbone:build", ...}`` with the
``examples`` folder on ``PYTHONPATH``.
"""

from __future__ import annotations

import torch
from torch import nn

from fewshot_nsl.backbones import ConvFactoryLike


class TinyNet(nn.Module):
    """Two [conv3×3 → BatchNorm → ReLU → 2×2 max-pool] blocks and global average pooling."""

    def __init__(self, conv_factory: ConvFactoryLike, in_channels: int, width: int = 16) -> None:
        super().__init__()
        self.features = nn.Sequential(
            conv_factory(in_channels, width, 3, padding=1),
            nn.BatchNorm2d(width),
            nn.ReLU(),
            nn.MaxPool2d(2),
            conv_factory(width, 2 * width, 3, padding=1),
            nn.BatchNorm2d(2 * width),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.out_features = 2 * width

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """``(B, C, H, W)`` → ``(B, 2 * width)``."""
        return self.features(images).mean(dim=(2, 3))


def build(*, conv_factory: ConvFactoryLike, in_channels: int, width: int = 16) -> TinyNet:
    """The plug-in entry point: ``model.backbone = "my_backbone:build"``."""
    return TinyNet(conv_factory, in_channels, width=width)


def main() -> None:
    from episodes import Episode
    from fewshot_nsl.learners import build_learner

    torch.manual_seed(0)
    way, shot, query, size = 5, 1, 3, 16
    learner = build_learner(
        {"name": "static_nsn", "inner_steps": 2},
        {"backbone": "my_backbone:build", "backbone_options": {"width": 8}},
        in_channels=3,
        way=way,
    )
    optimizer = torch.optim.Adam(learner.parameters(), lr=1e-2)
    # One fixed random task: the meta-loss on it should fall within a few steps.
    labels = torch.arange(way)
    episode = Episode(
        support_x=torch.randn(way * shot, 3, size, size),
        support_y=labels.repeat_interleave(shot),
        query_x=torch.randn(way * query, 3, size, size),
        query_y=labels.repeat_interleave(query),
        classes=labels,
        support_indices=torch.arange(way * shot),
        query_indices=torch.arange(way * query),
        way=way,
        shot=shot,
        query=query,
    )
    for step in range(5):
        loss, accuracy = learner.meta_loss(episode)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        print(f"step {step}: meta-loss {loss.item():.4f}, query accuracy {accuracy.item():.2f}")


if __name__ == "__main__":
    main()
