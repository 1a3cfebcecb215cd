"""How hard is a few-shot dataset? Two quick reference learners, for tests and docs.

* :func:`nearest_neighbour_accuracy`: each query takes the label of its nearest support image
  in raw (normalised) pixel space, no learning at all.
* :func:`train_protonet`: a tiny Conv-4 prototypical network (Snell et al., 2017) meta-trained
  for a few hundred episodes on CPU, then scored on held-out episodes.

These are yardsticks for the data (e.g. "the synthetic glyphs are learnable but not trivial"),
not the project's learners, which live in ``fewshot_nsl`` (``episodes`` must not import it).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn

from episodes.episode import Episode

__all__ = ["nearest_neighbour_accuracy", "train_protonet", "ProtoNetReport", "conv4"]


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


def conv4(in_channels: int, hidden: int = 32) -> nn.Sequential:
    """Conv-4: four [3×3 conv, BatchNorm, ReLU, 2×2 max-pool] blocks, then flatten."""
    layers: list[nn.Module] = []
    for block in range(4):
        layers += [
            nn.Conv2d(in_channels if block == 0 else hidden, hidden, 3, padding=1),
            nn.BatchNorm2d(hidden),
            nn.ReLU(),
            nn.MaxPool2d(2, ceil_mode=True),
        ]
    return nn.Sequential(*layers, nn.Flatten())


def _protonet_logits(encoder: nn.Module, episode: Episode) -> torch.Tensor:
    """Negative squared distances ``(N*Q, way)`` from query embeddings to class prototypes."""
    features = encoder(torch.cat([episode.support_x, episode.query_x]))
    support, query = features[: len(episode.support_y)], features[len(episode.support_y) :]
    prototypes = torch.zeros(episode.way, support.shape[1]).index_add_(
        0, episode.support_y, support
    ) / torch.bincount(episode.support_y, minlength=episode.way).unsqueeze(1)
    return -torch.cdist(query, prototypes).square()


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
    hidden: int = 32,
    lr: float = 1e-3,
    seed: int = 0,
) -> ProtoNetReport:
    """Meta-train a Conv-4 ProtoNet with Adam on ``train_episodes``; score ``test_episodes``."""
    torch.manual_seed(seed)
    encoder = conv4(in_channels, hidden)
    test_episodes = list(test_episodes)

    def evaluate() -> float:
        encoder.eval()
        with torch.no_grad():
            scores = [
                (_protonet_logits(encoder, e).argmax(1) == e.query_y).float().mean().item()
                for e in test_episodes
            ]
        encoder.train()
        return sum(scores) / len(scores)

    untrained = evaluate()
    optimiser = torch.optim.Adam(encoder.parameters(), lr=lr)
    recent: list[float] = []
    for episode in train_episodes:
        logits = _protonet_logits(encoder, episode)
        loss = nn.functional.cross_entropy(logits, episode.query_y)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        recent = (recent + [(logits.argmax(1) == episode.query_y).float().mean().item()])[-50:]
    return ProtoNetReport(
        untrained_accuracy=untrained,
        test_accuracy=evaluate(),
        train_accuracy_last=sum(recent) / max(len(recent), 1),
    )
