"""The unit of few-shot data: one N-way K-shot task."""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch


@dataclass(frozen=True)
class Episode:
    """One N-way K-shot classification task.

    Shapes (``N = way``, ``K = shot``, ``Q = query`` per class, images ``C×H×W``):

    * ``support_x``: ``(N*K, C, H, W)`` float32, ``support_y``: ``(N*K,)`` int64 in ``0..N-1``
    * ``query_x``: ``(N*Q, C, H, W)`` float32, ``query_y``: ``(N*Q,)`` int64 in ``0..N-1``
    * ``classes``: ``(N,)`` int64, the dataset-split class index behind episode label ``l``
      is ``classes[l]``
    * ``support_indices`` / ``query_indices``: ``(N*K,)`` / ``(N*Q,)`` int64 row indices of
      the images in their dataset split, so the task can be stored in a manifest and replayed.
    """

    support_x: torch.Tensor
    support_y: torch.Tensor
    query_x: torch.Tensor
    query_y: torch.Tensor
    classes: torch.Tensor
    support_indices: torch.Tensor
    query_indices: torch.Tensor
    way: int
    shot: int
    query: int

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Episode:
        """The same episode with its image and label tensors on ``device``."""
        move = {
            name: getattr(self, name).to(device, non_blocking=non_blocking)
            for name in ("support_x", "support_y", "query_x", "query_y")
        }
        return replace(self, **move)
