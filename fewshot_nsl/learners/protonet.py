"""Prototypical Networks (Snell, Swersky & Zemel, NeurIPS 2017) on any backbone."""

from __future__ import annotations

import torch
from torch import nn

from episodes import Episode
from fewshot_nsl.learners.base import Learner, check_common_options, similarity_penalty_term
from fewshot_nsl.learners.registry import register_learner


@register_learner("protonet")
class ProtoNet(Learner):
    """Prototypical Networks: logits are minus squared Euclidean distances to class means.

    ``adapt`` embeds the support set and averages each class's features into a prototype
    ``c_n`` (shape ``(way, D)``); ``predict`` returns ``-‖f(x) − c_n‖²`` (shape
    ``(N*Q, way)``). BatchNorm follows the module's train/eval mode as usual.

    Args:
        backbone: images ``(B, C, H, W)`` → features ``(B, D)``.
        way: classes per episode (checked against every episode).
        similarity_penalty: weight of ``fewshot_nsl.nn.similarity_penalty`` on the backbone's
            NSL layers, added to :meth:`meta_loss` (0 disables it).
    """

    #: BatchNorm follows the module's train/eval mode (batch statistics and running-average
    #: updates in meta-training, running statistics in evaluation); stamped into results.
    bn = "module"

    def __init__(self, backbone: nn.Module, way: int, *, similarity_penalty: float = 0.0) -> None:
        super().__init__()
        check_common_options(way, similarity_penalty)
        self.backbone = backbone
        self.way = way
        self.similarity_penalty = float(similarity_penalty)

    def adapt(self, support_x: torch.Tensor, support_y: torch.Tensor, way: int) -> torch.Tensor:
        """Prototypes ``(way, D)``: the mean support feature of each class ``0..way-1``."""
        if way != self.way:
            raise ValueError(f"episode way={way} but this learner was built for way={self.way}")
        counts = torch.bincount(support_y, minlength=way)
        if counts.numel() != way or bool((counts == 0).any()):
            raise ValueError(f"support_y must hold every label 0..{way - 1} at least once, got "
                             f"counts {counts.tolist()}")
        features = self.backbone(support_x)
        sums = features.new_zeros(way, features.shape[1]).index_add_(0, support_y, features)
        return sums / counts.unsqueeze(1).to(features.dtype)

    def predict(self, state: torch.Tensor, query_x: torch.Tensor) -> torch.Tensor:
        """``-‖f(query) − prototype‖²`` of shape ``(N*Q, way)``."""
        features = self.backbone(query_x)
        return -torch.cdist(features, state).pow(2)

    def meta_loss(self, episode: Episode) -> tuple[torch.Tensor, torch.Tensor]:
        """Query cross-entropy on the distance logits (+ similarity penalty), accuracy."""
        loss, accuracy = super().meta_loss(episode)
        return loss + similarity_penalty_term(self.backbone, self.similarity_penalty), accuracy

    def extra_repr(self) -> str:
        return f"way={self.way}, similarity_penalty={self.similarity_penalty}"
