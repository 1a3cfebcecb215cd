"""Memory held by the autograd graph, measurable on any device (CPU included).

A CPU process has no allocator counter like ``torch.cuda.max_memory_allocated``; what can be
measured honestly is the memory the autograd graph keeps alive for the backward pass, which
is what grows with MAML's inner steps (second order keeps every inner forward *and* backward
graph). :class:`SavedTensorMeter` sees every tensor saved for backward through
``torch.autograd.graph.saved_tensors_hooks`` and sums the sizes of the distinct storages that
are still referenced by a graph. It does not count temporaries freed during the forward pass,
parameters (excluded) nor allocator fragmentation, so it is a lower bound of the peak. Tensors
saved inside ``torch.utils.checkpoint`` regions are not seen (checkpoint discards them and
recomputes them in backward), which is exactly the saving checkpointing buys.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class StepMemory:
    """Memory after one inner step (``step`` counts from 1; 0 is "before the first step").

    ``saved_bytes``: bytes of distinct storages held by the autograd graph (any device).
    ``cuda_peak_bytes``: ``torch.cuda.max_memory_allocated`` since the meter started, or None
    when the model is not on CUDA.
    """

    step: int
    saved_bytes: int
    cuda_peak_bytes: int | None


class SavedTensorMeter:
    """Context manager counting the live bytes saved for backward (see module docstring)."""

    def __init__(self, exclude: Iterable[torch.Tensor] = (), device: torch.device | None = None):
        self._excluded = {t.untyped_storage().data_ptr() for t in exclude}
        self._saved: list[weakref.ref[torch.Tensor]] = []
        self._cuda = device is not None and device.type == "cuda"
        self._device = device
        self._hooks: Any = None

    def _pack(self, tensor: torch.Tensor) -> torch.Tensor:
        self._saved.append(weakref.ref(tensor))
        return tensor

    def __enter__(self) -> SavedTensorMeter:
        if self._cuda:
            torch.cuda.reset_peak_memory_stats(self._device)
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self._hooks.__exit__(*exc_info)

    def live_bytes(self) -> int:
        """Bytes of the distinct, still referenced, non-excluded storages saved so far."""
        sizes: dict[int, int] = {}
        for ref in self._saved:
            tensor = ref()
            if tensor is None:
                continue
            storage = tensor.untyped_storage()
            pointer = storage.data_ptr()
            if pointer not in self._excluded:
                sizes[pointer] = storage.nbytes()
        return sum(sizes.values())

    def record(self, step: int) -> StepMemory:
        """A :class:`StepMemory` for the current moment."""
        peak = torch.cuda.max_memory_allocated(self._device) if self._cuda else None
        return StepMemory(step=step, saved_bytes=self.live_bytes(), cuda_peak_bytes=peak)
