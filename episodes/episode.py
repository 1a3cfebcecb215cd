"""The unit of few-shot data: one N-way K-shot task."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch

from episodes.transforms import to_float_normalized


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

    A sampler with ``output="uint8"`` gives ``support_x``/``query_x`` as the stored uint8
    pixels ``(N*K, H, W, C)``; :meth:`to_float` converts them on the training device.
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

    @property
    def is_uint8(self) -> bool:
        """True when the images are raw uint8 ``(n, H, W, C)`` pixels (``output="uint8"``)."""
        return self.support_x.dtype == torch.uint8

    def to_float(
        self,
        mean: Sequence[float],
        std: Sequence[float],
        device: torch.device | str | None = None,
        non_blocking: bool = True,
    ) -> Episode:
        """The episode on ``device`` with float32 ``(n, C, H, W)`` images ``(x/255 - mean) /
        std``, converted there (pass ``split.normalization``); float episodes just move."""
        if not self.is_uint8:
            return self.to(device, non_blocking) if device is not None else self
        # Each side on its own: elementwise, so the same values as one joint conversion,
        # without first copying support and query into one host buffer.
        support_x, query_x = (
            to_float_normalized(pixels, mean, std, device, non_blocking)
            for pixels in (self.support_x, self.query_x)
        )
        target = support_x.device
        return replace(
            self,
            support_x=support_x,
            query_x=query_x,
            support_y=self.support_y.to(target, non_blocking=non_blocking),
            query_y=self.query_y.to(target, non_blocking=non_blocking),
        )
