"""Prototypical Networks (Snell, Swersky & Zemel, NeurIPS 2017) on any backbone."""

from __future__ import annotations

import torch
from torch import nn

from episodes import Episode
from fewshot_nsl.learners.base import Learner, check_common_options, similarity_penalty_term
from fewshot_nsl.learners.registry import register_learner


def class_prototypes(features: torch.Tensor, labels: torch.Tensor, way: int) -> torch.Tensor:
    """Prototypes ``(way, D)``: the mean of the ``features`` ``(B, D)`` of each class
    ``0..way-1`` (``labels`` ``(B,)``); ``ValueError`` when a class has no example."""
    counts = torch.bincount(labels, minlength=way)
    if counts.numel() != way or bool((counts == 0).any()):
        raise ValueError(
            f"support_y must hold every label 0..{way - 1} at least once, got "
            f"counts {counts.tolist()}"
        )
    sums = features.new_zeros(way, features.shape[1]).index_add_(0, labels, features)
    return sums / counts.unsqueeze(1).to(features.dtype)


@register_learner("protonet")
class ProtoNet(Learner):
    """Prototypical Networks: logits are minus squared Euclidean distances to class means.

    ``adapt`` embeds the support set and averages each class's features into a prototype
    ``c_n`` (shape ``(way, D)``); ``predict`` returns ``-‖f(x) − c_n‖²`` (shape
    ``(N*Q, way)``). BatchNorm follows the module's train/eval mode as usual. ProtoNet has no
    way-sized parameter: it adapts to episodes of any way (the reference trains with more ways
    than it tests); ``way`` is the meta-training way, kept for the record.

    Args:
        backbone: images ``(B, C, H, W)`` → features ``(B, D)``.
        way: classes per meta-training episode.
        similarity_penalty: weight of ``fewshot_nsl.nn.similarity_penalty`` on the backbone's
            NSL layers, added to :meth:`meta_loss` (0 disables it).
        embed_together: in :meth:`meta_loss`, pass support and query through the backbone as
            one batch (jakesnell/prototypical-networks ``Protonet.loss``: one BatchNorm batch
            statistic over both) instead of two batches. In evaluation mode BatchNorm uses its
            running statistics, so both give the same logits there.
    """

    #: BatchNorm follows the module's train/eval mode (batch statistics and running-average
    #: updates in meta-training, running statistics in evaluation); stamped into results.
    bn = "module"
    #: No way-sized parameter: tests at any way (``episodes.test_way``).
    any_way = True

    def __init__(
        self,
        backbone: nn.Module,
        way: int,
        *,
        similarity_penalty: float = 0.0,
        embed_together: bool = False,
    ) -> None:
        super().__init__()
        check_common_options(way, similarity_penalty)
        self.backbone = backbone
        self.way = way
        self.similarity_penalty = float(similarity_penalty)
        self.embed_together = bool(embed_together)

    def adapt(self, support_x: torch.Tensor, support_y: torch.Tensor, way: int) -> torch.Tensor:
        """Prototypes ``(way, D)``: the mean support feature of each class ``0..way-1``."""
        return class_prototypes(self.backbone(support_x), support_y, way)

    def predict(self, state: torch.Tensor, query_x: torch.Tensor) -> torch.Tensor:
        """``-‖f(query) − prototype‖²`` of shape ``(N*Q, way)``."""
        return self._logits(self.backbone(query_x), state)

    @staticmethod
    def _logits(query_features: torch.Tensor, prototypes: torch.Tensor) -> torch.Tensor:
        return -torch.cdist(query_features, prototypes).pow(2)

    def meta_loss(self, episode: Episode) -> tuple[torch.Tensor, torch.Tensor]:
        """Query cross-entropy on the distance logits (+ similarity penalty), accuracy."""
        if self.embed_together:
            support = episode.support_x.shape[0]
            features = self.backbone(torch.cat([episode.support_x, episode.query_x]))
            prototypes = class_prototypes(features[:support], episode.support_y, episode.way)
            logits = self._logits(features[support:], prototypes)
            loss = nn.functional.cross_entropy(logits, episode.query_y)
            accuracy = (logits.argmax(dim=-1) == episode.query_y).float().mean().detach()
        else:
            loss, accuracy = super().meta_loss(episode)
        return loss + similarity_penalty_term(self.backbone, self.similarity_penalty), accuracy

    def extra_repr(self) -> str:
        return (
            f"way={self.way}, similarity_penalty={self.similarity_penalty}, "
            f"embed_together={self.embed_together}"
        )
