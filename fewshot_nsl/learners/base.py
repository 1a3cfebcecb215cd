"""The one protocol every few-shot learner implements (the runner never looks further), and the
helpers every learner shares."""

from __future__ import annotations

import warnings
from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from episodes import Episode


class Learner(nn.Module, ABC):
    """A few-shot learner: adapts to a support set, then classifies queries.

    Subclasses implement :meth:`adapt` and :meth:`predict`; :meth:`meta_loss` (the quantity
    the outer optimiser minimises for one episode) defaults to the query cross-entropy after
    adaptation. ``state`` is whatever a learner needs between the two calls (fast weights for
    MAML, prototypes for ProtoNet) and is opaque to the runner.
    """

    #: Whether :meth:`adapt` accepts episodes of any way, not only the meta-training way (no
    #: way-sized parameter): then ``episodes.test_way`` may differ from ``episodes.way``.
    any_way: bool = False

    @abstractmethod
    def adapt(self, support_x: torch.Tensor, support_y: torch.Tensor, way: int) -> Any:
        """Adapt to a labelled support set; return the task state."""

    @abstractmethod
    def predict(self, state: Any, query_x: torch.Tensor) -> torch.Tensor:
        """Logits ``(num_query, way)`` for the query images under the adapted ``state``."""

    def meta_loss(self, episode: Episode) -> tuple[torch.Tensor, torch.Tensor]:
        """Query loss (differentiable w.r.t. the meta-parameters) and query accuracy."""
        state = self.adapt(episode.support_x, episode.support_y, episode.way)
        logits = self.predict(state, episode.query_x)
        loss = nn.functional.cross_entropy(logits, episode.query_y)
        accuracy = (logits.argmax(dim=-1) == episode.query_y).float().mean()
        return loss, accuracy.detach()

    def meta_loss_batch(
        self, episodes: Sequence[Episode]
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Mean :meth:`meta_loss` and accuracy of a meta-batch with every task computed at once
        (``train.meta_batch: vectorised``), or ``None`` where this learner has no vectorised
        form for these episodes: the caller then runs :meth:`meta_loss` task by task, the
        reference. This default has none (one warning says so)."""
        warn_sequential_once(f"{type(self).__name__} has no vectorised meta-batch")
        return None


#: Reasons already reported by :func:`warn_sequential_once` in this process.
SEQUENTIAL_REASONS_WARNED: set[str] = set()


def warn_sequential_once(reason: str) -> None:
    """Warn that a meta-batch asked to run vectorised runs task by task, once per reason."""
    if reason not in SEQUENTIAL_REASONS_WARNED:
        SEQUENTIAL_REASONS_WARNED.add(reason)
        warnings.warn(
            f"train.meta_batch=vectorised: running the tasks sequentially ({reason})",
            stacklevel=3,
        )


def check_common_options(way: object, similarity_penalty: object) -> None:
    """Validate the options every learner shares (``ValueError`` naming the bad one)."""
    if not isinstance(way, int) or isinstance(way, bool) or way < 2:
        raise ValueError(f"way must be an int >= 2, got {way!r}")
    if not isinstance(similarity_penalty, (int, float)) or similarity_penalty < 0:
        raise ValueError(f"similarity_penalty must be a number >= 0, got {similarity_penalty!r}")


def similarity_penalty_term(model: nn.Module, weight: float) -> torch.Tensor | float:
    """``weight · fewshot_nsl.nn.similarity_penalty(model)``, or 0.0 when ``weight == 0``."""
    if weight == 0:
        return 0.0
    from fewshot_nsl.nn import similarity_penalty

    return weight * similarity_penalty(model)
