"""How hard is a few-shot dataset? Two quick reference learners, for tests and docs.

* :func:`nearest_neighbour_accuracy`: each query takes the label of its nearest support image
  in raw (normalised) pixel space, no learning at all.
* :func:`train_protonet`: the toolkit's Conv-4 ProtoNet (Snell et al., 2017) meta-trained
  for a few hundred episodes on CPU, then scored on held-out episodes.

These are yardsticks for the data (e.g. "the synthetic glyphs are learnable but not trivial").
The ProtoNet and Conv-4 are the toolkit's own (``fewshot_nsl``); this file lives in scripts/
because ``episodes`` knows nothing of models. Used by scripts/bench_episodes.py and the tests.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch

from episodes.episode import Episode
from fewshot_nsl.backbones import build_backbone
from fewshot_nsl.learners.protonet import ProtoNet

__all__ = ["nearest_neighbour_accuracy", "train_protonet", "ProtoNetReport"]


def nearest_neighbour_accuracy(episodes: Iterable[Episode]) -> float:
    """Mean query accuracy of 1-nearest-neighbour (Euclidean, raw pixels) over ``episodes``."""
    correct, total = 0, 0
    for episode in episodes:
        support = episode.support_x.flatten(1)
        query = episode.query_x.flatten(1)
        nearest = torch.cdist(query, support).argmin(dim=1)
        correct += int((episode.support_y[nearest] == episode.query_y).sum())
        total += len(episode.query_y)
    return correct / max(total, 1)


@dataclass
class ProtoNetReport:
    """Accuracies of :func:`train_protonet`: before training, after, and the training curve."""

    untrained_accuracy: float
    test_accuracy: float
    train_accuracy_last: float


def train_protonet(
    train_episodes: Iterable[Episode],
    test_episodes: Iterable[Episode],
    in_channels: int,
    image_size: int,
    filters: int = 32,
    lr: float = 1e-3,
    seed: int = 0,
) -> ProtoNetReport:
    """Meta-train the toolkit's Conv-4 ProtoNet with Adam on ``train_episodes`` (one episode
    per step); score ``test_episodes`` before and after."""
    torch.manual_seed(seed)
    test_episodes = list(test_episodes)
    backbone = build_backbone(
        "conv4", in_channels=in_channels, filters=filters, image_size=image_size
    )
    learner = None

    def evaluate() -> float:
        learner.eval()
        with torch.no_grad():
            scores = [float(learner.meta_loss(e)[1]) for e in test_episodes]
        learner.train()
        return sum(scores) / len(scores)

    recent: list[float] = []
    optimiser = torch.optim.Adam(backbone.parameters(), lr=lr)
    for episode in train_episodes:
        if learner is None:
            learner = ProtoNet(backbone, way=episode.way)
            untrained = evaluate()
        loss, accuracy = learner.meta_loss(episode)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        recent = (recent + [float(accuracy)])[-50:]
    if learner is None:
        raise ValueError("train_protonet: no training episodes")
    return ProtoNetReport(
        untrained_accuracy=untrained,
        test_accuracy=evaluate(),
        train_accuracy_last=sum(recent) / max(len(recent), 1),
    )
